"""``edgexfer export``: turn a run directory into a bundle (docs/architecture.md, "The bundle").

The bundle's ``backbone.onnx`` is the run's exported backbone; before the manifest is written the
export is validated against PyTorch on the run's validation samples (features and full-model top-1),
and every failure is collected into one :class:`ValidationError`. Samples are read batch by batch
(:meth:`~edgexfer.modalities.base.ExportReader.batches`): memory holds one batch and the features, whatever
the number of validation samples. What differs between images and texts
(reading samples, golden inputs, a tokenizer file) is the run's host modality's (:mod:`edgexfer.modalities`).
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.backbones import run_config
from edgexfer.modalities import host_modality
from edgexfer.modalities.base import stream_features
from edgexfer.onnx_export import OPSET
from edgexfer.run_record import log
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import compare, feature_outputs, flat_figures, tolerance_for
from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.fsutil import StagedDir, file_sha256, write_atomic
from edgexfer.runtime.heads import Head
from edgexfer.runtime.manifest import BackboneInfo, FileEntry, HeadInfo, Manifest

#: training samples per class whose features travel in the bundle (see _write_exemplars)
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


def export(run_dir: str | Path, out: str | Path, *, name: str | None = None, progress: bool = True) -> ExportResult:
    """Write the bundle for ``run_dir`` into ``out`` (created; an existing bundle there is replaced).

    The run's backbone names its modality (:mod:`edgexfer.modalities`), which reads the samples: validation
    samples for the parity check and golden.npz, training samples for the exemplars.
    """
    run_dir, out = Path(run_dir), Path(out)
    run = load_run(run_dir)
    bb = run_config(run)
    modality = host_modality(bb.modality)
    reader = modality.export_reader(run, run_dir)
    head = Head.load(run_dir / "head.safetensors", feature_dim=run["backbone"]["feature_dim"])
    val = run["val"]
    labels = np.array([v["label"] for v in val])
    log(f"checking backbone.onnx against {reader.reference_title} on {len(val)} validation {modality.plural}", progress)
    # one batch of samples in memory at a time: only the features of every validation sample are kept
    ref = stream_features(reader, val, reader.torch_runner())
    onnx_feats = stream_features(reader, val, reader.onnx_runner(run_dir / "backbone.onnx"))
    report = parity_report(ref, onnx_feats, head, labels, **modality.parity_extra)
    staging = new_staging(out)
    for rel in ("backbone.onnx", "head.safetensors", *modality.bundle_files):
        shutil.copy2(run_dir / rel, staging / rel)
    # golden samples: a few of every class, with the reference (ONNX Runtime fp32) outputs
    order = golden_order(labels, GOLDEN_COUNT)
    np.savez(staging / "golden.npz", **reader.golden([val[i] for i in order]), features=onnx_feats[order],
             logits=head.logits(onnx_feats[order]), labels=labels[order])
    _write_exemplars(run, reader, modality.plural, staging / "backbone.onnx", staging / "exemplars.npz", progress)
    report_doc = {"schema": "edgexfer.export-report/1", "reference": reader.reference, "candidate": "onnxruntime fp32",
                  "reference_title": reader.reference_title,
                  **report}
    write_atomic(staging / "reports" / "export.json", (json.dumps(report_doc, indent=2) + "\n").encode())
    backbone_sha = file_sha256(staging / "backbone.onnx")
    metrics = {"val_accuracy": round(float(run["val_accuracy"]), 4)}
    files = {}
    for rel in ("backbone.onnx", "head.safetensors", *modality.bundle_files, "golden.npz", "exemplars.npz",
                "reports/export.json"):
        p = staging / rel
        files[rel] = FileEntry(sha256=file_sha256(p), bytes=p.stat().st_size)
    manifest = Manifest(
        name=name or modality.bundle_name(run["data_root"]),
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        backbone=BackboneInfo(arch=run["backbone"]["arch"], sha256=backbone_sha, feature_dim=run["backbone"]["feature_dim"],
                              input=reader.manifest_input(), modality=modality.name,
                              # a brought backbone names its weights too: the packaged ones are named by arch
                              weights_sha256=bb.weight_sha256 if bb.record_key else ""),
        head=HeadInfo(kind=head.kind, classes=tuple(head.classes), version=1, backbone_sha256=backbone_sha, metrics=metrics),
        files=files,
        tools={**run.get("tools", {}), "opset": OPSET},
    )
    seal(manifest, staging, out)
    return ExportResult(out, report_doc)


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


def golden_order(labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` samples spread over the classes (round robin over classes)."""
    by_class = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < min(count, len(labels)):
        for idx in by_class:
            if idx and len(chosen) < count:
                chosen.append(idx.pop(0))
    return np.array(sorted(chosen))


def _write_exemplars(run: dict[str, Any], reader: Any, plural: str, onnx_path: Path, out: Path, progress: bool) -> None:
    """Features of a few training samples per class (float16), for class-incremental retraining.

    A device learns new classes from its own samples, but it has no samples of the classes it was
    shipped with; retraining on new samples alone would let new classes swallow the old ones. These
    exemplar features (iCaRL's idea, kept as features: ~2.5 KB each) stand in for the old classes.
    They are bound to the backbone like every cached feature: a new backbone needs new exemplars.
    """
    rng = np.random.default_rng(0)
    chosen = []
    for label in sorted({t["label"] for t in run["train"]}):
        items = [t for t in run["train"] if t["label"] == label and reader.usable(t)]
        pick = rng.permutation(len(items))[:EXEMPLARS_PER_CLASS]
        chosen += [items[i] for i in sorted(pick)]
    log(f"computing exemplar features of {len(chosen)} training {plural}", progress)
    feats = stream_features(reader, chosen, reader.onnx_runner(onnx_path))
    np.savez(out, features=feats.astype(np.float16), labels=np.array([t["label"] for t in chosen], dtype=np.int64),
             sha256=np.array([t["sha256"] for t in chosen]))
