"""Head trainers in numpy/scipy, shared by the host (first training) and the device (retraining).

Features are used raw, never standardised: the device evaluates ``logits = f·Wᵀ + b`` on the
backbone's output as it is, so a trainer that rescaled its inputs would need the scaler shipped too.

``fit_linear`` minimises the same objective as scikit-learn's multinomial ``LogisticRegression`` with
L-BFGS, so results can be checked against it; ``fit_mlp`` is a small Adam loop; ``fit_prototype`` is
a nearest-class-mean classifier for few-shot class additions; ``fit_temperature`` calibrates.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.heads import Head
from edgexfer.runtime.lbfgs import minimize_lbfgs
from edgexfer.runtime.linear_objective import CentredBlocks, LinearObjective

_CLASS_WEIGHTS = ("balanced", None)


# ---------------------------------------------------------------------------- input checks

def _one_blas_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with BLAS limited to one thread.

    These problems are small (a few hundred samples x 1280 features); OpenBLAS's worker threads gain
    nothing here and, on a 2-core device that is also running inference, spin against each other:
    measured 0.28 s with one thread against 13 s with two for the same linear head.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper

def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise InputError("classes must be a sequence of names", got=type(classes).__name__,
                         expected="list or tuple of str", todo="pass the class names in label order")
    names = tuple(classes)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"classes[{i}] is not a usable class name", got=repr(name)[:80],
                             expected="a non-empty string", todo="name every class")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError("classes repeats a name", got=repr(dup)[:80], expected="unique class names",
                         todo="give every class its own name")
    return names


def _check_training_data(
    X: np.ndarray, y: np.ndarray, classes: Sequence[str], *, min_present: int = 2
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Return ``(X [N, D], y int64 [N], classes)`` or raise :class:`InputError`.

    ``X`` is the caller's array itself when it is float32 or float64 (the feature matrix can be large: no
    copy), a float64 copy otherwise."""
    names = _check_classes(classes)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError("training features have the wrong shape", got=list(X.shape),
                         expected="[N, D] with N, D >= 1", todo="stack one feature vector per sample")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise InputError("training features are not numeric", got=str(X.dtype), expected="a float array",
                         todo="pass the backbone features")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    step = max(1, (1 << 20) // X.shape[1])  # rows per block: the check's mask stays small next to X
    for start in range(0, len(X), step):
        finite = np.isfinite(X[start:start + step]).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise InputError("training features hold NaN or infinity", got=f"first bad row {bad}",
                             expected="finite values", todo="drop or re-extract the bad samples")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise InputError("labels do not match the features", got=f"y shape {list(y.shape)}",
                         expected=f"[{len(X)}] (one label per feature row)", todo="pass one integer label per sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise InputError("labels are not integers", got=str(y.dtype), expected="integer class indices",
                         todo="map class names to their index in `classes`")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= len(names):
        bad = int(y[(y < 0) | (y >= len(names))][0])
        raise InputError("a label is out of range", got=bad, expected=f"0..{len(names) - 1} (index into classes)",
                         todo="check the label mapping")
    present = np.unique(y)
    if len(present) < min_present:
        raise InputError("too few classes in the labels", got=f"{len(present)} class(es) with samples",
                         expected=f">= {min_present}", todo="collect samples of more classes")
    return X, y, names


def _require_every_class(y: np.ndarray, classes: tuple[str, ...], trainer: str, exempt: Sequence[int] = ()) -> None:
    """A discriminative head cannot learn a class it never sees: its bias would run to minus infinity."""
    counts = np.bincount(y, minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0) if i not in exempt]
    if empty:
        raise InputError(f"{trainer} needs samples of every class", got=f"no samples of {empty[:5]}",
                         expected="at least one sample per class",
                         todo="add samples of those classes or leave them out of `classes`")


def _sample_weights(y: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    if class_weight not in _CLASS_WEIGHTS:
        raise InputError("class_weight is unknown", got=repr(class_weight), expected="'balanced' or None",
                         todo="use class_weight='balanced' for imbalanced data")
    if class_weight is None:
        return np.ones(len(y))
    # Same rule as scikit-learn: n_samples / (n_classes * count_c), over the classes present.
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = np.count_nonzero(counts)
    per_class = np.divide(len(y), present * counts, out=np.zeros_like(counts), where=counts > 0)
    return per_class[y]


def _positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} is out of range", got=repr(value), expected=">= 0" if allow_zero else "> 0",
                         todo=f"pass a finite {name}")
    return float(value)


def _count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} is out of range", got=repr(value), expected=f"an integer >= {minimum}",
                         todo=f"pass an integer {name}")
    return int(value)


