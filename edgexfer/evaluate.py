"""``edgexfer eval``: accuracy of a bundle on an ImageFolder tree (image bundles) or on text data (text bundles:
a folder per class of .txt files, or a .csv/.jsonl file of text,label), through the runtime's Predictor."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from edgexfer.data import scan_image_folder
from edgexfer.metrics import classification_report
from edgexfer.runtime.errors import DataError
from edgexfer.runtime.predictor import Prediction, Predictor


def evaluate(bundle_dir: str | Path, data_dir: str | Path, *, backend: str = "onnxruntime", precision: str = "fp32",
             batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    with Predictor.from_bundle(bundle_dir, backend=backend, precision=precision) as predictor:
        if predictor.modality == "text":
            return _evaluate_texts(predictor, bundle_dir, data_dir, backend, precision, batch_size, progress)
        folder = scan_image_folder(data_dir)
        classes = list(predictor.head.classes)
        unknown = [c for c in folder.classes if c not in classes]
        if len(unknown) == len(folder.classes):
            raise DataError("no class of the data set is known to the bundle's head", got=", ".join(unknown),
                            expected=f"folders named like {', '.join(classes)}", todo="evaluate on matching data")
        y_true, y_pred, skipped = [], [], []
        items = [(p, folder.classes[lbl]) for p, lbl in zip(folder.paths, folder.labels)
                 if folder.classes[lbl] in classes]
        for start in tqdm(range(0, len(items), batch_size), desc="evaluating", unit="batch",
                          disable=not progress, leave=False):
            chunk = items[start:start + batch_size]
            for (path, cls), result in zip(chunk, predictor.predict([p for p, _ in chunk], top_k=1)):
                if isinstance(result, Prediction):
                    y_true.append(classes.index(cls))
                    y_pred.append(classes.index(result.label))
                else:
                    skipped.append({"path": str(path), "reason": result.error})
        report = classification_report(y_true, y_pred, classes)
        report.update({
            "bundle": str(bundle_dir), "data": str(folder.root), "backend": backend, "precision": precision,
            "engine": predictor.details, "skipped": skipped,
            "ignored_classes": unknown,
        })
    return report


def _evaluate_texts(predictor: Predictor, bundle_dir, data_dir, backend: str, precision: str, batch_size: int,
                    progress: bool) -> dict[str, Any]:
    from edgexfer.runtime.textdata import read_text_dataset

    ds = read_text_dataset(data_dir)
    classes = list(predictor.head.classes)
    unknown = [c for c in ds.classes if c not in classes]
    if len(unknown) == len(ds.classes):
        raise DataError("no class of the data set is known to the bundle's head", got=", ".join(unknown),
                        expected=f"labels like {', '.join(classes)}", todo="evaluate on matching data")
    items = [s for s in ds.samples if ds.classes[s.label] in classes]
    y_true, y_pred = [], []
    skipped = [{"path": src, "reason": why} for src, why in ds.skipped]
    for start in tqdm(range(0, len(items), batch_size * 8), desc="evaluating", unit="batch", disable=not progress,
                      leave=False):
        chunk = items[start:start + batch_size * 8]
        results = predictor.predict_texts([s.text for s in chunk], top_k=1, sources=[s.source for s in chunk])
        for sample, result in zip(chunk, results):
            if isinstance(result, Prediction):
                y_true.append(classes.index(ds.classes[sample.label]))
                y_pred.append(classes.index(result.label))
            else:
                skipped.append({"path": sample.source, "reason": result.error})
    report = classification_report(y_true, y_pred, classes)
    report.update({"bundle": str(bundle_dir), "data": str(ds.root), "backend": backend, "precision": precision,
                   "engine": predictor.details, "skipped": skipped, "ignored_classes": unknown,
                   "truncated": sum(predictor.tokenizer.truncated([s.text for s in items]))})
    return report
