"""Classification metrics and their text rendering (numpy only)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def classification_report(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix, JSON-ready."""
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    support = cm.sum(axis=1).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = int(cm.sum())
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "count": total,
        "per_class": {
            name: {"precision": round(float(precision[i]), 4), "recall": round(float(recall[i]), 4),
                   "f1": round(float(f1[i]), 4), "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "classes": list(classes),
        "confusion_matrix": cm.tolist(),
    }


def format_report(report: dict[str, Any]) -> str:
    """A per-class table and the confusion matrix as plain text for a terminal."""
    classes = report["classes"]
    width = max(8, *(len(c) for c in classes))
    # a modality may name its samples ("unit"); a text bundle's eval reports truncated texts
    unit = report.get("unit") or ("texts" if "truncated" in report else "images")
    lines = [f"accuracy {report['accuracy']:.3f} on {report['count']} {unit}", "",
             f"{'class':<{width}}  precision  recall     f1  support"]
    for name in classes:
        row = report["per_class"][name]
        lines.append(f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  {row['f1']:5.3f}  {row['support']:7d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    short = [c[:6] for c in classes]
    lines.append(" " * (width + 2) + " ".join(f"{s:>6}" for s in short))
    for name, row in zip(classes, report["confusion_matrix"]):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>6d}" for v in row))
    return "\n".join(lines)
