"""The backend contract: a small protocol and the base runner that owns the checks and statistics.

A backend turns a uint8 ``[N, H, W, 3]`` batch (an image backbone) or a feed of ``input_ids`` and
``attention_mask``, both int64 ``[N, L]`` (a text backbone), into float32 ``[N, feature_dim]`` features.
A single-input engine takes the bare array; a multi-input engine a mapping of input name to array, or
an object whose attributes carry those names (the runtime's ``TokenBatch``). Every runner
(the engines, the PyTorch eager twin of the bench, the QDQ reference of the converters) subclasses
:class:`EngineRunner`; which engines exist and which one runs is :mod:`edgexfer.runtime.backends.registry`.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
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

    def input_specs(self) -> tuple[TensorSpec, ...]: ...

    def run(self, batch: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray: ...

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
        """The first (for image engines: the only) input."""
        raise NotImplementedError

    def input_specs(self) -> tuple[TensorSpec, ...]:
        """Every input, in the engine's order; a multi-input engine overrides this."""
        return (self.input_spec(),)

    def run_impl(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def run_feed_impl(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run a checked feed (input name -> array). Single-input engines need only :meth:`run_impl`."""
        (batch,) = feed.values()
        return self.run_impl(batch)

    def close(self) -> None:
        """Release the engine; the default has nothing to release."""

    # --- shared ------------------------------------------------------------------------------
    def run(self, batch: np.ndarray | Mapping[str, np.ndarray] | object) -> np.ndarray:
        """Features of one batch: the bare array of a single-input engine, or a feed of every input."""
        feed = self._feed(batch)
        rows = next(iter(feed.values())).shape[0]
        start = time.perf_counter()
        out = self.run_feed_impl(feed)
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        self.stats.images += int(rows)
        if out.ndim != 2 or out.shape[0] != rows:
            raise InputError(f"engine output of {self.name}", got=f"shape {out.shape}",
                             expected=f"[{rows}, feature_dim]", todo="check the engine file")
        if not np.isfinite(out).all():
            raise InputError(f"engine output of {self.name}", got="NaN or inf features", expected="finite features",
                             todo="validate the engine with `edgexfer convert` or re-export the bundle")
        return out.astype(np.float32, copy=False)

    def _feed(self, batch) -> dict[str, np.ndarray]:
        """``batch`` as {input name: contiguous array}, every input checked against its spec."""
        specs = self.input_specs()
        names = [spec.name for spec in specs]
        if isinstance(batch, np.ndarray):
            if len(specs) != 1:
                raise InputError(f"input of the {self.name} engine", got="one array",
                                 expected=f"a feed of {' and '.join(names)}",
                                 todo="pass the tokenized batch (edgexfer.runtime.text), or a dict by input name")
            arrays = {names[0]: batch}
        elif isinstance(batch, Mapping):
            arrays = dict(batch)
        elif all(hasattr(batch, n) for n in names):
            arrays = {n: getattr(batch, n) for n in names}
        else:
            raise InputError(f"input of the {self.name} engine", got=type(batch).__name__,
                             expected=("numpy.ndarray" if len(specs) == 1 else f"a feed of {' and '.join(names)}"),
                             todo=_TODO.get(specs[0].dtype, "pass numpy arrays"))
        if sorted(arrays) != sorted(names):
            raise InputError(f"inputs of the {self.name} engine", got=", ".join(sorted(arrays)) or "none",
                             expected=", ".join(names), todo="name every input of the engine once")
        rows = None
        for spec in specs:
            arrays[spec.name] = _checked(spec, arrays[spec.name])
            if rows is not None and arrays[spec.name].shape[:2] != rows:
                raise InputError(f"input tensor: {spec.name}", got=f"shape {arrays[spec.name].shape}",
                                 expected=f"the shape of {specs[0].name} {arrays[specs[0].name].shape}",
                                 todo="pass the arrays of one tokenized batch together")
            rows = arrays[spec.name].shape[:2] if len(specs) > 1 else arrays[spec.name].shape[:1]
        return {n: arrays[n] for n in names}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


#: what to do about a bad input, by the dtype the engine takes (uint8: pixels; int64: token ids and mask)
_TODO = {"uint8": "pass raw uint8 RGB pixels through edgexfer.runtime.preprocess; normalisation happens inside the engine",
         "int64": "tokenize with edgexfer.runtime.text (int64 input_ids and attention_mask of one batch)"}
_SHAPE_TODO = {"uint8": "resize with edgexfer.runtime.preprocess to the bundle's input size",
               "int64": "tokenize with edgexfer.runtime.text (int64 [N, L] arrays)"}


def _checked(spec: TensorSpec, array: object) -> np.ndarray:
    """``array`` if it fits ``spec`` (type, dtype, rank, static dimensions, not empty), as a contiguous array."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"input tensor: {spec.name}", got=type(array).__name__, expected="numpy.ndarray",
                         todo=_TODO.get(spec.dtype, "pass numpy arrays"))
    if array.dtype != np.dtype(spec.dtype):
        raise InputError(f"input tensor: {spec.name}", got=f"dtype {array.dtype}", expected=f"dtype {spec.dtype}",
                         todo=_TODO.get(spec.dtype, f"pass {spec.dtype} arrays"))
    if array.ndim != len(spec.shape) or any(
            want is not None and got != want for got, want in zip(array.shape, spec.shape)):
        shown = tuple("N" if i == 0 and d is None else "L" if d is None else d for i, d in enumerate(spec.shape))
        raise InputError(f"input tensor: {spec.name}", got=f"shape {array.shape}", expected=f"shape {shown}",
                         todo=_SHAPE_TODO.get(spec.dtype, "pass arrays of the engine's shape"))
    if array.shape[0] == 0 or 0 in array.shape:
        raise InputError(f"input tensor: {spec.name}", got="an empty batch", expected="at least one item")
    return np.ascontiguousarray(array)
