"""Retrain: fit a candidate head on the device's cached features, judge it, keep it, activate it if it passes.

``Device.retrain`` takes the state lock and calls :func:`retrain_head`, which runs four steps:

1. :func:`training_set`: the bundle's exemplars, the training side of the local split
   (:class:`~edgexfer.runtime.holdout.LocalSplit`, the split the update health check uses too) and the
   augmented views of those training samples (``learn --augment``, keys :func:`~edgexfer.runtime.augment.view_key`);
2. :func:`head_fit`: the policy (:mod:`edgexfer.runtime.fewshot` for linear heads, else
   :class:`~edgexfer.runtime.head_training.HeadTrainer`) and the fit that trains the candidate, warm-started
   from the active head;
3. judging: the holdout, plus :func:`leave_one_out` refits for the few-shot classes (too few local samples
   to split), then :func:`~edgexfer.runtime.holdout.retrain_gate`;
4. keeping: the candidate is recorded with its metrics ("candidate" until the switch is done, or
   "rejected"), activated when accepted, and the report written to ``last_retrain.json``.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgexfer.runtime.augment import MAX_AUGMENT, view_key
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fewshot import POLICIES, choose_policy, fit_fewshot, frozen_rows, leave_one_out_correct
from edgexfer.runtime.fsutil import PRIVATE_FILE, write_atomic
from edgexfer.runtime.head_training import HeadTrainer, fit_linear
from edgexfer.runtime.heads import Head
from edgexfer.runtime.holdout import (
    DEFAULT_HOLDOUT,
    DEFAULT_SEED,
    DEFAULT_TOLERANCE,
    MIN_SPLIT_SAMPLES,
    GateResult,
    LeaveOneOut,
    LocalSplit,
    retrain_gate,
)
from edgexfer.runtime.names import DEFAULT_HEAD_POLICY
from edgexfer.runtime.state import ActiveState, DeviceState, HeadRecord, crash_point

#: ``fit(X, y, warm_start)``: trains a head of the retrain's classes (the candidate, and its leave-one-out refits)
HeadFit = Callable[[np.ndarray, np.ndarray, Head | None], Head]


@dataclass(frozen=True)
class RetrainSettings:
    """What ``Device.retrain`` was asked for; the policy is checked when made (before the state lock)."""

    kind: str | None = None  #: head kind of the candidate; None: the active head's
    tolerance: float = DEFAULT_TOLERANCE  #: the gate's allowed accuracy loss
    holdout: float = DEFAULT_HOLDOUT  #: share of every split class held out
    seed: int = DEFAULT_SEED  #: seed of the split, the MLP trainer and the leave-one-out draw
    C: float = 1.0  #: inverse L2 strength of linear heads
    policy: str = DEFAULT_HEAD_POLICY  #: linear head policy (:data:`edgexfer.runtime.fewshot.POLICIES`)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InputError("retrain policy", got=repr(self.policy), expected=f"one of {list(POLICIES)}",
                             todo="use 'auto' (the default), 'fewshot' or 'frozen' (the previous policy)")


@dataclass(frozen=True)
class RetrainReport:
    accepted: bool
    version: int
    active_head: int
    kind: str
    classes: list[str]
    holdout_count: int
    holdout_accuracy_new: float | None
    holdout_accuracy_old: float | None
    tolerance: float
    train_count: int
    exemplar_count: int
    frozen_classes: list[str]  #: classes whose rows are the active head's (frozen; fewshot: restored, one common scale)
    temperature: float | None
    seconds: float
    reason: str
    policy: str = "fewshot"  #: the linear head policy used (edgexfer.runtime.fewshot), or the head kind
    requested_policy: str = "auto"  #: the policy asked for ("auto" picks fewshot or frozen)
    #: how the candidate was judged: "holdout", "leave-one-out", "holdout+leave-one-out" or "none"
    gate: str = "holdout"
    loo_count: int = 0  #: few-shot samples judged by leave-one-out refits
    few_shot_classes: list[str] = field(default_factory=list)  #: classes not split (too few local samples)
    min_split_samples: int = MIN_SPLIT_SAMPLES  #: below this many local samples a class is not split
    view_count: int = 0  #: augmented views of training samples trained on (``learn --augment``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class TrainingSet:
    """What the candidate trains on, in this row order: the bundle's exemplars, the split's training
    samples, then the augmented views of those samples."""

    split: LocalSplit
    X: np.ndarray
    y: np.ndarray  #: class numbers in ``split.classes``
    #: leave-one-out groups: one per exemplar (negative), one per local sample, a view in its sample's group
    groups: np.ndarray
    exemplar_count: int
    view_count: int
    device_only: list[str]  #: classes without exemplars (only the device's samples teach them); [] without exemplars
    train_shas: list[str]  #: the split's training samples

    @property
    def train_labels(self) -> list[str]:
        return [self.split.labels[i] for i in self.split.train]

    @property
    def few_shot(self) -> np.ndarray:
        """Per training sample, whether its class is a few-shot class (not split: judged by leave-one-out)."""
        few = set(self.split.few_shot_classes)
        return np.array([label in few for label in self.train_labels], dtype=bool)

    @property
    def few_shot_trained(self) -> list[str]:
        """The few-shot samples trained on, sorted: the next retrain's leave-one-out leaves them out."""
        return sorted(self.train_shas[j] for j in np.flatnonzero(self.few_shot))


