"""Timing done by the bench itself, beside LoadGen: latency statistics of the SUT's own timing, what the
head and the wrapper add to an engine call (paired, interleaved), and engines interleaved round by round.

These exist because a shared, busy machine drifts: separate tests run one after the other can differ
by more than what is being compared, so the comparisons here interleave what they compare.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgexfer.bench.loadgen import PERCENTILES, percentile_key
from edgexfer.bench.plan import WARMUP_CALLS
from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.predictor import Predictor


def latency_stats(latencies_s: Sequence[float]) -> dict[str, float]:
    """Milliseconds: p50/p90/p95/p99/max, mean, std, count (numpy's linear percentile)."""
    a = np.asarray(latencies_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"count": 0}
    out = {percentile_key(p): float(np.percentile(a, p)) for p in PERCENTILES}
    out.update({"max_ms": float(a.max()), "min_ms": float(a.min()), "mean_ms": float(a.mean()),
                "std_ms": float(a.std(ddof=1)) if a.size > 1 else 0.0, "count": int(a.size)})
    return out


def median_call(fn: Callable[[], Any], calls: int) -> float:
    """Median seconds of ``calls`` calls: what LoadGen is told to expect (also a warm-up)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def paired_head_overhead(engine: EngineRunner, predictor: Predictor, pixels: np.ndarray, pairs: int) -> dict[str, Any]:
    """Engine vs engine + head on the same sample, interleaved (ABBA order) so load drift cancels out.

    On a shared, busy machine two separate runs can differ by more than the head costs. Three views:
    ``ratio`` (median of engine + head calls / median of bare engine calls, interleaved), ``pairwise_ratio_median``
    (median of per-pair ratios) and ``decomposed_ratio``: inside each engine + head call, the time spent in
    the engine itself (``EngineRunner.stats``) is subtracted, so the wrapper's and head's own cost is measured
    without the engine's jitter; ratio = (engine p50 + that cost's p50) / engine p50.
    """
    t_engine: list[float] = []
    t_full: list[float] = []
    t_outside: list[float] = []
    t_head: list[float] = []
    head = predictor.head
    feats = engine.run(pixels[:1])
    for i in range(max(4, pairs)):
        x = pixels[i % len(pixels)][None]
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            inside_before = engine.stats.seconds
            start = time.perf_counter()
            if which == 0:
                engine.run(x)
                t_engine.append(time.perf_counter() - start)
            else:
                predictor.classify_pixels(x)
                t_full.append(time.perf_counter() - start)
                t_outside.append(t_full[-1] - (engine.stats.seconds - inside_before))
        start = time.perf_counter()
        head.probabilities(feats)
        t_head.append(time.perf_counter() - start)
    e50, f50 = float(np.median(t_engine)) * 1e3, float(np.median(t_full)) * 1e3
    outside50 = float(np.median(t_outside)) * 1e3
    return {
        "pairs": len(t_engine), "engine_p50_ms": e50, "engine_head_p50_ms": f50,
        "head_only_p50_ms": float(np.median(t_head)) * 1e3,
        "ratio": f50 / e50 if e50 > 0 else None,
        "pairwise_ratio_median": float(np.median(np.asarray(t_full) / np.asarray(t_engine))),
        "outside_engine_p50_ms": outside50,
        "decomposed_ratio": (e50 + outside50) / e50 if e50 > 0 else None,
    }


def interleaved_engines(runners: Mapping[str, EngineRunner], pixels: np.ndarray, rounds: int,
                        sample: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Every engine called once per round on the same sample, round after round, in a rotating order.

    ``sample(i)`` is the batch-1 input of round ``i`` (default: image ``i`` of ``pixels``; a text bundle
    passes one row of its token samples).

    Separate LoadGen tests run one after the other, so a load change on a shared machine can favour one
    engine; here each round gives every engine the same conditions, and the medians compare them fairly.
    """
    names = list(runners)
    sample = sample or (lambda i: pixels[i % len(pixels)][None])
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        for _ in range(WARMUP_CALLS):
            runners[name].run(sample(0))
    for r in range(max(4, rounds)):
        x = sample(r)
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            start = time.perf_counter()
            runners[name].run(x)
            times[name].append(time.perf_counter() - start)
    return {"rounds": max(4, rounds), "layer": "engine", "batch": 1,
            "p50_ms": {name: float(np.median(t)) * 1e3 for name, t in times.items()},
            "p90_ms": {name: float(np.percentile(t, 90)) * 1e3 for name, t in times.items()}}
