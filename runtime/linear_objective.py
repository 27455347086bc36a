"""The linear head's objective over the whole feature matrix: float32 products, block by block, on several threads.

``fit_linear`` minimises a weighted softmax cross-entropy of ``logits = (x - mean)·Wᵀ + c`` plus a penalty.
Evaluating it used to take two float64 copies of the feature matrix (the cast, then the centred matrix): 8 bytes
per feature twice over, 400 MB at 20,000 x 1280, and most of the fit's time went into streaming them. Here the
matrix is read as it is (float32 from the feature cache and the engines), one block of rows at a time: a block
is centred into a small buffer in the product dtype and multiplied while it is in the cache; only small arrays
(the ``[N, C]`` logits, the ``[C, D]`` gradient, the loss) are float64. Memory beyond the features is
O(block rows x D + N x C).

Float32 products give logits exact to ~1e-7 relative, and a gradient exact to ~1e-8, but a loss whose rounding
(~1e-7 of it) swamps the decrease a line search must see near the optimum. The logits are linear in the
parameters, so :meth:`LinearObjective.line` computes the logits of the search direction once and evaluates the
loss along the line from them: a difference of two losses is then exact to float64 rounding whatever the
product dtype, and a trial step costs no product at all.

Blocks run on a pool of threads, one BLAS thread each: numpy's matrix products and element-wise loops release the
GIL, and threads that wait on a future do not spin the way OpenBLAS's own workers do on a core another process is
using. Block partials are summed in block order, so the result does not depend on the number of threads
(:func:`fit_threads`).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import numpy as np

#: bytes of one block of centred features (rows x D x itemsize): a few blocks stay in a core's cache
BLOCK_BYTES = 2 << 20
#: fewer rows than this make a block that costs more in Python overhead than it saves
MIN_BLOCK_ROWS = 64
#: environment variables that cap the threads of numerical code; the smallest one set wins
THREAD_LIMITS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

#: ``penalty(W, c) -> (value, d/dW, d/dc)``: the part of the objective that does not read the features
Penalty = Callable[[np.ndarray, np.ndarray], "tuple[float, np.ndarray, np.ndarray]"]


def fit_threads() -> int:
    """Threads a head fit may use: the cores this process may run on, at most what ``OMP_NUM_THREADS``,
    ``OPENBLAS_NUM_THREADS`` or ``MKL_NUM_THREADS`` allow where one of them is set (a service pinned to one
    core says so there)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    for name in THREAD_LIMITS:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) >= 1:
            cores = min(cores, int(value))
    return max(1, cores)