def retrain_head(state: DeviceState, cache: Callable[[], FeatureCache], settings: RetrainSettings,
                 *, started: float | None = None) -> RetrainReport:
    """Train a candidate head on cached features and activate it if it passes the gate (see the module doc).

    The caller holds the state lock. ``cache`` opens the device's feature cache; ``started`` is the
    ``time.perf_counter()`` the report's seconds count from (default: now).
    """
    started = time.perf_counter() if started is None else started
    active = state.active()
    bundle = state.bundle(active.bundle)
    old_head = state.load_head(active.head, feature_dim=bundle.manifest.backbone.feature_dim)
    kind = settings.kind or old_head.kind
    data = training_set(bundle, active.bundle, old_head, cache, settings)
    warm = old_head if (old_head.kind == kind) else None
    policy, frozen, fit = head_fit(kind, data, warm, settings)
    candidate = fit(data.X, data.y, warm)
    # few-shot classes have no holdout: their local samples are judged by leave-one-out refits
    loo = leave_one_out(state.head_record(active.head), fit, data, candidate, settings.seed) \
        if data.split.few_shot_classes and kind == "linear" else None
    gate = retrain_gate(candidate, old_head, data.split, settings.tolerance, loo=loo)
    used = policy if kind == "linear" else kind
    record = _keep(state, active, gate, retrain_metrics(gate, data, used))
    report = RetrainReport(
        accepted=gate.accepted, version=record.version,
        active_head=record.version if gate.accepted else active.head, kind=kind, classes=data.split.classes,
        holdout_count=gate.holdout_count, holdout_accuracy_new=gate.accuracy_new,
        holdout_accuracy_old=gate.accuracy_active, tolerance=settings.tolerance, train_count=int(len(data.y)),
        exemplar_count=data.exemplar_count, frozen_classes=frozen, temperature=gate.temperature,
        seconds=round(time.perf_counter() - started, 3), reason=gate.reason,
        policy=used, requested_policy=settings.policy, gate=gate.method,
        loo_count=gate.loo_count,
        view_count=data.view_count,
        few_shot_classes=data.split.few_shot_classes, min_split_samples=MIN_SPLIT_SAMPLES)
    write_atomic(state.last_retrain_path, (json.dumps(report.to_dict(), indent=2) + "\n").encode(),
                 mode=PRIVATE_FILE)
    crash_point("retrain-done")
    return report


def training_set(bundle: Bundle, backbone: str, active_head: Head, cache: Callable[[], FeatureCache],
                 settings: RetrainSettings) -> TrainingSet:
    """The exemplars, the local split's training samples and their views (:class:`TrainingSet`)."""
    with cache() as opened:
        shas, features, labels = opened.labelled(backbone, bundle.preprocess.key())
    if len(labels) == 0:
        raise InputError("nothing to retrain on", got="no labelled samples for the installed backbone",
                         expected="samples added with `edgexfer device learn`", todo="learn some samples first")
    # the split the update health check uses too (same class order, fraction and seed)
    split = LocalSplit.of(shas, features, labels, active_head.classes, settings.holdout, settings.seed)
    ex = bundle.exemplars()
    X_ex, y_ex = (ex if ex is not None else (np.zeros((0, features.shape[1]), np.float32), np.zeros(0, np.int64)))
    # augmented views of the training samples only (learn --augment): a held-out sample's views
    # never train, and leave-one-out drops a sample with its views (same group)
    train_shas = [shas[i] for i in split.train]
    view_rows, view_groups = _views(cache, backbone, bundle.preprocess.key(), train_shas)
    view_groups_arr = np.array(view_groups, dtype=np.int64)
    X_views = np.stack(view_rows).astype(np.float32) if view_rows else np.zeros((0, features.shape[1]), np.float32)
    targets = split.targets[split.train]
    exemplar_classes = {active_head.classes[i] for i in np.unique(y_ex)} if len(y_ex) else set()
    return TrainingSet(
        split=split,
        X=np.concatenate([X_ex, features[split.train], X_views]),
        y=np.concatenate([y_ex, targets, targets[view_groups_arr]]),
        groups=np.concatenate([-1 - np.arange(len(y_ex)), np.arange(len(split.train)), view_groups_arr]),
        exemplar_count=int(len(y_ex)), view_count=int(len(X_views)),
        device_only=[c for c in split.classes if c not in exemplar_classes] if exemplar_classes else [],
        train_shas=train_shas)


