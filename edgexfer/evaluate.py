"""``edgexfer eval``: accuracy of a bundle on labelled data of its modality, through the runtime's Predictor.

An image bundle reads an ImageFolder tree, a text bundle a folder per class of .txt files or a .csv/.jsonl
file of text,label: the bundle's host modality (:mod:`edgexfer.modalities`) reads the data and predicts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgexfer.metrics import classification_report
from edgexfer.modalities import host_modality
from edgexfer.runtime.predictor import Predictor


def evaluate(bundle_dir: str | Path, data_dir: str | Path, *, backend: str = "onnxruntime", precision: str = "fp32",
             batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    with Predictor.from_bundle(bundle_dir, backend=backend, precision=precision) as predictor:
        seen = host_modality(predictor.modality).evaluate(predictor, Path(data_dir), batch_size, progress)
        report = classification_report(seen.pop("y_true"), seen.pop("y_pred"), list(predictor.head.classes))
        data, skipped, unknown = seen.pop("data"), seen.pop("skipped"), seen.pop("ignored_classes")
        report.update({"bundle": str(bundle_dir), "data": data, "backend": backend, "precision": precision,
                       "engine": predictor.details, "skipped": skipped, "ignored_classes": unknown, **seen})
    return report
