"""The backend spec: everything the kit knows of one engine, in that engine's own module.

A backend module (``runtime/backends/<name>.py``) holds its runner (an
:class:`~edgexfer.runtime.backends.base.EngineRunner`) and a :class:`BackendSpec` subclass saying which
packages it needs, which precisions it runs, where it stands in the ``auto`` order, which packages'
versions decide what its conversion produces, its converter on the host (``"module:function"``, resolved
by :mod:`edgexfer.converters.conversion`; the runtime never imports it), and how a device finds, keys,
prepares and opens its engine. The registry (:mod:`edgexfer.runtime.backends.registry`) maps a name to its
spec; nothing outside the backend modules compares a backend's name.

The converter signature every backend's converter has::

    convert(bundle, out_dir, precision, split, tolerance, workdir, *, progress, int8_target) -> EngineBuild
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgexfer.runtime.errors import BundleError

if TYPE_CHECKING:
    from edgexfer.runtime.backends.base import EngineRunner
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.engine_store import EngineKey

#: where an engine comes from: (model file, runner options, a description for reports)
Located = tuple[Path, dict[str, Any], str]


class BackendSpec:
    """One backend's facts. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str] = ""
    #: the runner class, ``"module:Class"`` (imported only when an engine is opened)
    runner: ClassVar[str] = ""
    #: Python packages the engine needs (found with find_spec, never imported to list backends)
    requires: ClassVar[tuple[str, ...]] = ()
    #: precisions it runs
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    #: whether its bf16 runs on the CPU's own bf16 arithmetic (so needs a CPU with it)
    bf16_on_cpu: ClassVar[bool] = False
    #: place in the ``auto`` order (lower first); None: never chosen by ``auto``
    auto_rank: ClassVar[int | None] = None
    #: file endings of its model among an engine's recorded files
    model_suffixes: ClassVar[tuple[str, ...]] = (".onnx",)
    #: packages whose versions decide what its conversion produces (part of conversion's reuse key)
    tools: ClassVar[tuple[str, ...]] = ()
    #: the host converter, ``"module:function"`` with the signature above; "" for none
    converter: ClassVar[str] = ""
    #: the device-side engine builder, ``"module:function"`` (bundle, precision, out_dir) -> dict; "" for none
    device_builder: ClassVar[str] = ""

    def runner_class(self) -> type[EngineRunner]:
        module, _, cls = self.runner.partition(":")
        return getattr(importlib.import_module(module), cls)

    # --- the bundle ------------------------------------------------------------------------------
    def recorded_model(self, bundle: Bundle, precision: str) -> Path | None:
        """The engine ``edgexfer convert`` recorded in the bundle for ``precision``, or None."""
        for entry in bundle.manifest.engines:
            if entry.backend == self.name and entry.precision == precision:
                model = [f for f in entry.files if f.endswith(self.model_suffixes)]
                if model:
                    return bundle.root / model[0]
        return None

    def bundle_model(self, bundle: Bundle, precision: str) -> Path | None:
        """The model this backend opens from the bundle alone (its recorded engine by default)."""
        return self.recorded_model(bundle, precision)

    # --- a device ------------------------------------------------------------------------------
    def engine_key(self, device: Any, bundle: Bundle, precision: str) -> EngineKey | None:
        """The key of the engine this device builds or compiles for the bundle; None: it builds nothing."""
        return None

    def installed_version(self) -> str | None:
        """The version of the engine installed here whose device entries stay valid (None: none kept)."""
        return None

    def has_engine(self, device: Any, bundle: Bundle, precision: str) -> bool:
        """Whether the device has or can make an engine of the bundle (``auto`` asks)."""
        return self.bundle_model(bundle, precision) is not None

    def prepare(self, device: Any, bundle: Bundle, precision: str) -> tuple[EngineKey | None, dict[str, Any]]:
        """Build or compile the device's engine if needed (under the state lock); returns its key and what was done."""
        return None, {"built": False}

    def locate(self, device: Any, bundle: Bundle, precision: str) -> Located:
        """Model file, runner options and where the engine comes from; builds nothing."""
        model = self.bundle_model(bundle, precision)
        if model is None:
            raise self.no_engine(bundle, precision)
        return model, {}, f"bundle:{model.relative_to(bundle.root)}"

    def no_engine(self, bundle: Bundle, precision: str) -> BundleError:
        have = sorted({f"{e.backend}/{e.precision}" for e in bundle.manifest.engines})
        return BundleError("no engine in the bundle for this backend and precision", got=f"{self.name}/{precision}",
                           expected=f"one of {', '.join(have) or 'none'}",
                           todo=f"run `edgexfer convert {bundle.root} --to {self.name} --precision {precision}`")


def source_sha(bundle: Bundle, path: Path | None) -> str:
    """The manifest's sha256 of a bundle file (what a device engine is built from); "" for none."""
    if path is None:
        return ""
    entry = bundle.manifest.files.get(path.relative_to(bundle.root).as_posix())
    return entry.sha256 if entry is not None else ""
