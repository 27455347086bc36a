"""Static lint of an ONNX graph against what a TensorRT version's ONNX parser supports.

Runs anywhere (no TensorRT needed): op types against the supported-operator table kept as data in
``converters/data/trt_supported_ops.json`` (transcribed from onnx-tensorrt's docs/operators.md, with
the commit), the opset, dynamic dimensions, and data types (INT64 or double initializers, UINT8
tensors used anywhere but as a network input consumed by Cast). Every problem names its node.
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


def lint_model(model, target: str | None = None) -> dict[str, Any]:
    """Problems of ``model`` (an ``onnx.ModelProto``) for TensorRT ``target``; see module docstring.

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

    # Dynamic dimensions: only the batch (first) dimension of inputs may be dynamic; it gets a profile.
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if not dim.HasField("dim_value"):
                severity = "info" if axis == 0 else "warning"
                label = dim.dim_param or "?"
                add(severity, "dynamic_dim", value.name, "graph input" if value in graph.input else "graph output",
                    f"dimension {axis} is dynamic ('{label}')" + (
                        ": covered by the optimisation profile (min/opt/max batch)" if axis == 0 else
                        ": needs its own optimisation profile range"))

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
