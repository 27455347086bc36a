"""Model selection for ``edgexfer train --mode auto``: seeded, stratified k-fold cross-validation.

Every candidate is scored on the same folds of the *training* part of the data; the validation split
that ``train`` reports never takes part, so the reported accuracy of the chosen model is not the
figure it was chosen by. Frozen candidates (heads on the cached backbone features: a linear head over
a grid of ``C``, the mlp head, the prototype head) cost milliseconds per fold. A partial fine-tuning
candidate is scored on the same folds by a caller-supplied function, within a time budget; if the
budget runs out before every fold is scored, the candidate is reported but not eligible, since a
mean over fewer folds is not comparable.

The frozen linear head with the configured ``C`` is listed first and is the baseline; another candidate
is chosen only when it beats the baseline credibly over the same folds (:func:`choose`), and then the
best such candidate. So the chosen model is never one that cross-validation ranks below the frozen
linear head.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.head_training import HeadTrainer

#: the grid of C (inverse L2 strength) searched for the linear head, besides the configured C
LINEAR_C_GRID = (0.1, 0.3, 1.0, 3.0, 10.0)
#: default number of folds
DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class Candidate:
    """One model family with fixed settings."""

    name: str  #: shown in tables, e.g. "frozen linear C=1"
    mode: str  #: "frozen" or "partial"
    head: str  #: head kind
    params: dict[str, Any] = field(default_factory=dict)  #: the head trainer's (frozen) or recipe's (partial)


@dataclass
class CandidateScore:
    candidate: Candidate
    fold_accuracy: list[float] = field(default_factory=list)
    fold_seconds: list[float] = field(default_factory=list)
    note: str = ""  #: why a candidate is not eligible (empty when it is)

    @property
    def complete(self) -> bool:
        return not self.note

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_accuracy)) if self.fold_accuracy else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.fold_accuracy, ddof=1)) if len(self.fold_accuracy) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"name": c.name, "mode": c.mode, "head": c.head, "params": c.params,
                "fold_accuracy": [round(a, 5) for a in self.fold_accuracy],
                "mean": round(self.mean, 5) if self.fold_accuracy else None,
                "std": round(self.std, 5) if self.fold_accuracy else None,
                "seconds": round(float(np.sum(self.fold_seconds)), 3),
                "seconds_per_fold": round(float(np.mean(self.fold_seconds)), 3) if self.fold_seconds else None,
                "eligible": self.complete, "note": self.note}


def stratified_folds(labels: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` index pairs of a seeded stratified k-fold split; every sample is tested once.

    Each class is shuffled by its own generator seeded with ``(seed, label)`` and dealt to the folds
    in turn, starting where the previous class stopped, so fold sizes differ by at most one.
    ``folds`` is lowered to the size of the smallest class (at least 2).
    """
    y = np.asarray(labels)
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise InputError("--folds", got=repr(folds), expected="an integer >= 2", todo="use e.g. --folds 5")
    counts = np.bincount(y)
    present = counts[counts > 0]
    if present.min() < 2:
        small = [int(c) for c in np.flatnonzero((counts > 0) & (counts < 2))]
        raise DataError("cross-validation needs two training images per class", got=f"class index(es) {small} with one",
                        expected="at least 2 per class in the training split", todo="add images or use --mode frozen")
    k = int(min(folds, present.min()))
    assignment = np.empty(len(y), dtype=np.int64)
    start = 0
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        members = members[np.random.default_rng((seed, int(label))).permutation(len(members))]
        assignment[members] = (start + np.arange(len(members))) % k
        start = (start + len(members)) % k
    return [(np.flatnonzero(assignment != f), np.flatnonzero(assignment == f)) for f in range(k)]


def frozen_candidates(C: float = 1.0, seed: int = 0) -> list[Candidate]:
    """The frozen linear head with the configured ``C`` first, then the C grid, mlp and prototype."""
    grid = [C] + [c for c in LINEAR_C_GRID if not np.isclose(c, C)]
    out = [Candidate(f"frozen linear C={c:g}", "frozen", "linear", {"C": float(c)}) for c in grid]
    out.append(Candidate("frozen mlp", "frozen", "mlp", {"epochs": 200, "lr": 1e-3, "seed": seed}))
    out.append(Candidate("frozen prototype", "frozen", "prototype", {}))
    return out


