"""Has the device's world changed? The latest inputs' features against the bundle's training features.

* **What is kept** (:class:`RecentInputs`): the features of the last ``capacity`` inputs that ``device
  predict``, ``serve`` and ``watch`` classified, with the answer and its confidence, in the device's
  ``features.sqlite`` (table ``recent_inputs``, float16 like the feature cache). Never the sample itself:
  only the review queue keeps samples. Bounded: adding beyond ``capacity`` drops the oldest rows.
* **The reference**: the bundle's exemplars (the features of up to 20 training samples per class that
  export puts in every bundle, whatever the modality), at most :data:`MAX_REFERENCE` rows.
* **The test** (:func:`mmd_test`): a kernel two-sample test, the maximum mean discrepancy (Gretton et al.,
  JMLR 2012) of unit-length features with a Gaussian kernel whose bandwidth is the median squared distance
  of the pooled rows, and a permutation p-value (``permutations`` relabellings of the pooled rows, seeded).
  Chosen over per-dimension tests (1,280 dimensions need a multiple-test correction that costs power) and
  over a classifier two-sample test (too few rows to train one: a window is 30 inputs). Measured on the 336
  clipart8 images the demo bundle never saw (2026-12-07, tests/device/test_drift.py, 160 reference rows):
  windows of 30 camera-degraded images (tilt, blur, dim light, lower contrast, colour cast, noise, JPEG) are
  called drifted in 300 of 300 seeded windows, windows of 30 clean images in 2 of 300 at alpha 0.01 (0.7 %;
  14 of 300, 4.7 %, at 0.05): the p-value is calibrated.
* **Beside it**: the mix of predicted classes in the window against the mix the head predicts on the
  reference (total variation distance: label shift), and the mean confidence of each (a confidence drop).

Pure numpy; ``edgexfer device drift`` (:meth:`edgexfer.runtime.device.Device.drift`) reads it.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.cache_sqlite import CacheDatabase
from edgexfer.runtime.errors import BundleError, InputError

#: inputs the ring buffer keeps by default
DEFAULT_RECENT_CAPACITY = 1000
#: the window ``device drift`` tests by default: the latest inputs
DEFAULT_WINDOW = 30
DEFAULT_ALPHA = 0.01
DEFAULT_PERMUTATIONS = 500
#: reference rows used at most (a bundle of many classes has more exemplars: a seeded subsample)
MAX_REFERENCE = 512
#: the least window the test is run on (fewer inputs: no verdict)
MIN_WINDOW = 10
#: ``device serve`` and ``watch`` test again after this many inputs
DEFAULT_EVERY = 50
#: relabellings whose statistics one matrix product computes (memory: this many labellings and rows of the
#: kernel product at a time)
PERMUTATION_CHUNK = 64
#: a relabelled statistic this close to the observed one (relative, at least absolute) counts as a tie
TIE_TOLERANCE = 1e-12


class RecentInputs:
    """The ring buffer of the latest inputs' features in ``path`` (the device's ``features.sqlite``)."""

    def __init__(self, path: str | Path, capacity: int = DEFAULT_RECENT_CAPACITY) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InputError("recent inputs capacity", got=repr(capacity), expected="a positive integer",
                             todo="pass e.g. 1000")
        self.capacity = capacity
        self._db = CacheDatabase(Path(path))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RecentInputs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, backbone_sha256: str, features: np.ndarray, labels: Sequence[str],
            probabilities: Sequence[float]) -> None:
        """Keep the features (float16) of classified inputs, with their answers; the oldest go beyond capacity."""
        rows = np.asarray(features, dtype=np.float16)
        if rows.ndim != 2 or len(rows) != len(labels) or len(rows) != len(probabilities):
            raise InputError("recent inputs", got=f"features {rows.shape}, {len(labels)} labels",
                             expected="[N, D] features and N labels and probabilities")
        if not len(rows):
            return
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        dim = rows.shape[1]
        with self._db.write("recent inputs add") as conn:
            conn.executemany(
                "INSERT INTO recent_inputs (backbone_sha256, dim, vec, label, probability, created_utc) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [(backbone_sha256, dim, row.tobytes(), str(label), float(p), created)
                 for row, label, p in zip(rows, labels, probabilities)])
            conn.execute("DELETE FROM recent_inputs WHERE id <= (SELECT MAX(id) FROM recent_inputs) - ?",
                         (self.capacity,))

    def window(self, backbone_sha256: str, n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The latest ``n`` inputs of that backbone: features float32 ``[m, D]`` (m <= n, oldest first),
        their predicted labels and confidences."""
        with self._db.read("recent inputs window") as conn:
            rows = conn.execute(
                "SELECT vec, label, probability FROM recent_inputs WHERE backbone_sha256 = ? "
                "ORDER BY id DESC LIMIT ?", (backbone_sha256, int(n))).fetchall()[::-1]
        if not rows:
            return np.zeros((0, 0), np.float32), [], np.zeros(0, np.float32)
        feats = np.stack([np.frombuffer(r[0], dtype=np.float16) for r in rows]).astype(np.float32)
        return feats, [r[1] for r in rows], np.array([r[2] for r in rows], dtype=np.float32)

    def count(self) -> int:
        with self._db.read("recent inputs count") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM recent_inputs").fetchone()[0])


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def mmd_test(reference: np.ndarray, window: np.ndarray, *, permutations: int = DEFAULT_PERMUTATIONS,
             seed: int = 0) -> tuple[float, float]:
    """(MMD², permutation p-value) of ``window`` against ``reference`` (rows: feature vectors).

    Unbiased MMD² of unit-length rows with a Gaussian kernel of bandwidth the median squared distance of
    the pooled rows; the p-value is ``(1 + #{permuted >= observed}) / (1 + permutations)``.
    """
    x, y = _unit(reference), _unit(window)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise InputError("drift test", got=f"{n} reference rows and {m} window rows", expected="at least 2 of each")
    z = np.vstack([x, y])
    sq = z @ z.T
    norms = np.diag(sq)
    dist = np.maximum(norms[:, None] + norms[None, :] - 2 * sq, 0.0)
    bandwidth = float(np.median(dist[np.triu_indices(n + m, 1)])) or 1.0
    kernel = np.exp(-dist / bandwidth)
    np.fill_diagonal(kernel, 0.0)  # the unbiased estimate leaves out k(i, i)

    # The statistic of a relabelling, with s its 0/1 row of the rows that play the reference, K the kernel,
    # r = K 1 its row sums and T = 1' K 1: sum K[x, x] = s'Ks, sum K[x, y] = s'r - s'Ks and
    # sum K[y, y] = T - 2 s'r + s'Ks. So every relabelling costs one row of a matrix product (S K) * S,
    # chunk by chunk, instead of three fancy-indexed copies of the kernel: 542 rows, 500 relabellings
    # took 0.41 s that way and 0.023 s this way (benchmarks/README.md, "The drift test's cost"), and
    # ``device serve`` runs it every 50 inputs.
    rows = kernel.sum(axis=1)
    total = float(rows.sum())
    mask = np.zeros(n + m, dtype=bool)
    mask[:n] = True
    rng = np.random.default_rng(seed)
    # the observed labelling first, in the same products as the relabellings (a relabelling that is the
    # observed one ties with it exactly); the relabellings drawn as before, one permutation at a time, and
    # a chunk at a time (memory: PERMUTATION_CHUNK labellings, whatever ``permutations`` asks)
    stats = np.empty(1 + permutations)
    for start in range(0, 1 + permutations, PERMUTATION_CHUNK):
        s = np.empty((min(PERMUTATION_CHUNK, 1 + permutations - start), n + m))
        for k in range(len(s)):
            s[k] = mask if start + k == 0 else rng.permutation(mask)
        kxx = np.einsum("ij,ij->i", s @ kernel, s)
        sr = s @ rows
        kxy, kyy = sr - kxx, total - 2 * sr + kxx
        stats[start:start + len(s)] = kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)
    observed = float(stats[0])
    # sums in another order differ in the last bits: a tie is a tie within them
    above = int(np.sum(stats[1:] >= observed - TIE_TOLERANCE * max(1.0, abs(observed))))
    return float(observed), float((1 + above) / (1 + permutations))


