"""Head trainers, checked against scikit-learn as a peer on real digits and on Gaussian blobs."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.special import logsumexp
from sklearn.datasets import load_digits, make_blobs
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.head_training import (
    TRAINERS,
    HeadTrainer,
    fit_linear,
    fit_mlp,
    fit_prototype,
    fit_temperature,
)
from edgexfer.runtime.heads import HEAD_KINDS, Head


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """Run BLAS single-threaded: on a CPU shared with other jobs (CI), OpenBLAS worker threads spin
    and make the small products of head training 10-40x slower, which says nothing about the code."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


DIGIT_CLASSES = tuple(f"digit_{i}" for i in range(10))
BLOB_CLASSES = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """8x8 handwritten digits, pixel intensities scaled to [0, 1], stratified 70/30 split."""
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.3, stratify=y, random_state=0))


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Five overlapping Gaussian classes in 32 dimensions, shifted off the origin like ReLU features."""
    X, y = make_blobs(n_samples=1500, centers=5, n_features=32, cluster_std=4.0, center_box=(-5, 5),
                      random_state=0)
    X = (X + 10.0).astype(np.float32)
    return tuple(train_test_split(X, y, test_size=0.4, stratify=y, random_state=0))


def accuracy(head: Head, X: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(head.logits(X).argmax(axis=1) == y))


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    z = logits.astype(np.float64) / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def sklearn_objective(X: np.ndarray, y: np.ndarray, W: np.ndarray, b: np.ndarray, C: float,
                      sample_weight: np.ndarray) -> float:
    """Σ w_i·CE_i + ||W||²/(2C): the function both solvers minimise, written out independently."""
    z = X.astype(np.float64) @ W.T.astype(np.float64) + b
    ce = logsumexp(z, axis=1) - z[np.arange(len(y)), y]
    return float(sample_weight @ ce + 0.5 / C * np.sum(W.astype(np.float64) ** 2))


# --------------------------------------------------------------------------- linear vs peer
def test_fit_linear_matches_sklearn_on_digits(digits) -> None:
    Xtr, Xte, ytr, yte = digits
    ours = fit_linear(Xtr, ytr, DIGIT_CLASSES, C=1.0, class_weight="balanced")
    # float64 for the peer: given float32, scikit-learn also optimises in float32 and stops early.
    peer = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000).fit(Xtr.astype(np.float64), ytr)

    ours_acc, peer_acc = accuracy(ours, Xte, yte), peer.score(Xte, yte)
    assert ours_acc > 0.9
    assert abs(ours_acc - peer_acc) <= 0.01, (ours_acc, peer_acc)
    assert np.corrcoef(ours.tensors["W"].ravel(), peer.coef_.ravel())[0, 1] > 0.999
    # Logits are defined up to a constant per sample (softmax), so compare them centred.
    ours_z = ours.logits(Xte).astype(np.float64)
    peer_z = peer.decision_function(Xte)
    ours_z -= ours_z.mean(axis=1, keepdims=True)
    peer_z -= peer_z.mean(axis=1, keepdims=True)
    assert np.max(np.abs(ours_z - peer_z)) < 0.05 * np.max(np.abs(peer_z))
    # Same objective: ours must be at least as low as the peer's (which stops at tol=1e-4).
    counts = np.bincount(ytr)
    w = (len(ytr) / (len(counts) * counts))[ytr]
    assert sklearn_objective(Xtr, ytr, ours.tensors["W"], ours.tensors["b"], 1.0, w) <= \
        sklearn_objective(Xtr, ytr, peer.coef_, peer.intercept_, 1.0, w) * (1 + 1e-6)


@pytest.mark.parametrize("class_weight", ["balanced", None])
def test_fit_linear_weights_imbalanced_classes_like_sklearn(blobs, class_weight) -> None:
    Xtr, _, ytr, _ = blobs
    # Keep 20 samples of class 0 and everything else: the balanced weights then differ a lot.
    keep = np.concatenate([np.flatnonzero(ytr == 0)[:20], np.flatnonzero(ytr != 0)])
    X, y = Xtr[keep], ytr[keep]
    ours = fit_linear(X, y, BLOB_CLASSES, C=0.5, class_weight=class_weight)
    # The peer gets centred features: with a free intercept that leaves coef_ unchanged and lets it
    # converge to a tight tolerance quickly. Our bias is then checked through the raw-feature logits.
    mean = X.astype(np.float64).mean(axis=0)
    peer = LogisticRegression(C=0.5, class_weight=class_weight, max_iter=5000, tol=1e-8).fit(X - mean, y)
    np.testing.assert_allclose(ours.tensors["W"], peer.coef_, atol=1e-3)
    ours_z = ours.logits(X).astype(np.float64)
    peer_z = peer.decision_function(X - mean)
    # where L-BFGS stops differs by row order and BLAS kernel (float32 products): 0.003-0.023 over 12 row orders
    # on an AVX-512 EPYC, so the bound leaves room for other CPUs' summation order
    np.testing.assert_allclose(ours_z - ours_z.mean(1, keepdims=True), peer_z - peer_z.mean(1, keepdims=True),
                               atol=4e-2)


def test_fit_linear_returns_a_float32_head_with_the_given_class_order(blobs) -> None:
    Xtr, _, ytr, _ = blobs
    head = fit_linear(Xtr.astype(np.float64), ytr, BLOB_CLASSES)
    assert head.kind == "linear" and head.classes == BLOB_CLASSES
    assert all(t.dtype == np.float32 for t in head.tensors.values())
    assert head.tensors["W"].shape == (5, 32)


# ------------------------------------------------------------------------------ scale
def _many_features(n: int, d: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Backbone-like float32 features (non-negative, off zero), classes overlapping."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    centres = rng.normal(0.0, 0.15, size=(classes, d)).astype(np.float32)
    X = np.maximum(centres[y] + 0.5 + rng.standard_normal((n, d), dtype=np.float32), 0.0)
    return X, y


def test_fit_linear_reads_the_features_without_copying_them(monkeypatch) -> None:
    import tracemalloc

    # two threads here whatever the machine: each holds one block of rows, so peak memory depends on them
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    X, y = _many_features(16384, 256, 3)
    tracemalloc.start()
    try:
        head = fit_linear(X, y, ("a", "b", "c"), C=0.1, tol=1e-4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert accuracy(head, X, y) > 0.8
    # a float64 copy would be 2 * X.nbytes; the blocks and N x C arrays stay far below even one float32 copy
    assert peak < X.nbytes // 2, f"peak {peak / 2**20:.1f} MiB for {X.nbytes / 2**20:.0f} MiB of features"


def test_fit_linear_gives_the_same_head_on_any_number_of_threads(monkeypatch) -> None:
    X, y = _many_features(3000, 64, 4)
    heads = []
    for threads in ("1", "3"):
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        heads.append(fit_linear(X, y, ("a", "b", "c", "d"), C=0.5))
    np.testing.assert_array_equal(heads[0].tensors["W"], heads[1].tensors["W"])
    np.testing.assert_array_equal(heads[0].tensors["b"], heads[1].tensors["b"])


def test_fit_threads_follow_the_cores_and_the_thread_limits(monkeypatch) -> None:
    from edgexfer.runtime.linear_objective import THREAD_LIMITS, fit_threads

    for name in THREAD_LIMITS:
        monkeypatch.delenv(name, raising=False)
    cores = fit_threads()
    assert cores >= 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert fit_threads() == 1


@pytest.mark.parametrize("matmul_dtype", ["float32", "float64"])
def test_every_product_dtype_reaches_the_same_optimum(digits, matmul_dtype) -> None:
    Xtr, _, ytr, _ = digits
    exact = fit_linear(Xtr.astype(np.float64), ytr, DIGIT_CLASSES, matmul_dtype="float64", tol=1e-8, max_iter=3000)
    head = fit_linear(Xtr, ytr, DIGIT_CLASSES, matmul_dtype=matmul_dtype)
    assert np.corrcoef(head.tensors["W"].ravel(), exact.tensors["W"].ravel())[0, 1] > 0.9999
    np.testing.assert_array_equal(head.logits(Xtr).argmax(1), exact.logits(Xtr).argmax(1))


# ------------------------------------------------------------------------------ warm start
def test_warm_start_adds_a_class_and_keeps_the_old_classes(blobs) -> None:
    Xtr, Xte, ytr, yte = blobs
    old_train, old_test = ytr < 4, yte < 4
    old = fit_linear(Xtr[old_train], ytr[old_train], BLOB_CLASSES[:4])
    old_accuracy = accuracy(old, Xte[old_test], yte[old_test])

    new = fit_linear(Xtr, ytr, BLOB_CLASSES, warm_start=old)
    assert new.classes == BLOB_CLASSES and new.tensors["W"].shape == (5, 32)
    kept = np.mean(new.logits(Xte[old_test]).argmax(axis=1) == yte[old_test])
    assert kept >= old_accuracy - 0.03, (kept, old_accuracy)
    new_class = yte == 4
    assert np.mean(new.logits(Xte[new_class]).argmax(axis=1) == 4) > 0.8


def test_warm_start_rows_are_matched_by_class_name(blobs) -> None:
    Xtr, _, ytr, _ = blobs
    solved = fit_linear(Xtr, ytr, BLOB_CLASSES)
    # The same solution with the classes listed backwards: matched by name it is already optimal,
    # so one iteration must leave it in place; matched by position it would be far off.
    backwards = Head("linear", BLOB_CLASSES[::-1], {"W": solved.tensors["W"][::-1], "b": solved.tensors["b"][::-1]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one iteration is, on purpose, not convergence
        again = fit_linear(Xtr, ytr, BLOB_CLASSES, warm_start=backwards, max_iter=1)
    np.testing.assert_allclose(again.tensors["W"], solved.tensors["W"], atol=1e-3)


def test_warm_start_must_fit_the_kind_and_the_features(blobs) -> None:
    Xtr, _, ytr, _ = blobs
    prototype = fit_prototype(Xtr, ytr, BLOB_CLASSES)
    with pytest.raises(InputError, match="kind"):
        fit_linear(Xtr, ytr, BLOB_CLASSES, warm_start=prototype)
    with pytest.raises(InputError, match="feature_dim"):
        fit_prototype(Xtr[:, :16], ytr, BLOB_CLASSES, warm_start=prototype)


def test_fit_linear_warns_when_it_runs_out_of_iterations(digits) -> None:
    Xtr, _, ytr, _ = digits
    with pytest.warns(RuntimeWarning, match="max_iter"):
        fit_linear(Xtr, ytr, DIGIT_CLASSES, max_iter=3)


# ------------------------------------------------------------------------------- prototype
def test_prototype_head_learns_from_a_few_shots(blobs) -> None:
    Xtr, Xte, ytr, yte = blobs
    shots = np.concatenate([np.flatnonzero(ytr == c)[:5] for c in range(5)])
    head = fit_prototype(Xtr[shots], ytr[shots], BLOB_CLASSES)
    assert head.kind == "prototype"
    np.testing.assert_allclose(np.linalg.norm(head.tensors["P"], axis=1), 1.0, atol=1e-5)
    assert accuracy(head, Xte, yte) > 0.9


def test_prototype_adds_a_class_from_its_samples_alone(blobs) -> None:
    Xtr, Xte, ytr, yte = blobs
    old = fit_prototype(Xtr[ytr < 4], ytr[ytr < 4], BLOB_CLASSES[:4])
    five_of_e = np.flatnonzero(ytr == 4)[:5]
    new = fit_prototype(Xtr[five_of_e], ytr[five_of_e], BLOB_CLASSES, warm_start=old)
    np.testing.assert_array_equal(new.tensors["P"][:4], old.tensors["P"])
    assert accuracy(new, Xte, yte) > 0.9
    with pytest.raises(InputError, match="too few classes"):
        fit_prototype(Xtr[five_of_e], ytr[five_of_e], BLOB_CLASSES)


# ----------------------------------------------------------------------------- temperature
def test_temperature_fitting_lowers_the_nll_of_an_overconfident_head(digits) -> None:
    Xtr, Xte, ytr, yte = digits
    # Barely regularised and trained on 200 samples: confident far beyond its accuracy.
    overfit = fit_linear(Xtr[:200], ytr[:200], DIGIT_CLASSES, C=1e4, max_iter=300)
    logits = overfit.logits(Xte)
    half = len(yte) // 2
    T = fit_temperature(logits[:half], yte[:half])
    assert T > 1.5
    assert nll(logits[half:], yte[half:], T) < 0.9 * nll(logits[half:], yte[half:])
    # A calibrated head keeps its predictions: temperature never changes the argmax.
    calibrated = Head("linear", DIGIT_CLASSES, dict(overfit.tensors), temperature=T)
    np.testing.assert_array_equal(calibrated.probabilities(Xte).argmax(1), overfit.logits(Xte).argmax(1))


def test_temperature_refuses_bad_inputs() -> None:
    with pytest.raises(InputError):
        fit_temperature(np.zeros(5), np.zeros(5, np.int64))
    with pytest.raises(InputError):
        fit_temperature(np.zeros((5, 3)), np.full(5, 3))


# -------------------------------------------------------------------------------------- mlp
def test_mlp_reaches_good_accuracy_on_digits(digits) -> None:
    Xtr, Xte, ytr, yte = digits
    head = fit_mlp(Xtr, ytr, DIGIT_CLASSES, hidden=128, epochs=30, lr=3e-3, seed=0)
    assert head.kind == "mlp" and head.tensors["W1"].shape == (128, 64)
    assert accuracy(head, Xte, yte) > 0.9


def test_mlp_is_deterministic_per_seed(digits) -> None:
    Xtr, _, ytr, _ = digits
    runs = [fit_mlp(Xtr, ytr, DIGIT_CLASSES, hidden=32, epochs=2, seed=s) for s in (7, 7, 8)]
    for name in runs[0].tensors:
        np.testing.assert_array_equal(runs[0].tensors[name], runs[1].tensors[name])
    assert not np.array_equal(runs[0].tensors["W1"], runs[2].tensors["W1"])


# ---------------------------------------------------------------------------- HeadTrainer
def test_every_head_kind_has_a_trainer() -> None:
    assert set(TRAINERS) == set(HEAD_KINDS)


@pytest.mark.parametrize(("kind", "params"), [("linear", {"C": 0.5}), ("mlp", {"epochs": 20, "hidden": 32}),
                                               ("prototype", {"scale": 10.0})])
def test_head_trainer_dispatches_by_kind(blobs, kind, params) -> None:
    Xtr, Xte, ytr, yte = blobs
    head = HeadTrainer(kind, **params).fit(Xtr, ytr, BLOB_CLASSES)
    assert head.kind == kind and head.classes == BLOB_CLASSES
    assert accuracy(head, Xte, yte) > 0.5
    assert HeadTrainer(kind, **params).fit(Xtr, ytr, BLOB_CLASSES, warm_start=head).kind == kind


def test_head_trainer_refuses_unknown_kinds_and_parameters() -> None:
    with pytest.raises(InputError) as exc:
        HeadTrainer("svm")
    assert "linear" in str(exc.value) and "prototype" in str(exc.value)
    with pytest.raises(InputError, match="hidden"):
        HeadTrainer("linear", hidden=64)


def _bad_inputs() -> list[tuple[str, np.ndarray, np.ndarray, tuple[str, ...]]]:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4)).astype(np.float32)
    y = np.arange(20) % 2
    nan = X.copy()
    nan[3, 1] = np.nan
    two = ("a", "b")
    return [
        ("1-D features", X[:, 0], y, two),
        ("NaN feature", nan, y, two),
        ("label count", X, y[:-1], two),
        ("one class", X, np.zeros(20, np.int64), two),
        ("label out of range", X, np.where(y == 1, 2, 0), two),
        ("float labels", X, y.astype(np.float64), two),
        ("duplicate class names", X, y, ("a", "a")),
        ("class without samples", X, y, ("a", "b", "c")),
        ("classes as a string", X, y, "ab"),
    ]


@pytest.mark.parametrize("kind", sorted(TRAINERS))
@pytest.mark.parametrize(("case", "X", "y", "classes"), _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_head_trainer_refuses_unusable_training_data(kind, case, X, y, classes) -> None:
    with pytest.raises(InputError) as exc:
        HeadTrainer(kind).fit(X, y, classes)
    assert " | " in str(exc.value), case


# ---------------------------------------------------------------------------- boundaries
def test_heads_and_trainers_import_without_host_packages() -> None:
    code = (
        "import sys\n"
        "import edgexfer.runtime.heads, edgexfer.runtime.head_training\n"
        "print(sorted(m for m in ('torch', 'onnx', 'sklearn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
