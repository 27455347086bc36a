"""Which engines exist, which are installed, and which one runs: the one home of backend choice.

Each engine lives in its own module with its spec (:mod:`edgexfer.runtime.backends.spec`); the engine
itself is imported only when opened, so listing what is available never loads CUDA. ``backend="auto"``
means the first of :func:`auto_order` that is installed and has an engine for the bundle
(:func:`choose_backend`); the device adds the engines it built or can build, the bench adds every engine
the bundle records.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.optional import is_installed
from edgexfer.runtime.precision import check_precision

if TYPE_CHECKING:  # the registry stays light: the command line imports it for its choices
    from edgexfer.runtime.backends.base import EngineRunner
    from edgexfer.runtime.backends.spec import BackendSpec
    from edgexfer.runtime.bundle import Bundle

#: the reference engine: the backend that runs a bundle's own ``backbone.onnx`` in fp32 (every bundle has it).
#: Export's parity, golden outputs, conversion validation and host training extract features with it.
REFERENCE_BACKEND = "onnxruntime"
#: default ``--backend`` of host commands (predict, eval): the fp32 reference the bundle always has
HOST_DEFAULT = REFERENCE_BACKEND
#: default ``--backend`` of device commands: the best engine installed here
DEVICE_DEFAULT = "auto"


#: backend name -> its spec, ``"module:Class"`` (a :class:`~edgexfer.runtime.backends.spec.BackendSpec`); the
#: module is imported only when the backend is asked about, and it imports its engine only to open one
BACKENDS: dict[str, str] = {
    "onnxruntime": "edgexfer.runtime.backends.onnxruntime:OnnxRuntimeSpec",
    "openvino": "edgexfer.runtime.backends.openvino:OpenVinoSpec",
    "tensorrt": "edgexfer.runtime.backends.tensorrt:TensorRtSpec",
}
_SPECS: dict[str, BackendSpec] = {}


def register_backend(name: str, target: str) -> None:
    """Register a backend plug-in: ``target`` is its spec, ``"module:Class"``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise InputError("backend name", got=repr(name), expected="an identifier like 'mybackend'")
    if not isinstance(target, str) or ":" not in target:
        raise InputError(f"backend {name} target", got=repr(target), expected="'module:Class'")
    BACKENDS[name] = target
    _SPECS.pop(name, None)


def unregister_backend(name: str) -> None:
    """Remove a plug-in registered with :func:`register_backend`."""
    BACKENDS.pop(name, None)
    _SPECS.pop(name, None)


def backend_spec(name: str) -> BackendSpec:
    """The spec of the backend ``name`` (made once); a one-line :class:`InputError` for an unknown name."""
    if name not in BACKENDS:
        raise InputError("unknown backend", got=repr(name), expected=f"one of {', '.join(sorted(BACKENDS))}")
    if name not in _SPECS:
        module, _, cls = BACKENDS[name].partition(":")
        _SPECS[name] = getattr(importlib.import_module(module), cls)()
    return _SPECS[name]


def auto_order() -> tuple[str, ...]:
    """The order ``backend="auto"`` tries: each spec's ``auto_rank``, lowest first (defined in the backend modules)."""
    ranked = [(backend_spec(name).auto_rank, name) for name in BACKENDS]
    return tuple(name for rank, name in sorted((r, n) for r, n in ranked if r is not None))


def available_backends() -> list[str]:
    """Backends whose packages are installed. Finds the packages without importing them."""
    return [name for name in BACKENDS if all(is_installed(m) for m in backend_spec(name).requires)]


def backend_class(name: str) -> type[EngineRunner]:
    return backend_spec(name).runner_class()


def open_backend(name: str, model_path: str | Path, precision: str = "fp32", **options: Any) -> EngineRunner:
    """Open the named engine on ``model_path``; the load time is kept in ``stats.load_seconds``."""
    cls = backend_class(name)
    check_precision(precision, name)  # one line naming the backend or the missing CPU flags
    start = time.perf_counter()
    runner = cls(model_path, precision=precision, **options)
    runner.stats.load_seconds = time.perf_counter() - start
    return runner


def open_reference(model_path: str | Path, **options: Any) -> EngineRunner:
    """The fp32 reference engine (:data:`REFERENCE_BACKEND`) on an ONNX model."""
    return open_backend(REFERENCE_BACKEND, model_path, precision="fp32", **options)


def choose_backend(bundle: Bundle, backend: str = "auto", precision: str = "fp32",
                   has_engine: Callable[[str], bool] | None = None) -> str:
    """``auto``: the first of :func:`auto_order` that is installed and has an engine for this bundle.

    ``has_engine(name)`` says whether there is one; the default looks only at the engines recorded in
    the bundle (a device also counts the engines it built or can build, see :meth:`Device.choose_backend`).
    """
    if backend != "auto":
        return backend
    has_engine = has_engine or (lambda name: has_recorded_engine(bundle, name, precision))
    installed = set(available_backends())
    order = auto_order()
    for name in order:
        if name in installed and has_engine(name):
            return name
    raise InputError("no usable backend for this bundle", got=f"installed: {', '.join(sorted(installed)) or 'none'}",
                     expected=f"one of {', '.join(order)} with a {precision} engine in the bundle",
                     todo="pip install 'edgexfer[onnxruntime]' or convert the bundle for an installed engine")


def has_recorded_engine(bundle: Bundle, name: str, precision: str) -> bool:
    """Whether the bundle alone has an engine of ``name`` at ``precision`` (one recorded, or its own backbone)."""
    try:
        bundle.engine_file(name, precision)  # the backend's spec looks (Bundle.engine_file asks it)
        return True
    except BundleError:
        return False
