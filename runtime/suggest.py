"""Which samples are worth a label? Uncertainty plus coverage of what the labels so far do not cover.

``edgexfer device suggest`` ranks candidate samples (the review queue's, or given files) for a person with a
small label budget:

* **uncertainty**: one minus the margin between the active head's two highest probabilities (a sample the
  head hesitates on teaches it more than one it is sure of);
* **coverage**: k-center greedy in feature space (Sener and Savarese, ICLR 2018): the distance (cosine, on
  unit-length features) from a candidate to the nearest sample already labelled or already suggested, so
  the budget spreads over the drifted region instead of spending itself on near-duplicates.

Each pick maximises ``UNCERTAINTY_WEIGHT * uncertainty + (1 - UNCERTAINTY_WEIGHT) * coverage`` (uncertainty in
[0, 1] as it is, coverage scaled by the largest distance left), and the picked sample joins the covered set. Margin alone is the classic
uncertainty sampling; coverage alone is core-set selection. benchmarks/label_budget.py measures the three
against random choice on camera-degraded clipart8 (10 draws, 2, 5 and 10 labels per class): none of them
beats random by more than the spread between draws (paired means within -1.7 and +1.0 points; random
covers 8 classes at least as well), so the page keeps its queue's own order.

Pure numpy, torch-free: a device runs it.
"""
from __future__ import annotations

import numpy as np

from edgexfer.runtime.errors import InputError

#: weight of the head's uncertainty against the coverage of feature space (see benchmarks/label_budget.py)
UNCERTAINTY_WEIGHT = 0.5
METHODS = ("suggested", "margin", "coverage", "random")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """One minus the margin between the two highest class probabilities of each row."""
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape[1] < 2:
        return np.zeros(len(p))
    top2 = -np.partition(-p, 1, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - top2[:, 1])


def rank(features: np.ndarray, probabilities: np.ndarray, k: int, *, labelled: np.ndarray | None = None,
         method: str = "suggested", weight: float = UNCERTAINTY_WEIGHT, seed: int = 0) -> list[int]:
    """The indices of the ``k`` candidates to label first, best first.

    ``features`` ``[N, D]`` and ``probabilities`` ``[N, C]`` of the candidates; ``labelled``: features of the
    samples that have labels already (they count as covered). ``method``: "suggested" (uncertainty and
    coverage), "margin" (uncertainty only), "coverage" (k-center greedy only) or "random".
    """
    if method not in METHODS:
        raise InputError("suggest method", got=repr(method), expected=" or ".join(METHODS))
    n = len(features)
    if len(probabilities) != n:
        raise InputError("suggest", got=f"{n} feature rows and {len(probabilities)} probability rows",
                         expected="one of each per candidate")
    k = min(int(k), n)
    if k <= 0:
        return []
    if method == "random":
        return [int(i) for i in np.random.default_rng(seed).permutation(n)[:k]]
    unsure = uncertainty(probabilities)
    if method == "margin":
        return [int(i) for i in np.argsort(-unsure, kind="stable")[:k]]
    x = _unit(features)
    # distance to the nearest covered sample (1 - cosine); nothing covered yet: every candidate is far (1)
    nearest = np.ones(n)
    if labelled is not None and len(labelled):
        nearest = np.maximum(1.0 - (x @ _unit(labelled).T).max(axis=1), 0.0)
    u = unsure  # in [0, 1] already: a small spread of uncertainty stays a small difference
    w = 0.0 if method == "coverage" else weight
    picked: list[int] = []
    free = np.ones(n, dtype=bool)
    for _ in range(k):
        cover = nearest / (nearest[free].max() or 1.0)
        score = np.where(free, w * u + (1 - w) * cover, -np.inf)
        best = int(np.argmax(score))
        picked.append(best)
        free[best] = False
        nearest = np.minimum(nearest, np.maximum(1.0 - x @ x[best], 0.0))
    return picked
