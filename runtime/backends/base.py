"""The backend contract: a small protocol, a base runner that owns the checks, and a lazy registry.

A backend turns a uint8 ``[N, H, W, 3]`` batch into float32 ``[N, feature_dim]`` features. Each engine
lives in its own module and is imported only when chosen; listing what is available never imports
an engine (so never loads CUDA).
"""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.optional import is_installed
from edgexfer.runtime.precision import check_precision, execution_record


@dataclass(frozen=True)
class TensorSpec:
    """Shape (``None`` = dynamic) and dtype of the engine's input."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


@runtime_checkable
class Backend(Protocol):
    name: str
    precision: str

    def input_spec(self) -> TensorSpec: ...

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass
class RunStats:
    """What an engine did: calls, images, seconds spent inside the engine."""

    calls: int = 0
    images: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0


class EngineRunner:
    """Base of every backend. ``run`` validates the batch and the output; ``run_impl`` is the engine."""

    name = "engine"

    def __init__(self, model_path: str | Path, precision: str = "fp32"):
        self.model_path = Path(model_path)
        self.precision = precision
        #: what the float arithmetic really runs in (f32, f16, bf16); a backend sets it from its engine
        self.inference_precision = "f16" if precision == "fp16" else "f32"
        self.stats = RunStats()
        self.details: dict[str, Any] = {}  # what actually ran (providers, device), recorded in results

    @property
    def execution(self) -> dict[str, Any]:
        """What ran: the precision asked for, the arithmetic the engine uses, this CPU's ISA signature."""
        return execution_record(self.precision, self.inference_precision)

    # --- to implement -------------------------------------------------------------------------
    def input_spec(self) -> TensorSpec:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_impl(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine; the default has nothing to release."""

    # --- shared ------------------------------------------------------------------------------
    def run(self, batch: np.ndarray) -> np.ndarray:
        spec = self.input_spec()
        if not isinstance(batch, np.ndarray):
            raise InputError(f"input tensor: {spec.name}", got=type(batch).__name__, expected="numpy.ndarray",
                             todo="pass images through edgexfer.runtime.preprocess")
        if batch.dtype != np.dtype(spec.dtype):
            raise InputError(f"input tensor: {spec.name}", got=f"dtype {batch.dtype}", expected=f"dtype {spec.dtype}",
                             todo="pass raw uint8 RGB pixels; normalisation happens inside the engine")
        if batch.ndim != len(spec.shape) or any(
                want is not None and got != want for got, want in zip(batch.shape, spec.shape)):
            shown = tuple("N" if d is None else d for d in spec.shape)
            raise InputError(f"input tensor: {spec.name}", got=f"shape {batch.shape}", expected=f"shape {shown}",
                             todo="resize with edgexfer.runtime.preprocess to the bundle's input size")
        if batch.shape[0] == 0:
            raise InputError(f"input tensor: {spec.name}", got="an empty batch", expected="at least one image")
        start = time.perf_counter()
        out = self.run_impl(np.ascontiguousarray(batch))
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.images += int(batch.shape[0])
        if out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise InputError(f"engine output of {self.name}", got=f"shape {out.shape}",
                             expected=f"[{batch.shape[0]}, feature_dim]", todo="check the engine file")
        if not np.isfinite(out).all():
            raise InputError(f"engine output of {self.name}", got="NaN or inf features", expected="finite features",
                             todo="validate the engine with `edgexfer convert` or re-export the bundle")
        return out.astype(np.float32, copy=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class BackendEntry:
    """Registry entry: where the class lives and which packages it needs (checked with find_spec)."""

    target: str  #: "module:Class"
    requires: tuple[str, ...] = field(default_factory=tuple)


BACKENDS: dict[str, BackendEntry] = {
    "onnxruntime": BackendEntry("edgexfer.runtime.backends.onnxruntime:OnnxRuntimeBackend", ("onnxruntime",)),
    "openvino": BackendEntry("edgexfer.runtime.backends.openvino:OpenVinoBackend", ("openvino",)),
    "tensorrt": BackendEntry("edgexfer.runtime.backends.tensorrt:TensorRtBackend", ("tensorrt",)),
}

#: documented order used by ``backend="auto"``: the first that is installed and has an engine in the bundle
AUTO_ORDER: tuple[str, ...] = ("tensorrt", "openvino", "onnxruntime")


def available_backends() -> list[str]:
    """Backends whose packages are installed. Finds the packages without importing them."""
    return [name for name, entry in BACKENDS.items() if all(is_installed(m) for m in entry.requires)]


def backend_class(name: str) -> type[EngineRunner]:
    if name not in BACKENDS:
        raise InputError("unknown backend", got=repr(name), expected=f"one of {', '.join(sorted(BACKENDS))}")
    module, _, cls = BACKENDS[name].target.partition(":")
    return getattr(importlib.import_module(module), cls)


def open_backend(name: str, model_path: str | Path, precision: str = "fp32", **options: Any) -> EngineRunner:
    """Open the named engine on ``model_path``; the load time is kept in ``stats.load_seconds``."""
    cls = backend_class(name)
    check_precision(precision, name)  # one line naming the backend or the missing CPU flags
    start = time.perf_counter()
    runner = cls(model_path, precision=precision, **options)
    runner.stats.load_seconds = time.perf_counter() - start
    return runner
