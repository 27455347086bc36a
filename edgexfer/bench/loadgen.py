"""Driving MLPerf's LoadGen (``mlperf_loadgen``): test settings, the SingleStream and Offline scenarios,
and reading LoadGen's results back from its detail log.

The work a query does is a callable the caller passes (``work(index)``, ``work_batch(indices)``);
samples are preloaded, so LoadGen's load/unload callbacks do nothing.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgexfer.bench.plan import SEED
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.optional import require

#: SingleStream percentiles reported (LoadGen's own, from its detail log)
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 97.0, 99.0, 99.9)


@dataclass(frozen=True)
class LoadGenSettings:
    min_duration_s: float
    min_queries: int
    log_dir: Path


def require_loadgen():
    return require("mlperf_loadgen", "edgexfer bench (MLPerf LoadGen)")


def percentile_key(p: float) -> str:
    """``p50_ms``, ``p99_9_ms``: the report's name of a latency percentile."""
    return f"p{p:g}_ms".replace(".", "_")


def _test_settings(lg, scenario, s: LoadGenSettings):
    ts = lg.TestSettings()
    ts.scenario = scenario
    ts.mode = lg.TestMode.PerformanceOnly
    ts.min_duration_ms = int(round(s.min_duration_s * 1000))
    ts.qsl_rng_seed = SEED
    ts.sample_index_rng_seed = SEED
    ts.schedule_rng_seed = SEED
    return ts


def _log_settings(lg, log_dir: Path):
    log_dir.mkdir(parents=True, exist_ok=True)
    ls = lg.LogSettings()
    ls.log_output.outdir = str(log_dir)
    ls.log_output.copy_summary_to_stdout = False
    ls.log_output.copy_detail_to_stdout = False
    ls.enable_trace = False
    return ls


def parse_loadgen_detail(path: Path) -> dict[str, Any]:
    """The ``result_*`` and early-stopping entries of LoadGen's ``mlperf_log_detail.txt``."""
    out: dict[str, Any] = {}
    if not path.is_file():
        raise InputError("LoadGen wrote no detail log", got=str(path), expected="mlperf_log_detail.txt",
                         todo="check that the --out directory is writable")
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        try:
            entry = json.loads(line[len(":::MLLOG "):])
        except ValueError:
            continue
        key = entry.get("key", "")
        if key.startswith(("result_", "early_stopping")) or key in ("loadgen_version", "effective_samples_per_query",
                                                                    "effective_min_query_count",
                                                                    "effective_min_duration_ms"):
            out[key] = entry.get("value")
    return out


def loadgen_latency_ms(loadgen: dict[str, Any]) -> dict[str, float | None]:
    """LoadGen's SingleStream latencies in ms: ``p50_ms`` … ``p99_9_ms``, ``max_ms``, ``min_ms``, ``mean_ms``
    (None where LoadGen reported none)."""
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        value = loadgen.get(f"result_{p:.2f}_percentile_latency_ns")
        out[percentile_key(p)] = None if value is None else value / 1e6
    for key in ("max", "min", "mean"):
        value = loadgen.get(f"result_{key}_latency_ns")
        out[f"{key}_ms"] = None if value is None else value / 1e6
    return out


class _FirstFailure:
    """LoadGen calls the system under test from C++, which an exception cannot cross: keep the first
    one, skip the work after it (queries still complete, so LoadGen stops), raise it when LoadGen is done."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def call(self, work: Callable[[Any], Any], arg: Any) -> None:
        if self.error is not None:
            return
        try:
            work(arg)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() after LoadGen stops
            self.error = exc

    def run(self, lg, settings, issue: Callable, n_samples: int, log_dir: Path) -> dict[str, Any]:
        """One LoadGen test; LoadGen's results, or the SUT's first error."""
        qsl = lg.ConstructQSL(n_samples, n_samples, lambda idx: None, lambda idx: None)  # samples are preloaded
        sut = lg.ConstructSUT(issue, lambda: None)
        try:
            lg.StartTestWithLogSettings(sut, qsl, settings, _log_settings(lg, log_dir))
        finally:
            lg.DestroySUT(sut)
            lg.DestroyQSL(qsl)
        if self.error is not None:
            raise self.error
        return parse_loadgen_detail(log_dir / "mlperf_log_detail.txt")


def single_stream(work: Callable[[int], Any], n_samples: int, s: LoadGenSettings, expected_s: float) -> dict[str, Any]:
    """LoadGen SingleStream: one query of one sample in flight. ``work(index)`` does the layer's work.

    Returns LoadGen's results plus our own per-query latencies (from the SUT's entry to completion), which
    give the CDF and the std LoadGen does not report.
    """
    lg = require_loadgen()
    latencies: list[float] = []
    guard = _FirstFailure()

    def issue(queries):
        for q in queries:
            start = time.perf_counter()
            guard.call(work, q.index)
            latencies.append(time.perf_counter() - start)
            lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0)])

    ts = _test_settings(lg, lg.TestScenario.SingleStream, s)
    ts.min_query_count = int(s.min_queries)
    ts.single_stream_expected_latency_ns = max(1, int(expected_s * 1e9))
    return {"loadgen": guard.run(lg, ts, issue, n_samples, s.log_dir), "latencies_s": latencies}


def offline(work_batch: Callable[[list[int]], Any], n_samples: int, batch: int, s: LoadGenSettings,
            expected_qps: float, min_samples: int) -> dict[str, Any]:
    """LoadGen Offline: every sample in one query; the SUT works through it in batches of ``batch``."""
    lg = require_loadgen()
    spans: list[float] = []
    guard = _FirstFailure()

    def issue(queries):
        start = time.perf_counter()
        for i in range(0, len(queries), batch):
            chunk = queries[i:i + batch]
            guard.call(work_batch, [q.index for q in chunk])
            lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in chunk])
        spans.append(time.perf_counter() - start)

    ts = _test_settings(lg, lg.TestScenario.Offline, s)
    ts.min_query_count = 1
    # LoadGen sizes the one offline query as expected_qps x min_duration (x1.1); ask for at least min_samples
    ts.offline_expected_qps = max(float(expected_qps), min_samples / (1.1 * max(s.min_duration_s, 1e-3)))
    loadgen = guard.run(lg, ts, issue, n_samples, s.log_dir)
    return {"loadgen": loadgen, "wall_s": float(sum(spans))}
