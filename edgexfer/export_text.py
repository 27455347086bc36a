"""``edgexfer export`` of a text run: the bundle of :mod:`edgexfer.export`, for a text backbone.

What differs from images: the bundle ships ``tokenizer.json`` (listed and checksummed like every file; the
manifest's ``backbone.input`` records its path, sha256 and ``max_length``); ``backbone.onnx`` is checked
against PyTorch on the run's validation texts (features and the head's top-1, fp32 tolerance, every
failure collected); ``golden.npz`` holds texts with their token ids and attention masks instead of images
(the device re-tokenizes the texts and must get the same ids); the exemplars are features of training texts.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.onnx_export import OPSET
from edgexfer.runtime.features import text_features
from edgexfer.runtime.fsutil import file_sha256, write_atomic
from edgexfer.runtime.heads import Head
from edgexfer.runtime.manifest import BackboneInfo, FileEntry, HeadInfo, Manifest, TextInputSpec
from edgexfer.runtime.text import TextTokenizer


def _torch_text_backbone(run: dict[str, Any], run_dir: Path):
    from safetensors.torch import load_file

    from edgexfer.backbones import build_backbone

    model = build_backbone(run["backbone"]["arch"], weights=run["config"].get("weights"))
    if run["backbone"]["fine_tuned"]:
        model.load_state_dict(load_file(str(run_dir / "backbone.safetensors")), strict=True)
    return model.eval()


def _features_torch(model, tokenizer: TextTokenizer, texts: list[str], batch: int = 32) -> np.ndarray:
    import torch

    rows: dict[int, np.ndarray] = {}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.no_grad():
        for start in range(0, len(order), batch):
            chunk = order[start:start + batch]
            tokens = tokenizer.encode([texts[i] for i in chunk])
            out = model(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)).numpy()
            rows.update(zip(chunk, out))
    return np.stack([rows[i] for i in range(len(texts))]).astype(np.float32)


def _features_ort(path: Path, tokenizer: TextTokenizer, texts: list[str]) -> np.ndarray:
    from edgexfer.runtime.backends.registry import open_backend

    with open_backend("onnxruntime", path) as backend:
        return text_features(backend, tokenizer, texts)[0]


def export_text(run: dict[str, Any], run_dir: Path, out: Path, *, name: str | None, progress: bool,
                golden_count: int, exemplars_per_class: int):
    """Write the bundle of a text run (called by :func:`edgexfer.export.export`)."""
    from edgexfer.export import ExportResult, _golden_order, new_staging, parity_report, seal

    pp = run["preprocess"]
    tokenizer = TextTokenizer.from_file(run_dir / pp["tokenizer"], pp["max_length"], sha256=pp["tokenizer_sha256"])
    head = Head.load(run_dir / "head.safetensors", feature_dim=run["backbone"]["feature_dim"])
    val = run["val"]
    texts = [v["text"] for v in val]
    labels = np.array([v["label"] for v in val])
    if progress:
        print(f"checking backbone.onnx against PyTorch on {len(val)} validation texts", file=sys.stderr, flush=True)
    ref = _features_torch(_torch_text_backbone(run, run_dir), tokenizer, texts)
    onnx_feats = _features_ort(run_dir / "backbone.onnx", tokenizer, texts)
    report = parity_report(ref, onnx_feats, head, labels, samples="texts")
    staging = new_staging(out)
    for rel in ("backbone.onnx", "head.safetensors", "tokenizer.json"):
        shutil.copy2(run_dir / rel, staging / rel)
    order = _golden_order(labels, golden_count)
    golden_texts = [texts[i] for i in order]
    tokens = tokenizer.encode(golden_texts)
    np.savez(staging / "golden.npz", texts=np.array(golden_texts), input_ids=tokens.input_ids,
             attention_mask=tokens.attention_mask, features=onnx_feats[order], logits=head.logits(onnx_feats[order]),
             labels=labels[order])
    _write_exemplars(run, tokenizer, staging / "backbone.onnx", staging / "exemplars.npz", exemplars_per_class, progress)
    write_atomic(staging / "reports" / "export.json", (json.dumps(
        {"schema": "edgexfer.export-report/1", "reference": "pytorch fp32", "candidate": "onnxruntime fp32", **report},
        indent=2) + "\n").encode())
    backbone_sha = file_sha256(staging / "backbone.onnx")
    files = {rel: FileEntry(sha256=file_sha256(staging / rel), bytes=(staging / rel).stat().st_size)
             for rel in ("backbone.onnx", "head.safetensors", "tokenizer.json", "golden.npz", "exemplars.npz",
                         "reports/export.json")}
    manifest = Manifest(
        name=name or Path(run["data_root"]).stem,
        created_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        backbone=BackboneInfo(arch=run["backbone"]["arch"], sha256=backbone_sha, feature_dim=run["backbone"]["feature_dim"],
                              input=TextInputSpec("tokenizer.json", tokenizer.sha256, tokenizer.max_length),
                              modality="text"),
        head=HeadInfo(kind=head.kind, classes=tuple(head.classes), version=1, backbone_sha256=backbone_sha,
                      metrics={"val_accuracy": round(float(run["val_accuracy"]), 4)}),
        files=files,
        tools={**run.get("tools", {}), "opset": OPSET},
    )
    seal(manifest, staging, out)
    return ExportResult(out, report)


def _write_exemplars(run: dict[str, Any], tokenizer: TextTokenizer, onnx_path: Path, out: Path, per_class: int,
                     progress: bool) -> None:
    """Features of a few training texts per class (float16), for class-incremental retraining (see export.py)."""
    rng = np.random.default_rng(0)
    chosen = []
    for label in sorted({t["label"] for t in run["train"]}):
        items = [t for t in run["train"] if t["label"] == label]
        chosen += [items[i] for i in sorted(rng.permutation(len(items))[:per_class])]
    if progress:
        print(f"computing exemplar features of {len(chosen)} training texts", file=sys.stderr, flush=True)
    feats = _features_ort(onnx_path, tokenizer, [t["text"] for t in chosen])
    np.savez(out, features=feats.astype(np.float16), labels=np.array([t["label"] for t in chosen], dtype=np.int64),
             sha256=np.array([t["sha256"] for t in chosen]))
