"""The dynamic batcher's choice of batch size (runtime/service/batching.py), from given costs: no timing here.

The timed targets (batched >= 0.95x unbatched when loaded, >= 1.4x when quiet) live in benchmarks/serve_batching.py.
"""
from __future__ import annotations

from edgexfer.runtime.service.batching import BatchSizer, candidate_sizes

#: seconds of one batch cycle by batch size. Quiet: 8 per batch serve 1.4x faster (benchmarks/README.md, 2026-11-30);
#: loaded: a batch of 8 costs more per sample than single calls (issue 23: 13 ms per image against 8 ms)
QUIET = {1: 0.010, 2: 0.017, 4: 0.031, 8: 0.057}
LOADED = {1: 0.022, 2: 0.045, 4: 0.095, 8: 0.200}


def _serve(sizer: BatchSizer, costs: dict[int, float], batches: int, waiting: int = 16, engine="e") -> dict:
    """``batches`` batches through the sizer with ``waiting`` samples always queued; ``costs[n]``: seconds of a
    batch of n. Returns the seconds spent, the samples served and the limit of every batch."""
    out = {"seconds": 0.0, "samples": 0, "limits": []}
    for _ in range(batches):
        n = min(sizer.limit(waiting), waiting)
        sizer.record(n, costs[n], engine)
        out["seconds"] += costs[n]
        out["samples"] += n
        out["limits"].append(n)
    return out


def _efficiency(served: dict, costs: dict[int, float]) -> float:
    """Samples per second served, relative to always running the best size."""
    best = max(n / seconds for n, seconds in costs.items())
    return served["samples"] / served["seconds"] / best


def test_candidates_are_single_calls_and_the_maximum():
    assert candidate_sizes(1) == (1,)
    assert candidate_sizes(8) == (1, 8)
    assert candidate_sizes(12) == (1, 12)


def test_it_picks_the_cap_with_the_least_cost_per_sample_not_per_call():
    sizer = BatchSizer(8)
    _serve(sizer, LOADED, 600)
    assert sizer.best() == 1
    late = _serve(sizer, LOADED, 600)
    assert _efficiency(late, LOADED) > 0.95
    sizer = BatchSizer(8)
    _serve(sizer, QUIET, 300)
    assert sizer.best() == 8
    late = _serve(sizer, QUIET, 300)
    assert _efficiency(late, QUIET) > 0.95


def test_probes_follow_a_change_of_load_both_ways():
    sizer = BatchSizer(8)
    _serve(sizer, QUIET, 300)
    assert sizer.best() == 8
    _serve(sizer, LOADED, 400)  # the machine gets loaded
    assert sizer.best() == 1
    probes = sizer.probes
    _serve(sizer, QUIET, 700)  # and quiet again
    assert sizer.best() == 8 and sizer.probes > probes


def test_steady_load_probes_within_their_share():
    sizer = BatchSizer(8)
    _serve(sizer, LOADED, 200)
    probes = sizer.probes
    late = _serve(sizer, LOADED, 5000)
    assert sizer.probes > probes  # the other caps are still measured now and then
    assert _efficiency(late, LOADED) > 0.95


def test_probes_that_confirm_the_best_cap_come_ever_more_seldom():
    """A probe disturbs more than its own window (clients answered one at a time get out of step): on a
    quiet machine, 3-s slices with a probe of single calls served 251-262 req/s, without one 280-307. At a
    steady load each probe that confirms the best cap doubles the wait for the next (up to 8x); before,
    5,000 quiet batches held 26 probes."""
    sizer = BatchSizer(8)
    _serve(sizer, QUIET, 200)
    probes, at, limits = sizer.probes, [], _serve(sizer, QUIET, 5000)["limits"]
    at = [i for i, n in enumerate(limits) if n == 1]
    assert sizer.probes - probes <= 8
    starts = [i for k, i in enumerate(at) if k == 0 or i - at[k - 1] > 1]  # the first call of each probe window
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert len(gaps) >= 2 and gaps[-1] > 1.5 * gaps[0]


def test_a_change_of_load_is_probed_at_once_and_the_wait_between_probes_is_kept():
    """When the load changes (the best cap's cost moves by more than 50 %), the other cap is measured again at
    once; the probes after that stay as seldom as before. Spacing them out again from the start after every
    change put a probe into most 3-s slices of the load study, which alternates its loads."""
    heavy = {n: 3 * seconds for n, seconds in QUIET.items()}  # batches still win, everything costs 3x
    sizer = BatchSizer(8)
    _serve(sizer, heavy, 3000)
    limits = _serve(sizer, QUIET, 3000)["limits"]  # the machine gets quiet
    singles = [i for i, n in enumerate(limits) if n == 1]
    starts = [i for k, i in enumerate(singles) if k == 0 or i - singles[k - 1] > 1]
    assert starts[0] < 20  # at once: the window that saw the change, then the probe
    assert len(starts) >= 2 and starts[1] - starts[0] > 600, starts  # the grown wait, not the first one


def test_one_client_gets_single_calls_whatever_the_cap():
    sizer = BatchSizer(8)
    out = _serve(sizer, {1: 0.008}, 300, waiting=1)  # one client: only batches of 1
    assert set(out["limits"]) == {1}
    assert sizer.describe()["ms_per_sample"] == {}  # a lone request's call measures no cap


def test_the_first_call_of_each_size_does_not_count():
    class Compiling(dict):  # OpenVINO compiles its dynamic-batch model in the first call of a size
        seen: set = set()

        def __getitem__(self, n):
            first = n not in self.seen
            self.seen.add(n)
            return 5.0 if first else dict.__getitem__(self, n)

    sizer = BatchSizer(8)
    _serve(sizer, Compiling(QUIET), 300)
    assert sizer.best() == 8 and sizer.describe()["ms_per_sample"]["8"] == 7.125


def test_another_engine_starts_the_estimates_again():
    sizer = BatchSizer(8)
    _serve(sizer, LOADED, 400, engine="bundle-a")
    assert sizer.best() == 1
    _serve(sizer, {1: 0.008, 2: 0.012, 4: 0.020, 8: 0.032}, 200, engine="bundle-b")
    assert sizer.best() == 8 and sizer.describe()["ms_per_sample"]["8"] == 4.0


def test_max_batch_1_never_batches():
    sizer = BatchSizer(1)
    assert _serve(sizer, {1: 0.01}, 50)["limits"] == [1] * 50


def test_a_burst_after_single_requests_batches_soon():
    """Lone requests measure nothing; a burst of 16 after them runs batches of 8 at once."""
    sizer = BatchSizer(8)
    _serve(sizer, QUIET, 110, waiting=1)  # lone requests: nothing measured
    burst = _serve(sizer, QUIET, 4, waiting=16)
    assert burst["limits"] == [8, 8, 8, 8]  # the burst is batched at once


def test_single_calls_must_win_by_a_margin_over_batching():
    """Within the noise (5 % cheaper per sample) batching stays; a clear loss of batching (17 %) serves singly."""
    sizer = BatchSizer(8)
    _serve(sizer, {1: 0.0100, 8: 0.084}, 400)  # 1: 10 ms per sample, 8: 10.5 ms
    assert sizer.best() == 8
    sizer = BatchSizer(8)
    _serve(sizer, {1: 0.0100, 8: 0.096}, 400)  # 8: 12 ms per sample against 10
    assert sizer.best() == 1