def _views(cache: Callable[[], FeatureCache], backbone: str, preprocess_key: str,
           train_shas: list[str]) -> tuple[list[np.ndarray], list[int]]:
    """The cached views of ``train_shas``, view after view: ``(rows, index of each row's sample)``."""
    rows: list[np.ndarray] = []
    groups: list[int] = []
    with cache() as opened:
        for view in range(MAX_AUGMENT):
            found = opened.get_features(backbone, view_key(preprocess_key, view), train_shas)
            if not found:
                break
            for j, sha in enumerate(train_shas):
                if sha in found:
                    rows.append(found[sha])
                    groups.append(j)
    return rows, groups


def head_fit(kind: str, data: TrainingSet, warm: Head | None,
             settings: RetrainSettings) -> tuple[str, list[str], HeadFit]:
    """``(policy, frozen classes, fit)``: the policy ``settings.policy`` stands for here, and the fit it makes."""
    classes, labels, C = data.split.classes, data.split.labels, settings.C
    train_labels = data.train_labels
    policy = choose_policy(settings.policy, [train_labels.count(c) for c in data.device_only])
    if kind == "linear" and policy == "fewshot":
        # classes without local samples keep the active head's rows (rescaled): see fit_fewshot
        frozen = frozen_rows(warm, classes, labels)

        def fit(X: np.ndarray, y: np.ndarray, start: Head | None) -> Head:
            # leave-one-out refits start from the candidate: the rows to keep still come from
            # the active head
            return fit_fewshot(X, y, classes, device_only=data.device_only, keep=frozen, C=C,
                               warm_start=start, keep_from=warm)
        return policy, frozen, fit
    if kind == "linear" and policy == "adapt" and warm is not None and warm.kind == "linear":
        return policy, *_adapt_fit(data, warm, C)
    frozen = []
    params: dict[str, Any] = {"seed": settings.seed} if kind == "mlp" else {}
    if kind == "linear":
        # float32 products and a 1e-5 gradient tolerance: ~2.5x faster than the host's exact
        # settings, with weights within ~1e-3 of them (measured on 1,000 x 1,280 features)
        params = {"C": C, "tol": 1e-5, "matmul_dtype": "float32"}
        if warm is not None:
            # the previous policy: classes without local samples keep the active head's row
            frozen = frozen_rows(warm, classes, labels)
            params["frozen_classes"] = frozen
    trainer = HeadTrainer(kind, **params)

    def fit_trainer(X: np.ndarray, y: np.ndarray, start: Head | None) -> Head:
        return trainer.fit(X, y, classes, warm_start=start)
    return policy, frozen, fit_trainer


#: the "adapt" policy's proximal strength towards the active head (FedProx's mu, per unit of sample weight)
ADAPT_PROXIMAL = 0.1


