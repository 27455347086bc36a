"""Engines built on the device, kept under ``state/engines/<key>/`` and rebuilt only when something changed.

A compiled engine is valid for exactly one combination of backend, engine version, device, precision
and backbone. :func:`engine_store_key` turns those five into a directory name, so a new TensorRT from a
JetPack upgrade, another GPU, another precision or a new backbone each lands in a new entry and an
entry is never loaded by an engine it was not built for.

* TensorRT: ``backbone.plan`` (and ``timing.cache``), built on the device from the bundle's TensorRT kit
  by the converters' builder (``edgexfer device install`` passes it in; the runtime never imports the
  converters).
* OpenVINO: the compiled-model blobs of OpenVINO's own model cache (``CACHE_DIR``), written by the first
  compile: later loads import the blob instead of compiling again (on Intel GPUs that is seconds).

An entry is complete when its ``engine_key.json`` exists: it is built in ``.tmp-<key>-<pid>``, the key file
is written last, the tree is fsynced and renamed into place (:class:`fsutil.StagedDir`). A process killed
mid-build leaves only a ``.tmp-`` directory, which the next writer under the state lock removes
(``DeviceState`` sweeps it).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgexfer.runtime.errors import BundleError
from edgexfer.runtime.fsutil import StagedDir, make_private, private_dir
from edgexfer.runtime.state import crash_point

KEY_FILE = "engine_key.json"


def engine_store_key(backend: str, engine_version: str, device: str, precision: str, backbone_sha256: str,
                     source_sha256: str = "", profile: str = "") -> str:
    """Directory name of an engine: readable prefix plus a digest over all parts.

    ``source_sha256`` is the file the engine is built from (a TensorRT kit model, an OpenVINO IR): a bundle
    converted again (another int8 calibration, say) keeps its backbone but needs a new engine.
    ``profile`` names the input shapes a TensorRT plan accepts (:func:`edgexfer.runtime.backends.tensorrt.tensorrt_profile_id`): a text bundle
    whose ``max_length`` changes keeps its backbone but needs a plan with a longer sequence range.
    """
    parts = {"backend": str(backend), "engine_version": str(engine_version), "device": str(device),
             "precision": str(precision), "backbone_sha256": str(backbone_sha256)}
    if source_sha256:
        parts["source_sha256"] = str(source_sha256)
    if profile:
        parts["profile"] = str(profile)
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    readable = "-".join(re.sub(r"[^A-Za-z0-9.]+", "", p)[:16] or "x"
                        for p in (parts["backend"], parts["engine_version"], _short_device(parts["device"]),
                                  parts["precision"]))
    return f"{readable}-{digest}"


def _short_device(device: str) -> str:
    match = re.search(r"sm\s*([0-9.]+)", device)
    if match:
        return f"sm{match.group(1).replace('.', '')}"
    words = device.split()
    return words[0] if words else device


def cuda_device(index: int = 0) -> dict[str, str] | None:
    """Name and compute capability of a CUDA GPU through the driver library, or None without one."""
    for lib in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return None
    device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    cuda.cuDeviceGetName(name, len(name), device)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def package_version(name: str) -> str | None:
    """Installed version of a distribution without importing it (no CUDA is loaded)."""
    for dist in (name, f"{name}-cu12", f"{name}_cu12", f"{name}-cu11"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


@dataclass(frozen=True)
class EngineKey:
    """What a compiled engine is built for on this device; :attr:`key` names its cache entry."""

    backend: str
    engine_version: str
    device: str
    precision: str
    backbone_sha256: str
    extra: tuple[tuple[str, str], ...] = ()  #: backend-specific fields also written to engine_key.json
    source_sha256: str = ""  #: sha256 of the file the engine is built from, when known
    profile: str = ""  #: the input shapes a TensorRT plan accepts (text bundles), see tensorrt_profile_id

    @property
    def key(self) -> str:
        return engine_store_key(self.backend, self.engine_version, self.device, self.precision, self.backbone_sha256,
                                self.source_sha256, self.profile)

    def record(self) -> dict[str, Any]:
        out = {"key": self.key, "backend": self.backend, "engine_version": self.engine_version, "device": self.device,
               "precision": self.precision, "backbone_sha256": self.backbone_sha256,
               "source_sha256": self.source_sha256, **dict(self.extra)}
        if self.profile:
            out["profile"] = self.profile
        return out


class EngineStore:
    """The ``engines/`` directory of a device state."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def lookup(self, target: EngineKey) -> Path | None:
        """The complete entry for ``target``, or None. An entry whose key file disagrees is not used."""
        entry = self.path(target.key)
        try:
            recorded = json.loads((entry / KEY_FILE).read_text())
        except (OSError, ValueError):
            return None
        return entry if recorded.get("key") == target.key else None

    def build(self, target: EngineKey, builder: Callable[[Path], dict[str, Any] | None]) -> tuple[Path, dict[str, Any]]:
        """Return the entry for ``target``, building it with ``builder(tmp_dir)`` only when it is missing.

        The second value says what happened: ``{"built": bool, "seconds": float, ...builder info}``.
        Call under the state lock; a failed builder leaves no entry behind.
        """
        entry = self.lookup(target)
        if entry is not None:
            return entry, {"built": False, "seconds": 0.0}
        private_dir(self.root)
        final = self.path(target.key)
        # replace: an entry with a bad key file is rebuilt; .tmp-<key>-<pid>: swept after a crash
        with StagedDir(final, name=f".tmp-{target.key}-{os.getpid()}", private=True, replace=True) as staged:
            tmp = staged.path
            started = time.perf_counter()
            info = dict(builder(tmp) or {})
            if not any(tmp.iterdir()):
                raise BundleError(f"the {target.backend} engine build wrote nothing", got=f"empty {tmp.name}",
                                  expected="engine files", todo="read the engine's log above")
            seconds = round(time.perf_counter() - started, 3)
            record = {**target.record(), "built_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "build_seconds": seconds, **{k: v for k, v in info.items() if isinstance(v, (str, int, float))}}
            (tmp / KEY_FILE).write_text(json.dumps(record, indent=2) + "\n")
            make_private(tmp)  # what the engine's builder wrote, with its own modes
            crash_point("engine-built")
        return final, {"built": True, "seconds": seconds, **info}

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry's key record, with its size on disk."""
        out = []
        if self.root.is_dir():
            for child in sorted(self.root.iterdir()):
                if child.name.startswith(".") or not (child / KEY_FILE).is_file():
                    continue
                with contextlib.suppress(OSError, ValueError):
                    rec = json.loads((child / KEY_FILE).read_text())
                    rec["bytes"] = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
                    out.append(rec)
        return out

    def prune(self, current_versions: dict[str, str], installed_backbones: set[str]) -> list[str]:
        """Remove entries that can never load again; returns their keys. Call under the state lock.

        An entry built by another version of an engine installed here (a JetPack or OpenVINO upgrade), or
        for a backbone no longer installed, is dead weight on a small eMMC. Entries of engines that are
        not installed here are kept (the device may get that engine back).
        """
        removed = []
        for rec in self.entries():
            backend, version = rec.get("backend"), rec.get("engine_version")
            stale = backend in current_versions and version != current_versions[backend]
            if stale or rec.get("backbone_sha256") not in installed_backbones:
                shutil.rmtree(self.path(rec["key"]), ignore_errors=True)
                removed.append(rec["key"])
        return removed

