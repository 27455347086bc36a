"""LoadGen wiring alone (:mod:`edgexfer.bench.loadgen`): tiny SingleStream and Offline tests on a fake SUT."""
from __future__ import annotations

import pytest

pytest.importorskip("mlperf_loadgen")

from edgexfer.bench.loadgen import LoadGenSettings, offline, single_stream  # noqa: E402
from edgexfer.runtime.errors import InputError  # noqa: E402


def test_single_stream_issues_one_sample_at_a_time_until_the_minimum(tmp_path):
    seen: list[int] = []
    run = single_stream(seen.append, 5, LoadGenSettings(0.01, 7, tmp_path / "ss"), expected_s=0.001)
    lg = run["loadgen"]
    assert lg["result_query_count"] == len(seen) == len(run["latencies_s"]) >= 7
    assert set(seen) <= set(range(5))
    assert "result_50.00_percentile_latency_ns" in lg and "result_validity" in lg


def test_offline_issues_every_sample_in_batches_no_larger_than_asked(tmp_path):
    batches: list[list[int]] = []
    run = offline(batches.append, 6, 4, LoadGenSettings(0.01, 10, tmp_path / "off"),
                  expected_qps=100.0, min_samples=10)
    done = sum(len(b) for b in batches)
    assert done == run["loadgen"]["effective_samples_per_query"] >= 10
    assert max(len(b) for b in batches) == 4
    assert all(0 <= i < 6 for b in batches for i in b)
    assert run["loadgen"]["result_samples_per_second"] > 0


def test_an_error_inside_the_system_under_test_is_raised_after_loadgen_stops(tmp_path):
    def broken(index: int) -> None:
        raise InputError("engine exploded", got=index)

    with pytest.raises(InputError, match="engine exploded"):
        single_stream(broken, 3, LoadGenSettings(0.01, 3, tmp_path / "bad"), expected_s=0.001)
