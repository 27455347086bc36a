"""Open a bundle directory: parse the manifest strictly and verify every file before parsing any."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgexfer.runtime.errors import BundleError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.manifest import Manifest, TextInputSpec, check_relative_path
from edgexfer.runtime.preprocess import PreprocessSpec
from edgexfer.runtime.text import TextSpec

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
        """What the backbone reads: "image" or "text" (the manifest's ``backbone.modality``)."""
        return self.manifest.backbone.modality

    @property
    def preprocess(self) -> PreprocessSpec | TextSpec:
        """The preprocessing of the bundle's modality; its ``key()`` keys the feature cache."""
        inp = self.manifest.backbone.input
        if isinstance(inp, TextInputSpec):
            return TextSpec(inp.tokenizer_sha256, inp.max_length)
        return PreprocessSpec(size=tuple(inp.size), resize=inp.resize, fill=tuple(inp.fill))

    def tokenizer(self):
        """The text bundle's :class:`~edgexfer.runtime.text.TextTokenizer` (its sha256 checked against the manifest)."""
        from edgexfer.runtime.text import TextTokenizer

        inp = self.manifest.backbone.input
        if not isinstance(inp, TextInputSpec):
            raise BundleError("this bundle reads images, not texts", got=f"{self.root} (modality image)",
                              expected="a text bundle", todo="pass image files to an image bundle")
        return TextTokenizer.from_file(self.root / inp.tokenizer, inp.max_length, sha256=inp.tokenizer_sha256)

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

    def tensorrt_kit(self, precision: str) -> Path | None:
        """The ONNX model of the TensorRT device build kit for ``precision``, if the bundle has one.

        ``edgexfer convert --to tensorrt`` writes the kit on a machine without TensorRT; the device
        builds its plan from it (``edgexfer device install``).
        """
        for name in ("backbone.qdq.onnx", "backbone.onnx"):
            rel = f"engines/tensorrt/{precision}/{name}"
            if rel in self.manifest.files:
                return self.root / rel
        return None

    def engine_file(self, backend: str, precision: str) -> Path:
        """The engine file for (backend, precision); fp32 ONNX Runtime is the bundle's own backbone."""
        for entry in self.manifest.engines:
            if entry.backend == backend and entry.precision == precision:
                model = [f for f in entry.files if f.endswith((".onnx", ".xml", ".plan", ".engine"))]
                if model:
                    return self.root / model[0]
        if backend == "onnxruntime" and precision == "fp32":
            # no offline-optimised engine recorded: the bundle's own backbone is the fp32 ORT model
            return self.backbone_path
        have = sorted({"onnxruntime/fp32"} | {f"{e.backend}/{e.precision}" for e in self.manifest.engines})
        raise BundleError("no engine in the bundle for this backend and precision", got=f"{backend}/{precision}",
                          expected=f"one of {', '.join(have)}",
                          todo=f"run `edgexfer convert {self.root} --to {backend} --precision {precision}`")


def bundle_relative_files(root: Path, names: list[str]) -> dict[str, dict[str, int | str]]:
    """Manifest ``files`` entries (sha256 and size) for files under ``root``."""
    out: dict[str, dict[str, int | str]] = {}
    for name in names:
        path = root / name
        out[name] = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
    return out
