"""How right is the device in the field? Each label given on site against what the active head answered.

When a sample is labelled on the device (``device learn``, the page's label buttons, ``POST /v1/label``) the
head active at that moment classifies it from its features, before any retrain could learn it; the verdict
is kept once per (sample, label) in ``features.sqlite`` (table ``field_labels``). The running accuracy per
class and over all, with Wilson 95 % intervals, is in ``device status``, ``/v1/status`` and ``/metrics``.

Beside it, a label-free estimate for the inputs nobody labels: the mean top probability of the latest
inputs (confidence-based performance estimation, as CBPE does without its calibration step). It assumes a
calibrated head, and the kit's logistic heads are over-confident on new data: on the 336 clipart8 images
the demo bundle never saw it said 0.73 where the accuracy was 0.64, and on their camera-degraded copies
0.63 for 0.49 (2026-12-07, windows of 30: mean error +0.10 and +0.14). Read it as an upper bound that
falls when the inputs get harder, not as the accuracy.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.cache_sqlite import CacheDatabase


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of ``correct`` of ``n`` (None for n = 0)."""
    if n <= 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)


class FieldLabels:
    """The verdicts in ``path`` (the device's ``features.sqlite``)."""

    def __init__(self, path: str | Path) -> None:
        self._db = CacheDatabase(Path(path))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> FieldLabels:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def judge(self, shas: Sequence[str], label: str, probabilities: np.ndarray, classes: Sequence[str],
              head: int) -> None:
        """Keep the head's answer for each newly labelled sample (a sample already judged under that label keeps
        its first verdict: a later head may have learned it)."""
        if not len(shas):
            return
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        top = np.argmax(probabilities, axis=1)
        with self._db.write("field labels") as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO field_labels (sample_sha256, label, predicted, probability, head, created_utc) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(sha, label, classes[j], float(probabilities[i, j]), int(head), created)
                 for i, (sha, j) in enumerate(zip(shas, top))])

    def report(self) -> dict[str, Any]:
        """Accuracy per labelled class and over all, each with its count and Wilson 95 % interval."""
        with self._db.read("field labels") as conn:
            rows = conn.execute("SELECT label, SUM(predicted = label), COUNT(*) FROM field_labels "
                                "GROUP BY label ORDER BY label").fetchall()
        per_class = {label: {"n": int(n), "correct": int(k), "accuracy": round(k / n, 4), "ci95": wilson(int(k), int(n))}
                     for label, k, n in rows}
        n, k = sum(c["n"] for c in per_class.values()), sum(c["correct"] for c in per_class.values())
        return {"n": n, "correct": k, "accuracy": round(k / n, 4) if n else None, "ci95": wilson(k, n),
                "per_class": per_class}


def estimated_accuracy(confidences: np.ndarray) -> float | None:
    """The label-free estimate: the mean top probability (see the module for how far to trust it)."""
    return round(float(np.mean(confidences)), 4) if len(confidences) else None
