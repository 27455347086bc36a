"""Which engines exist, which are installed, and which one runs: the one home of backend choice.

Each engine lives in its own module and is imported only when chosen; listing what is available never
imports an engine (so never loads CUDA). ``backend="auto"`` means the first of :data:`AUTO_ORDER` that is
installed and has an engine for the bundle (:func:`choose_backend`); the device adds the engines it
built or can build, the bench adds every engine the bundle records.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.optional import is_installed
from edgexfer.runtime.precision import check_precision

if TYPE_CHECKING:  # the registry stays light: the command line imports it for its choices
    from edgexfer.runtime.backends.base import EngineRunner
    from edgexfer.runtime.bundle import Bundle

#: default ``--backend`` of host commands (predict, eval): the fp32 ONNX Runtime reference the bundle always has
HOST_DEFAULT = "onnxruntime"
#: default ``--backend`` of device commands: the best engine installed here
DEVICE_DEFAULT = "auto"


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


def choose_backend(bundle: Bundle, backend: str = "auto", precision: str = "fp32",
                   has_engine: Callable[[str], bool] | None = None) -> str:
    """``auto``: the first of :data:`AUTO_ORDER` that is installed and has an engine for this bundle.

    ``has_engine(name)`` says whether there is one; the default looks only at the engines recorded in
    the bundle (a device also counts the engines it built or can build, see :meth:`Device.choose_backend`).
    """
    if backend != "auto":
        return backend
    has_engine = has_engine or (lambda name: has_recorded_engine(bundle, name, precision))
    installed = set(available_backends())
    for name in AUTO_ORDER:
        if name in installed and has_engine(name):
            return name
    raise InputError("no usable backend for this bundle", got=f"installed: {', '.join(sorted(installed)) or 'none'}",
                     expected=f"one of {', '.join(AUTO_ORDER)} with a {precision} engine in the bundle",
                     todo="pip install 'edgexfer[onnxruntime]' or convert the bundle for an installed engine")


def has_recorded_engine(bundle: Bundle, name: str, precision: str) -> bool:
    try:
        bundle.engine_file(name, precision)
        return True
    except BundleError:
        return False
