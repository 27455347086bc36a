"""The first round of fleet learning of a linear head: per-class sufficient statistics, merged into a head.

FedProx rounds are first-order: from a zero head, 8 non-IID clipart8 devices needed 7 rounds to come
within 2 points of the central head (docs/fleet.md). The central head is multinomial logistic
regression on the union of the devices' samples; its second-order structure (how the 1280 features
co-vary within a class) is what the first-order rounds learn slowly. So the first round asks each
device for the statistics of a class-conditional Gaussian model instead of a trained head:

- per class: the sample count and the **sum** of the feature vectors;
- the device's **within-class scatter** ``Σ (x - m_c)(x - m_c)ᵀ`` (around its own class means, over the
  classes it sends), as a factor ``F`` with ``FᵀF`` = the scatter (``r x D``, ``r <= min(n - classes, D)``:
  a device with 30 samples sends at most 30 x 1280 floats, one with thousands 1280 x 1280).

The server pools them exactly (the scatter around the fleet's class means adds each device's
``n·(m_device - m_fleet)(...)ᵀ`` per class: a split of the same samples over any devices gives the same
pooled statistics), draws :data:`DRAWS_PER_SAMPLE` synthetic features per real sample from the pooled
model ``N(m_c, Σ_within)`` and fits the head with the host's trainer (:func:`fit_linear`, the same ``C``
and class weights as the central head). That head starts the FedProx rounds. Measured on clipart8 (benchmarks/README.md "Three rounds to
central", 4 and 8 devices, split seeds 0-9, from a zero head): this round's head alone is +0.2 and -1.8
points from central on average (worst -3.1 and -4.4), after two FedProx rounds +0.2 and -0.8 (worst -4.4
and -2.5; 17 of 20 within 2 points), where three FedProx rounds from the zero head end 21-22 points below.

**What leaves a device** (docs/fleet.md): counts, per-class sums and the scatter factor, float32.
Not an image, a sample id or a feature vector; but a sum over few samples is close to them: a class
with fewer than :data:`MIN_CLASS_SAMPLES` samples on a device is left out of everything it sends
(count 0, no sum, not in the scatter). The scatter determines the device's centred samples up to a
rotation (their Gram matrix): it is more than a head reveals. Fleets that must not share it run
without this round (``fleet serve --first-round fedprox``); with differential privacy it is off.

**A device that lies** (the rules of :mod:`edgexfer.runtime.federated`): counts weigh at most as the
median holder's (:func:`bounded_weights`); a device's class mean may lie at most :data:`CLIP_MULTIPLE`
times the median distance from the fleet's centre (the coordinate-wise median of the devices'
means), further is pulled in; a class held by 3 or more devices takes the coordinate-wise median of
their means; a device's scatter per sample is scaled down to at most :data:`CLIP_MULTIPLE` times the
median trace per sample. What two holders of a class disagree on cannot be settled: one of them can
move that class.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.federated import (
    CLIP_MULTIPLE,
    MAX_SAMPLES_PER_CLASS,
    Rejection,
    UpdateRejected,
    _lower_median,
    bounded_weights,
)
from edgexfer.runtime.heads import Head

#: version tag of a statistics reply; the server refuses any other
STATS_FORMAT = "edgexfer.fleet-statistics/1"

#: a class with fewer samples on a device is not in its statistics (a sum over few samples is close to them)
MIN_CLASS_SAMPLES = 5

#: synthetic features drawn per real sample for the server's fit (4: 0.2 points below central on average,
#: 1: 2.2; benchmarks/README.md); at most MAX_DRAWS_PER_CLASS per class keep the server's fit small
DRAWS_PER_SAMPLE = 4
MAX_DRAWS_PER_CLASS = 2_000

#: two holders' class means further apart than this many times their sampling noise: one of them lies
PAIR_GAP = 3.0

#: a device with a class mean further than this many times the median distance from the fleet's centre
#: lies: all its statistics are left out of the round (honest devices: at most 1.55 times on clipart8
#: image features, 50 splits over 4-40 devices, 1.83 on fortunes7 text features, 30 splits over 4-16;
#: issue 24's D3 liar: about 50 times)
OUTLIER_MULTIPLE = 3.0


@dataclass(frozen=True, eq=False)
class ClassStatistics:
    """One device's statistics (or the fleet's, pooled)."""

    classes: tuple[str, ...]
    counts: dict[str, int]  #: samples per class in the statistics (0: the class is not in them)
    sums: np.ndarray  #: [K, D] float64, the sum of each class's feature vectors (zero rows where count is 0)
    factor: np.ndarray  #: [r, D] float64 with factor.T @ factor = the within-class scatter

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))


def class_statistics(X: np.ndarray, labels: Sequence[str], classes: Sequence[str], *,
                     min_count: int = MIN_CLASS_SAMPLES) -> ClassStatistics:
    """A device's statistics of its labelled features ``X`` (float, [N, D]) for ``classes``, then the
    classes of ``labels`` not in ``classes`` (in name order); classes with fewer than ``min_count``
    samples are left out (count 0)."""
    labels = np.asarray(labels, dtype=str)
    X = np.asarray(X, dtype=np.float64)
    names = tuple(classes) + tuple(sorted({str(c) for c in labels} - set(classes)))
    counts = {c: 0 for c in names}
    sums = np.zeros((len(names), X.shape[1]))
    centred = []
    for i, c in enumerate(names):
        rows = X[labels == c]
        if len(rows) < max(1, min_count):
            continue
        counts[c] = len(rows)
        sums[i] = rows.sum(axis=0)
        centred.append(rows - rows.mean(axis=0))
    factor = np.zeros((0, X.shape[1]))
    if centred:
        _, s, vt = np.linalg.svd(np.concatenate(centred), full_matrices=False)
        keep = s > 1e-6 * max(float(s[0]), 1e-30)
        factor = s[keep, None] * vt[keep]
    return ClassStatistics(names, counts, sums, factor)


def pack_statistics(stats: ClassStatistics, backbone_sha256: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What a device sends in the statistics round: ``(arrays, config)``; config is strings only."""
    arrays = {"sums": np.ascontiguousarray(stats.sums, dtype=np.float32),
              "scatter_factor": np.ascontiguousarray(stats.factor, dtype=np.float32)}
    config = {"format": STATS_FORMAT, "classes": json.dumps(list(stats.classes)),
              "counts": json.dumps([int(stats.counts[c]) for c in stats.classes]), "backbone_sha256": backbone_sha256}
    return arrays, config


