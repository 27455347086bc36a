"""The device's holdout (one split for retrain and the update health check) and McNemar's test.

The decision on plain counts and arrays, checked against the binomial tail (and scipy where it is
installed); retrain's gate on small linear heads; the split against what ``Device.retrain`` held out
on a real device.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edgexfer.runtime.device import Device
from edgexfer.runtime.heads import Head
from edgexfer.runtime.holdout import (
    MIN_TEMPERATURE_SAMPLES,
    LocalSplit,
    class_order,
    correct,
    holdout_digest,
    holdout_split,
    mcnemar_p_value,
    mcnemar_worse,
    retrain_gate,
)
from edgexfer.runtime.state import DeviceState

DEMO = Path(__file__).resolve().parents[2] / "data" / "clipart8-demo"


# ------------------------------------------------------------------------------------------ McNemar, split
@pytest.mark.parametrize(("previous_only", "new_only", "p"), [
    (0, 0, 1.0), (7, 0, 1 / 128), (5, 0, 1 / 32), (4, 0, 1 / 16), (0, 10, 1.0),
    (9, 2, (55 + 11 + 1) / 2048), (8, 3, (165 + 55 + 11 + 1) / 2048), (5, 5, 638 / 1024)])
def test_mcnemar_p_value_is_the_exact_one_sided_binomial_tail(previous_only, new_only, p):
    assert mcnemar_p_value(previous_only, new_only) == pytest.approx(p, rel=1e-12)
    n = previous_only + new_only
    tail = sum(math.comb(n, k) for k in range(previous_only, n + 1)) / 2 ** n if n else 1.0
    assert mcnemar_p_value(previous_only, new_only) == pytest.approx(tail, rel=1e-12)


def test_mcnemar_p_value_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats", reason="scipy is the reference, not a dependency")
    for b, c in [(3, 1), (12, 4), (30, 18), (200, 170), (1, 40)]:
        expected = stats.binomtest(b, b + c, 0.5, alternative="greater").pvalue
        assert mcnemar_p_value(b, c) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_decision_is_one_sided_at_alpha_005():
    # 24 samples; the previous head alone is right on 5 of them: p = 1/32 <= 0.05, worse
    prev = np.ones(24, bool)
    new = prev.copy()
    new[:5] = False
    worse = mcnemar_worse(prev, new)
    assert (worse.previous_only, worse.new_only, worse.new_is_worse) == (5, 0, True)
    assert "McNemar one-sided p = 0.03125 <= 0.05" in worse.describe()
    new[4] = True  # 4 against 0: p = 1/16, not significant
    assert not mcnemar_worse(prev, new).new_is_worse
    # a much better new head is never "worse" (one-sided), however large the difference
    assert mcnemar_worse(~prev, prev).p_value == 1.0
    # discordant pairs only: 10 concordant errors change nothing
    a, b = np.r_[np.zeros(10, bool), np.ones(5, bool)], np.zeros(15, bool)
    assert mcnemar_worse(a, b).p_value == mcnemar_p_value(5, 0)


def test_labels_a_head_does_not_know_are_its_errors(bundle):
    golden = bundle.golden()
    head = bundle.head()
    labels = [bundle.manifest.head.classes[i] for i in golden["labels"]]
    ok = correct(head, golden["features"], labels)
    assert ok.sum() >= 6 and np.array_equal(ok, golden["logits"].argmax(1) == golden["labels"])
    assert not correct(head, golden["features"], ["drums"] * len(labels)).any()


def test_split_follows_the_class_order_and_is_seeded():
    labels = ["zebra"] * 12 + ["apple"] * 12 + ["mango"] * 5 + ["kiwi"] * 2
    order = class_order(["zebra", "apple"], labels)
    assert order == ["zebra", "apple", "kiwi", "mango"]  # the active head's classes first, then new ones sorted
    train, hold = holdout_split(labels, order, 0.25, 0)
    assert sorted([*train, *hold]) == list(range(len(labels))) and not set(train) & set(hold)
    held = [labels[i] for i in hold]
    # mango (5) and kiwi (2) are below MIN_SPLIT_SAMPLES: few-shot classes keep every sample for training
    assert (held.count("zebra"), held.count("apple"), held.count("mango"), held.count("kiwi")) == (3, 3, 0, 0)
    # the previous rule (classes >= 3 split) is still a parameter; the other classes' draws do not move
    old_rule = holdout_split(labels, order, 0.25, 0, min_split=3)[1]
    assert [labels[i] for i in old_rule].count("mango") == 1
    assert [i for i in old_rule if labels[i] != "mango"] == list(hold)
    again = holdout_split(labels, order, 0.25, 0)
    assert np.array_equal(again[1], hold)
    # the order is part of the split: the alphabetical one (np.unique's) draws other samples
    assert not np.array_equal(holdout_split(labels, sorted(order), 0.25, 0)[1], hold)
    assert not np.array_equal(holdout_split(labels, order, 0.25, 1)[1], hold)


def test_retrain_holds_out_what_the_shared_split_gives(bundle, make_device):
    """Retrain's holdout is holdout_split(labels, class_order(active head, labels)): the health check's call."""
    state = make_device()
    with Device(state) as dev:
        for folder, label in {"sports": "sports", "music": "drums", "fruit": "fruit"}.items():
            dev.learn(sorted((DEMO / folder).iterdir())[:12], label)
        report = dev.retrain()
        with dev.cache() as cache:
            shas, _, labels = cache.labelled(bundle.manifest.backbone.sha256, bundle.preprocess.key())
    # the bundle head's classes (active at retrain) then "drums": not alphabetical
    order = class_order(bundle.manifest.head.classes, labels)
    assert order[-1] == "drums" and order != sorted(order)
    _, hold = holdout_split(labels, order)
    assert len(hold) == report.holdout_count == 9
    digest = DeviceState(state).head_record(report.version).metrics["holdout_digest"]
    assert holdout_digest([shas[i] for i in hold]) == digest
    _, alphabetical = holdout_split(labels, sorted(order))
    assert holdout_digest([shas[i] for i in alphabetical]) != digest


# ------------------------------------------------------------------------------------------ retrain's gate
def _linear(classes: list[str], predicts: list[str]) -> Head:
    """A linear head on one-hot-like features whose class ``classes[i]`` scores feature ``predicts`` maps to it."""
    dim = len(predicts)
    W = np.zeros((len(classes), dim), np.float32)
    for j, name in enumerate(predicts):
        W[classes.index(name), j] = 4.0
    return Head("linear", classes, {"W": W, "b": np.zeros(len(classes), np.float32)})


def _local(per_class: int, fraction: float = 0.25) -> LocalSplit:
    names = ["cat", "dog", "fox"]
    labels = [name for name in names for _ in range(per_class)]
    rng = np.random.default_rng(3)
    X = np.eye(3, dtype=np.float32)[[names.index(label) for label in labels]] + rng.normal(0, 0.1, (len(labels), 3))
    shas = [f"{i:064x}" for i in range(len(labels))]
    return LocalSplit.of(shas, X.astype(np.float32), labels, ["dog", "cat"], fraction)


def test_retrain_gate_accepts_within_the_tolerance_and_fits_the_temperature():
    split = _local(per_class=16)  # 4 of each class held out: 12 >= MIN_TEMPERATURE_SAMPLES
    assert split.classes == ["dog", "cat", "fox"] and len(split.hold) == 12 >= MIN_TEMPERATURE_SAMPLES
    right = _linear(split.classes, ["cat", "dog", "fox"])
    active = _linear(["dog", "cat"], ["cat", "dog", "dog"])  # never knew "fox": those are its errors
    gate = retrain_gate(right, active, split, tolerance=0.01)
    assert gate.accepted and gate.holdout_count == 12
    assert (gate.accuracy_new, gate.accuracy_active) == (pytest.approx(1.0), pytest.approx(8 / 12))
    assert gate.reason == "holdout accuracy 1.000 vs active 0.667 (tolerance 0.010)"
    assert gate.temperature is not None and gate.head.temperature == gate.temperature
    assert right.temperature is None  # the candidate given is left as it was

    # a candidate that calls everything "dog": 4/12, more than the tolerance below the active head
    dogs = _linear(split.classes, ["dog", "dog", "dog"])
    assert not retrain_gate(dogs, active, split, tolerance=0.01).accepted
    assert retrain_gate(dogs, active, split, tolerance=0.5).accepted


def test_retrain_gate_without_a_holdout_or_with_a_small_one():
    right = _linear(["dog", "cat", "fox"], ["cat", "dog", "fox"])
    none = retrain_gate(right, right, _local(per_class=8, fraction=0.0), tolerance=0.01)
    assert (none.accepted, none.holdout_count, none.accuracy_new, none.temperature) == (True, 0, None, None)
    assert none.reason == "no holdout: accepted on training data alone"
    # 8 per class is below MIN_SPLIT_SAMPLES: not split at all (few-shot classes keep every sample)
    assert len(_local(per_class=8).hold) == 0
    small = retrain_gate(right, right, _local(per_class=12))  # 3 of each class: below MIN_TEMPERATURE_SAMPLES
    assert small.holdout_count == 9 and small.accepted and small.temperature is None
    assert small.head is right
