"""One Open Inference Protocol request, whichever transport brought it (HTTP :mod:`.routes_v2`, gRPC :mod:`.grpc_service`).

A transport parses its wire format into :class:`~edgexfer.runtime.service.protocol.Tensor` inputs and the
names of the outputs asked for, calls :func:`infer`, and encodes the :class:`Answer`. Everything between is
here, once: which inputs the active modality takes, decoding (in worker threads), the shared dynamic
batcher (``ServiceCore.classify``, so requests of both transports share batches), the review queue, the
prediction metrics and Triton's model statistics, and the classification extension (``class_count``).

What both transports answer about a model beyond inference is here too: :func:`model_config` and
:func:`model_statistics`, in Triton's JSON shapes (``GET /v2/models/{name}/config`` and ``/stats``; the gRPC
service parses the same documents into its messages).
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.modalities.base import Modality
from edgexfer.runtime.service.core import ActiveModel, Classified, ModelSwitched, ServiceCore
from edgexfer.runtime.service.protocol import ProtocolError, Tensor, brief
from edgexfer.runtime.service.samples import decode_all, record

OUTPUTS = ("label", "probabilities", "features")
#: the output whose top K the classification extension (``class_count``) gives
CLASSIFIED = "probabilities"
#: Triton's ``DataType`` names (model_config.proto) of the protocol's datatypes
CONFIG_TYPES = {"BYTES": "TYPE_STRING", "UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "INT64": "TYPE_INT64"}


@dataclass(frozen=True)
class Answer:
    """What an inference request is answered with, before a transport encodes it."""

    model_name: str
    model_version: str
    outputs: list[Tensor]  #: in the order asked for
    parameters: dict[str, Any]  #: head_version, classes (JSON text), backend, precision
    head_version: int


@dataclass
class _Timing:
    compute_input: float = 0.0
    queue: float = 0.0
    compute_infer: float = 0.0
    compute_output: float = 0.0


async def infer(core: ServiceCore, model: ActiveModel, inputs: Mapping[str, Tensor], outputs: Sequence[str],
                class_count: Mapping[str, Any], source: str, started: float) -> Answer:
    """Answer one request to ``model`` (the served model, :meth:`ServiceCore.served`, as the path or message
    named it). Raises :class:`ModelSwitched` if another bundle came in before its batch ran: ask again.

    ``outputs``: the names asked for (none: label and probabilities); ``class_count``: output name -> the
    top K asked of it; ``source``: the review queue's source; ``started``: ``time.perf_counter()`` when the
    request arrived (Triton's statistics time the whole request). Raises :class:`ProtocolError` (4xx).
    """
    timing = _Timing()
    try:
        answer, samples = await _answer(core, model, inputs, outputs, class_count, source, timing)
    except ModelSwitched:  # the transport asks again, for the new model: one request, counted once
        raise
    except Exception:
        core.metrics.statistics.request(model.name, str(model.head_version), ok=False, samples=0,
                                        total=time.perf_counter() - started)
        raise
    core.metrics.statistics.request(model.name, answer.model_version, ok=True, samples=samples,
                                    total=time.perf_counter() - started, queue=timing.queue,
                                    compute_input=timing.compute_input, compute_infer=timing.compute_infer,
                                    compute_output=timing.compute_output)
    return answer


async def _answer(core: ServiceCore, model: ActiveModel, inputs: Mapping[str, Tensor], outputs: Sequence[str],
                  class_count: Mapping[str, Any], source: str, timing: _Timing) -> tuple[Answer, int]:
    modality = model.input_modality  # the one this request's samples are decoded and run with
    described = modality.service_input()
    if set(inputs) - {i["name"] for i in described.inputs} or len(inputs) != 1:
        raise ProtocolError(400, "inference inputs", got=sorted(inputs)[:4], expected=described.expected)
    wanted = list(outputs) or ["label", "probabilities"]
    bad = [n for n in wanted if n not in OUTPUTS]
    if bad:
        raise ProtocolError(400, "requested outputs", got=bad[:4], expected="label, probabilities, features")
    top = _class_count(class_count, wanted)
    tensor = next(iter(inputs.values()))
    items: list[bytes] | None = None
    began = time.perf_counter()
    if tensor.name == described.inputs[0]["name"]:  # encoded samples, one per element
        if tensor.datatype != "BYTES":
            raise ProtocolError(400, f"input '{tensor.name}' datatype", got=tensor.datatype, expected=described.datatype)
        items = list(tensor.data)
        values: Any = await decode_all(core, modality, items)
    else:
        values = _batch_tensor(core, modality, tensor, described.inputs)
    timing.compute_input = time.perf_counter() - began
    began = time.perf_counter()
    result = await core.classify(values, modality, want_features="features" in wanted)
    waited = time.perf_counter() - began
    timing.compute_infer = min(result.engine_seconds, waited)
    timing.queue = waited - timing.compute_infer
    began = time.perf_counter()
    await record(core, modality, result, items, values, source)
    n = len(result.probabilities)
    labels = [result.classes[int(j)].encode() for j in np.argmax(result.probabilities, axis=1)]
    made = {"label": Tensor("label", "BYTES", [n], labels),
            "probabilities": Tensor("probabilities", "FP32", [n, len(result.classes)], result.probabilities),
            "features": Tensor("features", "FP32", list(result.features.shape), result.features)}
    if top is not None:
        made[CLASSIFIED] = classification(result, top)
    answer = Answer(model.name, str(result.head_version), [made[w] for w in wanted],
                    {"head_version": result.head_version, "classes": _json_list(result.classes),
                     "backend": result.backend, "precision": result.precision}, result.head_version)
    timing.compute_output = time.perf_counter() - began
    return answer, n


def _json_list(items: list[str]) -> str:
    return json.dumps(items)


def _class_count(asked: Mapping[str, Any], wanted: list[str]) -> int | None:
    """The top K of the classification extension, checked: only on ``probabilities``, a positive integer."""
    for name, k in asked.items():
        if name != CLASSIFIED or name not in wanted:
            raise ProtocolError(400, "class_count (parameters.classification) of an output", got=repr(name[:40]),
                                expected=f"only on the requested output '{CLASSIFIED}'")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1 << 31:
            raise ProtocolError(400, f"class_count of '{name}'", got=brief(k), expected="an integer >= 1")
        return k
    return None


def classification(result: Classified, k: int) -> Tensor:
    """Triton's classification extension: per sample the top ``k`` (at most the number of classes) as
    ``"score:index:label"`` strings, the score printed as C++ ``std::to_string`` prints a float."""
    k = min(k, len(result.classes))
    rows = []
    for row in result.probabilities:
        order = np.argsort(-row, kind="stable")[:k]
        rows.extend(f"{float(row[j]):f}:{int(j)}:{result.classes[j]}".encode() for j in order)
    return Tensor(CLASSIFIED, "BYTES", [len(result.probabilities), k], rows)


def _batch_tensor(core: ServiceCore, modality: Modality, tensor: Tensor, inputs: tuple[dict, ...]) -> np.ndarray:
    """Sample values sent as one tensor (an image model's ``pixels``), checked by the modality."""
    (spec,) = [i for i in inputs if i["name"] == tensor.name]
    if tensor.datatype != spec["datatype"]:
        raise ProtocolError(400, f"input '{tensor.name}' datatype", got=tensor.datatype, expected=spec["datatype"])
    rank = len(spec["shape"])
    if len(tensor.shape) == rank and tensor.shape[0] > core.config.max_images:
        raise ProtocolError(413, f"too many {modality.plural} in one request", got=tensor.shape[0],
                            expected=f"at most {core.config.max_images}")
    if len(tensor.shape) == rank and tensor.shape[0] == 0:
        raise ProtocolError(400, f"no {modality.noun} in the request", got=f"0 {modality.plural}",
                            expected="at least one")
    try:
        return modality.check_batch(np.asarray(tensor.data))
    except InputError as exc:
        raise ProtocolError(400, exc.what, got=exc.got, expected=exc.expected, todo=exc.todo) from None


# ------------------------------------------------------------------------------------------ about a model
def model_config(core: ServiceCore, model: ActiveModel) -> dict[str, Any]:
    """Triton's model configuration (model_config.proto, as Triton's HTTP ``/config`` writes it) of ``model``.

    ``max_batch_size`` is the most samples one request may carry; the batch dimension is left out of
    ``dims`` as Triton does for a batching model; ``dynamic_batching`` is the service's batcher.
    """
    inputs = [dict(i) for i in model.input_modality.service_input().inputs]
    metadata_outputs = [("label", "BYTES", []), ("probabilities", "FP32", [len(model.classes)]),
                        ("features", "FP32", [model.bundle.manifest.backbone.feature_dim])]
    return {
        "name": model.name, "platform": f"edgexfer_{model.backend}", "backend": "edgexfer",
        "max_batch_size": core.config.max_images,
        "input": [{"name": i["name"], "data_type": CONFIG_TYPES[i["datatype"]], "dims": list(i["shape"][1:])}
                  for i in inputs],
        "output": [{"name": n, "data_type": CONFIG_TYPES[t], "dims": dims} for n, t, dims in metadata_outputs],
        "dynamic_batching": {"preferred_batch_size": [core.config.max_batch],
                             "max_queue_delay_microseconds": int(core.config.max_queue_delay_ms * 1000)},
        "parameters": {"classes": {"string_value": _json_list(model.classes)},
                       "head_version": {"string_value": str(model.head_version)},
                       "modality": {"string_value": model.modality},
                       "precision": {"string_value": core.config.precision}},
    }


def model_statistics(core: ServiceCore, model: ActiveModel, version: str | None = None) -> dict[str, Any]:
    """Triton's ``{"model_stats": [...]}`` of ``model``: one entry per version (head) that answered since
    start, or the one asked for (an entry of zeros for the active head before its first request)."""
    return {"model_stats": core.metrics.statistics.report(model.name, version, served=str(model.head_version))}