@dataclass(frozen=True, eq=False)
class StatisticsUpdate:
    device: str
    stats: ClassStatistics

    @property
    def total(self) -> int:
        return self.stats.total


def check_statistics(device: str, arrays: Mapping[str, Any], config: Mapping[str, Any], *, global_head: Head,
                     backbone_sha256: str) -> StatisticsUpdate:
    """One device's statistics reply, checked; raises :class:`UpdateRejected` naming the device."""

    def reject(what: str, got: object, expected: object) -> UpdateRejected:
        return UpdateRejected(f"statistics from device {device}: {what}", got=got, expected=expected,
                              todo="the device is dropped from this round; check its edgexfer version and its state")

    if config.get("format") != STATS_FORMAT:
        raise reject("unknown statistics format", repr(config.get("format"))[:60], repr(STATS_FORMAT))
    if config.get("backbone_sha256") != backbone_sha256:
        raise reject("statistics of another backbone", f"backbone {str(config.get('backbone_sha256'))[:12]}…",
                     f"backbone {backbone_sha256[:12]}…")
    try:
        classes, counts = json.loads(config.get("classes", "null")), json.loads(config.get("counts", "null"))
    except (TypeError, ValueError) as exc:
        raise reject("classes or counts are not JSON", str(exc)[:80], "JSON lists") from exc
    if (not isinstance(classes, list) or not all(isinstance(c, str) and c.strip() for c in classes)
            or len(set(classes)) != len(classes) or classes[:global_head.num_classes] != list(global_head.classes)):
        raise reject("malformed class list", repr(classes)[:80], f"{list(global_head.classes)[:8]} then any new classes")
    if (not isinstance(counts, list) or len(counts) != len(classes) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_SAMPLES_PER_CLASS for n in counts)):
        raise reject("malformed sample counts", repr(counts)[:80], f"{len(classes)} integers in 0..{MAX_SAMPLES_PER_CLASS}")
    if set(arrays) != {"sums", "scatter_factor"}:
        raise reject("wrong tensors", sorted(arrays), ["scatter_factor", "sums"])
    d = global_head.feature_dim
    sums, factor = np.asarray(arrays["sums"]), np.asarray(arrays["scatter_factor"])
    for name, value, shape in (("sums", sums, f"[{len(classes)}, {d}]"), ("scatter_factor", factor, f"[r <= {d}, {d}]")):
        if value.dtype != np.float32 or value.ndim != 2 or value.shape[1] != d:
            raise reject(f"tensor '{name}' has the wrong type or shape", f"{value.dtype} {list(value.shape)}", f"float32 {shape}")
        if not np.all(np.isfinite(value)):
            raise reject(f"tensor '{name}' holds NaN or infinity", f"{int(np.count_nonzero(~np.isfinite(value)))} values",
                         "finite statistics")
    if sums.shape[0] != len(classes) or factor.shape[0] > min(d, sum(counts)):
        raise reject("statistics do not fit the counts", f"sums {list(sums.shape)}, factor {list(factor.shape)}",
                     f"{len(classes)} sums and at most min({d}, samples) factor rows")
    if np.any(sums[np.asarray(counts) == 0] != 0):
        raise reject("a class without samples has a sum", "a non-zero row", "zero rows where the count is 0")
    stats = ClassStatistics(tuple(classes), dict(zip(classes, counts)), sums.astype(np.float64), factor.astype(np.float64))
    return StatisticsUpdate(device, stats)


