"""Export a :class:`~edgexfer.pixel_model.PixelBackbone` to ``backbone.onnx`` (the bundle contract).

uint8 NHWC input ``image`` with a dynamic batch, float32 output ``features``, opset 17, checked with
``onnx.checker``, simplified with onnxslim (BatchNorm and padding folded into the convolutions), and
every weight inside the one file.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from edgexfer.runtime.errors import ValidationError
from edgexfer.runtime.fsutil import write_atomic
from edgexfer.runtime.optional import require

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "features"


def export_backbone(pixel_model, input_size: tuple[int, int], path: Path) -> Path:
    """Trace ``pixel_model`` (eval mode) and write the simplified ONNX model to ``path`` atomically."""
    torch = require("torch", "ONNX export")
    onnx = require("onnx", "ONNX export")
    onnxslim = require("onnxslim", "ONNX export")
    pixel_model = pixel_model.eval()
    example = torch.zeros((2, *input_size, 3), dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is the one that needs no extra packages; its deprecation notice is noise here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pixel_model, (example,), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    model = onnxslim.slim(model)
    model.producer_name = "edgexfer"
    onnx.checker.check_model(model, full_check=True)
    problems = check_contract(model, input_size)
    if problems:
        raise ValidationError("exported backbone.onnx breaks the bundle contract", problems,
                              todo="report this as a bug with the backbone name")
    write_atomic(path, model.SerializeToString())
    return path


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
