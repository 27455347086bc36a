"""The dynamic batcher's choice of batch size (runtime/service/batching.py), from given costs: no timing here.

The timed targets (batched >= 0.95x unbatched when loaded, >= 1.4x when quiet) live in benchmarks/serve_batching.py.
"""
from __future__ import annotations

from edgexfer.runtime.service.batching import BatchSizer, candidate_sizes


def _serve(sizer: BatchSizer, cost, batches: int, waiting: int = 16, engine="e") -> list[int]:
    """Run ``batches`` batches through the sizer with ``waiting`` samples always queued; ``cost(n)``: seconds
    of a batch of n. Returns the limit of every batch."""
    limits = []
    for _ in range(batches):
        n = sizer.limit(waiting)
        limits.append(n)
        sizer.record(min(n, waiting), cost(min(n, waiting)), engine)
    return limits


def test_candidates_are_powers_of_two_and_the_maximum():
    assert candidate_sizes(1) == (1,)
    assert candidate_sizes(8) == (1, 2, 4, 8)
    assert candidate_sizes(12) == (1, 2, 4, 8, 12)


def test_it_picks_the_size_with_the_least_cost_per_sample_not_per_call():
    # loaded machine (issue 23): 13 ms per image in a batch of 8, 8 ms alone -> single calls
    loaded = {1: 0.008, 2: 0.018, 4: 0.044, 8: 0.104}
    sizer = BatchSizer(8)
    limits = _serve(sizer, loaded.__getitem__, 400)
    assert sizer.best() == 1
    assert limits[-200:].count(1) >= 180
    # quiet machine: a batch of 8 costs 52 ms, 6.5 ms per image, against 8 ms alone -> batches of 8
    quiet = {1: 0.008, 2: 0.015, 4: 0.028, 8: 0.052}
    sizer = BatchSizer(8)
    limits = _serve(sizer, quiet.__getitem__, 400)
    assert sizer.best() == 8
    assert limits[-200:].count(8) >= 160  # probes are spaced by time: a probe of 1 is cheap, so more frequent


def test_probes_follow_a_change_of_load_and_stay_within_their_share():
    costs = {1: 0.008, 2: 0.015, 4: 0.028, 8: 0.052}
    sizer = BatchSizer(8)
    _serve(sizer, costs.__getitem__, 200)
    assert sizer.best() == 8
    # the machine gets loaded: batches of 8 now cost 13 ms per image
    costs.update({2: 0.020, 4: 0.046, 8: 0.104})
    spent = {"probe": 0.0, "all": 0.0}
    for _ in range(2000):
        n = sizer.limit(16)
        probing = n != sizer.best()
        sizer.record(n, costs[n], "e")
        spent["all"] += costs[n]
        spent["probe"] += costs[n] if probing else 0.0
    assert sizer.best() == 1
    assert sizer.probes > 10  # the other sizes are still measured now and then
    assert spent["probe"] / spent["all"] < 0.15
    # and back: quiet again, batches of 8 win again
    costs.update({2: 0.015, 4: 0.028, 8: 0.052})
    _serve(sizer, costs.__getitem__, 2000)
    assert sizer.best() == 8


def test_a_size_that_cannot_fill_is_not_probed_and_the_first_call_of_a_size_does_not_count():
    sizer = BatchSizer(8)
    limits = _serve(sizer, lambda n: 0.008 * n, 50, waiting=1)  # one client: only batches of 1
    assert set(limits) <= {1, 8} and sizer.best() == 1
    assert sizer.probes <= 2  # only size 1, to learn it: never a size that cannot fill
    sizer = BatchSizer(4)
    sizer.record(4, 5.0, "e")  # OpenVINO compiles its dynamic-batch model in the first call of a size
    sizer.record(4, 0.02, "e")
    assert sizer.per_sample(4) == 0.005


def test_another_engine_starts_the_estimates_again():
    sizer = BatchSizer(8)
    _serve(sizer, {1: 0.008, 2: 0.018, 4: 0.044, 8: 0.104}.__getitem__, 200, engine="bundle-a")
    assert sizer.best() == 1
    _serve(sizer, {1: 0.008, 2: 0.012, 4: 0.020, 8: 0.032}.__getitem__, 8, engine="bundle-b")
    assert sizer.best() == 8 and sizer.describe()["ms_per_sample"]["8"] == 4.0


def test_max_batch_1_never_batches():
    sizer = BatchSizer(1)
    assert _serve(sizer, lambda n: 0.01, 20) == [1] * 20