@dataclass(frozen=True, eq=False)
class PooledStatistics:
    """The fleet's class-conditional Gaussian model, bounded against lying devices."""

    classes: tuple[str, ...]  #: the classes with statistics (the global ones first)
    counts: dict[str, int]  #: samples per class as merged (capped per device)
    means: np.ndarray  #: [K, D]
    factor: np.ndarray  #: [r, D] with factor.T @ factor = the within-class scatter around the fleet's class means
    weights: dict[str, float] = field(default_factory=dict)  #: per device, its capped sample count
    pulled_in: dict[str, float] = field(default_factory=dict)  #: devices whose means or scatter were scaled down
    #: devices left out because a class mean lay far outside the fleet's (device: times the median distance)
    outliers: dict[str, float] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return int(sum(self.counts.values()))


def _class_means(live: Sequence[StatisticsUpdate]) -> tuple[list[dict[str, np.ndarray]], np.ndarray, list[list[float]]]:
    """Each device's class means, the fleet's centre (the coordinate-wise median of the devices' mean
    of their class means) and each class mean's distance from it."""
    means = [{c: u.stats.sums[u.stats.classes.index(c)] / u.stats.counts[c] for c in u.stats.classes
              if u.stats.counts[c] > 0} for u in live]
    centre = np.median(np.stack([np.mean(list(m.values()), axis=0) for m in means]), axis=0)
    return means, centre, [[float(np.linalg.norm(v - centre)) for v in m.values()] for m in means]


def outlier_devices(live: Sequence[StatisticsUpdate]) -> dict[str, float]:
    """Devices with a class mean further than :data:`OUTLIER_MULTIPLE` times the median distance from the
    fleet's centre (device: its furthest, in medians); none when that would be half the devices or more
    (then nobody can say who lies, and the pull-in of :func:`pool_statistics` bounds them all)."""
    if len(live) < 2:
        return {}
    _, _, far = _class_means(live)
    median = _lower_median([f for row in far for f in row])
    worst = {u.device: max(row) / median for u, row in zip(live, far) if median > 0 and max(row) > OUTLIER_MULTIPLE * median}
    return {k: round(v, 2) for k, v in worst.items()} if 2 * len(worst) < len(live) else {}


def pool_statistics(updates: Sequence[StatisticsUpdate], global_classes: Sequence[str]) -> PooledStatistics:
    """Pool devices' statistics robustly (module docstring, "A device that lies"): the outliers
    (:func:`outlier_devices`) are left out, the others pooled with bounded weights, means and scatter."""
    live = [u for u in updates if u.total > 0]
    if not live:
        raise InputError("no device sent statistics", got="0 devices with samples", expected=">= 1")
    outliers = outlier_devices(live)
    pooled = _pool([u for u in live if u.device not in outliers], global_classes)
    return PooledStatistics(pooled.classes, pooled.counts, pooled.means, pooled.factor, weights=pooled.weights,
                            pulled_in=pooled.pulled_in, outliers=outliers)