def _adapt_fit(data: TrainingSet, warm: Head, C: float) -> tuple[list[str], HeadFit]:
    """The "adapt" policy, for inputs that changed (a new camera, light, microphone): the local samples show
    the new domain, the exemplars the old one, and the active head knows the old one from more data than the
    exemplars hold. So: every row fitted on exemplars and local samples, the local rows repeated until they
    weigh about as much as the exemplars (a domain-balanced loss), with a proximal term pulling towards the
    active head (:data:`ADAPT_PROXIMAL`); classes without local samples keep their rows.

    Measured on the 336 clipart8 images the demo bundle never saw, against their camera-degraded copy (5
    labelled degraded images per class, 6 draws, features in numpy, 2026-12-07): the active head 0.633 clean /
    0.487 degraded; the plain refit ("frozen", what ``auto`` chose) 0.628 / 0.521, losing up to 2.7 clean
    points; proximal 0.1 with domain balancing 0.646 / 0.534, at worst 0.3 clean points below the active head.
    """
    frozen = frozen_rows(warm, data.split.classes, data.split.labels)
    first_local = data.exemplar_count

    def fit(X: np.ndarray, y: np.ndarray, start: Head | None) -> Head:
        # leave-one-out refits drop local rows only: the exemplars stay the first rows; the proximal anchor is
        # the active head for them too (the same objective)
        return fit_adapt(X[:first_local], y[:first_local], X[first_local:], y[first_local:], data.split.classes,
                         warm, C=C, frozen=frozen)
    return frozen, fit


def fit_adapt(X_old: np.ndarray, y_old: np.ndarray, X_new: np.ndarray, y_new: np.ndarray, classes: list[str],
              warm: Head, *, C: float = 1.0, frozen: list[str] | tuple[str, ...] = ()) -> Head:
    """The "adapt" fit (:func:`_adapt_fit`): ``X_new`` repeated until it weighs about as much as ``X_old``, a
    proximal pull of :data:`ADAPT_PROXIMAL` towards ``warm``; ``frozen`` classes keep its rows."""
    repeat = max(1, round(len(X_old) / len(X_new))) if len(X_new) else 1
    X = np.concatenate([X_old, *([X_new] * repeat)])
    y = np.concatenate([y_old, *([y_new] * repeat)])
    return fit_linear(X, y, classes, C=C, tol=1e-5, matmul_dtype="float32", warm_start=warm,
                      proximal=ADAPT_PROXIMAL, frozen_classes=list(frozen))


def leave_one_out(active_record: HeadRecord, fit: HeadFit, data: TrainingSet, candidate: Head,
                  seed: int) -> LeaveOneOut | None:
    """Leave-one-out refits on the few-shot classes' local training samples the active head never trained on.

    A fair comparison needs samples the active head never trained on either: a retrained head records
    the few-shot samples it trained on; one from before that record may have trained on any of them.
    Bundle and published heads never saw a local sample. None when no sample could be judged.
    """
    local_rows = data.exemplar_count + np.arange(len(data.split.train))
    if active_record.source == "retrain":
        seen = set(active_record.metrics.get("few_shot_trained", data.train_shas))
    else:
        seen = set()
    fair = np.array([sha not in seen for sha in data.train_shas], dtype=bool)
    judged, ok = leave_one_out_correct(fit, data.X, data.y, local_rows[data.few_shot & fair], candidate,
                                       seed=seed, groups=data.groups)
    if not len(judged):
        return None
    classes = data.split.classes
    return LeaveOneOut(features=data.X[judged], labels=[classes[int(c)] for c in data.y[judged]],
                       candidate_correct=ok)


def retrain_metrics(gate: GateResult, data: TrainingSet, policy: str) -> dict[str, Any]:
    """The metrics a retrained head's record keeps (``policy``: the linear policy used, or the head kind)."""
    metrics: dict[str, Any] = {k: v for k, v in {"holdout_accuracy": gate.accuracy_new,
                                                 "holdout_accuracy_previous": gate.accuracy_active,
                                                 "holdout_count": gate.holdout_count,
                                                 "train_count": len(data.y)}.items()
                               if v is not None}
    metrics["holdout_digest"] = data.split.digest
    metrics["gate"] = gate.method
    metrics["loo_count"] = gate.loo_count
    metrics["policy"] = policy
    # the few-shot samples this head trained on: the next retrain's leave-one-out leaves them out
    metrics["few_shot_trained"] = data.few_shot_trained
    return metrics


def _keep(state: DeviceState, active: ActiveState, gate: GateResult, metrics: dict[str, Any]) -> HeadRecord:
    """Record the judged head and switch to it when accepted."""
    # "candidate" until the switch is done: a crash in between leaves a candidate that never ran
    record = state.add_head(gate.head, backbone_sha256=active.bundle, parent=active.head,
                            status="candidate" if gate.accepted else "rejected", source="retrain",
                            metrics=metrics)
    if gate.accepted:
        state.activate_head(record.version)
        state.set_head_status(record.version, "accepted")
    return record
