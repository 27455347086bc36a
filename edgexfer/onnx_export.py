"""Export a backbone to ``backbone.onnx`` (the bundle contract).

Images (:func:`export_backbone`, a :class:`~edgexfer.pixel_model.PixelBackbone`): uint8 NHWC input
``image`` with a dynamic batch. Text (:func:`export_text_backbone`, a
:class:`~edgexfer.backbones.minilm.MiniLM`): int64 inputs ``input_ids`` and ``attention_mask``
``[batch, sequence]``, both dynamic. Both: float32 output ``features``, opset 17, checked with
``onnx.checker``, simplified with onnxslim (BatchNorm and padding folded into the convolutions), and
every weight inside the one file.
"""
from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path

from edgexfer.runtime.errors import ValidationError
from edgexfer.runtime.fsutil import write_atomic
from edgexfer.runtime.optional import require

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "features"
#: inputs of a text backbone, in this order
TEXT_INPUTS = ("input_ids", "attention_mask")


def export_backbone(pixel_model, input_size: tuple[int, int], path: Path) -> Path:
    """Trace ``pixel_model`` (eval mode) and write the simplified ONNX model to ``path`` atomically."""
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    pixel_model = pixel_model.eval()
    example = torch.zeros((2, *input_size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _no_attention_fastpath(torch):
        # the TorchScript exporter is the one that needs no extra packages; its deprecation notice is noise here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pixel_model, (example,), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    model = finish_model(onnx.load_from_string(buffer.getvalue()))
    problems = check_contract(model, input_size)
    if problems:
        raise ValidationError("exported backbone.onnx breaks the bundle contract", problems,
                              todo="report this as a bug with the backbone name")
    write_atomic(path, model.SerializeToString())
    return path


def finish_model(model):
    """Simplify with onnxslim (BatchNorm and padding folded), name the producer, check the whole model."""
    onnx = require("onnx", "ONNX export")
    onnxslim = require("onnxslim", "ONNX export")
    model = onnxslim.slim(model)
    model.producer_name = "edgexfer"
    onnx.checker.check_model(model, full_check=True)
    return model


@contextmanager
def _no_attention_fastpath(torch):
    """nn.TransformerEncoder(Layer) and nn.MultiheadAttention take a fused kernel in eval mode under no_grad
    (``aten::_transformer_encoder_layer_fwd``) that has no ONNX form; the exporter must trace the plain ops."""
    mha = torch.backends.mha
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def check_contract(model, input_size: tuple[int, int]) -> list[str]:
    """Differences between ``model`` and the backbone.onnx contract of docs/architecture.md, one line each."""
    onnx = require("onnx", "ONNX checks")
    problems = []
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx") != OPSET:
        problems.append(f"- opset: {opsets.get('ai.onnx')} (expected {OPSET})")
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        problems.append(f"- io: {len(model.graph.input)} inputs, {len(model.graph.output)} outputs (expected 1 and 1)")
        return problems
    inp, out = model.graph.input[0], model.graph.output[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    if inp.name != INPUT_NAME or inp.type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        problems.append(f"- {inp.name}: type {inp.type.tensor_type.elem_type} (expected uint8 input '{INPUT_NAME}')")
    if len(dims) != 4 or not isinstance(dims[0], str) or dims[1:] != [*input_size, 3]:
        problems.append(f"- {inp.name}: shape {dims} (expected [batch, {input_size[0]}, {input_size[1]}, 3])")
    if out.name != OUTPUT_NAME or out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        problems.append(f"- {out.name}: (expected float32 output '{OUTPUT_NAME}')")
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            problems.append(f"- {init.name}: stored as external data (expected inside the file)")
    return problems


def export_text_backbone(model, path: str | Path, feature_dim: int) -> Path:
    """Trace a text backbone (eval mode) and write the simplified ONNX model to ``path`` atomically.

    The example the tracer sees has two rows of 16 tokens, one of them padded, so the mask arithmetic is
    traced as it runs; batch and sequence length stay dynamic (checked by :func:`check_text_contract`).
    """
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    onnxslim = require("onnxslim", "ONNX export")
    model = model.eval()
    length = 16
    ids = torch.full((2, length), 1000, dtype=torch.int64)
    ids[:, 0], ids[0, -1], ids[1, 9] = 101, 102, 102  # [CLS] ... [SEP]
    mask = torch.ones((2, length), dtype=torch.int64)
    ids[1, 10:], mask[1, 10:] = 0, 0  # the second row padded after its [SEP]
    dynamic = {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (ids, mask), buffer, dynamo=False, opset_version=OPSET,
            input_names=list(TEXT_INPUTS), output_names=[OUTPUT_NAME],
            dynamic_axes={**{name: dynamic for name in TEXT_INPUTS}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    onnx_model = onnxslim.slim(onnx.load_from_string(buffer.getvalue()))
    onnx_model.producer_name = "edgexfer"
    onnx.checker.check_model(onnx_model, full_check=True)
    problems = check_text_contract(onnx_model, feature_dim)
    if problems:
        raise ValidationError("exported text backbone.onnx breaks the bundle contract", problems,
                              todo="report this as a bug with the backbone name")
    path = Path(path)
    write_atomic(path, onnx_model.SerializeToString())
    return path


def check_text_contract(model, feature_dim: int) -> list[str]:
    """Differences between ``model`` and the text backbone.onnx contract, one line each."""
    onnx = require("onnx", "ONNX checks")
    problems = []
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    if opsets.get("ai.onnx") != OPSET:
        problems.append(f"- opset: {opsets.get('ai.onnx')} (expected {OPSET})")
    names = tuple(i.name for i in model.graph.input)
    if names != TEXT_INPUTS or len(model.graph.output) != 1:
        problems.append(f"- io: inputs {list(names)}, {len(model.graph.output)} outputs "
                        f"(expected {list(TEXT_INPUTS)} and 1)")
        return problems
    for inp in model.graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        if inp.type.tensor_type.elem_type != onnx.TensorProto.INT64:
            problems.append(f"- {inp.name}: type {inp.type.tensor_type.elem_type} (expected int64)")
        if len(dims) != 2 or not all(isinstance(d, str) for d in dims):
            problems.append(f"- {inp.name}: shape {dims} (expected [batch, sequence], both dynamic)")
    out = model.graph.output[0]
    dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    if out.name != OUTPUT_NAME or out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        problems.append(f"- {out.name}: (expected float32 output '{OUTPUT_NAME}')")
    if len(dims) != 2 or not isinstance(dims[0], str) or dims[1] != feature_dim:
        problems.append(f"- {out.name}: shape {dims} (expected [batch, {feature_dim}])")
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            problems.append(f"- {init.name}: stored as external data (expected inside the file)")
    return problems


def text_parity(model, onnx_path: Path, batches) -> dict:
    """Features of ``backbone.onnx`` (ONNX Runtime, fp32) against PyTorch on token batches, judged by
    the fp32 tolerance of :mod:`edgexfer.runtime.compare` (max |diff| <= 1e-4 + 1e-4·|ref|).

    ``batches``: objects with ``input_ids`` and ``attention_mask`` (int64 ``[N, L]``, e.g. the runtime's
    ``TokenBatch``); use several batch sizes and lengths, the engine's shapes are dynamic. Returns the
    figures (``max_abs_diff`` over every batch, per-batch shapes); raises a :class:`ValidationError`
    listing every failing batch.
    """
    import numpy as np

    torch = require("torch", "checking an ONNX export against PyTorch")
    from edgexfer.runtime.backends.registry import open_reference
    from edgexfer.runtime.compare import Output, compare, tolerance_for

    model = model.eval()
    tol = tolerance_for("fp32")
    outputs = []
    with open_reference(onnx_path) as engine, torch.no_grad():
        for i, batch in enumerate(batches):
            ids, mask = np.asarray(batch.input_ids), np.asarray(batch.attention_mask)
            ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            new = engine.run({"input_ids": ids, "attention_mask": mask})
            outputs.append(Output(f"features[{i}] {ids.shape[0]}x{ids.shape[1]}", ref, new))
    result = compare(outputs, tol, "text parity")
    report = {"batches": [list(np.asarray(b.input_ids).shape) for b in batches],
              "max_abs_diff": max(f["max_abs_diff"] for f in result.outputs.values()),
              "min_cosine": min(f["min_cosine"] for f in result.outputs.values()),
              "tolerance": tol.to_dict(), "passed": result.passed}
    result.raise_if_failed("text backbone.onnx does not match PyTorch",
                           todo="report this as a bug; the bundle was not written")
    return report
