"""The backend contract: a small protocol and the base runner that owns the checks and statistics.

A backend turns a uint8 ``[N, H, W, 3]`` batch into float32 ``[N, feature_dim]`` features. Every runner
(the engines, the PyTorch eager twin of the bench, the QDQ reference of the converters) subclasses
:class:`EngineRunner`; which engines exist and which one runs is :mod:`edgexfer.runtime.backends.registry`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.precision import execution_record


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
    """Base of every runner. ``run`` validates the batch and the output; ``run_impl`` is the engine.

    Options every runner takes: ``precision`` (what the engine is asked to compute in) and ``threads``
    (the size of its CPU thread pool; only where :attr:`takes_threads` says it has one).
    """

    name = "engine"
    #: whether ``threads=N`` sizes a CPU thread pool the engine computes with (ONNX Runtime, OpenVINO,
    #: PyTorch eager). An engine without one (TensorRT computes on the GPU) refuses a thread count
    #: instead of ignoring it; callers that set threads for several engines ask this first.
    takes_threads: ClassVar[bool] = False

    def __init__(self, model_path: str | Path, precision: str = "fp32", *, threads: int | None = None):
        if threads is not None:
            if not self.takes_threads:
                raise InputError(f"threads for the {self.name} backend", got=repr(threads),
                                 expected="no thread count: this engine has no CPU thread pool",
                                 todo="leave threads unset for this backend")
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise InputError("threads", got=repr(threads), expected="an integer >= 1")
        self.model_path = Path(model_path)
        self.precision = precision
        #: CPU threads the engine computes with; None: the engine's own default
        self.threads = threads
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
