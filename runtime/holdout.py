"""The device's labelled holdout, and the two ways a new head is judged on it.

``Device.retrain`` gates a retrained head on a seeded share of the local labelled samples; the update
health check compares the previous and the new head on the same share. Both take it from
:meth:`LocalSplit.of` (:func:`holdout_split` with the same seed, fraction and class order:
:func:`class_order`, the active head's classes, then labels it does not know, sorted), so a retrained
head is never judged by an update's health check on samples it was trained on.

Retrain's gate (:func:`retrain_gate`) accepts a candidate unless it is more than a tolerance less
accurate than the active head on the holdout, and fits the candidate's temperature there.

Two heads on the same samples are compared with McNemar's exact test (:func:`mcnemar_worse`): only
the samples on which exactly one head is right carry information, and under "both heads are equally
good" each of them goes either way with probability 1/2. The test is one-sided: it asks whether the
new head is *significantly worse*, not whether the two differ. Below :data:`MIN_HOLDOUT_SAMPLES` holdout
samples the test cannot decide (among 5 discordant samples all 5 must favour the previous head); the
update health check then compares the two heads' accuracy on **all** the device's labelled samples,
with :data:`SMALL_SAMPLE_TOLERANCE` (:func:`accuracy_worse`), as retrain's gate does on its few-shot
samples.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.heads import Head

#: share of the local labelled samples held out (per class; a class with fewer than MIN_SPLIT_SAMPLES has none)
DEFAULT_HOLDOUT = 0.25
#: a class with fewer local samples than this is not split: all its samples train (few-shot classes;
#: retrain judges them by leave-one-out instead). 25% of 5 shots is one sample that the head never sees,
#: which cost more accuracy on clipart8 than any choice of classifier (benchmarks/fewshot_curves.py)
MIN_SPLIT_SAMPLES = 10
#: the seed of the split; retrain's default, and the only one the update health check uses
DEFAULT_SEED = 0
#: below this many holdout samples, two heads are not compared locally
MIN_HOLDOUT_SAMPLES = 20
#: level of the one-sided McNemar test: the new head is rolled back when p <= ALPHA
ALPHA = 0.05
#: retrain's gate: the new head may be at most this much less accurate than the active one on the holdout
DEFAULT_TOLERANCE = 0.01
#: the update health check below MIN_HOLDOUT_SAMPLES holdout samples: a signed head may be at most this much
#: less accurate than the active one on all the device's labelled samples. Wider than retrain's: the active
#: head may have been trained on some of them (it is favoured there), and one sample of 11 is 9 points, so
#: a head may lose one sample in ten to the active head, not two (issue 24: a poisoned fleet head 25 points
#: worse on held-out images installed because the check was skipped below 20 holdout samples)
SMALL_SAMPLE_TOLERANCE = 0.1
#: below this many holdout samples, retrain does not fit the new head's temperature
MIN_TEMPERATURE_SAMPLES = 10


def class_order(active_classes: Sequence[str], labels: Sequence[str]) -> list[str]:
    """The active head's classes in its order, then the labels it does not know, sorted."""
    known = list(active_classes)
    return known + sorted(set(labels) - set(known))


def holdout_split(labels: Sequence[str], classes: Sequence[str], fraction: float = DEFAULT_HOLDOUT,
                  seed: int = DEFAULT_SEED, min_split: int = MIN_SPLIT_SAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, holdout)`` of ``labels``: a seeded share of every class is held out.

    Classes are visited in the order of ``classes`` (see :func:`class_order`), each drawing its
    permutation from one generator seeded with ``seed``: the same labels, order, fraction and seed
    always give the same split. A class with fewer than ``min_split`` samples (default
    :data:`MIN_SPLIT_SAMPLES`) stays entirely in training; its permutation is drawn all the same, so
    the split of the other classes does not depend on ``min_split``.
    """
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise InputError("holdout labels outside the class order", got=", ".join(unknown[:5]),
                         expected=f"one of {len(index)} classes", todo="build the order with class_order()")
    if not 0.0 <= fraction < 1.0:
        raise InputError("holdout fraction", got=fraction, expected="0 <= fraction < 1")
    y = np.array([index[name] for name in labels], dtype=np.int64)
    rng = np.random.default_rng(seed)
    train: list[int] = []
    hold: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        n_hold = int(round(len(idx) * fraction)) if len(idx) >= max(min_split, 3) else 0
        hold += list(idx[:n_hold])
        train += list(idx[n_hold:])
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(hold), dtype=np.int64)


def holdout_digest(sample_sha256: Sequence[str]) -> str:
    """sha256 of the sorted sample ids of a holdout: two reports name the same samples iff it matches."""
    return hashlib.sha256("\n".join(sorted(sample_sha256)).encode()).hexdigest()


@dataclass(frozen=True)
class LocalSplit:
    """The device's labelled samples of one backbone, split into training and holdout (see the module doc)."""

    shas: list[str]
    features: np.ndarray  #: float32 ``[N, D]``; row ``i`` belongs to ``shas[i]``
    labels: list[str]
    classes: list[str]  #: :func:`class_order` of the active head's classes and ``labels``
    train: np.ndarray  #: indices of the training samples
    hold: np.ndarray  #: indices of the holdout samples

    @classmethod
    def of(cls, shas: Sequence[str], features: np.ndarray, labels: Sequence[str], active_classes: Sequence[str],
           fraction: float = DEFAULT_HOLDOUT, seed: int = DEFAULT_SEED) -> LocalSplit:
        """Split ``FeatureCache.labelled``'s ``(shas, features, labels)`` for a device whose active head has ``active_classes``."""
        classes = class_order(active_classes, labels)
        train, hold = holdout_split(labels, classes, fraction, seed)
        return cls(list(shas), features, list(labels), classes, train, hold)

    @property
    def few_shot_classes(self) -> list[str]:
        """Classes with local samples but none held out (fewer than :data:`MIN_SPLIT_SAMPLES`), in class order."""
        held = {self.labels[i] for i in self.hold}
        present = set(self.labels)
        return [c for c in self.classes if c in present and c not in held]

    @property
    def targets(self) -> np.ndarray:
        """Each sample's class number in :attr:`classes`."""
        return np.array([self.classes.index(label) for label in self.labels], dtype=np.int64)

    @property
    def holdout_features(self) -> np.ndarray:
        return self.features[self.hold]

    @property
    def holdout_labels(self) -> list[str]:
        return [self.labels[i] for i in self.hold]

    @property
    def digest(self) -> str:
        """:func:`holdout_digest` of the holdout samples."""
        return holdout_digest([self.shas[i] for i in self.hold])


