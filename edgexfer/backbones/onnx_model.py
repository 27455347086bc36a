"""Bring your own ONNX feature extractor: ``--backbone onnx:MODEL.onnx [--output NAME]`` (no torch).

The model has one float32 NCHW image input (normalised by ``--mean``/``--std``) and a features output
(``[N, D]``, ``[N, D, 1, 1]`` or a ``[N, C, H, W]`` map). The kit wraps it into its own ``backbone.onnx``
contract: uint8 NHWC ``image`` in (cast, transpose and normalisation inside the graph), the chosen output
pooled to ``features`` ``[N, D]``, dynamic batch, opset 17; the wrapped graph is checked against the original
on random images before it is written. The manifest records the original file's sha256. Frozen only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import file_sha256, write_atomic
from edgexfer.runtime.optional import require

ONNX_PREFIX = "onnx:"
RECORD_KEY = "onnx"
_NORMALISED = "edgexfer_normalised"


def is_onnx_spec(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(ONNX_PREFIX)


def _load(path: Path):
    onnx = require("onnx", "an onnx: backbone")
    if not path.is_file():
        raise InputError("--backbone onnx: file not found", got=str(path), expected="an existing .onnx file",
                         todo="check the path")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ...
        raise InputError("--backbone onnx: file is not a valid ONNX model", got=f"{path.name}: {type(exc).__name__}: "
                         f"{str(exc)[:120]}", expected="an ONNX model file", todo="export the model to ONNX again") from None
    return model


def _image_input(model, input_size: tuple[int, int]):
    """The one graph input that is not an initializer: float32 [batch, 3, H, W] with H, W = --input-size."""
    onnx = require("onnx", "an onnx: backbone")
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise InputError("onnx: backbone inputs", got=f"{len(inputs)} inputs ({', '.join(i.name for i in inputs)})",
                         expected="one float32 NCHW image input", todo="export a model with the image as its only input")
    inp = inputs[0]
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    ok = inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and len(dims) == 4 and dims[1] == 3
    if not ok or any(isinstance(d, int) and d and d != want for d, want in zip(dims[2:], input_size)):
        raise InputError("onnx: backbone input", got=f"{inp.name}: {dims}",
                         expected=f"float32 [batch, 3, {input_size[0]}, {input_size[1]}] (NCHW; --input-size H,W)",
                         todo="check --input-size, or export the model with an NCHW float input")
    return inp


def _output(model, name: str | None):
    outs = [o.name for o in model.graph.output]
    if name is None and len(outs) == 1:
        return outs[0]
    if name in outs:
        return name
    raise InputError("onnx: backbone output", got=f"--output {name!r}; outputs {', '.join(outs)}",
                     expected="--output naming one of the model's outputs", todo="pass --output NAME")


def _session(model_bytes: bytes):
    ort = require("onnxruntime", "an onnx: backbone")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def _pool(out: np.ndarray) -> np.ndarray:
    if out.ndim == 4:
        return out.mean(axis=(2, 3))
    if out.ndim == 2:
        return out
    raise InputError("onnx: backbone output is not poolable to [N, D]", got=f"shape {list(out.shape)}",
                     expected="[N, D], [N, D, 1, 1] or [N, C, H, W]", todo="pick another output with --output")


def _dynamic_batch(model, inp) -> None:
    """Make a fixed batch axis dynamic; whether the graph can take another batch is checked by running it."""
    dim = inp.type.tensor_type.shape.dim[0]
    if not dim.dim_param:
        dim.dim_param = "batch"
    for out in model.graph.output:
        shape = out.type.tensor_type.shape
        if shape.dim and not shape.dim[0].dim_param:
            shape.dim[0].dim_param = "batch"


def original_runner(path: Path, output: str, input_size: tuple[int, int], mean, std):
    """The original model as the reference: uint8 NHWC -> numpy normalisation -> ONNX Runtime -> pooled."""
    model = _load(path)
    inp = _image_input(model, input_size)
    _dynamic_batch(model, inp)
    session = _session(model.SerializeToString())
    mean_a = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    std_a = np.asarray(std, np.float32).reshape(1, 3, 1, 1)

    def run(pixels: np.ndarray) -> np.ndarray:
        x = ((pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean_a) / std_a).astype(np.float32)
        return _pool(session.run([output], {inp.name: x})[0]).astype(np.float32)

    return run


def inspect_onnx(path: Path, output: str | None, input_size: tuple[int, int], mean, std) -> dict[str, Any]:
    """Check the model once: its input, the chosen output, a batch of 2 through it, finite poolable features."""
    model = _load(path)
    _image_input(model, input_size)
    name = _output(model, output)
    run = original_runner(path, name, input_size, mean, std)
    pixels = np.random.default_rng(0).integers(0, 256, (2, *input_size, 3), dtype=np.uint8)
    try:
        feats = run(pixels)
    except InputError:
        raise
    except Exception as exc:  # a fixed batch in a Reshape, a wrong spatial size, ...
        raise InputError("onnx: backbone cannot run a batch of 2", got=f"{type(exc).__name__}: {str(exc)[:160]}",
                         expected="a model with a dynamic (or reshapable) batch axis",
                         todo="export it with a dynamic batch (torch.onnx.export(..., dynamic_axes={...: {0: 'batch'}}))") from None
    if not np.isfinite(feats).all():
        raise InputError("onnx: backbone gives NaN or infinite features", got=f"{int((~np.isfinite(feats)).sum())} values",
                         expected="finite features", todo="check the model and --mean/--std")
    return {"path": str(path), "output": name, "feature_dim": int(feats.shape[1]), "num_blocks": 0,
            "weights_sha256": file_sha256(path), "weights_report": {}}


def write_wrapped(cfg, path: Path) -> Path:
    """Write the kit's backbone.onnx around the original model and check it against the original."""
    onnx = require("onnx", "an onnx: backbone")
    from onnx import helper, numpy_helper

    from edgexfer.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, check_contract, finish_model
    from edgexfer.runtime.compare import Output, tolerance_for
    from edgexfer.runtime.compare import compare as compare_outputs

    kw = cfg.builder_kwargs
    src = Path(kw["path"])
    model = _load(src)
    opset = {o.domain or "ai.onnx": o.version for o in model.opset_import}.get("ai.onnx")
    if opset != OPSET:
        try:
            model = onnx.version_converter.convert_version(model, OPSET)
        except Exception as exc:
            raise InputError("onnx: backbone opset", got=f"opset {opset}: {type(exc).__name__}", expected=f"opset {OPSET} "
                             "or one convertible to it", todo=f"export the model with opset {OPSET}") from None
    inp = _image_input(model, cfg.input_size)
    graph = model.graph
    for node in graph.node:
        node.input[:] = [_NORMALISED if i == inp.name else i for i in node.input]
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).astype(np.float32)
    shift = (-mean / std).reshape(1, 3, 1, 1).astype(np.float32)
    pre = [helper.make_node("Cast", [INPUT_NAME], ["edgexfer_float"], to=onnx.TensorProto.FLOAT),
           helper.make_node("Transpose", ["edgexfer_float"], ["edgexfer_nchw"], perm=[0, 3, 1, 2]),
           helper.make_node("Mul", ["edgexfer_nchw", "edgexfer_scale"], ["edgexfer_scaled"]),
           helper.make_node("Add", ["edgexfer_scaled", "edgexfer_shift"], [_NORMALISED])]
    rank = 4 if kw["map"] else 2
    post = ([helper.make_node("ReduceMean", [kw["output"]], [OUTPUT_NAME], axes=[2, 3], keepdims=0)] if rank == 4
            else [helper.make_node("Identity", [kw["output"]], [OUTPUT_NAME])])
    nodes = [*pre, *graph.node, *post]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend([numpy_helper.from_array(scale, "edgexfer_scale"),
                              numpy_helper.from_array(shift, "edgexfer_shift")])
    image = helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.UINT8, ["batch", *cfg.input_size, 3])
    feats = helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", cfg.feature_dim])
    keep = [i for i in graph.input if i.name != inp.name]
    del graph.input[:]
    graph.input.extend([image, *keep])
    del graph.output[:]
    graph.output.extend([feats])
    wrapped = finish_model(model)
    problems = check_contract(wrapped, cfg.input_size)
    if problems:
        raise InputError("wrapped onnx: backbone breaks the bundle contract", got="; ".join(problems),
                         expected="uint8 NHWC in, float32 features out", todo="report this with the model")
    pixels = np.random.default_rng(1).integers(0, 256, (4, *cfg.input_size, 3), dtype=np.uint8)
    ref = original_runner(src, kw["output"], cfg.input_size, cfg.mean, cfg.std)(pixels)
    got = _session(wrapped.SerializeToString()).run(None, {INPUT_NAME: pixels})[0]
    result = compare_outputs([Output("features", ref, got)], tolerance_for("fp32"), "wrapped onnx: backbone")
    result.raise_if_failed("the wrapped onnx: backbone does not match the original model",
                           todo="report this with the model")
    write_atomic(path, wrapped.SerializeToString())
    return path


def reference(cfg):
    """Export's reference for the parity check: the original model (see :func:`original_runner`)."""
    kw = cfg.builder_kwargs
    return original_runner(Path(kw["path"]), kw["output"], cfg.input_size, cfg.mean, cfg.std)


def output_is_map(path: Path, output: str, input_size, mean, std) -> bool:
    model = _load(path)
    inp = _image_input(model, input_size)
    _dynamic_batch(model, inp)
    x = np.zeros((1, 3, *input_size), np.float32)
    return _session(model.SerializeToString()).run([output], {inp.name: x})[0].ndim == 4
