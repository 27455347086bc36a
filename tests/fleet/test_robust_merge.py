"""A device that lies to the merge (issue 24, D3): plain functions, real clipart8 features, no Flower processes.

One of 4 non-IID devices answers a round with 9,000,000 samples claimed per class and its head scaled by
-50 (D3, which took round-1 accuracy from 0.405 to 0.024 on main), or its step times 1000, or its step
negated, or honest weights with huge counts. The round is what the deployment runs: the device's
:func:`train_on_samples`, :func:`pack_update`, :func:`check_update`, then :class:`HeadFedAvg` with
``edgexfer fleet serve``'s settings. The start head knows 4 of the 8 classes (the devices add the others,
as in the issue's fleet whose bundle knew 3 of 6). The liar's classes are held by other devices too, so
that its data is not what the comparison measures (benchmarks/fleet_study.py ``--attacks`` measures
the other splits, docs/fleet.md "A device that lies").
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.federated import HeadFedAvg, bounded_weights, check_update, clip_factors, pack_update
from edgexfer.runtime.fleet_client import train_on_samples
from edgexfer.runtime.heads import Head

HELD_OUT_PER_CLASS = 21
#: the classes each device holds; every class of device 0 (the liar) is held by another device too
HOLDINGS = (("fruit", "vehicles"), ("beverages", "music", "sports", "vehicles"),
            ("beverages", "fruit", "hardware", "tools"), ("desserts", "hardware", "sports", "vehicles"))
#: the most the liar may move held-out accuracy (Acceptance 1 of issue 24)
MAX_MOVE = 0.03


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, device_bundle, clipart8):
    """(bundle, features, labels, held-out indices, one index array per device)."""
    from edgexfer.fleet.deployment import write_val_features

    bundle = Bundle.open(device_bundle)
    path = tmp_path_factory.mktemp("robust") / "features.npz"
    write_val_features(bundle, clipart8, path)
    with np.load(path) as data:
        X, labels = data["features"].astype(np.float32), data["labels"].astype(str)
    rng = random.Random(0)
    val, parts = [], [[] for _ in HOLDINGS]
    for c in sorted(set(labels)):
        idx = [int(i) for i in np.flatnonzero(labels == c)]
        rng.shuffle(idx)
        val += idx[:HELD_OUT_PER_CLASS]
        owners = [k for k, held in enumerate(HOLDINGS) if c in held]
        for j, i in enumerate(idx[HELD_OUT_PER_CLASS:]):
            parts[owners[j % len(owners)]].append(i)
    return bundle, X, labels, np.array(val), [np.array(p) for p in parts]


def _half(head: Head) -> Head:
    keep = len(head.classes) // 2
    return Head(head.kind, head.classes[:keep], {k: v[:keep] for k, v in head.tensors.items()})


def _lie(attack: str, global_head: Head, local: Head, counts: dict[str, int]) -> tuple[Head, dict[str, int]]:
    huge = {c: 9_000_000 for c in local.classes}
    if attack == "honest":
        return local, counts
    if attack == "huge-counts":
        return local, huge
    if attack == "d3":
        return Head(local.kind, local.classes, {k: (-50 * v).astype(np.float32) for k, v in local.tensors.items()}), huge
    factor = {"huge-norm": 1000.0, "sign-flip": -1.0}[attack]
    known = global_head.num_classes
    tensors = {}
    for name, value in local.tensors.items():
        t = value.astype(np.float64).copy()
        t[:known] = global_head.tensors[name] + factor * (t[:known] - global_head.tensors[name])
        tensors[name] = t.astype(np.float32)
    return Head(local.kind, local.classes, tensors), (counts if attack == "huge-norm" else huge)


def _round(fleet, attack: str):
    bundle, X, labels, val, parts = fleet
    head, sha = _half(bundle.head()), bundle.manifest.backbone.sha256
    updates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # max_iter warnings of the local fits
        for k, p in enumerate(parts):
            local, counts, _ = train_on_samples(head, X[p], list(labels[p]))
            if k == 0:
                local, counts = _lie(attack, head, local, counts)
            arrays, config = pack_update(local, counts, sha)
            updates.append(check_update(f"device-{k}", arrays, config, global_head=head, backbone_sha256=sha))
    # fleet serve's defaults: momentum 0.8, rows "all"
    result = HeadFedAvg(min_devices=2, momentum=0.8).aggregate(head, updates)
    merged = result.head
    accuracy = float(np.mean(np.asarray(merged.classes)[merged.logits(X[val]).argmax(1)] == labels[val]))
    return accuracy, result


@pytest.mark.parametrize("attack", ["d3", "huge-norm", "sign-flip", "huge-counts"])
def test_one_lying_device_of_four_moves_held_out_accuracy_by_at_most_3_points(fleet, attack):
    honest, _ = _round(fleet, "honest")
    lied, result = _round(fleet, attack)
    assert abs(lied - honest) <= MAX_MOVE, f"{attack}: {lied:.3f} against {honest:.3f} with an honest device 0"
    assert sorted(result.head.classes) == sorted(set(fleet[2]))  # the classes new to the fleet were added
    # however much it claims, the liar weighs no more than the median device; a huge step is clipped
    assert result.weights["device-0"] <= sorted(result.weights.values())[1]
    if attack in ("d3", "huge-norm"):
        assert "device-0" in result.clipped and result.clipped["device-0"] < 0.1
    if attack != "huge-norm":
        assert result.counts["fruit"] >= 9_000_000  # the claim is reported as it came
    assert result.fleet_samples < 2_000  # but devices scale their training by what the merge counted


def test_bounded_weights_cap_every_count_at_the_lower_median():
    np.testing.assert_array_equal(bounded_weights([60, 90, 120, 54_000_000]), [60, 90, 90, 90])
    np.testing.assert_array_equal(bounded_weights([30, 9_000_000]), [30, 30])  # of two, neither outweighs the other
    np.testing.assert_array_equal(bounded_weights([7]), [7])  # a lone holder keeps its count
    assert len(bounded_weights([])) == 0


def test_clip_factors_scale_a_step_down_to_one_and_a_half_median_steps():
    factors = clip_factors([0.5, 0.6, 0.7, 30.0])
    assert factors[:3] == [1.0, 1.0, 1.0]
    assert factors[3] == pytest.approx(1.5 * 0.6 / 30.0)
    assert clip_factors([1.0, 100.0]) == [1.0, pytest.approx(0.015)]


# ------------------------------------------------------------------ the statistics round (runtime/fleet_stats.py)

def _lie_statistics(attack: str, stats):
    """Device 0's statistics: D3's 9,000,000 per class with sums and scatter times -50; its sums and scatter
    times 1000; its class means negated at 9,000,000 claimed samples; honest statistics with huge counts."""
    from edgexfer.runtime.fleet_stats import ClassStatistics

    if attack == "honest":
        return stats
    held = np.array([stats.counts[c] > 0 for c in stats.classes])
    huge = {c: (9_000_000 if n else 0) for c, n in stats.counts.items()}
    counts = dict(stats.counts) if attack == "huge-norm" else huge
    sums = stats.sums * np.where(held, [counts[c] / max(stats.counts[c], 1) for c in stats.classes], 0)[:, None]
    factor = stats.factor
    if attack == "d3":
        sums, factor = -50 * sums, 50 * factor
    elif attack == "huge-norm":
        sums, factor = 1000 * sums, 1000 * factor
    elif attack == "sign-flip":
        sums = -sums
    return ClassStatistics(stats.classes, counts, sums, factor)


def _statistics_round(fleet, attack: str):
    from edgexfer.runtime.fleet_stats import (
        check_statistics,
        class_statistics,
        pack_statistics,
        statistics_round,
    )

    bundle, X, labels, val, parts = fleet
    head, sha = _half(bundle.head()), bundle.manifest.backbone.sha256
    updates = []
    for k, p in enumerate(parts):
        stats = class_statistics(X[p], list(labels[p]), head.classes)
        if k == 0:
            stats = _lie_statistics(attack, stats)
        arrays, config = pack_statistics(stats, sha)
        updates.append(check_statistics(f"device-{k}", arrays, config, global_head=head, backbone_sha256=sha))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = statistics_round(head, updates, min_devices=2)
    merged = result.head
    return float(np.mean(np.asarray(merged.classes)[merged.logits(X[val]).argmax(1)] == labels[val])), result


@pytest.fixture(scope="module")
def honest_statistics_accuracy(fleet):
    return _statistics_round(fleet, "honest")[0]


@pytest.mark.parametrize("attack", ["d3", "huge-norm", "sign-flip", "huge-counts"])
def test_one_lying_device_of_four_moves_the_statistics_rounds_accuracy_by_at_most_3_points(
        fleet, honest_statistics_accuracy, attack):
    honest = honest_statistics_accuracy
    lied, result = _statistics_round(fleet, attack)
    assert abs(lied - honest) <= MAX_MOVE, f"{attack}: {lied:.3f} against {honest:.3f} with an honest device 0"
    assert sorted(result.head.classes) == sorted(set(fleet[2]))  # the classes new to the fleet were added
    assert result.fleet_samples < 2_000  # what the devices' next round scales by: the capped counts
    if attack == "huge-counts":  # honest statistics: merged, weighing no more than the median device
        assert result.pooled.weights["device-0"] <= sorted(result.pooled.weights.values())[1]
        assert result.outliers == []
    else:  # class means far outside the fleet's: the device is left out, and named
        assert result.outliers == ["device-0"] and "device-0" not in result.pooled.weights
        assert any(r.device == "device-0" and "far outside the fleet's" in r.reason for r in result.rejected)


#: device 0 holds fruit and music alone (as split seed 4 of benchmarks/fleet_study.py): what it holds alone
#: the fleet cannot check, so its lies are measured against the fleet without it
LONE_HOLDINGS = (("fruit", "music", "sports", "vehicles"), ("tools", "vehicles"), ("beverages", "desserts"),
                 ("hardware", "sports"))


def test_a_d3_liar_over_three_rounds_costs_at_most_3_points_beyond_its_absence(fleet):
    """Issue 24 acceptance 1 over the deployment's three rounds (statistics, then two FedProx rounds from
    the statistics head), device 0 lying as in D3 in every round. Before the outlier rule the statistics
    round took split seed 4 of benchmarks/fleet_study.py (these holdings) 9.3 points below the fleet
    without device 0 (0.429 against 0.522, benchmarks/README.md), and the FedProx rounds kept it there;
    this test fails without the rule."""
    from edgexfer.runtime.federated import leave_out
    from edgexfer.runtime.fleet_stats import (
        check_statistics,
        class_statistics,
        pack_statistics,
        statistics_round,
    )

    bundle, X, labels, val, _ = fleet
    train = np.setdiff1d(np.arange(len(labels)), val)
    parts = [train[np.isin(labels[train], held)] for held in LONE_HOLDINGS]
    # a class held by two devices: each takes every other sample
    for c in ("sports", "vehicles"):
        owners = [k for k, held in enumerate(LONE_HOLDINGS) if c in held]
        rows = train[labels[train] == c]
        for j, k in enumerate(owners):
            parts[k] = np.union1d(parts[k][labels[parts[k]] != c], rows[j::len(owners)])
    sha = bundle.manifest.backbone.sha256
    zero = Head("linear", bundle.head().classes, {k: np.zeros_like(v) for k, v in bundle.head().tensors.items()})

    def federate(attack: str) -> list[float]:
        head, liars, accuracies, fleet_samples = zero, {}, [], 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            stats = []
            for k, p in enumerate(parts):
                if k == 0 and attack == "absent":
                    continue
                own = class_statistics(X[p], list(labels[p]), head.classes)
                arrays, config = pack_statistics(_lie_statistics(attack, own) if k == 0 else own, sha)
                stats.append(check_statistics(f"device-{k}", arrays, config, global_head=head, backbone_sha256=sha))
            result = statistics_round(head, stats, min_devices=2)
            head, fleet_samples = result.head, result.fleet_samples
            liars.update({d: 1 for d in result.outliers})
            accuracies.append(float(np.mean(np.asarray(head.classes)[head.logits(X[val]).argmax(1)] == labels[val])))
            strategy = HeadFedAvg(min_devices=2, momentum=0.8)
            for _ in (2, 3):
                updates = []
                for k, p in enumerate(parts):
                    if k == 0 and attack == "absent":
                        continue
                    local, counts, _ = train_on_samples(head, X[p], list(labels[p]), fleet_samples=fleet_samples)
                    if k == 0 and attack == "d3":
                        local, counts = _lie("d3", head, local, counts)
                    arrays, config = pack_update(local, counts, sha)
                    updates.append(check_update(f"device-{k}", arrays, config, global_head=head, backbone_sha256=sha))
                result = strategy.aggregate(head, *leave_out(updates, [], liars))
                head, fleet_samples = result.head, result.fleet_samples
                accuracies.append(float(np.mean(np.asarray(head.classes)[head.logits(X[val]).argmax(1)] == labels[val])))
        return accuracies

    absent, lied = federate("absent"), federate("d3")
    assert all(a - b <= MAX_MOVE for a, b in zip(absent, lied)), f"rounds 1-3: d3 {lied} against {absent} without device 0"


def test_class_statistics_leave_out_small_classes_and_their_factor_is_the_within_class_scatter():
    from edgexfer.runtime.fleet_stats import MIN_CLASS_SAMPLES, class_statistics

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 6))
    labels = ["a"] * 12 + ["b"] * (MIN_CLASS_SAMPLES - 1) + ["c"] * 4
    stats = class_statistics(X, labels, ("a", "b"))
    assert stats.classes == ("a", "b", "c") and stats.counts == {"a": 12, "b": 0, "c": 0}
    assert not stats.sums[1:].any()  # nothing of a class below the floor leaves the device
    a = X[:12] - X[:12].mean(axis=0)
    np.testing.assert_allclose(stats.factor.T @ stats.factor, a.T @ a, atol=1e-9)
    assert stats.factor.shape[0] <= 11  # at most samples - classes rows


def test_statistics_replies_that_do_not_add_up_are_refused_and_name_the_device():
    from edgexfer.runtime.federated import UpdateRejected
    from edgexfer.runtime.fleet_stats import check_statistics, class_statistics, pack_statistics

    rng = np.random.default_rng(1)
    head = Head("linear", ("a", "b"), {"W": np.zeros((2, 6), np.float32), "b": np.zeros(2, np.float32)})
    stats = class_statistics(rng.normal(size=(16, 6)), ["a"] * 10 + ["b"] * 6, head.classes)
    arrays, config = pack_statistics(stats, "f" * 64)
    assert check_statistics("cam-1", arrays, config, global_head=head, backbone_sha256="f" * 64).total == 16
    nan = {**arrays, "sums": np.where(arrays["sums"] > 0, np.nan, arrays["sums"]).astype(np.float32)}
    with pytest.raises(UpdateRejected, match="statistics from device cam-1: tensor 'sums' holds NaN"):
        check_statistics("cam-1", nan, config, global_head=head, backbone_sha256="f" * 64)
    hidden = {**config, "counts": "[10, 0]"}  # a sum for a class it claims no samples of
    with pytest.raises(UpdateRejected, match="a class without samples has a sum"):
        check_statistics("cam-1", arrays, hidden, global_head=head, backbone_sha256="f" * 64)
    wide = {**arrays, "scatter_factor": np.zeros((17, 6), np.float32)}  # more rows than samples
    with pytest.raises(UpdateRejected, match="statistics do not fit the counts"):
        check_statistics("cam-1", wide, config, global_head=head, backbone_sha256="f" * 64)


def test_a_device_caught_lying_is_not_merged_again_in_the_federation():
    """The server's rule for rounds after the statistics round (``run_federation`` and the study call
    :func:`leave_out`): the liar's later replies become rejections that say why, the others pass."""
    from edgexfer.runtime.federated import HeadUpdate, Rejection, leave_out

    head = Head("linear", ("a", "b"), {"W": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)})
    updates = [HeadUpdate(f"cam-{k}", head, {"a": 5, "b": 5}) for k in range(3)]
    earlier = [Rejection("cam-9", "malformed")]
    kept, rejected = leave_out(updates, earlier, {"cam-1": 1})
    assert [u.device for u in kept] == ["cam-0", "cam-2"]
    assert rejected[0] == earlier[0] and [r.device for r in rejected[1:]] == ["cam-1"]
    assert rejected[1].reason.startswith("reply of device cam-1: the device lied in round 1 | ")
    assert rejected[1].reason.count(" | ") == 3
