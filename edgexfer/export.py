"""``edgexfer export``: turn a run directory into a bundle (docs/architecture.md, "The bundle").

The bundle's ``backbone.onnx`` is the run's exported backbone; before the manifest is written the
export is validated against PyTorch on the run's validation images (features and full-model top-1),
and every failure is collected into one :class:`ValidationError`.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.onnx_export import OPSET
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import compare, feature_outputs, flat_figures, tolerance_for
from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.fsutil import StagedDir, file_sha256, write_atomic
from edgexfer.runtime.heads import Head
from edgexfer.runtime.manifest import BackboneInfo, FileEntry, HeadInfo, InputSpec, Manifest
from edgexfer.runtime.preprocess import PreprocessSpec, load_image, stack

#: training images per class whose features travel in the bundle (see _write_exemplars)
EXEMPLARS_PER_CLASS = 20
GOLDEN_COUNT = 8


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    parity: dict[str, Any]


def load_run(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise InputError("not a run directory", got=str(run_dir), expected="a directory with run.json",
                         todo="pass the --out directory of `edgexfer train`")
    run = json.loads(path.read_text())
    for name in ("backbone.onnx", "head.safetensors"):
        if not (Path(run_dir) / name).is_file():
            raise InputError("run directory is incomplete", got=f"{name} missing in {run_dir}",
                             expected="a finished training run", todo="train again")
    return run


def _torch_backbone(run: dict[str, Any], run_dir: Path):
    """The PyTorch twin of the run's backbone.onnx (pretrained, or the fine-tuned weights)."""
    from safetensors.torch import load_file

    from edgexfer.backbones import build_backbone
    from edgexfer.pixel_model import PixelBackbone

    weights = run["config"].get("weights")
    net = build_backbone(run["backbone"]["arch"], weights=weights)
    if run["backbone"]["fine_tuned"]:
        net.load_state_dict(load_file(str(run_dir / "backbone.safetensors")), strict=True)
    model = PixelBackbone(net, tuple(run["backbone"]["mean"]), tuple(run["backbone"]["std"])).eval()
    return model


def _features_torch(model, pixels: np.ndarray, batch: int = 16) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(pixels[s:s + batch])).numpy() for s in range(0, len(pixels), batch)])


def _features_ort(path: Path, pixels: np.ndarray, batch: int = 16) -> np.ndarray:
    from edgexfer.runtime.backends.registry import open_backend

    with open_backend("onnxruntime", path) as backend:
        return np.concatenate([backend.run(pixels[s:s + batch]) for s in range(0, len(pixels), batch)])


def export(run_dir: str | Path, out: str | Path, *, name: str | None = None, progress: bool = True) -> ExportResult:
    """Write the bundle for ``run_dir`` into ``out`` (created; an existing bundle there is replaced)."""
    run_dir, out = Path(run_dir), Path(out)
    run = load_run(run_dir)
    if run.get("modality") == "text":
        from edgexfer.export_text import export_text

        return export_text(run, run_dir, out, name=name, progress=progress, golden_count=GOLDEN_COUNT,
                           exemplars_per_class=EXEMPLARS_PER_CLASS)
    pp = run["preprocess"]
    spec = PreprocessSpec(size=tuple(pp["size"]), resize=pp["resize"], fill=tuple(pp["fill"]))
    head = Head.load(run_dir / "head.safetensors", feature_dim=run["backbone"]["feature_dim"])
    val = run["val"]
    missing = [v["path"] for v in val if not Path(v["path"]).is_file()]
    if missing:
        raise InputError("validation images of the run are gone", got=f"{len(missing)} missing, e.g. {missing[0]}",
                         expected="the training data where it was", todo="restore the data directory or train again")
    pixels = stack([load_image(v["path"], spec) for v in val])
    labels = np.array([v["label"] for v in val])
    if progress:
        print(f"checking backbone.onnx against PyTorch on {len(val)} validation images", file=sys.stderr, flush=True)
    ref = _features_torch(_torch_backbone(run, run_dir), pixels)
    onnx_feats = _features_ort(run_dir / "backbone.onnx", pixels)
    report = parity_report(ref, onnx_feats, head, labels)
    staging = new_staging(out)
    shutil.copy2(run_dir / "backbone.onnx", staging / "backbone.onnx")
    shutil.copy2(run_dir / "head.safetensors", staging / "head.safetensors")
    # golden images: a few of every class, with the reference (ONNX Runtime fp32) outputs
    order = _golden_order(labels, GOLDEN_COUNT)
    np.savez(staging / "golden.npz", images=pixels[order], features=onnx_feats[order],
             logits=head.logits(onnx_feats[order]), labels=labels[order])
    _write_exemplars(run, spec, staging / "backbone.onnx", staging / "exemplars.npz", progress)
    report_doc = {"schema": "edgexfer.export-report/1", "reference": "pytorch fp32", "candidate": "onnxruntime fp32",
                  **report}
    write_atomic(staging / "reports" / "export.json", (json.dumps(report_doc, indent=2) + "\n").encode())
    backbone_sha = file_sha256(staging / "backbone.onnx")
    metrics = {"val_accuracy": round(float(run["val_accuracy"]), 4)}
    files = {}
    for rel in ("backbone.onnx", "head.safetensors", "golden.npz", "exemplars.npz", "reports/export.json"):
        p = staging / rel
        files[rel] = FileEntry(sha256=file_sha256(p), bytes=p.stat().st_size)
    manifest = Manifest(
        name=name or Path(run["data_root"]).name,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        backbone=BackboneInfo(arch=run["backbone"]["arch"], sha256=backbone_sha, feature_dim=run["backbone"]["feature_dim"],
                              input=InputSpec(size=tuple(spec.size), resize=spec.resize, fill=tuple(spec.fill),
                                              mean=tuple(run["backbone"]["mean"]), std=tuple(run["backbone"]["std"]))),
        head=HeadInfo(kind=head.kind, classes=tuple(head.classes), version=1, backbone_sha256=backbone_sha, metrics=metrics),
        files=files,
        tools={**run.get("tools", {}), "opset": OPSET},
    )
    seal(manifest, staging, out)
    return ExportResult(out, report)