def _check_warm_start(warm_start: Head | None, kind: str, feature_dim: int) -> None:
    if warm_start is None:
        return
    if not isinstance(warm_start, Head):
        raise InputError("warm_start is not a Head", got=type(warm_start).__name__, expected="Head or None",
                         todo="pass the current head, e.g. Head.load(...)")
    if warm_start.kind != kind:
        raise InputError("warm_start head is of another kind", got=warm_start.kind, expected=kind,
                         todo=f"train a {warm_start.kind} head, or start from scratch (warm_start=None)")
    if warm_start.feature_dim != feature_dim:
        raise InputError("warm_start head does not fit the features", got=f"feature_dim {warm_start.feature_dim}",
                         expected=f"feature_dim {feature_dim}", todo="start from scratch (warm_start=None)")


def _shared_rows(warm_start: Head, classes: tuple[str, ...]) -> list[tuple[int, int]]:
    """Pairs ``(row in the new head, row in warm_start)`` for classes both know, matched by name."""
    old = {name: i for i, name in enumerate(warm_start.classes)}
    return [(i, old[name]) for i, name in enumerate(classes) if name in old]


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# ---------------------------------------------------------------------------------- linear
# long: one numerical recipe read top to bottom (checks, class weights, warm start and frozen rows, the
# penalty as one closure over the same arrays, the objective, L-BFGS, the head); split, the closure's
# shared arrays would have to travel through every piece
@_one_blas_thread
def fit_linear(
    X: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    C: float = 1.0,
    class_weight: str | None = "balanced",
    max_iter: int = 500,
    warm_start: Head | None = None,
    tol: float = 1e-6,
    frozen_classes: Sequence[str] = (),
    matmul_dtype: str = "float32",
    proximal: float = 0.0,
) -> Head:
    """Multinomial logistic regression with L2 on ``W`` (not on ``b``), solved with L-BFGS.

    Minimises ``(Σ_i w_i·CE_i + ||W||² / (2C)) / Σ_i w_i`` — scikit-learn's objective for
    ``LogisticRegression(C=C, solver="lbfgs")``, including its division by the total sample weight,
    which changes nothing about the minimiser but keeps ``tol`` independent of the data size.
    ``warm_start`` seeds the rows of the classes it shares with ``classes`` (matched by name); new
    classes start at zero. The problem is convex, so a warm start only saves iterations.

    ``frozen_classes`` keep their ``warm_start`` row exactly (weights and bias): a device that has no
    local samples of a class keeps what the bundle learned from more data, and only the classes it
    has evidence for move. Frozen classes may have no samples in ``y``.

    The feature matrix is never copied (float32 and float64 are used as given): it is read block by block,
    on every core the process may use (:mod:`edgexfer.runtime.linear_objective`). ``matmul_dtype`` is the
    dtype of the two feature-matrix products; the loss, softmax, gradient sums and optimiser state stay
    float64, and the line search evaluates the loss from the logits of its direction, so float32 (the
    default: half the bytes streamed, twice the arithmetic rate) follows the same path to the same optimum
    as float64 (``"float64"``: products exact to float64 rounding, about twice as slow).

    ``proximal`` is FedProx's ``mu``: it adds ``mu/2·(||W - W_start||² + ||b - b_start||²)`` (per unit of
    sample weight) for the rows ``warm_start`` knows, so a device's round of fleet learning stays near the
    global head it started from and heads trained on very different local data still average well. With
    it, classes of the warm start without samples in ``y`` are allowed: they are trained by the other
    classes' samples only (pushed down), and the term keeps them bounded. 0 turns it off.
    """
    X, y, names = _check_training_data(X, y, classes)
    frozen = [names.index(c) for c in frozen_classes if c in names]
    if frozen and warm_start is None:
        raise InputError("frozen_classes need a warm_start head", got=list(frozen_classes),
                         expected="warm_start with those classes", todo="pass the active head as warm_start")
    if frozen and any(c not in warm_start.classes for c in frozen_classes):
        raise InputError("frozen_classes must be classes of the warm_start head", got=list(frozen_classes),
                         expected=f"some of {list(warm_start.classes)}")
    proximal = _positive("proximal", proximal, allow_zero=True)
    anchored_names = set(warm_start.classes) if (proximal and warm_start is not None) else set()
    _require_every_class(y, names, "fit_linear",
                         exempt=frozen + [i for i, c in enumerate(names) if c in anchored_names])
    C = _positive("C", C)
    tol = _positive("tol", tol)
    max_iter = _count("max_iter", max_iter)
    n, d = X.shape
    k = len(names)
    _check_warm_start(warm_start, "linear", d)
    if proximal and warm_start is None:
        raise InputError("a proximal term needs a warm_start head", got=f"proximal={proximal}",
                         expected="warm_start= the round's global head", todo="pass warm_start or proximal=0")
    if matmul_dtype not in ("float32", "float64"):
        raise InputError("matmul_dtype", got=repr(matmul_dtype), expected="'float32' or 'float64'")
    w = _sample_weights(y, k, class_weight)
    total_weight = w.sum()

    W0 = np.zeros((k, d))
    b0 = np.zeros(k)
    anchored = np.zeros(k, dtype=bool)
    if warm_start is not None:
        for new, old in _shared_rows(warm_start, names):
            W0[new] = warm_start.tensors["W"][old]
            b0[new] = warm_start.tensors["b"][old]
            anchored[new] = True
    # the proximal anchor: the start rows of the classes the warm start knows (new classes are free)
    anchor_mask = (anchored[:, None] * proximal) if proximal else None

    # Backbone features are far from zero-mean (pooled ReLU outputs), which couples W and b and makes
    # L-BFGS crawl. Solving for logits = (x - mean)·Wᵀ + c with c = b + W·mean is an exact change of
    # variables: the penalty only sees W and b is free, so the minimiser is the same. b is recovered
    # at the end, and the head still applies to raw features. The data term centres X block by block
    # (never a whole copy) and keeps the mean it centred by.
    mean = X.mean(axis=0, dtype=np.float64).astype(np.float32).astype(np.float64)  # exact in either dtype

    def penalty(W: np.ndarray, c: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """||W||²/(2C), and FedProx's term: what the objective adds to the data term (in sample weight)."""
        loss = 0.5 / C * float(np.dot(W.ravel(), W.ravel()))
        grad_W, grad_c = W / C, np.zeros(k)
        if anchor_mask is not None:
            # FedProx: mu/2·(||W - W0||² + ||b - b0||²) per unit of sample weight, with b = c - W·mean (the
            # change of variables above)
            dW = W - W0
            db = (c - W @ mean - b0) * anchor_mask[:, 0]
            loss += 0.5 * total_weight * float(np.sum(anchor_mask * dW * dW) + np.dot(db, c - W @ mean - b0))
            grad_W += total_weight * (anchor_mask * dW - np.outer(db, mean))
            grad_c += total_weight * db
        return loss, grad_W, grad_c

    # Our own L-BFGS: scipy's spends ~10 ms of bookkeeping per iteration at this size, ten times the
    # objective itself, which matters when a device retrains in the field.
    x0 = np.concatenate([W0.ravel(), b0 + W0 @ mean])
    with CentredBlocks(X, mean, matmul_dtype) as blocks:
        objective = LinearObjective(blocks, y, w, k, penalty, frozen)
        result = minimize_lbfgs(objective, x0, max_iter=max_iter, gtol=tol, ftol=64 * np.finfo(float).eps)
    if not result.converged and result.iterations >= max_iter:
        warnings.warn(f"fit_linear stopped after max_iter={max_iter} iterations before converging "
                      f"(gradient tolerance {tol}); raise max_iter", RuntimeWarning, stacklevel=2)
    W = result.x[: k * d].reshape(k, d)
    b = result.x[k * d :] - W @ mean
    return Head("linear", names, {"W": W.astype(np.float32), "b": b.astype(np.float32)})


# ------------------------------------------------------------------------------------- mlp
# long: the forward pass, backward pass and AdamW step of one minibatch share a dozen arrays; as one loop
# the seeded order of random draws (shuffle, dropout) is visible, and with it the bit-identical output
@_one_blas_thread
def fit_mlp(
    X: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    hidden: int = 256,
    dropout: float = 0.2,
    epochs: int = 200,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
    class_weight: str | None = "balanced",
    warm_start: Head | None = None,
) -> Head:
    """One hidden ReLU layer trained with Adam on minibatches; identical output for identical ``seed``.

    Dropout is inverted (kept units scaled by ``1/(1-dropout)`` while training) so the saved weights are
    used as they are at inference. ``weight_decay`` is decoupled (AdamW) and applies to the weight
    matrices only. ``warm_start`` (an mlp head with the same hidden size) seeds the hidden layer and
    the output rows of the classes it shares, matched by name.
    """
    X, y, names = _check_training_data(X, y, classes)
    _require_every_class(y, names, "fit_mlp")
    hidden = _count("hidden", hidden)
    epochs = _count("epochs", epochs)
    batch_size = _count("batch_size", batch_size)
    lr = _positive("lr", lr)
    weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
    dropout = _positive("dropout", dropout, allow_zero=True)
    if dropout >= 1.0:
        raise InputError("dropout is out of range", got=dropout, expected="0 <= dropout < 1",
                         todo="use e.g. dropout=0.2")
    n, d = X.shape
    k = len(names)
    _check_warm_start(warm_start, "mlp", d)
    if warm_start is not None and warm_start.tensors["W1"].shape[0] != hidden:
        raise InputError("warm_start head has another hidden size", got=warm_start.tensors["W1"].shape[0],
                         expected=hidden, todo="pass hidden= the warm start's size, or warm_start=None")
    rng = np.random.default_rng(seed)
    sample_w = _sample_weights(y, k, class_weight).astype(np.float32)
    Xf = X.astype(np.float32, copy=False)  # float32 is plenty for SGD and halves the work on a device

    # He initialisation for the ReLU layer, Glorot-like for the output layer.
    params = {
        "W1": (rng.standard_normal((hidden, d)) * math.sqrt(2.0 / d)).astype(np.float32),
        "b1": np.zeros(hidden, np.float32),
        "W2": (rng.standard_normal((k, hidden)) * math.sqrt(1.0 / hidden)).astype(np.float32),
        "b2": np.zeros(k, np.float32),
    }
    if warm_start is not None:
        params["W1"] = warm_start.tensors["W1"].copy()
        params["b1"] = warm_start.tensors["b1"].copy()
        for new, old in _shared_rows(warm_start, names):
            params["W2"][new] = warm_start.tensors["W2"][old]
            params["b2"][new] = warm_start.tensors["b2"][old]

    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = {name: np.zeros_like(p) for name, p in params.items()}
    v = {name: np.zeros_like(p) for name, p in params.items()}
    step = 0
    keep = 1.0 - dropout
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb, yb, wb = Xf[idx], y[idx], sample_w[idx]
            pre = xb @ params["W1"].T + params["b1"]
            act = np.maximum(pre, 0.0)
            if dropout > 0.0:
                mask = (rng.random(act.shape) < keep).astype(np.float32) / np.float32(keep)
                act = act * mask
            probs = _softmax_rows(act @ params["W2"].T + params["b2"])
            # Gradient of mean_i w_i·CE_i with respect to the output logits.
            g_out = probs
            g_out[np.arange(len(idx)), yb] -= 1.0
            g_out *= (wb / len(idx))[:, None]
            g_act = g_out @ params["W2"]
            if dropout > 0.0:
                g_act *= mask
            g_pre = g_act * (pre > 0.0)
            grads = {"W1": g_pre.T @ xb, "b1": g_pre.sum(axis=0), "W2": g_out.T @ act, "b2": g_out.sum(axis=0)}

            step += 1
            correction1 = 1.0 - beta1**step
            correction2 = 1.0 - beta2**step
            for name, p in params.items():
                m[name] = beta1 * m[name] + (1.0 - beta1) * grads[name]
                v[name] = beta2 * v[name] + (1.0 - beta2) * grads[name] ** 2
                update = (m[name] / correction1) / (np.sqrt(v[name] / correction2) + eps)
                if name in ("W1", "W2") and weight_decay > 0.0:
                    p *= np.float32(1.0 - lr * weight_decay)
                p -= np.float32(lr) * update.astype(np.float32)
    if not all(np.all(np.isfinite(p)) for p in params.values()):
        raise InputError("fit_mlp diverged", got="non-finite weights", expected="finite weights",
                         todo="lower lr or check the feature scale")
    return Head("mlp", names, {name: p.astype(np.float32) for name, p in params.items()})


# ------------------------------------------------------------------------------- prototype
@_one_blas_thread
def fit_prototype(
    X: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    scale: float = 16.0,
    warm_start: Head | None = None,
) -> Head:
    """Nearest class mean on L2-normalised features; logits = scale·cos(f, P).

    Each prototype is the mean of the unit-length features of its class, normalised again. Classes
    with samples in ``y`` get a fresh prototype; classes without samples keep ``warm_start``'s row
    (matched by name), which is how a class is added from a handful of samples without the old data.
    With a warm start, ``y`` may therefore hold samples of a single class.
    """
    # A warm start supplies the other classes, so one class with samples is enough to add it.
    X, y, names = _check_training_data(X, y, classes, min_present=1 if warm_start is not None else 2)
    _check_warm_start(warm_start, "prototype", X.shape[1])
    scale = _positive("scale", scale)
    k, d = len(names), X.shape[1]
    counts = np.bincount(y, minlength=k)
    X = X.astype(np.float64, copy=False)  # few-shot sizes: float64 keeps the prototypes as they always were
    unit = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((k, d))
    np.add.at(sums, y, unit)
    P = np.zeros((k, d))
    have = np.zeros(k, dtype=bool)
    for i in np.flatnonzero(counts):
        norm = np.linalg.norm(sums[i])
        if norm < 1e-12 * counts[i]:
            raise InputError(f"class '{names[i]}' has no mean direction", got="its features cancel out",
                             expected="features of one class pointing roughly the same way",
                             todo="check the features of that class")
        P[i] = sums[i] / norm
        have[i] = True
    if warm_start is not None:
        for new, old in _shared_rows(warm_start, names):
            if not have[new]:
                P[new] = warm_start.tensors["P"][old]
                have[new] = True
    if not have.all():
        missing = [names[i] for i in np.flatnonzero(~have)]
        raise InputError("fit_prototype needs samples of every class", got=f"no samples of {missing[:5]}",
                         expected="samples, or a warm_start head that knows the class",
                         todo="add samples of those classes or leave them out of `classes`")
    if int(have.sum()) < 2:
        raise InputError("too few classes for a prototype head", got="1 class", expected=">= 2",
                         todo="add samples of another class")
    return Head("prototype", names, {"P": P.astype(np.float32), "scale": np.array(scale, dtype=np.float32)})


# ----------------------------------------------------------------------------- temperature
@_one_blas_thread
def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Temperature ``T > 0`` minimising the mean NLL of ``softmax(logits / T)`` on a holdout set.

    Searched on ``log T`` in [1/100, 100]. The NLL is convex in ``1/T``, so the bounded scalar search
    finds the global minimum; ``T = 1`` is returned if nothing beats it.
    """
    # imported here: scipy.optimize costs ~0.8 s to import, which `device predict` should not pay
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z = np.asarray(logits)
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] < 2 or not np.issubdtype(z.dtype, np.floating):
        raise InputError("logits have the wrong shape or dtype", got=f"{z.dtype}{list(z.shape)}",
                         expected="float [N, C] with N >= 1, C >= 2", todo="pass Head.logits(features)")
    z = z.astype(np.float64)
    if not np.all(np.isfinite(z)):
        raise InputError("logits hold NaN or infinity", got="non-finite values", expected="finite values",
                         todo="check the head and features")
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(z) or not np.issubdtype(y.dtype, np.integer):
        raise InputError("labels do not match the logits", got=f"{y.dtype}{list(y.shape)}",
                         expected=f"integer [{len(z)}]", todo="pass one class index per row")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise InputError("a label is out of range", got=int(y[(y < 0) | (y >= z.shape[1])][0]),
                         expected=f"0..{z.shape[1] - 1}", todo="check the label mapping")
    true_logit = z[np.arange(len(y)), y]

    def nll(log_t: float) -> float:
        inv_t = math.exp(-log_t)
        return float(np.mean(logsumexp(z * inv_t, axis=1) - true_logit * inv_t))

    result = minimize_scalar(nll, bounds=(math.log(1e-2), math.log(1e2)), method="bounded",
                             options={"xatol": 1e-6})
    if not result.success or nll(result.x) > nll(0.0):
        return 1.0
    return float(math.exp(result.x))


# --------------------------------------------------------------------------------- trainer
#: kind -> trainer; every trainer takes (X, y, classes, *, warm_start=..., **its own parameters)
TRAINERS: dict[str, Callable[..., Head]] = {
    "linear": fit_linear,
    "mlp": fit_mlp,
    "prototype": fit_prototype,
}


class HeadTrainer:
    """Train a head of one kind with fixed parameters: ``HeadTrainer("linear", C=0.5).fit(X, y, classes)``.

    Unknown kinds and parameter names are refused at construction, listing what exists, so a typo in
    a config file fails before any training starts.
    """

    def __init__(self, kind: str, **params: Any) -> None:
        if kind not in TRAINERS:
            raise InputError("unknown head kind", got=repr(kind), expected=f"one of {sorted(TRAINERS)}",
                             todo="choose one of the listed kinds")
        accepted = [
            p.name for p in inspect.signature(TRAINERS[kind]).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "warm_start"
        ]
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise InputError(f"unknown parameter for a {kind} head", got=unknown, expected=f"some of {accepted}",
                             todo="fix the parameter name")
        self.kind = kind
        self.params: dict[str, Any] = dict(params)

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"HeadTrainer({self.kind!r}{args})"

    def fit(self, X: np.ndarray, y: np.ndarray, classes: Sequence[str], warm_start: Head | None = None) -> Head:
        """Train and return a new head; ``warm_start`` is the current head when retraining."""
        return TRAINERS[self.kind](X, y, classes, warm_start=warm_start, **self.params)