@dataclass(frozen=True)
class DriftReport:
    """``edgexfer device drift``'s answer (``--json`` prints :meth:`to_dict`)."""

    drift: bool | None  #: None: too few inputs to judge
    p_value: float | None
    statistic: float | None
    alpha: float
    window: int  #: inputs tested (the latest ones)
    reference: int  #: reference rows (the bundle's exemplars)
    permutations: int
    class_mix: dict[str, dict[str, float]]  #: per class: share of the window's answers and the reference's
    label_shift: float | None  #: total variation distance between the two mixes (0: same, 1: disjoint)
    confidence: dict[str, float | None]  #: mean confidence of the window's and the reference's answers
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reference_rows(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The bundle's exemplars, a seeded subsample of :data:`MAX_REFERENCE` rows if there are more."""
    if len(features) <= MAX_REFERENCE:
        return features, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(features))[:MAX_REFERENCE])
    return features[keep], labels[keep]


def drift_report(reference: np.ndarray, reference_probs: np.ndarray, classes: Sequence[str], window: np.ndarray,
                 window_labels: Sequence[str], window_conf: np.ndarray, *, alpha: float = DEFAULT_ALPHA,
                 permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> DriftReport:
    """The test of ``window`` against ``reference`` with the label mix and confidences beside it.

    ``reference_probs``: the active head's probabilities on the reference rows (its answers there).
    """
    if not 0 < alpha < 1:
        raise InputError("alpha", got=repr(alpha), expected="a number in (0, 1)", todo="pass e.g. --alpha 0.01")
    ref_answers = [classes[i] for i in np.argmax(reference_probs, axis=1)] if len(reference_probs) else []
    names = sorted(set(classes) | set(window_labels))
    mix_w = {c: (list(window_labels).count(c) / len(window_labels) if len(window_labels) else 0.0) for c in names}
    mix_r = {c: (ref_answers.count(c) / len(ref_answers) if ref_answers else 0.0) for c in names}
    class_mix = {c: {"window": round(mix_w[c], 4), "reference": round(mix_r[c], 4)} for c in names}
    confidence = {"window": round(float(np.mean(window_conf)), 4) if len(window_conf) else None,
                  "reference": round(float(np.max(reference_probs, axis=1).mean()), 4) if len(reference_probs)
                  else None}
    common = dict(alpha=alpha, window=len(window), reference=len(reference), permutations=permutations,
                  class_mix=class_mix, confidence=confidence)
    if len(window) < MIN_WINDOW:
        return DriftReport(None, None, None, label_shift=None, note=f"{len(window)} recent inputs < {MIN_WINDOW}: "
                           "classify more inputs before testing", **common)
    stat, p = mmd_test(reference, window, permutations=permutations, seed=seed)
    shift = 0.5 * sum(abs(mix_w[c] - mix_r[c]) for c in names)
    return DriftReport(bool(p < alpha), round(p, 6), stat, label_shift=round(shift, 4), **common)


def check_recent(recent: RecentInputs, bundle: Any, head: Any, *, window: int = DEFAULT_WINDOW,
                alpha: float = DEFAULT_ALPHA, permutations: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> DriftReport:
    """The latest ``window`` inputs of ``bundle``'s backbone against its exemplars, answered by ``head``
    (``device drift``, and ``device serve``/``watch`` every :data:`DEFAULT_EVERY` inputs)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise InputError("window", got=repr(window), expected="an integer >= 2", todo="pass e.g. --window 30")
    exemplars = bundle.exemplars()
    if exemplars is None:
        raise BundleError("drift test", got=f"bundle {bundle.manifest.name} without exemplars.npz",
                          expected="a bundle with its training exemplars (edgexfer export writes them)",
                          todo="export the bundle again")
    reference, _ = reference_rows(*exemplars)
    feats, labels, conf = recent.window(bundle.manifest.backbone.sha256, window)
    return drift_report(reference, head.probabilities(reference), head.classes, feats, labels, conf,
                        alpha=alpha, permutations=permutations, seed=seed)


class DriftMonitor:
    """A running service's side of the test: every engine call's features go to the ring buffer, and the
    latest window is tested again every ``every`` inputs (``device serve``, ``device watch``).

    :meth:`observe` runs in one thread (the service's database thread: the SQLite connection is that
    thread's); :meth:`status` from any thread. ``every`` 0: the inputs are kept, never tested.
    """

    def __init__(self, path: str | Path, *, every: int = DEFAULT_EVERY, window: int = DEFAULT_WINDOW,
                 alpha: float = DEFAULT_ALPHA, permutations: int = DEFAULT_PERMUTATIONS) -> None:
        for name, value, low in (("drift every", every, 0), ("drift window", window, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(name, got=repr(value), expected=f"an integer >= {low}",
                                 todo="pass e.g. --drift-every 50 --drift-window 30")
        self.path, self.every, self.window, self.alpha, self.permutations = Path(path), every, window, alpha, permutations
        self._recent: RecentInputs | None = None
        self._lock = threading.Lock()
        self._since = 0
        self._last: DriftReport | None = None
        self._tested_utc: str | None = None
        self._error: str | None = None

    def observe(self, bundle: Any, head: Any, features: np.ndarray, probabilities: np.ndarray) -> None:
        if self._recent is None:
            self._recent = RecentInputs(self.path)
        labels = [head.classes[j] for j in np.argmax(probabilities, axis=1)]
        self._recent.add(bundle.manifest.backbone.sha256, features, labels, np.max(probabilities, axis=1))
        self._since += len(labels)
        if not self.every or self._since < self.every:
            return
        self._since = 0
        try:
            report, error = check_recent(self._recent, bundle, head, window=self.window, alpha=self.alpha,
                                        permutations=self.permutations), None
        except (InputError, BundleError) as exc:
            report, error = None, str(exc)
        with self._lock:
            self._last, self._error = report, error
            self._tested_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    @property
    def last(self) -> DriftReport | None:
        with self._lock:
            return self._last

    def status(self) -> dict[str, Any]:
        """For ``/v1/status``: the settings, the last test (None before the first) and when it ran."""
        with self._lock:
            return {"every": self.every, "window": self.window, "alpha": self.alpha,
                    "tested_utc": self._tested_utc, "error": self._error,
                    "last": self._last.to_dict() if self._last is not None else None}

    def close(self) -> None:
        if self._recent is not None:
            self._recent.close()
            self._recent = None

