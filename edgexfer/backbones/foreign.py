"""Bring your own backbone: ``py:MODULE_OR_FILE:FACTORY`` becomes a :class:`~edgexfer.backbones.BackboneConfig`.

The factory is a Python callable (in an importable module, or a ``.py`` file) that returns a torch ``nn.Module``
mapping float32 NCHW RGB images, normalised by ``--mean``/``--std``, to features ``[N, D]``, ``[N, D, 1, 1]`` or a
``[N, C, H, W]`` map (averaged over H and W). The preprocessing the packaged backbones carry in the registry comes
from the command line here (``--input-size``, ``--mean``, ``--std``); a missing value is a one-line error.

Identity (what devices and updates bind to): ``weight_sha256`` is the sha256 of the ``--weights`` file; without
weights the factory is called under ``torch.manual_seed(0)`` and ``weight_sha256`` is the sha256 of that initial
state (each tensor's name, dtype, shape and bytes, in name order), so the same factory code gives the same
identity. ``backbone.onnx``'s own sha256 stays the bundle's backbone identity, as for every backbone.

This module imports no torch; :mod:`edgexfer.backbones.py_module` builds and checks the module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgexfer.runtime.errors import InputError

PY_PREFIX = "py:"
#: the ``run.json`` backbone record key that holds a brought backbone's recipe (see :func:`record`)
RECORD_KEY = "py"


@dataclass(frozen=True)
class PySource:
    """Where the factory lives: ``target`` is a module name or an absolute ``.py`` path."""

    target: str
    factory: str

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".py")

    def display(self) -> str:
        """The backbone's name in run.json and the manifest: ``py:<file name or module>:<factory>``."""
        return f"{PY_PREFIX}{Path(self.target).name if self.is_file else self.target}:{self.factory}"


def is_py_spec(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PY_PREFIX)


def parse_py_spec(spec: str) -> PySource:
    """``py:MODULE_OR_FILE:FACTORY`` -> :class:`PySource` (a file path made absolute; it must exist)."""
    body = spec[len(PY_PREFIX):]
    target, sep, factory = body.rpartition(":")
    if not sep or not target or not factory.isidentifier():
        raise InputError("--backbone py: spec", got=repr(spec), expected="py:MODULE_OR_FILE:FACTORY",
                         todo="e.g. --backbone py:my_resnet.py:build or py:mypkg.models:make_resnet")
    if target.endswith(".py"):
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise InputError("--backbone py: file not found", got=target, expected="an existing .py file",
                             todo="check the path (relative paths are taken from the current directory)")
        target = str(path)
    elif not all(part.isidentifier() for part in target.split(".")):
        raise InputError("--backbone py: module", got=repr(target), expected="a dotted module name or a .py file",
                         todo="e.g. py:mypkg.models:build or py:./models.py:build")
    return PySource(target, factory)


