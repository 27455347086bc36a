"""The bundle a federation writes: the input bundle's backbone and engines with the federated head.

Everything that depends on the head is redone: ``head.safetensors``, the golden logits (the golden
images and features stay: same backbone), the manifest's head entry (classes, version + 1, metrics)
and file list. The round-by-round record goes to ``reports/fleet.json``, listed and checksummed in the
manifest like every other file, so ``edgexfer eval`` and ``edgexfer heads publish`` take the result as
they take any bundle.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import BundleError
from edgexfer.runtime.fsutil import StagedDir, file_sha256, write_atomic
from edgexfer.runtime.heads import Head
from edgexfer.runtime.manifest import FileEntry, HeadInfo

FLEET_REPORT = "reports/fleet.json"
#: schema of reports/fleet.json
REPORT_SCHEMA = "edgexfer.fleet-report/1"


def write_result_bundle(source: Bundle, head: Head, out: str | Path, record: dict[str, Any]) -> Bundle:
    """Write ``out`` (a new directory) from ``source`` with ``head``; returns the verified result."""
    out = Path(out)
    if out.exists():
        raise BundleError("the federation's output directory exists", got=str(out), expected="a new path",
                          todo="choose another --out or remove the old result")
    if head.feature_dim != source.manifest.backbone.feature_dim:
        raise BundleError("the federated head does not fit the bundle's backbone", got=f"D={head.feature_dim}",
                          expected=f"D={source.manifest.backbone.feature_dim}")
    with StagedDir(out, name=f".{out.name}.partial") as staged:
        _write_result(source, head, staged.path, record)
        Bundle.open(staged.path)  # verify what was written before it becomes the result
    return Bundle.open(out)


def _write_result(source: Bundle, head: Head, staging: Path, record: dict[str, Any]) -> None:
    """The result bundle's files and manifest, written into ``staging``."""
    shutil.copytree(source.root, staging, symlinks=False, dirs_exist_ok=True)
    (staging / "reports").mkdir(exist_ok=True)
    head.save(staging / "head.safetensors")
    golden = source.golden()
    golden["logits"] = head.logits(golden["features"])
    np.savez(staging / "golden.npz", **golden)
    report = {"schema": REPORT_SCHEMA, "source_bundle": source.manifest.name,
              "source_head_version": source.manifest.head.version, **record}
    write_atomic(staging / FLEET_REPORT, (json.dumps(report, indent=2) + "\n").encode())
    files = dict(source.manifest.files)
    for rel in ("head.safetensors", "golden.npz", FLEET_REPORT):
        path = staging / rel
        files[rel] = FileEntry(sha256=file_sha256(path), bytes=path.stat().st_size)
    metrics = {k: v for k, v in source.manifest.head.metrics.items() if k != "val_accuracy"}
    metrics.update(numeric_summary(record))
    manifest = dataclasses.replace(
        source.manifest,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        head=HeadInfo(kind=head.kind, classes=tuple(head.classes), version=source.manifest.head.version + 1,
                      backbone_sha256=source.manifest.backbone.sha256, metrics=metrics),
        files=files,
    )
    manifest.write(staging / "manifest.json")


def numeric_summary(record: dict[str, Any]) -> dict[str, float]:
    """The manifest's head metrics of a federated head (numbers only; the details are in reports/fleet.json)."""
    rounds = record.get("rounds", [])
    out: dict[str, float] = {"fleet_rounds": float(len(rounds))}
    if rounds:
        last = rounds[int(record.get("kept_round") or len(rounds)) - 1]  # the round whose head was written
        out["fleet_devices"] = float(len(last.get("accepted", [])))
        out["fleet_samples"] = float(sum(last.get("counts", {}).values()))
        if last.get("val_accuracy") is not None:
            out["val_accuracy"] = round(float(last["val_accuracy"]), 4)
    return out
