"""The comparison table over every engine of a bundle: ``reports/engines.md`` and ``reports/engines.json``.

Built from the conversion reports the manifest lists, plus the bundle's own fp32 backbone as the
reference row. Speeds were measured on the machine that converted (its CPU), not on the device.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgexfer.runtime.backends.registry import REFERENCE_BACKEND
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.fsutil import write_atomic
from edgexfer.runtime.manifest import Manifest
from edgexfer.runtime.modalities import modality_named
from edgexfer.runtime.precision import PRECISIONS

TABLE_JSON = "reports/engines.json"
TABLE_MD = "reports/engines.md"
_MODEL_SUFFIXES = (".onnx", ".xml", ".bin", ".plan")


def engine_table(bundle_dir: str | Path, manifest: Manifest | None = None) -> dict[str, Any]:
    """Rows (one per converted engine, plus the reference) with size, validation, accuracy and speed."""
    root = Path(bundle_dir)
    manifest = manifest or Bundle.open(root).manifest
    ref_size = manifest.files["backbone.onnx"].bytes
    rows: list[dict[str, Any]] = []
    samples = modality_named(manifest.backbone.modality).plural
    for rel in sorted(k for k in manifest.files if k.startswith("reports/convert-") and k.endswith(".json")):
        report = json.loads((root / rel).read_text())
        v = report["validation"]
        figures = v.get("holdout") or v["golden"]
        speed = report.get("speed") or {}
        rows.append({
            "backend": report["backend"], "precision": report["precision"],
            "status": "engine" if report["registered"] else "device build kit (no TensorRT here)",
            "size_bytes": sum(manifest.files[f].bytes for f in report["files"]
                              if f.endswith(_MODEL_SUFFIXES) and f in manifest.files),
            "validated_on": f"{'held-out' if v.get('holdout') else 'golden'} ({figures['images']} {samples})",
            "max_abs_diff": figures["max_abs_diff"], "mean_cosine": figures["mean_cosine"],
            "top1_agreement": figures["top1_agreement"],
            "accuracy_reference": figures.get("accuracy_reference"), "accuracy": figures.get("accuracy"),
            "kept_in_float": report.get("kept_in_float"),
            "load_seconds": report.get("load_seconds"), "batch1_ms": speed.get("batch1_ms"),
            "batch8_images_per_s": speed.get("batch8_images_per_s"),
            "reference_batch1_ms": speed.get("reference_batch1_ms"), "validated_with": report["validated_with"],
            "report": rel,
        })
    rows.sort(key=lambda r: (r["backend"], PRECISIONS.index(r["precision"])))
    reference = {"backend": REFERENCE_BACKEND, "precision": "fp32", "status": "reference (backbone.onnx)",
                 "size_bytes": ref_size}
    return {"schema": "edgexfer.engine-table/1", "bundle": manifest.name, "backbone_sha256": manifest.backbone.sha256,
            "note": "speeds measured on the converting machine's CPU during each conversion, with the fp32 "
                    "reference measured at the same moment; not the target device",
            "reference": reference, "engines": rows}


def format_engine_table(table: dict[str, Any]) -> str:
    """Markdown: one row per engine."""
    def num(value, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    ref = table["reference"]
    lines = [f"# Engines of bundle {table['bundle']}", "",
             "Figures against the fp32 ONNX Runtime reference. Speed: measured on the converting machine's CPU "
             "during each conversion, beside the fp32 reference measured at the same moment (not the device).", "",
             "| engine | status | size MB | validated on | max abs diff | mean cosine | top-1 agreement | accuracy fp32 → engine "
             "| kept in float | load s | batch-1 ms (fp32 ref) | batch-8 img/s |",
             "|---|---|---:|---|---:|---:|---:|---|---|---:|---:|---:|",
             f"| onnxruntime fp32 | {ref['status']} | {ref['size_bytes'] / 1e6:.1f} | – | – | – | – | – | – | – | – | – |"]
    for r in table["engines"]:
        acc = "–" if r["accuracy"] is None else f"{r['accuracy_reference']:.3f} → {r['accuracy']:.3f}"
        kept = "–" if r["kept_in_float"] is None else str(len(r["kept_in_float"]))
        lines.append(
            f"| {r['backend']} {r['precision']} | {r['status']} | {r['size_bytes'] / 1e6:.1f} | {r['validated_on']} | "
            f"{r['max_abs_diff']:.2e} | {r['mean_cosine']:.5f} | {r['top1_agreement']:.1%} | {acc} | {kept} | "
            f"{num(r['load_seconds'], '.2f')} | {num(r['batch1_ms'], '.1f')} ({num(r['reference_batch1_ms'], '.1f')}) | "
            f"{num(r['batch8_images_per_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def write_engine_table(root: Path, manifest: Manifest) -> list[str]:
    """Write both table files; returns their bundle-relative paths."""
    table = engine_table(root, manifest)
    write_atomic(root / TABLE_JSON, (json.dumps(table, indent=2) + "\n").encode())
    write_atomic(root / TABLE_MD, format_engine_table(table).encode())
    return [TABLE_JSON, TABLE_MD]
