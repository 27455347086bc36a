"""``edgexfer eval``: accuracy of a bundle on labelled data of its modality, through the runtime's Predictor.

An image bundle reads an ImageFolder tree, a text bundle a folder per class of .txt files or a .csv/.jsonl
file of text,label: the bundle's host modality (:mod:`edgexfer.modalities`) reads the data and predicts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgexfer.metrics import classification_report
from edgexfer.modalities import host_modality
from edgexfer.runtime.backends.registry import HOST_DEFAULT
from edgexfer.runtime.errors import DataError
from edgexfer.runtime.predictor import Prediction, Predictor


def evaluate(bundle_dir: str | Path, data_dir: str | Path, *, backend: str = HOST_DEFAULT, precision: str = "fp32",
             batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    with Predictor.from_bundle(bundle_dir, backend=backend, precision=precision) as predictor:
        modality = host_modality(predictor.modality)
        data = modality.evaluation_set(Path(data_dir))
        classes = list(predictor.head.classes)
        unknown = [c for c in data.classes if c not in classes]
        if len(unknown) == len(data.classes):
            raise DataError("no class of the data set is known to the bundle's head", got=", ".join(unknown),
                            expected=f"{modality.eval_class_word} like {', '.join(classes)}",
                            todo="evaluate on matching data")
        items = [item for item in data.items if item[1] in classes]
        y_true, y_pred, skipped = [], [], list(data.skipped)
        step = batch_size * modality.eval_batch_factor
        for start in tqdm(range(0, len(items), step), desc="evaluating", unit="batch", disable=not progress,
                          leave=False):
            chunk = items[start:start + step]
            for (source, cls, _), result in zip(chunk, modality.predict(predictor, chunk)):
                if isinstance(result, Prediction):
                    y_true.append(classes.index(cls))
                    y_pred.append(classes.index(result.label))
                else:
                    skipped.append({"path": source, "reason": result.error})
        report = classification_report(y_true, y_pred, classes)
        report.update({"bundle": str(bundle_dir), "data": data.root, "backend": backend, "precision": precision,
                       "engine": predictor.details, "skipped": skipped, "ignored_classes": unknown,
                       **modality.evaluation_extra(predictor, items)})
    return report
