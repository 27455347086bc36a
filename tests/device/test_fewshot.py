"""Few-shot field learning on the device (no torch): SLDA, weight aligning, the split rule, leave-one-out, retrain."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fewshot import align_weights, fit_fewshot, fit_slda, imprint_rows, leave_one_out_correct
from edgexfer.runtime.head_training import fit_linear
from edgexfer.runtime.heads import Head
from edgexfer.runtime.holdout import MIN_SPLIT_SAMPLES, LeaveOneOut, LocalSplit, holdout_split, retrain_gate

CLASSES = ["a", "b", "c"]


def _blobs(n_per_class: int = 12, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, d))
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, d)) for c in centres]).astype(np.float32)
    return X, np.repeat(np.arange(3), n_per_class)


# ------------------------------------------------------------------------------------------------ SLDA
def test_slda_is_the_direct_numpy_computation() -> None:
    X, y = _blobs(d=24)
    lam = 0.3
    head = fit_slda(X, y, CLASSES, shrinkage=lam)
    Xd = X.astype(np.float64)
    mu = np.stack([Xd[y == c].mean(0) for c in range(3)])
    R = Xd - mu[y]
    S = R.T @ R / len(Xd)
    sigma = (1 - lam) * S + lam * np.trace(S) / S.shape[0] * np.eye(S.shape[0])
    W = np.linalg.solve(sigma, mu.T).T
    b = -0.5 * np.sum(W * mu, axis=1)
    assert head.kind == "linear" and head.classes == tuple(CLASSES)
    np.testing.assert_allclose(head.tensors["W"], W, rtol=2e-3, atol=2e-4 * np.abs(W).max())
    np.testing.assert_allclose(head.tensors["b"], b, rtol=2e-3, atol=2e-4 * np.abs(b).max())
    assert (head.logits(X).argmax(1) == y).mean() > 0.95


def test_slda_refuses_bad_shrinkage_and_missing_classes() -> None:
    X, y = _blobs()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(InputError, match="shrinkage"):
            fit_slda(X, y, CLASSES, shrinkage=bad)
    with pytest.raises(InputError, match="needs samples of every class"):
        fit_slda(X, y, [*CLASSES, "d"])


# -------------------------------------------------------------------------------------- weight aligning
def test_align_weights_equalises_group_norms_and_keeps_decisions_within_the_group() -> None:
    rng = np.random.default_rng(1)
    W = rng.normal(0, 1, (5, 8)).astype(np.float32)
    W[3:] *= 0.2  # device-only classes: short rows
    head = Head("linear", list("vwxyz"), {"W": W, "b": rng.normal(0, 1, 5).astype(np.float32)})
    aligned = align_weights(head, ["y", "z"])
    norms = np.linalg.norm(aligned.tensors["W"], axis=1)
    assert norms[3:].mean() == pytest.approx(norms[:3].mean(), rel=1e-5)
    np.testing.assert_array_equal(aligned.tensors["W"][:3], W[:3])
    f = rng.normal(0, 1, (50, 8)).astype(np.float32)
    np.testing.assert_array_equal(aligned.logits(f)[:, 3:].argmax(1), head.logits(f)[:, 3:].argmax(1))
    # nothing to align, or nothing to align to: unchanged
    for group in ([], list("vwxyz")):
        np.testing.assert_array_equal(align_weights(head, group).tensors["W"], W)


def test_imprint_rows_blends_towards_the_class_mean_direction_with_norm_and_mean_logit_kept() -> None:
    X, y = _blobs()
    rng = np.random.default_rng(2)
    W = rng.normal(0, 1, (3, X.shape[1])).astype(np.float32)
    head = Head("linear", CLASSES, {"W": W, "b": rng.normal(0, 1, 3).astype(np.float32)})
    mu = X.astype(np.float64).mean(0)
    m = X[y == 2].astype(np.float64).mean(0) - mu
    r = np.linalg.norm(W[2].astype(np.float64))
    full = imprint_rows(head, X, y, ["c"], 1.0)
    np.testing.assert_allclose(full.tensors["W"][2], r * m / np.linalg.norm(m), rtol=1e-5, atol=1e-6)
    half = imprint_rows(head, X, y, ["c"], 0.5)
    expected = 0.5 * W[2] + 0.5 * r * m / np.linalg.norm(m)
    np.testing.assert_allclose(half.tensors["W"][2], expected * r / np.linalg.norm(expected), rtol=1e-5, atol=1e-6)
    for h in (full, half):
        np.testing.assert_array_equal(h.tensors["W"][:2], W[:2])  # other rows untouched
        assert np.linalg.norm(h.tensors["W"][2]) == pytest.approx(r, rel=1e-5)
        # the logit at the training mean does not move
        assert h.logits(mu[None].astype(np.float32))[0, 2] == pytest.approx(head.logits(mu[None].astype(np.float32))[0, 2], abs=1e-4)
    np.testing.assert_array_equal(imprint_rows(head, X, y, ["c"], 0.0).tensors["W"], W)
    with pytest.raises(InputError):
        imprint_rows(head, X, y, ["c"], 1.5)


def test_fit_fewshot_is_balanced_logistic_regression_then_aligned() -> None:
    X, y = _blobs()
    keep = np.r_[np.arange(24), 24 + np.arange(3)]  # class c has 3 samples, a and b 12
    head = fit_fewshot(X[keep], y[keep], CLASSES, device_only=["c"])
    plain = fit_linear(X[keep], y[keep], CLASSES, class_weight="balanced", tol=1e-5, matmul_dtype="float32")
    norms = np.linalg.norm(head.tensors["W"], axis=1)
    assert norms[2] == pytest.approx(norms[:2].mean(), rel=1e-4)
    np.testing.assert_allclose(head.tensors["W"][:2], plain.tensors["W"][:2], atol=1e-3)


def test_auto_policy_is_fewshot_only_while_the_new_classes_have_few_samples() -> None:
    from edgexfer.runtime.fewshot import FEWSHOT_MAX_SAMPLES, choose_policy

    assert choose_policy("auto", [5, 5, 3]) == "fewshot"
    assert choose_policy("auto", [FEWSHOT_MAX_SAMPLES] * 3) == "frozen"
    assert choose_policy("auto", []) == "frozen"  # nothing learned on the device alone: the previous policy
    assert choose_policy("fewshot", [100]) == "fewshot" and choose_policy("frozen", [1]) == "frozen"


def test_restored_rows_decide_among_themselves_exactly_as_before() -> None:
    from edgexfer.runtime.fewshot import restore_rows

    X, y = _blobs()
    before = fit_linear(X[y < 2], y[y < 2], CLASSES[:2])
    head = fit_fewshot(X, y, CLASSES, device_only=["c"], keep=CLASSES[:2], warm_start=before)
    np.testing.assert_array_equal(head.logits(X)[:, :2].argmax(1), before.logits(X).argmax(1))
    ratio = head.tensors["W"][:2] / before.tensors["W"]
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)  # one common factor
    assert restore_rows(head, before, []) is head


# --------------------------------------------------------------------------------------- split and gate
def test_classes_below_min_split_samples_are_not_split() -> None:
    labels = ["old"] * 12 + ["few"] * (MIN_SPLIT_SAMPLES - 1) + ["enough"] * MIN_SPLIT_SAMPLES
    split = LocalSplit.of([f"{i:064x}" for i in range(len(labels))], np.zeros((len(labels), 4), np.float32),
                          labels, ["old"])
    held = [labels[i] for i in split.hold]
    assert held.count("few") == 0 and held.count("enough") >= 2 and held.count("old") == 3
    assert split.few_shot_classes == ["few"]
    # the seed and fraction still decide the rest exactly as holdout_split does (the health check's call)
    assert np.array_equal(split.hold, holdout_split(labels, split.classes)[1])


def test_leave_one_out_never_trains_on_the_sample_it_judges() -> None:
    X, y = _blobs(n_per_class=4)
    trained_on: list[np.ndarray] = []

    def fit(Xs, ys, start):
        trained_on.append(Xs)
        return fit_linear(Xs, ys, CLASSES, tol=1e-4, warm_start=start)

    start = fit_linear(X, y, CLASSES)
    judged, ok = leave_one_out_correct(fit, X, y, np.arange(len(y)), start, limit=100)
    assert list(judged) == list(range(len(y))) and ok.mean() > 0.9
    for i, rows in zip(judged, trained_on):
        assert len(rows) == len(y) - 1 and not (rows == X[i]).all(1).any()
    # a class with a single sample cannot lose it: that sample is skipped; the limit is honoured
    single = np.r_[np.arange(8), 8]
    judged, _ = leave_one_out_correct(fit, X[single], y[single], np.arange(9), None, limit=5)
    assert len(judged) == 5 and 8 not in judged


def test_gate_counts_leave_one_out_samples_and_says_so() -> None:
    X, y = _blobs()
    labels = [CLASSES[i] for i in y]
    active = fit_linear(X[y < 2], y[y < 2], CLASSES[:2])
    candidate = fit_linear(X, y, CLASSES)
    split = LocalSplit.of([f"{i:064x}" for i in range(len(y))], X, labels, CLASSES[:2])
    loo = LeaveOneOut(features=X[y == 2][:5], labels=["c"] * 5, candidate_correct=np.ones(5, bool))
    gate = retrain_gate(candidate, active, split, loo=loo)
    assert gate.method == "holdout+leave-one-out" and gate.loo_count == 5 and gate.holdout_count == 9
    assert gate.accuracy_new == 1.0 and gate.accuracy_active == pytest.approx(6 / 14)  # "c" is unknown to the active head
    few = LocalSplit.of(split.shas[:8], X[:8], labels[:8], CLASSES[:2])
    only = retrain_gate(candidate, active, few, loo=loo)
    assert only.method == "leave-one-out" and only.holdout_count == 0 and "leave-one-out" in only.reason
    assert retrain_gate(candidate, active, few).method == "none"


# ------------------------------------------------------------------------------------- on a real device
def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_retrain_with_five_shots_trains_on_all_of_them_and_judges_by_leave_one_out(tmp_path, device_bundle):
    from edgexfer.runtime.device import Device

    rng = np.random.default_rng(0)
    with Device(tmp_path / "state") as dev:
        dev.install(device_bundle)
        dev.learn([_png(tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(5)], "squares")
        report = dev.retrain()
        # the new head trained on those 5: judging it against the next candidate's leave-one-out on them
        # would be unfair, so a retrain without new samples has nothing to compare on
        again = dev.retrain()
        assert again.accepted and again.gate == "none" and again.loo_count == 0
        dev.learn([_png(tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(2)], "squares")
        third = dev.retrain()
        assert third.gate == "leave-one-out" and third.loo_count == 2  # only the samples no head has seen
    assert (report.requested_policy, report.policy, report.gate) == ("auto", "fewshot", "leave-one-out")
    assert report.few_shot_classes == ["squares"] and report.holdout_count == 0 and report.loo_count == 5
    assert report.train_count == report.exemplar_count + 5
    # the bundle's classes keep their rows (one common scale): old classes decide among themselves as before
    assert report.frozen_classes == report.classes[:-1]
    last = json.loads((tmp_path / "state" / "last_retrain.json").read_text())
    assert last["gate"] == "leave-one-out" and last["min_split_samples"] == MIN_SPLIT_SAMPLES


def test_retrain_refuses_an_unknown_policy(tmp_path, device_bundle):
    from edgexfer.runtime.device import Device

    with Device(tmp_path / "state") as dev:
        dev.install(device_bundle)
        dev.learn([_png((1, 2, 3)), _png((200, 2, 3))], "squares")
        with pytest.raises(InputError, match="retrain policy"):
            dev.retrain(policy="bogus")


def test_augmented_views_train_with_their_sample_and_leave_with_it(tmp_path, device_bundle):
    from edgexfer.runtime.augment import view_key
    from edgexfer.runtime.device import Device

    rng = np.random.default_rng(1)
    squares = [_png(tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(4)]
    with Device(tmp_path / "state", per_class_capacity=3) as dev:
        dev.install(device_bundle)
        report = dev.learn(squares[:3], "squares", augment=2)
        assert (report.added, report.views_added, report.backbone_runs) == (3, 6, 9)
        again = dev.learn(squares[:3], "squares", augment=2)  # the same views: nothing recomputed
        assert (again.views_added, again.backbone_runs) == (0, 0)
        with pytest.raises(InputError, match="augment"):
            dev.learn(squares[:1], "squares", augment=-1)
        retrain = dev.retrain()
        assert retrain.view_count == 6 and retrain.train_count == retrain.exemplar_count + 3 + 6
        assert retrain.gate == "leave-one-out" and retrain.loo_count == 3
        # the capacity keeps 3 samples per class: an evicted sample's views go with it (cascade)
        dev.learn(squares[3:], "squares", augment=2)
        bundle = dev.bundle()
        with dev.cache() as cache:
            shas, _, _ = cache.labelled(bundle.manifest.backbone.sha256, bundle.preprocess.key())
            assert len(shas) == 3
            for view in range(2):
                key = view_key(bundle.preprocess.key(), view)
                assert cache.features_count(bundle.manifest.backbone.sha256) == 3 * 3
                assert set(cache.get_features(bundle.manifest.backbone.sha256, key, shas)) == set(shas)
