"""Lazy import of optional heavy packages, with an error that names the pip extra.

Never auto-installs and never falls back to another package: a missing engine is an error.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from edgexfer.runtime.errors import MissingDependencyError

#: import name -> pip extra that provides it
EXTRAS: dict[str, str] = {
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "nncf": "convert",
    "tensorrt": "tensorrt",
    "tuf": "updates",
    "mlperf_loadgen": "bench",
    "matplotlib": "bench",
    "torch": "train",
    # onnx and onnxslim are in `train` too (export), but converting alone needs no torch
    "onnx": "convert",
    "onnxslim": "convert",
    # device serve (runtime/service) and device watch
    "starlette": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "prometheus_client": "serve",
    "grpc": "serve",
    "google": "serve",  # google.protobuf, the messages of the gRPC service
    "cv2": "camera",
    # fleet learning (device federate, fleet serve)
    "flwr": "fleet",
    # the text modality's tokenizer (runtime/text.py)
    "tokenizers": "text",
}


def is_installed(module: str) -> bool:
    """True when ``module`` can be imported; finds it without importing it (no CUDA is loaded)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0], "all")
        todo = f"pip install 'edgexfer[{extra}]'"
        if extra == "fleet" and sys.version_info < (3, 11):
            # flwr 1.42 needs Python 3.11+; JetPack 6's Python is 3.10 (docs/fleet.md: a 3.11 venv)
            todo = "flwr needs Python 3.11+: run it from a Python 3.11 venv (docs/fleet.md), then " + todo
        raise MissingDependencyError(
            f"{purpose} needs the Python package '{module}'",
            got=f"import failed ({exc})",
            expected=f"'{module}' importable",
            todo=todo,
        ) from exc


def lazy_attribute(module: str, name: str, build: Callable[[], Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds ``name`` on first access (once), so importing needs no optional package.

    Flower loads ``module:app`` by attribute; the ServerApp and the ClientApp are built from flwr only then.
    """
    built: list[Any] = []

    def getattr_(attr: str) -> Any:
        if attr == name:
            if not built:
                built.append(build())
            return built[0]
        raise AttributeError(f"module {module!r} has no attribute {attr!r}")

    return getattr_
