"""The Open Inference Protocol (KServe v2, as Triton serves it): server and model metadata, health, inference.

``GET /v2``, ``/v2/health/live|ready``; ``GET /v2/models/{name}[/versions/{v}]`` and its ``/ready``;
``POST /v2/models/{name}[/versions/{v}]/infer`` (JSON or binary tensor data, :mod:`.protocol`).
"""
from __future__ import annotations

import json

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.modalities.base import Modality
from edgexfer.runtime.service.core import ActiveModel, ServiceCore
from edgexfer.runtime.service.endpoint import read_body, route
from edgexfer.runtime.service.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    Tensor,
    encode_infer_response,
    parse_infer_request,
)
from edgexfer.runtime.service.samples import decode_all, record

INFER = "/v2/models/{name}/infer"
OUTPUTS = ("label", "probabilities", "features")


def model_named(core: ServiceCore, name: str, version: str | None = None) -> ActiveModel:
    """The active model if the path names it (and its active head, when a version is given); else 404."""
    model = core.model
    if name != model.name:
        raise ProtocolError(404, "unknown model", got=repr(name[:80]), expected=repr(model.name),
                            todo="GET /v2/models/" + model.name + " for its metadata")
    if version is not None and version != str(model.head_version):
        raise ProtocolError(404, f"model {name} version", got=repr(version[:20]),
                            expected=f"'{model.head_version}' (the active head)",
                            todo="leave the version out to use the active head")
    return model


def _path_model(request: Request) -> ActiveModel:
    return model_named(request.app.state.core, request.path_params["name"], request.path_params.get("version"))


async def server_metadata(request: Request) -> Response:
    from edgexfer import __version__

    return JSONResponse({"name": "edgexfer", "version": __version__,
                         "extensions": ["binary_tensor_data", "model_repository_health"]})


async def live(request: Request) -> Response:
    return JSONResponse({"live": True})


async def ready(request: Request) -> Response:
    return JSONResponse({"ready": True})


async def model_metadata(request: Request) -> Response:
    model = _path_model(request)
    inputs = [dict(i) for i in model.input_modality.service_input().inputs]
    return JSONResponse({
        "name": model.name, "versions": [str(model.head_version)],
        "platform": f"edgexfer_{model.backend}",
        "inputs": inputs,
        "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                    {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.classes)]},
                    {"name": "features", "datatype": "FP32",
                     "shape": [-1, model.bundle.manifest.backbone.feature_dim]}],
        "parameters": {"classes": model.classes, "head_version": model.head_version, "modality": model.modality,
                       "precision": request.app.state.config.precision}})


async def model_ready(request: Request) -> Response:
    model = _path_model(request)
    return JSONResponse({"name": model.name, "ready": True})


async def infer(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    with core.incoming():
        return await _infer(request, core)


async def _infer(request: Request, core: ServiceCore) -> Response:
    _path_model(request)
    modality = core.model.input_modality  # the one this request's samples are decoded and run with
    req = parse_infer_request(await read_body(request), request.headers.get(HEADER_LENGTH))
    described = modality.service_input()
    if set(req.inputs) - {i["name"] for i in described.inputs} or len(req.inputs) != 1:
        raise ProtocolError(400, "inference inputs", got=sorted(req.inputs), expected=described.expected)
    wanted = list(req.outputs) or ["label", "probabilities"]
    bad = [n for n in wanted if n not in OUTPUTS]
    if bad:
        raise ProtocolError(400, "requested outputs", got=bad, expected="label, probabilities, features")
    tensor = next(iter(req.inputs.values()))
    items: list[bytes] | None = None
    if tensor.name == described.inputs[0]["name"]:  # encoded samples, one per element
        if tensor.datatype != "BYTES":
            raise ProtocolError(400, f"input '{tensor.name}' datatype", got=tensor.datatype, expected=described.datatype)
        items = list(tensor.data)
        values = await decode_all(core, modality, items)
    else:
        values = _batch_tensor(core, modality, tensor, described.inputs)
    result = await core.classify(values, modality, want_features="features" in wanted)
    await record(core, modality, result, items, values, "serve:v2")
    n = len(result.probabilities)
    labels = [result.classes[int(j)].encode() for j in np.argmax(result.probabilities, axis=1)]
    made = {"label": Tensor("label", "BYTES", [n], labels),
            "probabilities": Tensor("probabilities", "FP32", [n, len(result.classes)], result.probabilities),
            "features": Tensor("features", "FP32", list(result.features.shape), result.features)}
    content, headers = encode_infer_response(
        core.model.name, str(result.head_version), req, [made[w] for w in wanted],
        {"head_version": result.head_version, "classes": json.dumps(result.classes),
         "backend": result.backend, "precision": result.precision})
    headers["X-Edgexfer-Head"] = str(result.head_version)
    return Response(content, media_type="application/json" if HEADER_LENGTH not in headers
                    else "application/octet-stream", headers=headers)


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


def routes() -> list[Route]:
    return [
        route("/v2", server_metadata, ["GET"]),
        route("/v2/health/live", live, ["GET"]),
        route("/v2/health/ready", ready, ["GET"]),
        route("/v2/models/{name}", model_metadata, ["GET"]),
        route("/v2/models/{name}/ready", model_ready, ["GET"]),
        route("/v2/models/{name}/versions/{version}", model_metadata, ["GET"], template="/v2/models/{name}"),
        route("/v2/models/{name}/versions/{version}/ready", model_ready, ["GET"], template="/v2/models/{name}/ready"),
        route(INFER, infer, ["POST"]),
        route("/v2/models/{name}/versions/{version}/infer", infer, ["POST"], template=INFER),
    ]