def parity_report(ref: np.ndarray, onnx_feats: np.ndarray, head: Any, labels: np.ndarray,
                  **extra: Any) -> dict[str, Any]:
    """backbone.onnx against PyTorch on the validation samples (image and text exports); raises when it fails.

    Both are fp32: the export must meet the fp32 tolerance, on features and logits alike.
    """
    result = compare(feature_outputs(ref, onnx_feats, head.logits), tolerance_for("fp32"), "validation")
    report = {"count": int(len(ref)), **extra, **flat_figures(result), "tolerance": result.tolerance.to_dict()}
    report["val_accuracy_onnx"] = float(np.mean(head.logits(onnx_feats).argmax(1) == labels))
    report["val_accuracy_torch"] = float(np.mean(head.logits(ref).argmax(1) == labels))
    result.raise_if_failed("backbone.onnx does not match PyTorch", todo="report this as a bug; the bundle was not written")
    return report


def new_staging(out: Path) -> Path:
    """An empty ``.<out>.partial`` directory beside ``out`` (with ``reports/``), where a bundle is assembled."""
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "reports").mkdir(parents=True)
    return staging


def seal(manifest: Manifest, staging: Path, out: Path) -> None:
    """Write ``manifest`` into the staged bundle, verify it, and put it at ``out`` (image and text exports).

    An existing bundle at ``out`` is replaced; a directory there that is not a bundle is refused.
    """
    staged = StagedDir(out, staging=staging, replace=True)
    manifest.write(staging / "manifest.json")
    Bundle.open(staging)  # verify what we wrote before it replaces anything
    if out.exists() and not (out / "manifest.json").is_file():
        staged.discard()
        raise BundleError("refusing to replace a directory that is not a bundle", got=str(out),
                          expected="a new path or an existing bundle", todo="choose another --out")
    staged.commit()


def _golden_order(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` images spread over the classes (round robin over classes)."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(labels)):
        for idx in by_class:
            if idx and len(chosen) < count:
                chosen.append(idx.pop(0))
    return np.array(sorted(chosen))


def _write_exemplars(run: dict[str, Any], spec: PreprocessSpec, onnx_path: Path, out: Path, progress: bool) -> None:
    """Features of a few training images per class (float16), for class-incremental retraining.

    A device learns new classes from its own samples, but it has no images of the classes it was
    shipped with; retraining on new samples alone would let new classes swallow the old ones. These
    exemplar features (iCaRL's idea, kept as features: ~2.5 KB each) stand in for the old classes.
    They are bound to the backbone like every cached feature: a new backbone needs new exemplars.
    """
    rng = np.random.default_rng(0)
    chosen = []
    for label in sorted({t["label"] for t in run["train"]}):
        items = [t for t in run["train"] if t["label"] == label and Path(t["path"]).is_file()]
        pick = rng.permutation(len(items))[:EXEMPLARS_PER_CLASS]
        chosen += [items[i] for i in sorted(pick)]
    if progress:
        print(f"computing exemplar features of {len(chosen)} training images", file=sys.stderr, flush=True)
    pixels = stack([load_image(t["path"], spec) for t in chosen])
    feats = _features_ort(onnx_path, pixels)
    np.savez(out, features=feats.astype(np.float16), labels=np.array([t["label"] for t in chosen], dtype=np.int64),
             sha256=np.array([t["sha256"] for t in chosen]))