# long: the robust pooling rules of the module docstring, one short block per statistic
def _pool(live: Sequence[StatisticsUpdate], global_classes: Sequence[str]) -> PooledStatistics:
    d = live[0].stats.sums.shape[1]
    new = sorted({c for u in live for c in u.stats.classes[len(global_classes):] if u.stats.counts[c] > 0})
    classes = tuple(c for c in (*global_classes, *new) if any(u.stats.counts.get(c, 0) > 0 for u in live))
    means, centre, far_of = _class_means(live)
    totals = [u.total for u in live]
    device_weights = bounded_weights(totals)
    radius = CLIP_MULTIPLE * _lower_median([f for row in far_of for f in row])
    pulled: dict[str, float] = {}
    for u, m in zip(live, means):
        for c, v in m.items():
            far = float(np.linalg.norm(v - centre))
            if far > radius > 0:
                m[c] = centre + (v - centre) * (radius / far)
                pulled[u.device] = min(pulled.get(u.device, 1.0), radius / far)
    merged_counts: dict[str, int] = {}
    class_means = np.zeros((len(classes), d))
    pairs: list[tuple[int, float, np.ndarray]] = []
    holders: list[tuple[list[int], np.ndarray, np.ndarray]] = []
    between = []  # per device and class: sqrt(weight)·(device mean - fleet mean), rows of the between-device scatter
    for i, c in enumerate(classes):
        who = [k for k, u in enumerate(live) if u.stats.counts.get(c, 0) > 0]
        # a holder's count is capped among the class's holders and at its own device's capped total: a
        # lone holder claiming 9,000,000 samples of a class would otherwise shrink the pooled covariance
        # (divided by the samples) to nothing and set the class's draws (6.2 points below its absence)
        w = np.minimum(bounded_weights([live[k].stats.counts[c] for k in who]), device_weights[who])
        rows = np.stack([means[k][c] for k in who])
        class_means[i] = np.median(rows, axis=0) if len(who) >= 3 else (w / w.sum()) @ rows
        holders.append((who, w, rows))
        if len(who) == 2:
            pairs.append((i, float(np.linalg.norm(rows[0] - rows[1])), rows))
        merged_counts[c] = int(round(w.sum()))
        between += [np.sqrt(wk) * (rows[j] - class_means[i]) for j, wk in enumerate(w)]
    # two honest holders of a class hold samples of one distribution: their means lie about
    # sqrt(trace Σ·(1/n1 + 1/n2)) apart (sampling noise). Further than PAIR_GAP times that, one of them
    # lies (or holds odd samples): the mean nearer the fleet's centre is the class's, so a lie can shrink
    # the class towards the centre but not turn it round
    per_sample = [float(np.sum(u.stats.factor ** 2)) / n for u, n in zip(live, totals)]
    spread = _lower_median(per_sample)
    for i, gap, rows in pairs:
        n1, n2 = holders[i][1]
        if spread > 0 and gap > PAIR_GAP * np.sqrt(spread * (1 / n1 + 1 / n2)):
            class_means[i] = rows[int(np.argmin(np.linalg.norm(rows - centre, axis=1)))]
    # each device's scatter per sample, scaled down to CLIP_MULTIPLE x the median, weighted by its capped total
    weights = device_weights
    bound = CLIP_MULTIPLE * _lower_median(per_sample)
    stacked = np.stack(between)
    for u, n, w, t in zip(live, totals, weights, per_sample):
        scale = w / n * (min(1.0, bound / t) if t > 0 else 1.0)
        if t > bound:
            pulled[u.device] = min(pulled.get(u.device, 1.0), bound / t)
        stacked = _compact(np.concatenate([stacked, np.sqrt(scale) * u.stats.factor]))
    return PooledStatistics(classes, merged_counts, class_means, _canonical(stacked),
                            weights={u.device: float(w) for u, w in zip(live, weights)},
                            pulled_in={k: round(v, 6) for k, v in pulled.items()})


def _compact(factor: np.ndarray) -> np.ndarray:
    """A factor with the same ``factor.T @ factor`` and at most D rows once it has more than 2·D (QR's R):
    a fleet of any size pools into a [D, D] factor at most."""
    if factor.shape[0] <= 2 * factor.shape[1]:
        return factor
    return np.linalg.qr(factor, mode="r")


def _canonical(factor: np.ndarray) -> np.ndarray:
    """The factor's R (QR) with a non-negative diagonal: the same for the devices' factors stacked in any
    order (``P·F = (P·Q)·R``), so the server's draws, and its head, do not depend on the order replies came in."""
    r = np.linalg.qr(factor, mode="r")
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return r * signs[:, None]