class CentredBlocks:
    """The two products of a linear model with ``X - mean`` (``[N, D]``, float32 or float64, never copied whole).

    ``mean`` (float64) should be representable in the product dtype (round it to float32 first): a block is
    then centred in that dtype with the rounding of the difference as the only error. Use as a context manager
    (it owns the thread pool).
    """

    def __init__(self, X: np.ndarray, mean: np.ndarray, dtype: str, threads: int | None = None) -> None:
        self.X, self.dtype = X, np.dtype(dtype)
        self.mean = mean.astype(self.dtype)
        n, d = X.shape
        rows = max(MIN_BLOCK_ROWS, BLOCK_BYTES // (d * self.dtype.itemsize))
        self.blocks = [(lo, min(n, lo + rows)) for lo in range(0, n, rows)]
        self.threads = min(fit_threads() if threads is None else threads, len(self.blocks))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fit") if self.threads > 1 else None

    def __enter__(self) -> CentredBlocks:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def _map(self, fn: Callable[[int, int], np.ndarray]) -> list[np.ndarray]:
        if self._pool is None:
            return [fn(lo, hi) for lo, hi in self.blocks]
        return [f.result() for f in [self._pool.submit(fn, lo, hi) for lo, hi in self.blocks]]

    def _centred(self, lo: int, hi: int) -> np.ndarray:
        return np.subtract(self.X[lo:hi], self.mean, dtype=self.dtype)

    def logits(self, W: np.ndarray) -> np.ndarray:
        """``(X - mean)·Wᵀ`` as float64 ``[N, C]``."""
        Wt = np.ascontiguousarray(W.T, dtype=self.dtype)
        return np.concatenate(self._map(lambda lo, hi: self._centred(lo, hi) @ Wt)).astype(np.float64)

    def transposed_product(self, G: np.ndarray) -> np.ndarray:
        """``Gᵀ·(X - mean)`` as float64 ``[C, D]`` for ``G [N, C]`` (partials summed in float64, in block order)."""
        Gd = G.astype(self.dtype)
        parts = self._map(lambda lo, hi: (Gd[lo:hi].T @ self._centred(lo, hi)).astype(np.float64))
        out = parts[0]
        for part in parts[1:]:
            out += part
        return out


def softmax_loss(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
    """``Σ_i w_i·CE(softmax(z_i), y_i)`` and its derivative with respect to ``z`` (``w_i·(p_i - onehot(y_i))``)."""
    rows = np.arange(len(y))
    # log-sum-exp by hand: shifting by the row maximum keeps exp() finite, and the shifted exponentials are
    # reused for the softmax
    z_max = z.max(axis=1)
    shifted = np.exp(z - z_max[:, None])
    sums = shifted.sum(axis=1)
    loss = float(np.dot(w, np.log(sums) + z_max - z[rows, y]))
    shifted /= sums[:, None]
    shifted[rows, y] -= 1.0
    shifted *= w[:, None]
    return loss, shifted


def _loss_only(z: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    z_max = z.max(axis=1)
    lse = np.log(np.exp(z - z_max[:, None]).sum(axis=1)) + z_max
    return float(np.dot(w, lse - z[np.arange(len(y)), y]))


class LinearObjective:
    """``(Σ_i w_i·CE_i + penalty(W, c)) / Σ_i w_i`` for ``theta = [W.ravel(), c]``, as :func:`minimize_lbfgs`
    takes it (a call gives value and gradient; :meth:`line` a line search). ``frozen`` rows keep their
    gradient at zero. The object remembers the logits of the last point it was asked about."""

    def __init__(self, blocks: CentredBlocks, y: np.ndarray, weights: np.ndarray, num_classes: int,
                 penalty: Penalty, frozen: list[int]) -> None:
        self.blocks, self.y, self.weights, self.penalty, self.frozen = blocks, y, weights, penalty, frozen
        self.k, self.d = num_classes, blocks.X.shape[1]
        self.total = float(weights.sum())
        self.z = np.zeros((0, num_classes))

    def split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return theta[: self.k * self.d].reshape(self.k, self.d), theta[self.k * self.d :]

    def __call__(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        W, c = self.split(theta)
        self.z = self.blocks.logits(W) + c
        return self._at(theta, self.z)

    def _at(self, theta: np.ndarray, z: np.ndarray) -> tuple[float, np.ndarray]:
        W, c = self.split(theta)
        loss, G = softmax_loss(z, self.y, self.weights)
        extra, grad_W, grad_c = self.penalty(W, c)
        grad_W = grad_W + self.blocks.transposed_product(G)
        grad_c = grad_c + G.sum(axis=0)
        if self.frozen:
            grad_W[self.frozen] = 0.0
            grad_c[self.frozen] = 0.0
        return (loss + extra) / self.total, np.concatenate([grad_W.ravel(), grad_c]) / self.total

    def line(self, theta: np.ndarray, direction: np.ndarray) -> Line:
        """The objective along ``theta + t·direction`` from the last point evaluated (which must be ``theta``)."""
        Wd, cd = self.split(direction)
        return Line(self, theta, direction, self.blocks.logits(Wd) + cd)


class Line:
    """One line search of :class:`LinearObjective`: the logits at ``t`` are ``z + t·dz``, no product needed."""

    def __init__(self, objective: LinearObjective, theta: np.ndarray, direction: np.ndarray, dz: np.ndarray):
        self.objective, self.theta, self.direction, self.dz = objective, theta, direction, dz
        self.z = objective.z

    def value(self, t: float) -> float:
        """The objective at ``theta + t·direction``."""
        o = self.objective
        W, c = o.split(self.theta + t * self.direction)
        return (_loss_only(self.z + t * self.dz, o.y, o.weights) + o.penalty(W, c)[0]) / o.total

    def point(self, t: float) -> tuple[float, np.ndarray]:
        """Value and gradient at ``theta + t·direction``, which becomes the objective's last point."""
        o = self.objective
        o.z = self.z + t * self.dz
        return o._at(self.theta + t * self.direction, o.z)