def correct(head: Head, features: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """Per sample, whether ``head``'s top-1 class is the label.

    A label the head does not know is an error of that head, and so is a row whose logits are not finite.
    """
    labels = np.asarray(list(labels), dtype=object)
    if len(labels) == 0:
        return np.zeros(0, dtype=bool)
    logits = head.logits(features)
    predicted = np.asarray(head.classes, dtype=object)[logits.argmax(1)]
    return (predicted == labels) & np.isfinite(logits).all(1)


def mcnemar_p_value(old_only: int, new_only: int) -> float:
    """One-sided exact McNemar p-value of "the new head is worse".

    ``old_only``: samples only the old head gets right; ``new_only``: only the new one. Under the null
    hypothesis each of the ``n = old_only + new_only`` discordant samples favours the old head with
    probability 1/2, so the p-value is ``P(X >= old_only)`` for ``X ~ Binomial(n, 1/2)``.
    """
    if old_only < 0 or new_only < 0:
        raise InputError("McNemar counts", got=(old_only, new_only), expected="non-negative integers")
    n = old_only + new_only
    if n == 0:
        return 1.0
    # exact integer sum; int / int is correctly rounded even for huge numbers
    return sum(math.comb(n, k) for k in range(old_only, n + 1)) / 2 ** n


@dataclass(frozen=True)
class PairedComparison:
    """Two heads on the same holdout samples, decided by the one-sided exact McNemar test."""

    samples: int
    accuracy_new: float
    accuracy_previous: float
    previous_only: int  #: samples only the previous head gets right
    new_only: int  #: samples only the new head gets right
    p_value: float
    alpha: float

    @property
    def new_is_worse(self) -> bool:
        return self.p_value <= self.alpha

    def describe(self) -> str:
        verdict = "<=" if self.new_is_worse else ">"
        return (f"holdout accuracy {self.accuracy_new:.3f} new vs {self.accuracy_previous:.3f} previous on "
                f"{self.samples} samples ({self.previous_only} only the previous head gets right, {self.new_only} "
                f"only the new one), McNemar one-sided p = {self.p_value:.4g} {verdict} {self.alpha}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new_is_worse": self.new_is_worse}


def mcnemar_worse(previous_correct: np.ndarray, new_correct: np.ndarray, alpha: float = ALPHA) -> PairedComparison:
    """Is the new head significantly worse than the previous one on these samples (paired, one-sided)?"""
    prev = np.asarray(previous_correct, dtype=bool)
    new = np.asarray(new_correct, dtype=bool)
    if prev.shape != new.shape or prev.ndim != 1:
        raise InputError("paired comparison needs one result per sample from each head",
                         got=f"shapes {prev.shape} and {new.shape}", expected="two equal 1-D arrays")
    n = len(prev)
    previous_only = int(np.sum(prev & ~new))
    new_only = int(np.sum(new & ~prev))
    return PairedComparison(samples=n, accuracy_new=float(new.mean()) if n else 0.0,
                            accuracy_previous=float(prev.mean()) if n else 0.0, previous_only=previous_only,
                            new_only=new_only, p_value=mcnemar_p_value(previous_only, new_only), alpha=float(alpha))


@dataclass(frozen=True)
class AccuracyComparison:
    """Two heads on the same (few) samples: the new head fails if it is more than ``tolerance`` less accurate."""

    samples: int
    accuracy_new: float
    accuracy_previous: float
    previous_only: int  #: samples only the previous head gets right
    new_only: int  #: samples only the new head gets right
    tolerance: float

    @property
    def new_is_worse(self) -> bool:
        # in whole samples, so that float rounding of the two accuracies cannot decide
        return self.previous_only - self.new_only > self.tolerance * self.samples

    def describe(self) -> str:
        verdict = "more" if self.new_is_worse else "not more"
        return (f"accuracy on all {self.samples} labelled samples {self.accuracy_new:.3f} new vs "
                f"{self.accuracy_previous:.3f} previous ({self.previous_only} only the previous head gets right, "
                f"{self.new_only} only the new one): {verdict} than {self.tolerance:.2f} worse")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "new_is_worse": self.new_is_worse}