def statistics_head(pooled: PooledStatistics, global_head: Head, *, C: float = 1.0, seed: int = 0,
                    draws_per_sample: int = DRAWS_PER_SAMPLE) -> Head:
    """The linear head fitted to the pooled model: synthetic features ``N(m_c, Σ)`` (``Σ`` the pooled
    within-class covariance), ``draws_per_sample`` per merged sample (at most :data:`MAX_DRAWS_PER_CLASS`
    per class), fitted by the host's trainer with ``C`` and balanced class weights (as the central head).
    Classes of ``global_head`` no device sent statistics for keep their global rows."""
    from edgexfer.runtime.head_training import fit_linear

    if global_head.kind != "linear":
        raise InputError("the statistics round fits linear heads only", got=repr(global_head.kind), expected="'linear'")
    K = len(pooled.classes)
    root = pooled.factor / np.sqrt(max(pooled.samples - K, 1))  # Σ = root.T @ root: z @ root ~ N(0, Σ)
    rng = np.random.default_rng(seed)
    draws = [min(draws_per_sample * pooled.counts[c], MAX_DRAWS_PER_CLASS) for c in pooled.classes]
    y = np.repeat(np.arange(K), draws)
    X = (pooled.means[y] + rng.standard_normal((len(y), root.shape[0])) @ root).astype(np.float32)
    if K < 2:
        raise InputError("the statistics round needs two classes", got=f"{K} class with statistics", expected=">= 2")
    fitted = fit_linear(X, y, pooled.classes, C=C)
    classes = tuple(global_head.classes) + tuple(c for c in pooled.classes if c not in global_head.classes)
    W = np.zeros((len(classes), global_head.feature_dim), np.float32)
    b = np.zeros(len(classes), np.float32)
    W[:global_head.num_classes], b[:global_head.num_classes] = global_head.tensors["W"], global_head.tensors["b"]
    for i, c in enumerate(pooled.classes):
        W[classes.index(c)], b[classes.index(c)] = fitted.tensors["W"][i], fitted.tensors["b"][i]
    return Head("linear", classes, {"W": W, "b": b})


@dataclass(frozen=True, eq=False)
class StatisticsResult:
    """The statistics round's head and what went into it (the fields of a round's report)."""

    head: Head
    pooled: PooledStatistics | None
    accepted: list[str]
    empty: list[str]
    rejected: list[Rejection]
    added: list[str] = field(default_factory=list)  #: classes new to the fleet this round
    outliers: list[str] = field(default_factory=list)  #: devices left out as liars (:func:`outlier_devices`)

    @property
    def fleet_samples(self) -> int:
        return self.pooled.samples if self.pooled is not None else 0

    def report(self) -> dict[str, Any]:
        p = self.pooled
        return {"kind": "statistics", "accepted": list(self.accepted), "empty": list(self.empty),
                "rejected": [r.to_dict() for r in self.rejected], "counts": dict(p.counts) if p else {},
                "weights": dict(p.weights) if p else {}, "clipped": dict(p.pulled_in) if p else {},
                "added_classes": list(self.added), "contributors": {}, "outliers": list(self.outliers),
                "classes": list(self.head.classes)}


def statistics_round(global_head: Head, updates: Sequence[StatisticsUpdate], rejected: Sequence[Rejection] = (), *,
                     min_devices: int = 1, C: float = 1.0, seed: int = 0) -> StatisticsResult:
    """The whole server side of the statistics round: pool, fit; fewer than ``min_devices`` devices with
    samples leave the head unchanged (as :meth:`HeadFedAvg.aggregate` does)."""
    live = [u for u in updates if u.total > 0]
    empty = [u.device for u in updates if u.total == 0]
    if len(live) < min_devices:
        return StatisticsResult(global_head, None, [u.device for u in live], empty, list(rejected))
    outliers = outlier_devices(live)
    rejected = [*rejected, *(outlier_rejection(device, times) for device, times in outliers.items())]
    live = [u for u in live if u.device not in outliers]
    if len(live) < min_devices:
        return StatisticsResult(global_head, None, [u.device for u in live], empty, rejected)
    pooled = pool_statistics(live, global_head.classes)
    try:
        head = statistics_head(pooled, global_head, C=C, seed=seed)
    except EdgexferError:
        return StatisticsResult(global_head, None, [u.device for u in live], empty, rejected)
    return StatisticsResult(head, pooled, [u.device for u in live], empty, rejected,
                            added=list(head.classes[global_head.num_classes:]), outliers=sorted(outliers))


def outlier_rejection(device: str, times: float) -> Rejection:
    """The round report's line for a device left out by :func:`outlier_devices`."""
    return Rejection(device, UpdateRejected(
        f"statistics from device {device}: a class mean far outside the fleet's", got=f"{times:g} times the median distance from the fleet's centre",
        expected=f"<= {OUTLIER_MULTIPLE:g} times (honest devices: <= 1.6)",
        todo="the device is left out of the rest of this federation; check its data and its edgexfer").one_line())
