"""Open a bundle directory: parse the manifest strictly and verify every file before parsing any."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgexfer.runtime.errors import BundleError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.manifest import Manifest, check_relative_path
from edgexfer.runtime.modalities import modality_named

if TYPE_CHECKING:
    from edgexfer.runtime.modalities.base import Modality

MANIFEST = "manifest.json"


def verify_files(root: Path, manifest: Manifest) -> None:
    """Every listed file exists inside ``root`` (no links), with the listed size and sha256."""
    root_real = root.resolve()
    problems: list[str] = []
    for rel, entry in manifest.files.items():
        check_relative_path(rel, "manifest.files")
        path = root / rel
        if path.is_symlink() or any(p.is_symlink() for p in path.parents if p != root and root in p.parents):
            problems.append(f"{rel}: is a link")
            continue
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        if root_real not in path.resolve().parents:
            problems.append(f"{rel}: outside the bundle")
            continue
        size = path.stat().st_size
        if size != entry.bytes:
            problems.append(f"{rel}: {size} bytes, manifest says {entry.bytes}")
            continue
        if file_sha256(path) != entry.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest")
    if problems:
        raise BundleError(f"bundle {root} fails verification", got="; ".join(problems),
                          expected="every file as listed in manifest.json",
                          todo="copy the bundle again or re-export it")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory."""

    root: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> Bundle:
        root = Path(path)
        if not root.is_dir():
            raise BundleError("bundle directory not found", got=str(root), expected="a directory with manifest.json",
                              todo="pass the --out directory of `edgexfer export`")
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError("bundle has no manifest.json", got=str(root), expected="a bundle directory",
                              todo="pass the --out directory of `edgexfer export`")
        manifest = Manifest.from_json(mpath.read_bytes())
        if verify:
            verify_files(root, manifest)
        return cls(root, manifest)

    @property
    def backbone_path(self) -> Path:
        return self.root / "backbone.onnx"

    @property
    def head_path(self) -> Path:
        return self.root / "head.safetensors"

    @property
    def modality(self) -> str:
        """The name of what the backbone reads (the manifest's ``backbone.modality``), for records."""
        return self.manifest.backbone.modality

    @functools.cached_property
    def input_modality(self) -> Modality:
        """The bundle's :class:`~edgexfer.runtime.modalities.base.Modality`, made once (use ``modality_of``)."""
        return modality_named(self.manifest.backbone.modality)(self.manifest.backbone, self.root)

    @property
    def preprocess(self) -> Any:
        """The preprocessing of the bundle's modality; its ``key()`` keys the feature cache."""
        return self.input_modality.preprocess

    def tokenizer(self):
        """The text bundle's :class:`~edgexfer.runtime.text.TextTokenizer` (its sha256 checked against the manifest)."""
        tokenizer = getattr(self.input_modality, "tokenizer", None)
        if tokenizer is None:
            raise BundleError(f"this bundle reads {self.input_modality.plural}, not texts",
                              got=f"{self.root} (modality {self.modality})",
                              expected="a text bundle", todo=f"pass {self.input_modality.noun} files to this bundle")
        return tokenizer

    def head(self):
        from edgexfer.runtime.heads import Head

        return Head.load(self.head_path, feature_dim=self.manifest.backbone.feature_dim)

    def golden(self) -> dict[str, np.ndarray]:
        """Golden images with their reference features and logits (no pickle allowed)."""
        path = self.root / "golden.npz"
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def exemplars(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Features (float32) and head-class indices of training exemplars, when the bundle has them."""
        if "exemplars.npz" not in self.manifest.files:
            return None
        with np.load(self.root / "exemplars.npz", allow_pickle=False) as data:
            return data["features"].astype(np.float32), data["labels"].astype(np.int64)

    def engine_file(self, backend: str, precision: str) -> Path:
        """The engine file for (backend, precision), as the backend's spec finds it in the bundle."""
        from edgexfer.runtime.backends.registry import BACKENDS, backend_spec

        model = backend_spec(backend).bundle_model(self, precision)
        if model is not None:
            return model
        have = sorted(f"{name}/{p}" for name in BACKENDS for p in backend_spec(name).precisions
                      if backend_spec(name).bundle_model(self, p) is not None)
        raise BundleError("no engine in the bundle for this backend and precision", got=f"{backend}/{precision}",
                          expected=f"one of {', '.join(have) or 'none'}",
                          todo=f"run `edgexfer convert {self.root} --to {backend} --precision {precision}`")


def bundle_relative_files(root: Path, names: list[str]) -> dict[str, dict[str, int | str]]:
    """Manifest ``files`` entries (sha256 and size) for files under ``root``."""
    out: dict[str, dict[str, int | str]] = {}
    for name in names:
        path = root / name
        out[name] = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
    return out
