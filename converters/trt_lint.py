"""Static lint of an ONNX graph against what a TensorRT version's ONNX parser supports.

Runs anywhere (no TensorRT needed): op types against the supported-operator table kept as data in
``converters/data/trt_supported_ops.json`` (transcribed from onnx-tensorrt's docs/operators.md, with
the commit), the opset, dynamic dimensions against the optimisation profiles, and data types (INT64 or
double initializers, INT64 network inputs on TensorRT 8, UINT8 tensors used anywhere but as a network
input consumed by Cast). Every problem names its node.

Transformers (text backbones) add checks of their own, for fp16 engines:

* a LayerNorm written out as ReduceMean/Sub/Pow/Sqrt/Div (exports before opset 17): TensorRT warns that
  such a layernorm after self-attention overflows in FP16 and can fuse only the LayerNormalization op of
  opset 17 (its INormalizationLayer, which keeps the statistics in FP32);
* float constants beyond the float16 range (an attention mask bias of float32's minimum, as BERT exports
  write it): they become -inf in fp16, and ``0 * -inf`` is NaN.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.optional import require

#: ONNX TensorProto data type numbers used below
_UINT8, _INT64, _DOUBLE, _FLOAT, _FLOAT16, _INT8, _INT32, _BOOL = 2, 7, 11, 1, 10, 3, 6, 9
_TYPE_NAMES = {1: "FLOAT32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE",
               16: "BFLOAT16"}


@lru_cache(maxsize=1)
def supported_ops() -> dict[str, Any]:
    """The operator tables, keyed by TensorRT version, with their source."""
    text = resources.files("edgexfer.converters").joinpath("data/trt_supported_ops.json").read_text()
    return json.loads(text)


def target_table(version: str | None = None) -> dict[str, Any]:
    data = supported_ops()
    version = version or data["default_target"]
    if version not in data["targets"]:
        raise InputError("TensorRT lint target", got=repr(version), expected=f"one of {', '.join(data['targets'])}",
                         todo="choose a TensorRT version the operator table covers")
    return data["targets"][version]


#: largest finite float16
FP16_MAX = 65504.0


# long: a list of independent checks over the same graph, each a short commented block that adds its
# problems; read in one place they are the checklist the module docstring describes
def lint_model(model, target: str | None = None, *, profiles: dict[str, Any] | None = None,
               precision: str | None = None) -> dict[str, Any]:
    """Problems of ``model`` (an ``onnx.ModelProto``) for TensorRT ``target``; see module docstring.

    ``profiles`` (input name -> (min, opt, max) shapes, :func:`edgexfer.converters.to_tensorrt.profile_shapes`)
    says which dynamic dimensions a profile covers; without it only the batch (first) dimension counts as
    covered. ``precision`` enables the fp16 checks.

    Each problem: ``{"severity": "error"|"warning"|"info", "check": ..., "node": ..., "op_type": ..., "message": ...}``.
    """
    onnx = require("onnx", "the TensorRT lint")
    table = target_table(target)
    ops = table["operators"]
    problems: list[dict[str, Any]] = []

    def add(severity: str, check: str, node: str, op_type: str, message: str) -> None:
        problems.append({"severity": severity, "check": check, "node": node, "op_type": op_type, "message": message})

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        add("error", "opset", "", "", "the model imports no default ONNX opset")
    else:
        if table["opset_max"] is not None and opset > table["opset_max"]:
            add("error", "opset", "", "", f"opset {opset} is newer than TensorRT {table['tensorrt']} supports "
                                          f"(max {table['opset_max']})")
        if table["opset_min"] is not None and opset < table["opset_min"]:
            add("error", "opset", "", "", f"opset {opset} is older than TensorRT {table['tensorrt']} supports "
                                          f"(min {table['opset_min']})")

    graph = model.graph
    from onnx import numpy_helper

    weights = {i.name: i for i in graph.initializer}
    restricted: dict[str, list[str]] = {}
    for node in graph.node:
        name = node.name or f"<unnamed {node.op_type}>"
        if node.domain not in ("", "ai.onnx"):
            add("error", "op_type", name, node.op_type,
                f"custom domain '{node.domain}' needs a TensorRT plugin")
            continue
        entry = ops.get(node.op_type)
        if entry is None:
            add("error", "op_type", name, node.op_type,
                f"{node.op_type} is not in the TensorRT {table['tensorrt']} operator table")
        elif not entry["supported"]:
            add("error", "op_type", name, node.op_type,
                f"{node.op_type} is not supported by TensorRT {table['tensorrt']}")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            # the table's restriction, checked: TensorRT quantization is symmetric
            zero_point = weights.get(node.input[2]) if len(node.input) > 2 else None
            if zero_point is not None and numpy_helper.to_array(zero_point).any():
                add("error", "quantization", name, node.op_type,
                    "non-zero zero point: TensorRT needs symmetric quantization (zero point 0)")
        elif entry.get("restrictions"):
            restricted.setdefault(node.op_type, []).append(name)
    for op_type, names in restricted.items():
        add("info", "restriction", names[0], op_type,
            f"{ops[op_type]['restrictions']} ({len(names)} node(s) of this type; not checked)")

    # Dynamic dimensions: each needs a min/opt/max range in the optimisation profile (the batch always has one).
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        is_input = value in graph.input
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value"):
                label = dim.dim_param or "?"
                if is_input:
                    covered = axis == 0 if profiles is None else value.name in profiles
                else:  # an output's shape follows from the inputs' shapes
                    covered = axis == 0 or profiles is not None
                what = "min/opt/max batch" if axis == 0 else f"min/opt/max of '{label}'"
                add("info" if covered else "warning", "dynamic_dim", value.name,
                    "graph input" if is_input else "graph output",
                    f"dimension {axis} is dynamic ('{label}')" + (
                        f": covered by the optimisation profile ({what})" if covered else
                        ": needs its own optimisation profile range"))

    # INT64 network inputs (a transformer's token ids and mask): TensorRT 10 binds them as INT64; TensorRT 8
    # has no INT64 tensors and the parser makes them INT32 inputs (exact for token ids < 2^31 and a 0/1 mask;
    # the runtime backend casts what it feeds)
    for value in graph.input:
        if value.type.tensor_type.elem_type == _INT64:
            if "INT64" in table["data_types"]:
                add("info", "dtype", value.name, "graph input",
                    f"INT64 input: bound as INT64 by TensorRT {table['tensorrt']}")
            else:
                add("warning", "dtype", value.name, "graph input",
                    f"INT64 input: TensorRT {table['tensorrt']} has no INT64 tensors and makes it an INT32 input "
                    "(exact for token ids and masks; edgexfer's tensorrt backend casts what it feeds)")

    if precision == "fp16":
        _fp16_transformer_checks(graph, numpy_helper, add)

    for init in graph.initializer:
        if init.data_type == _INT64:
            add("warning", "dtype", init.name, "initializer",
                "INT64 weights: TensorRT casts them down to INT32 where it can")
        elif init.data_type == _DOUBLE:
            add("warning", "dtype", init.name, "initializer",
                "DOUBLE weights: TensorRT casts them down to FLOAT32, clamping to +-FLT_MAX")

    # UINT8: network input/output only (TensorRT >= 9), and an input must go straight into Cast.
    uint8_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == _UINT8}
    for node in graph.node:
        for tensor in node.input:
            if tensor in uint8_inputs:
                name = node.name or f"<unnamed {node.op_type}>"
                if "UINT8" not in table["data_types"]:
                    add("error", "dtype", name, node.op_type,
                        f"reads UINT8 input '{tensor}': TensorRT {table['tensorrt']} has no UINT8 tensors")
                elif node.op_type != "Cast":
                    add("error", "dtype", name, node.op_type,
                        f"reads UINT8 input '{tensor}': TensorRT supports UINT8 only as network input/output, "
                        "so the first operation on it must be a Cast")
    errors = sum(p["severity"] == "error" for p in problems)
    return {"schema": "edgexfer.trt-lint/1", "tensorrt": table["tensorrt"], "opset": opset,
            "table_source": table["source"], "errors": errors,
            "warnings": sum(p["severity"] == "warning" for p in problems),
            "problems": problems, "onnx": onnx.__version__}


def _fp16_transformer_checks(graph, numpy_helper, add) -> None:
    """fp16 hazards of transformers: a LayerNorm written out in elementary ops, and constants fp16 cannot hold."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    for node in graph.node:
        # (x - mean)^2 -> ReduceMean: the variance of a decomposed LayerNorm
        if node.op_type == "Pow" and any(c.op_type == "ReduceMean" for c in consumers.get(node.output[0], [])):
            add("warning", "fp16_layernorm", node.name or "<unnamed Pow>", node.op_type,
                "LayerNorm written out as ReduceMean/Pow/Sqrt: in FP16 its variance overflows after self-attention; "
                "export with opset >= 17 (LayerNormalization, which TensorRT 8.6+ runs with FP32 statistics) "
                "or build with these layers in FP32 (--layerPrecisions, --precisionConstraints=obey)")
    constants = [(i.name, numpy_helper.to_array(i)) for i in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants.append((node.output[0], numpy_helper.to_array(attr.t)))
    for name, value in constants:
        if value.dtype.kind == "f" and value.size and float(abs(value).max()) > FP16_MAX:
            add("warning", "fp16_range", name, "constant",
                f"holds {float(abs(value).max()):.3g}, beyond float16's {FP16_MAX:g}: it becomes inf in an fp16 "
                "engine (an attention mask bias of float32's minimum turns 0 * -inf into NaN); use -1e4")


def cast_before_transpose(model) -> list[dict[str, str]]:
    """Rewrite ``uint8 input -> Transpose -> Cast`` as ``Cast -> Transpose`` in place (same values).

    The exported backbone transposes its uint8 NHWC input before casting it; TensorRT only accepts a
    uint8 network input that goes straight into a Cast. Returns what was rewritten (node names).
    """
    graph = model.graph
    uint8_inputs = {v.name for v in graph.input if v.type.tensor_type.elem_type == _UINT8}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    rewrites = []
    for transpose in list(graph.node):
        if transpose.op_type != "Transpose" or transpose.input[0] not in uint8_inputs:
            continue
        users = consumers.get(transpose.output[0], [])
        if len(users) != 1 or users[0].op_type != "Cast":
            continue
        cast = users[0]
        source, mid, out = transpose.input[0], transpose.output[0], cast.output[0]
        cast_out = f"{source}_as_float"
        # Cast(source) -> cast_out ; Transpose(cast_out) -> out: the same values, in the other order.
        cast.input[0], cast.output[0] = source, cast_out
        transpose.input[0], transpose.output[0] = cast_out, out
        nodes = list(graph.node)
        i, j = nodes.index(transpose), nodes.index(cast)
        nodes[i], nodes[j] = nodes[j], nodes[i]
        del graph.node[:]
        graph.node.extend(nodes)
        stale = [v for v in graph.value_info if v.name == mid]
        for v in stale:
            graph.value_info.remove(v)
        rewrites.append({"rewrite": "cast_before_transpose", "nodes": f"{cast.name}, {transpose.name}",
                         "why": "TensorRT takes a UINT8 network input only straight into a Cast"})
    return rewrites
