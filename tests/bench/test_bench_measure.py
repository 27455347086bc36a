"""The bench's own timing (:mod:`edgexfer.bench.measure`): statistics, engines interleaved, and the
head-overhead decomposition checked against a clock that moves only when the fakes work."""
from __future__ import annotations

import types

import numpy as np
import pytest

from edgexfer.bench import measure
from edgexfer.bench.measure import interleaved_engines, latency_stats, paired_head_overhead
from edgexfer.bench.plan import WARMUP_CALLS
from edgexfer.bench.report import summarize
from edgexfer.runtime.backends import base
from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
from edgexfer.runtime.predictor import Predictor


def test_latency_stats_of_known_values():
    stats = latency_stats([0.001, 0.002, 0.003, 0.004])
    assert stats["count"] == 4
    assert stats["p50_ms"] == pytest.approx(2.5)
    assert stats["max_ms"] == pytest.approx(4.0)
    assert stats["mean_ms"] == pytest.approx(2.5)


def test_interleaved_engines_give_every_engine_the_same_rounds():
    class Fake:
        def __init__(self):
            self.calls = 0

        def run(self, batch):
            self.calls += 1
            return np.zeros((len(batch), 4), np.float32)

    runners = {"a/fp32": Fake(), "b/int8": Fake()}
    side = interleaved_engines(runners, np.zeros((3, 8, 8, 3), np.uint8), rounds=10)
    assert side["rounds"] == 10
    assert runners["a/fp32"].calls == runners["b/int8"].calls == 10 + WARMUP_CALLS
    assert set(side["p50_ms"]) == set(runners) and all(v >= 0 for v in side["p50_ms"].values())
    report = {"results": [], "side_by_side": {**side, "p50_ms": {"a/fp32": 2.0, "pytorch-eager/fp32": 10.0}}}
    summary = summarize(report)
    assert summary["side_by_side_best"]["engine"] == "a/fp32"
    assert summary["side_by_side_speedup_vs_pytorch_eager"] == pytest.approx(5.0)


# ------------------------------------------------------------------------------ the head-overhead decomposition
class _Clock:
    """A stand-in for time.perf_counter that moves only when the fake engine or head works."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_head_overhead_parts_add_up_to_the_measured_engine_plus_head(monkeypatch):
    """Engine calls of known, varying cost and a head of known cost: the decomposition must find the head's
    cost, and engine p50 + outside-the-engine p50 must equal the engine + head p50 measured directly."""
    clock = _Clock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(measure, "time", fake_time)
    monkeypatch.setattr(base, "time", fake_time)
    head_cost_s = 0.0005
    # one cost per pair (both calls of a pair see it), a jittery engine: 4 ms with 8 ms and 20 ms outliers
    costs = [0.004, 0.0041, 0.0039, 0.008, 0.004, 0.02, 0.0042, 0.0038]
    calls = {"n": 1}  # paired_head_overhead's first engine call takes slot 0 alone; then pair i takes slot i + 1

    class ClockEngine(EngineRunner):
        name = "clock"

        def input_spec(self):
            return TensorSpec("image", (None, 4, 4, 3), "uint8")

        def run_impl(self, batch):
            clock.now += costs[(calls["n"] // 2) % len(costs)]
            calls["n"] += 1
            return np.ones((len(batch), 5), np.float32)

    class ClockHead:
        classes = ["a", "b"]

        def probabilities(self, feats):
            clock.now += head_cost_s
            return np.full((len(feats), 2), 0.5, np.float32)

    engine = ClockEngine("clock.onnx", "fp32")
    predictor = Predictor(None, engine, ClockHead(), "clock", "fp32")
    h = paired_head_overhead(engine, predictor, np.zeros((4, 4, 4, 3), np.uint8), pairs=32)

    assert h["pairs"] == 32
    assert h["outside_engine_p50_ms"] == pytest.approx(head_cost_s * 1e3, rel=1e-6)
    assert h["head_only_p50_ms"] == pytest.approx(head_cost_s * 1e3, rel=1e-6)
    assert h["engine_p50_ms"] == pytest.approx(float(np.median(costs)) * 1e3, rel=1e-6)
    # the parts add up to the directly measured engine + head figure (1 % tolerance; exact with this clock)
    assert h["engine_p50_ms"] + h["outside_engine_p50_ms"] == pytest.approx(h["engine_head_p50_ms"], rel=0.01)
    assert h["decomposed_ratio"] == pytest.approx(h["engine_head_p50_ms"] / h["engine_p50_ms"], rel=0.01)