def _triple(value: Any, what: str, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or (positive and min(out) <= 0) or any(v != v for v in out):
        raise InputError(f"--{what}", got=repr(value), expected=f"3 {'positive ' if positive else ''}numbers R,G,B "
                         "of [0, 1] pixels", todo=f"e.g. --{what} " + ("0.229,0.224,0.225" if positive else
                                                                       "0.485,0.456,0.406"))
    return out  # type: ignore[return-value]


def check_preprocessing(input_size, mean, std) -> tuple[tuple[int, int], tuple, tuple]:
    """The brought backbone's pixel contract from the options; a missing or bad value is a one-line error."""
    missing = [opt for opt, v in (("--input-size", input_size), ("--mean", mean), ("--std", std)) if v is None]
    if missing:
        raise InputError("a py: backbone needs its preprocessing", got=f"no {', '.join(missing)}",
                         expected="--input-size H,W --mean R,G,B --std R,G,B (what the weights were trained with)",
                         todo="e.g. --input-size 224,224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225")
    try:
        size = tuple(int(v) for v in input_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or not all(8 <= v <= 4096 for v in size):
        raise InputError("--input-size", got=repr(input_size), expected="H,W: two integers 8..4096",
                         todo="e.g. --input-size 224,224")
    return size, _triple(mean, "mean", False), _triple(std, "std", True)  # type: ignore[return-value]


def py_config(spec: str, *, weights: Path | None, input_size, mean, std):
    """The :class:`~edgexfer.backbones.BackboneConfig` of a ``py:`` backbone: builds the module once (torch) to
    check it and learn its feature length, number of blocks and weight identity."""
    from edgexfer.backbones.py_module import inspect_module

    source = parse_py_spec(spec)
    size, mean3, std3 = check_preprocessing(input_size, mean, std)
    facts = inspect_module(source, weights, size)
    return config_from_record({"target": source.target, "factory": source.factory, "input_size": list(size),
                               "mean": list(mean3), "std": list(std3), **facts})


def record(cfg) -> dict[str, Any]:
    """What run.json keeps to rebuild the config without running the factory (see :func:`config_from_record`)."""
    kw = cfg.builder_kwargs
    if "record" in kw:
        return dict(kw["record"])
    return {"target": kw["target"], "factory": kw["factory"], "input_size": list(cfg.input_size),
            "mean": list(cfg.mean), "std": list(cfg.std), "feature_dim": cfg.feature_dim,
            "num_blocks": cfg.num_blocks, "weights_sha256": cfg.weight_sha256, "weights_report": kw["weights_report"]}


def config_from_record(rec: dict[str, Any]):
    from edgexfer.backbones import BackboneConfig

    source = PySource(rec["target"], rec["factory"])
    return BackboneConfig(
        name=source.display(), builder="edgexfer.backbones.py_module:build", builder_loads_weights=True,
        feature_dim=int(rec["feature_dim"]), num_blocks=int(rec["num_blocks"]),
        weight_package="", weight_file="", weight_sha256=rec["weights_sha256"], license="the model owner's",
        input_size=tuple(rec["input_size"]), mean=tuple(rec["mean"]), std=tuple(rec["std"]),
        builder_kwargs={"target": source.target, "factory": source.factory,
                        "weights_report": rec.get("weights_report", {})},
        record_key=RECORD_KEY,
    )


def onnx_config(spec: str, *, output: str | None, input_size, mean, std):
    """The config of ``onnx:MODEL.onnx``: the model checked once with ONNX Runtime (no torch)."""
    from edgexfer.backbones import onnx_model

    path = Path(spec[len(onnx_model.ONNX_PREFIX):]).expanduser().resolve()
    size, mean3, std3 = check_preprocessing(input_size, mean, std)
    facts = onnx_model.inspect_onnx(path, output, size, mean3, std3)
    facts["map"] = onnx_model.output_is_map(path, facts["output"], size, mean3, std3)
    return onnx_config_from_record({"input_size": list(size), "mean": list(mean3), "std": list(std3), **facts})


def onnx_config_from_record(rec: dict[str, Any]):
    from edgexfer.backbones import BackboneConfig, onnx_model

    return BackboneConfig(
        name=f"{onnx_model.ONNX_PREFIX}{Path(rec['path']).name}", builder="", feature_dim=int(rec["feature_dim"]),
        num_blocks=0, weight_package="", weight_file="", weight_sha256=rec["weights_sha256"],
        license="the model owner's", input_size=tuple(rec["input_size"]), mean=tuple(rec["mean"]),
        std=tuple(rec["std"]), builder_kwargs={**rec, "record": rec}, record_key=onnx_model.RECORD_KEY,
        exporter="edgexfer.backbones.onnx_model:write_wrapped", reference="edgexfer.backbones.onnx_model:reference",
    )


HOW_TO = """\
bring your own:
  --backbone py:MODULE_OR_FILE:FACTORY [--weights CKPT.pth|.safetensors]
      --input-size H,W --mean R,G,B --std R,G,B [--resize letterbox|crop]
  FACTORY() returns a torch nn.Module: float32 NCHW RGB normalised by mean/std -> [N, D], [N, D, 1, 1] or a
  [N, C, H, W] map (averaged). --unfreeze N fine-tunes its last N top-level children (they must run in sequence).
  --backbone onnx:MODEL.onnx [--output NAME] --input-size H,W --mean R,G,B --std R,G,B
      an ONNX feature extractor with one float32 NCHW image input (frozen training only).
  See docs/backbones.md."""