def score_frozen(candidates: Sequence[Candidate], features: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 folds: Sequence[tuple[np.ndarray, np.ndarray]], progress: bool = True) -> list[CandidateScore]:
    """Cross-validate heads on fixed features: ``features[i]`` belongs to ``labels[i]``."""
    scores = [CandidateScore(c) for c in candidates]
    bar = tqdm(total=len(candidates) * len(folds), desc="cross-validating frozen heads", unit="fit",
               disable=not progress, leave=False, file=sys.stderr)
    for score in scores:
        trainer = HeadTrainer(score.candidate.head, **score.candidate.params)
        for train_idx, test_idx in folds:
            started = time.perf_counter()
            head = trainer.fit(features[train_idx], labels[train_idx], list(classes))
            predicted = head.logits(features[test_idx]).argmax(axis=1)
            score.fold_seconds.append(time.perf_counter() - started)
            score.fold_accuracy.append(float(np.mean(predicted == labels[test_idx])))
            bar.update()
    bar.close()
    return scores


#: scores one fold: (train indices, test indices, seconds left of the budget) -> test logits, or None
#: when the budget cannot cover the fold
FoldRunner = Callable[[np.ndarray, np.ndarray, float], "np.ndarray | None"]


def score_budgeted(candidate: Candidate, run_fold: FoldRunner, labels: np.ndarray,
                   folds: Sequence[tuple[np.ndarray, np.ndarray]], budget_s: float,
                   setup_seconds: float = 0.0) -> CandidateScore:
    """Cross-validate an expensive candidate fold by fold until the budget (seconds) is spent.

    ``setup_seconds`` (work shared by all folds, done before) counts against the budget. A fold is
    not started when the folds so far say it would not finish in time.
    """
    score = CandidateScore(candidate)
    spent = setup_seconds
    for i, (train_idx, test_idx) in enumerate(folds):
        left = budget_s - spent
        typical = float(np.mean(score.fold_seconds)) if score.fold_seconds else 0.0
        if left <= 0 or typical > left:
            score.note = (f"budget of {budget_s:g} s spent after {i} of {len(folds)} folds "
                          f"({spent:.0f} s so far); raise --budget to score it")
            return score
        started = time.perf_counter()
        logits = run_fold(train_idx, test_idx, left)
        seconds = time.perf_counter() - started
        spent += seconds
        if logits is None:
            score.note = (f"budget of {budget_s:g} s ran out in fold {i + 1} of {len(folds)}; "
                          "raise --budget to score it")
            return score
        score.fold_seconds.append(seconds)
        score.fold_accuracy.append(float(np.mean(np.asarray(logits).argmax(axis=1) == labels[test_idx])))
    return score


def paired_gain(score: CandidateScore, baseline: CandidateScore) -> tuple[float, float]:
    """Mean and standard error of ``score``'s accuracy minus ``baseline``'s, fold by fold (same folds)."""
    d = np.asarray(score.fold_accuracy) - np.asarray(baseline.fold_accuracy)
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    return float(np.mean(d)), se


def choose(scores: Sequence[CandidateScore]) -> CandidateScore:
    """The first candidate (the baseline), unless another beats it credibly; then the best of those.

    "Credibly" is a paired one-standard-error rule: over the same folds, the candidate's mean gain over
    the baseline must exceed the standard error of that gain. Picking the plain maximum of many
    candidates that are within noise of each other chases fold-to-fold luck: measured on clipart8
    (benchmarks/auto_selection.py) it landed 0.6 points below the best fixed candidate, where keeping
    the baseline unless beaten lost nothing. Candidates the budget cut short are never chosen.
    """
    eligible = [s for s in scores if s.complete and s.fold_accuracy]
    if not eligible or eligible[0] is not scores[0]:
        raise InputError("the baseline candidate did not finish cross-validation", got=f"{len(eligible)} eligible",
                         expected="the frozen linear head scored on every fold", todo="report this as a bug")
    baseline = eligible[0]
    best = baseline
    for s in eligible[1:]:
        gain, se = paired_gain(s, baseline)
        if gain > se and s.mean > best.mean + 1e-12:
            best = s
    return best


def selection_report(scores: Sequence[CandidateScore], chosen: CandidateScore, folds: int, seed: int,
                     train_count: int) -> dict[str, Any]:
    """The ``selection`` block of ``metrics.json``: the whole table and the choice."""
    baseline = scores[0]
    return {
        "method": f"seeded stratified {folds}-fold cross-validation on the {train_count} training images "
                  "(the validation split is not used)",
        "folds": folds, "seed": seed,
        "chosen": chosen.candidate.name,
        "rule": "the frozen linear head unless a candidate's mean gain over it, fold by fold, exceeds the "
                "gain's standard error; then the best such candidate",
        "chosen_minus_frozen_linear": round(chosen.mean - baseline.mean, 5),
        "candidates": [dict(s.to_dict(), **_gain(s, baseline)) for s in scores],
    }


def _gain(score: CandidateScore, baseline: CandidateScore) -> dict[str, Any]:
    if score is baseline or not score.complete:
        return {}
    gain, se = paired_gain(score, baseline)
    return {"gain_over_frozen_linear": round(gain, 5), "gain_standard_error": round(se, 5)}