def accuracy_worse(previous_correct: np.ndarray, new_correct: np.ndarray,
                   tolerance: float = SMALL_SAMPLE_TOLERANCE) -> AccuracyComparison:
    """Is the new head more than ``tolerance`` less accurate than the previous one on these samples?"""
    prev = np.asarray(previous_correct, dtype=bool)
    new = np.asarray(new_correct, dtype=bool)
    if prev.shape != new.shape or prev.ndim != 1 or not len(prev):
        raise InputError("accuracy comparison needs one result per sample from each head",
                         got=f"shapes {prev.shape} and {new.shape}", expected="two equal, non-empty 1-D arrays")
    return AccuracyComparison(samples=len(prev), accuracy_new=float(new.mean()), accuracy_previous=float(prev.mean()),
                              previous_only=int(np.sum(prev & ~new)), new_only=int(np.sum(new & ~prev)),
                              tolerance=float(tolerance))


@dataclass(frozen=True)
class GateResult:
    """Retrain's verdict on a candidate head."""

    accepted: bool
    head: Head  #: the candidate, with its temperature when the holdout was large enough to fit one
    holdout_count: int
    accuracy_new: float | None  #: None without holdout samples
    accuracy_active: float | None
    temperature: float | None
    reason: str
    method: str = "holdout"  #: "holdout", "leave-one-out", "holdout+leave-one-out" or "none"
    loo_count: int = 0  #: few-shot samples judged by leave-one-out


@dataclass(frozen=True)
class LeaveOneOut:
    """Leave-one-out verdicts on local training samples of few-shot classes (they have no holdout)."""

    features: np.ndarray  #: ``[M, D]`` the samples judged
    labels: list[str]
    candidate_correct: np.ndarray  #: whether the candidate, refitted without each sample, predicts it


def retrain_gate(candidate: Head, active: Head, split: LocalSplit, tolerance: float = DEFAULT_TOLERANCE,
                 loo: LeaveOneOut | None = None) -> GateResult:
    """Accept ``candidate`` unless it is more than ``tolerance`` less accurate than ``active`` on the holdout.

    The holdout is the split's held-out samples plus, for few-shot classes (not split), the samples in
    ``loo``: there the candidate's verdict is its leave-one-out refit's, the active head's its own (it
    was not trained on them by this retrain). Without any such sample the candidate is accepted on its
    training alone. With at least :data:`MIN_TEMPERATURE_SAMPLES` true holdout samples its temperature
    is fitted there, accepted or not.
    """
    X, labels = split.holdout_features, split.holdout_labels
    n_loo = 0 if loo is None else len(loo.labels)
    if not labels and not n_loo:
        return GateResult(accepted=True, head=candidate, holdout_count=0, accuracy_new=None, accuracy_active=None,
                          temperature=None, reason="no holdout: accepted on training data alone", method="none")
    new_ok = correct(candidate, X, labels)
    active_ok = correct(active, X, labels)
    if n_loo:
        new_ok = np.concatenate([new_ok, np.asarray(loo.candidate_correct, dtype=bool)])
        active_ok = np.concatenate([active_ok, correct(active, loo.features, loo.labels)])
    method = "holdout+leave-one-out" if labels and n_loo else ("holdout" if labels else "leave-one-out")
    accuracy_new = float(np.mean(new_ok))
    accuracy_active = float(np.mean(active_ok))
    temperature = None
    if len(labels) >= MIN_TEMPERATURE_SAMPLES:
        # imported here, as in Device.retrain: predicting never needs the trainers
        from edgexfer.runtime.head_training import fit_temperature

        y = np.array([candidate.classes.index(label) for label in labels], dtype=np.int64)
        temperature = fit_temperature(candidate.logits(X), y)
        candidate = replace(candidate, temperature=temperature)
    what = {"holdout": "holdout accuracy",
            "leave-one-out": f"leave-one-out accuracy on {n_loo} few-shot samples",
            "holdout+leave-one-out": f"accuracy on {len(labels)} holdout + {n_loo} leave-one-out samples"}[method]
    return GateResult(accepted=accuracy_new >= accuracy_active - tolerance, head=candidate,
                      holdout_count=len(labels), accuracy_new=accuracy_new, accuracy_active=accuracy_active,
                      temperature=temperature,
                      reason=f"{what} {accuracy_new:.3f} vs active {accuracy_active:.3f} "
                             f"(tolerance {tolerance:.3f})", method=method, loo_count=n_loo)
