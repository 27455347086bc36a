"""Aggregation of heads for fleet learning, on arrays (no network): runtime/federated.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.federated import (
    HeadFedAvg,
    HeadUpdate,
    Rejection,
    UpdateRejected,
    check_update,
    pack_update,
)
from edgexfer.runtime.head_training import fit_linear
from edgexfer.runtime.heads import Head

SHA = "a" * 64
CLASSES = ("cat", "dog", "fox")
D = 4


def linear(rows: np.ndarray, bias: np.ndarray, classes=CLASSES) -> Head:
    return Head("linear", classes, {"W": np.asarray(rows, np.float32), "b": np.asarray(bias, np.float32)})


def unit_rows(rows) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def prototype(rows, classes=CLASSES, scale=10.0) -> Head:
    return Head("prototype", classes, {"P": unit_rows(rows), "scale": np.array(scale, np.float32)})


GLOBAL = linear(np.zeros((3, D)), np.zeros(3))


def reply(head: Head, counts: dict[str, int], sha: str = SHA):
    return pack_update(head, counts, sha)


def test_holders_policy_averages_each_row_over_only_the_devices_holding_its_class():
    a = linear(np.full((3, D), 1.0), [1.0, 1.0, 1.0])
    b = linear(np.full((3, D), 4.0), [4.0, 4.0, 4.0])
    updates = [HeadUpdate("a", a, {"cat": 10, "dog": 30, "fox": 0}),
               HeadUpdate("b", b, {"cat": 30, "dog": 0, "fox": 0})]
    result = HeadFedAvg(rows="holders").aggregate(GLOBAL, updates)
    W, bias = result.head.tensors["W"], result.head.tensors["b"]
    # b's step is 4 times a's: clipped to 1.5 times the lower median step (a's), so its rows count as 1.5;
    # cat: its holders' counts capped at their lower median (10, 10): (1 + 1.5) / 2; dog: only device a
    # holds it; fox: nobody, the global row stays
    assert result.clipped == {"b": 0.375}
    np.testing.assert_allclose(W[0], 1.25)
    np.testing.assert_allclose(bias[0], 1.25)
    np.testing.assert_allclose(W[1], 1.0)
    np.testing.assert_allclose(bias[1], 1.0)
    np.testing.assert_allclose(W[2], 0.0)
    assert result.counts == {"cat": 40, "dog": 30, "fox": 0}
    assert result.contributors == {"cat": 2, "dog": 1, "fox": 0}
    assert result.accepted == ["a", "b"] and result.added_classes == []


def test_all_policy_is_fedavg_of_every_known_row_weighted_by_device_samples_with_server_momentum():
    a = linear(np.full((3, D), 1.0), [1.0, 1.0, 1.0])
    b = linear(np.full((3, D), 1.2), [1.2, 1.2, 1.2])
    c = linear(np.full((3, D), 2.0), [2.0, 2.0, 2.0])
    updates = [HeadUpdate("a", a, {"cat": 10, "dog": 30, "fox": 0}),  # 40 samples
               HeadUpdate("b", b, {"cat": 20, "dog": 0, "fox": 0}),  # 20 samples
               HeadUpdate("c", c, {"cat": 5, "dog": 5, "fox": 0})]  # 10 samples
    strategy = HeadFedAvg(rows="all", momentum=0.5)
    result = strategy.aggregate(GLOBAL, updates)
    first = result.head
    # a's 40 samples weigh as the median device's 20; c's step (2) is clipped to 1.5 times the median step (1.2)
    assert result.weights == {"a": 20.0, "b": 20.0, "c": 10.0} and result.fleet_samples == 50
    assert result.clipped == {"c": 0.9}
    np.testing.assert_allclose(first.tensors["W"], (20 * 1 + 20 * 1.2 + 10 * 1.8) / 50, rtol=1e-6)  # fox too
    np.testing.assert_allclose(first.tensors["b"], 1.24, rtol=1e-6)
    # replies equal to the merged head: step 0, plus half the previous step (1.24)
    same = linear(np.full((3, D), 1.24), [1.24] * 3)
    second = strategy.aggregate(first, [HeadUpdate("a", same, {"cat": 1, "dog": 1}),
                                        HeadUpdate("b", same, {"cat": 1})]).head
    np.testing.assert_allclose(second.tensors["W"], 1.86, rtol=1e-6)


def test_a_class_new_to_the_fleet_is_added_after_the_global_classes_in_name_order():
    wide = ("cat", "dog", "fox", "owl", "bee")
    a = linear(np.arange(5 * D).reshape(5, D), np.arange(5), wide)
    result = HeadFedAvg().aggregate(GLOBAL, [HeadUpdate("a", a, {"cat": 3, "dog": 3, "fox": 0, "owl": 5, "bee": 2})])
    assert result.head.classes == ("cat", "dog", "fox", "bee", "owl")
    # a new row (W, b) is scaled down to the norm of the largest known row of the merged head (fox's here)
    bound = np.linalg.norm(np.append(a.tensors["W"][2], a.tensors["b"][2]))
    for row, source in ((3, 4), (4, 3)):  # bee, owl
        full = np.append(a.tensors["W"][source], a.tensors["b"][source])
        np.testing.assert_allclose(result.head.tensors["W"][row], full[:-1] * bound / np.linalg.norm(full), rtol=1e-5)
    assert result.added_classes == ["bee", "owl"]


def test_prototypes_merge_as_class_means_weighted_by_counts_capped_at_the_median():
    g = prototype(np.eye(3, D))
    a = prototype([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]])
    b = prototype([[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]])
    result = HeadFedAvg().aggregate(g, [HeadUpdate("a", a, {"cat": 1, "dog": 1, "fox": 0}),
                                        HeadUpdate("b", b, {"cat": 3, "dog": 1, "fox": 0})])
    expected = np.array([1.0, 0, 0, 1.0]) / np.sqrt(2.0)  # b's 3 samples of cat weigh as a's 1
    np.testing.assert_allclose(result.head.tensors["P"][0], expected, atol=1e-6)
    assert float(result.head.tensors["scale"]) == 10.0


def test_mlp_heads_are_refused_with_the_reason():
    mlp = Head("mlp", CLASSES, {"W1": np.ones((2, D), np.float32), "b1": np.zeros(2, np.float32),
                                "W2": np.ones((3, 2), np.float32), "b2": np.zeros(3, np.float32)})
    with pytest.raises(InputError, match="cannot merge this head kind.*mlp"):
        HeadFedAvg().aggregate(mlp, [])


def test_fewer_devices_than_the_minimum_leave_the_head_unchanged():
    a = linear(np.ones((3, D)), np.ones(3))
    result = HeadFedAvg(min_devices=2).aggregate(GLOBAL, [HeadUpdate("a", a, {"cat": 5, "dog": 5, "fox": 0})])
    assert result.head is GLOBAL


def test_devices_with_no_samples_answer_but_are_not_merged():
    a = linear(np.ones((3, D)), np.ones(3))
    result = HeadFedAvg().aggregate(GLOBAL, [HeadUpdate("a", a, {"cat": 0, "dog": 0, "fox": 0}),
                                             HeadUpdate("b", a, {"cat": 2, "dog": 2, "fox": 0})])
    assert result.empty == ["a"] and result.accepted == ["b"]


# ------------------------------------------------------------------------------- checking replies

def check(arrays, config, device="dev-7"):
    return check_update(device, arrays, config, global_head=GLOBAL, backbone_sha256=SHA)


def test_a_valid_reply_round_trips():
    head = linear(np.ones((3, D)), np.ones(3))
    update = check(*reply(head, {"cat": 1, "dog": 2}))
    assert update.counts == {"cat": 1, "dog": 2, "fox": 0} and update.device == "dev-7"


@pytest.mark.parametrize("bad, message", [
    ("nan", "tensor 'W' holds NaN or infinity"),
    ("inf", "tensor 'b' holds NaN or infinity"),
    ("shape", "tensor 'W' has the wrong shape"),
    ("backbone", "head is for another backbone"),
    ("kind", "head is of another kind"),
    ("counts", "malformed sample counts"),
    ("negative", "malformed sample counts"),
    ("huge", "malformed sample counts"),
    ("dtype", "tensor 'W' is not float32"),
    ("classes", "class list does not start with the round's classes"),
    ("format", "unknown update format"),
    ("extra", "wrong tensors"),
])
def test_bad_replies_are_rejected_and_name_the_device(bad, message):
    arrays, config = reply(linear(np.ones((3, D)), np.ones(3)), {"cat": 1, "dog": 1})
    arrays = dict(arrays)
    if bad == "nan":
        arrays["W"] = arrays["W"].copy()
        arrays["W"][1, 2] = np.nan
    elif bad == "inf":
        arrays["b"] = np.array([0, np.inf, 0], np.float32)
    elif bad == "shape":
        arrays["W"] = np.ones((3, D + 1), np.float32)
    elif bad == "backbone":
        config["backbone_sha256"] = "b" * 64
    elif bad == "kind":
        config["kind"] = "prototype"
    elif bad == "counts":
        config["counts"] = json.dumps([1, 2])
    elif bad == "negative":
        config["counts"] = json.dumps([1, -2, 0])
    elif bad == "huge":
        config["counts"] = json.dumps([1, 10**12, 0])
    elif bad == "dtype":
        arrays["W"] = arrays["W"].astype(np.float64)
    elif bad == "classes":
        config["classes"] = json.dumps(["dog", "cat", "fox"])
    elif bad == "format":
        config["format"] = "pickle"
    elif bad == "extra":
        arrays["smuggled"] = np.zeros(3, np.float32)
    with pytest.raises(UpdateRejected) as err:
        check(arrays, config)
    line = str(err.value)
    assert line.startswith(f"update from device dev-7: {message}"), line
    assert "\n" not in line and line.count(" | ") >= 2


def test_rejections_are_reported_by_device():
    result = HeadFedAvg().aggregate(GLOBAL, [], [Rejection("dev-3", "update from device dev-3: NaN")])
    assert result.report()["rejected"] == [{"device": "dev-3", "reason": "update from device dev-3: NaN"}]


# ------------------------------------------------------------------------------- FedProx

def test_the_proximal_term_keeps_local_training_near_the_global_head():
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (40, D)) + 3 * np.eye(D)[i % 2] for i in range(2)])
    y = np.repeat([0, 1], 40)
    start = linear(rng.normal(0, 0.1, (2, D)), np.zeros(2), ("cat", "dog"))
    free = fit_linear(X, y, ("cat", "dog"), warm_start=start)
    near = fit_linear(X, y, ("cat", "dog"), warm_start=start, proximal=10.0)
    drift = lambda h: float(np.linalg.norm(h.tensors["W"] - start.tensors["W"]))  # noqa: E731
    assert drift(near) < 0.5 * drift(free)
    assert fit_linear(X, y, ("cat", "dog"), warm_start=start, proximal=0.0).tensors["W"].tobytes() == \
        free.tensors["W"].tobytes()
    with pytest.raises(InputError, match="proximal term needs a warm_start"):
        fit_linear(X, y, ("cat", "dog"), proximal=1.0)


def test_a_stronger_proximal_term_keeps_both_weights_and_biases_nearer_the_start():
    # the minimiser of loss + mu/2·||θ - θ0||² moves towards θ0 as mu grows (W and b alike: b is in the term)
    rng = np.random.default_rng(1)
    X = rng.normal(2.0, 1.0, (60, D))
    y = rng.integers(0, 3, 60)
    start = linear(rng.normal(0, 0.3, (3, D)), rng.normal(0, 0.3, 3))
    far = fit_linear(X, y, CLASSES, warm_start=start, proximal=0.01, tol=1e-9)
    near = fit_linear(X, y, CLASSES, warm_start=start, proximal=100.0, tol=1e-9)
    for name in ("W", "b"):
        assert np.linalg.norm(near.tensors[name] - start.tensors[name]) < 0.1 * np.linalg.norm(
            far.tensors[name] - start.tensors[name])


def test_local_training_of_a_round_appends_new_classes_and_reports_counts():
    from edgexfer.runtime.fleet_client import train_on_samples

    rng = np.random.default_rng(2)
    centres = {"cat": 0, "dog": 1, "owl": 2}
    labels = [c for c in ("cat", "dog", "owl") for _ in range(15)]
    X = np.stack([rng.normal(0, 0.5, D) + 3 * np.eye(D)[centres[c]] for c in labels])
    start = linear(rng.normal(0, 0.1, (3, D)), np.zeros(3))
    head, counts, note = train_on_samples(start, X, labels)
    assert head.classes == ("cat", "dog", "fox", "owl") and note == ""
    assert counts == {"cat": 15, "dog": 15, "fox": 0, "owl": 15}
    pred = np.asarray(head.classes)[head.logits(X).argmax(1)]
    assert np.mean(pred == np.asarray(labels)) > 0.9
    # nothing to learn from: the round's head comes back with zero counts and the reason
    same, zero, why = train_on_samples(start, X[:5], labels[:5])
    assert same is start and sum(zero.values()) == 0 and "one class only" in why
    same, zero, why = train_on_samples(start, np.zeros((0, D), np.float32), [])
    assert same is start and why == "no labelled samples"


def test_differential_privacy_clips_each_device_step_and_adds_calibrated_noise():
    a = linear(np.full((3, D), 10.0), np.full(3, 10.0))  # a huge step: clipped to norm 1
    b = linear(np.zeros((3, D)), np.zeros(3))
    updates = [HeadUpdate("a", a, {"cat": 1000, "dog": 1}), HeadUpdate("b", b, {"cat": 1})]
    quiet = HeadFedAvg(dp_clip=1.0, dp_noise=0.0).aggregate(GLOBAL, updates).head
    step = np.concatenate([quiet.tensors["W"].ravel(), quiet.tensors["b"]])
    # unweighted mean of the clipped steps: device a's 1,000 samples buy it no more than its clip
    assert np.linalg.norm(step) == pytest.approx(0.5, rel=1e-5)
    noisy = [HeadFedAvg(dp_clip=1.0, dp_noise=2.0, seed=s).aggregate(GLOBAL, updates).head for s in range(40)]
    residual = np.stack([np.concatenate([h.tensors["W"].ravel(), h.tensors["b"]]) - step for h in noisy])
    assert residual.std() == pytest.approx(2.0 * 1.0 / 2, rel=0.1)  # noise std = multiplier · clip / devices
    with pytest.raises(InputError, match="dp_noise needs dp_clip"):
        HeadFedAvg(dp_noise=1.0)


def test_differential_privacy_keeps_a_class_new_to_the_fleet_inside_the_clipped_step():
    """Issue 24: with --dp-clip the classes new to the fleet vanished (accuracy 0.381). A new class steps
    from a zero row inside the holder's clipped step; the others' step on it is zero (benchmarks/README.md:
    8 devices, σ = 0.1, 10 rounds from a head of 4 classes: 0.615-0.658 against 0.398-0.416 before)."""
    bird = linear(np.vstack([np.zeros((3, D)), np.full((1, D), 0.3)]), np.array([0, 0, 0, 0.3]), (*CLASSES, "bird"))
    stay = linear(np.zeros((3, D)), np.zeros(3))
    updates = [HeadUpdate("a", bird, {"bird": 20, CLASSES[0]: 5}), HeadUpdate("b", stay, {CLASSES[0]: 9})]
    result = HeadFedAvg(dp_clip=0.5, dp_noise=0.0, momentum=0.0).aggregate(GLOBAL, updates)
    head = result.head
    assert head.classes == (*CLASSES, "bird") and result.added_classes == ["bird"]
    row = np.append(head.tensors["W"][3], head.tensors["b"][3])
    # device a's whole step (its bird row, norm 0.3 * sqrt(5) = 0.67) clipped to 0.5, averaged over 2 devices
    assert np.linalg.norm(row) == pytest.approx(0.25, rel=1e-5)
    assert np.allclose(row / np.linalg.norm(row), 1 / np.sqrt(D + 1), rtol=1e-5)
    noisy = HeadFedAvg(dp_clip=0.5, dp_noise=1.0, seed=3).aggregate(GLOBAL, updates).head
    assert noisy.classes == head.classes and not np.allclose(noisy.tensors["W"][3], head.tensors["W"][3])
