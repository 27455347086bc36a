"""How many samples the dynamic batcher puts in one engine call: chosen from what calls of each size cost.

A fixed batch size can lose. On a quiet 2-core EPYC, ``device serve`` with 16 clients gained 1.40x from
batches of 8; on the same machine at load average 5-8 the same setting gave 0.91x and 0.69x of unbatched
throughput, because an engine call then cost 13 ms per image in a batch of 8 against 8 ms alone (the
engine's intra-op threads, the decoding threads of the next requests and other processes all want the two
cores, and a long call is preempted more). Which size wins depends on the engine, the CPU and the load of
the moment, so :class:`BatchSizer` measures it while serving instead of trusting a default:

* it keeps, for every batch size it has run, an exponentially weighted moving average (EWMA) of the
  seconds one batch cycle took: from the moment the batcher held the batch's first request until the
  engine's answer was back, so the wait for company and the hand-over to the engine thread count too;
* the size for the next batch is the one with the least seconds **per sample** (the most samples per
  second): with more requests waiting than that size, the engine thread is busy all the time, and its
  throughput is exactly samples per cycle / seconds per cycle;
* it probes now and then: a batch capped at another candidate size (1, 2, 4, ... up to ``max_batch``,
  the one measured longest ago first, and only when enough requests wait to fill it), so a change of load
  or engine is seen. A size never measured is tried as soon as enough requests wait for it. Probes are spaced so that
  they take at most ``probe_share`` (5 %) of the batcher's time: a probe that turns out 1.6x dearer per
  sample then costs 3 % of throughput, and the comparison stays honest at any load;
* the first call of each size is not counted (OpenVINO compiles its dynamic-batch model then, and every
  engine allocates), and the estimates start again when another engine serves (another bundle).

Why measured, and not per-engine defaults: the defaults would have to be measured on every CPU and at every
load (the same engine and CPU wanted 8 when quiet and 1 when loaded), and a device's load changes by the
minute. Measuring costs only the probes. The engine's thread count was measured too (benchmarks/README.md,
"Dynamic batching that never loses"): one intra-op thread instead of the default two is ~10-15 % cheaper
per call under a CPU hog and ~35-40 % dearer on a quiet machine, so no fixed count helps at every load,
and the engines keep their defaults.

Not thread-safe: the batcher (one asyncio task) is its only user.
"""
from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

#: the weight of a new observation in a size's moving average (0.3: about the last 3-6 cycles count)
ALPHA = 0.3
#: at most this share of the batcher's time goes to probes of sizes that are not the best
PROBE_SHARE = 0.05


def candidate_sizes(max_batch: int) -> tuple[int, ...]:
    """The sizes probed: powers of two below ``max_batch``, and ``max_batch`` itself."""
    sizes, size = {max_batch}, 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


@dataclass
class SizeCost:
    """What one batch size costs: the moving average of seconds per cycle, and how often it was seen."""

    seconds: float = 0.0
    observations: int = 0  #: counted observations (the first call of a size is not one)
    calls: int = 0  #: every call of this size, counted or not
    last: int = 0  #: the batch number of the last call of this size

    @property
    def known(self) -> bool:
        return self.observations > 0


class BatchSizer:
    """The batch size for the next engine call, from the measured cost of each size (see the module).

    ``limit()`` before gathering a batch: the most samples it may hold. ``record(size, seconds)`` after it ran.
    """

    def __init__(self, max_batch: int, *, alpha: float = ALPHA, probe_share: float = PROBE_SHARE) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} < 1")
        self.max_batch = max_batch
        self.candidates = candidate_sizes(max_batch)
        self.alpha = alpha
        self.probe_share = probe_share
        self.reset()

    def reset(self, engine: Hashable = None) -> None:
        """Forget every estimate (another engine serves)."""
        self.engine = engine
        self.costs: dict[int, SizeCost] = {}
        self.batches = 0
        self.probes = 0
        #: batcher seconds since the last probe
        self._since_probe = 0.0
        #: the size the last limit() returned as a probe (None: the best size)
        self._probing: int | None = None

    # ------------------------------------------------------------------------------------------ estimates
    def per_sample(self, size: int) -> float | None:
        """Estimated seconds per sample in a batch of ``size`` (None: not measured yet)."""
        cost = self.costs.get(size)
        return cost.seconds / size if cost is not None and cost.known else None

    def best(self) -> int:
        """The size with the least estimated seconds per sample; ``max_batch`` before anything is measured."""
        known = [(self.per_sample(s), -s) for s in self.costs if s <= self.max_batch and self.costs[s].known]
        if not known:
            return self.max_batch
        return -min(known)[1]  # a tie goes to the larger batch

    # ------------------------------------------------------------------------------------------ choosing
    def limit(self, waiting: int | None = None) -> int:
        """The most samples the next batch may hold: the best size, or a probe of another candidate.

        ``waiting``: the samples that could join this batch now (None: enough for any size). A probe is only
        made of a size that can fill: a size never measured as soon as that many wait, another one when a
        probe is due (the one measured longest ago).
        """
        best = self.best()
        self._probing = None
        room = self.max_batch if waiting is None else max(1, waiting)
        others = [s for s in self.candidates if s != best and s <= room]
        if not others:
            return best
        unknown = [s for s in others if not self._cost(s).known]
        if unknown:  # learn every size first: two calls each (the first one is not counted)
            return self._probe(unknown[0])
        target = min(others, key=lambda s: self._cost(s).last)
        # space probes so that they take at most probe_share of the time: a probe of `target` costs about its
        # own estimate, so it is due after estimate / probe_share seconds of batches since the last one
        if self._since_probe * self.probe_share >= self._cost(target).seconds:
            return self._probe(target)
        return best

    def _cost(self, size: int) -> SizeCost:
        return self.costs.get(size) or SizeCost()

    def _probe(self, size: int) -> int:
        self._probing = size
        return size

    def record(self, size: int, seconds: float, engine: Hashable = None) -> None:
        """A batch of ``size`` samples took ``seconds`` (from its first request's turn to the engine's answer)."""
        if engine != self.engine:
            self.reset(engine)
        if size < 1 or seconds < 0:
            return
        self.batches += 1
        cost = self.costs.setdefault(size, SizeCost())
        cost.calls += 1
        cost.last = self.batches
        if self._probing is not None:
            self.probes += 1
            self._since_probe = 0.0
            self._probing = None
        else:
            self._since_probe += seconds
        if cost.calls == 1:
            return  # the first call of a size compiles or allocates: not what the size costs
        cost.seconds = seconds if not cost.known else (1 - self.alpha) * cost.seconds + self.alpha * seconds
        cost.observations += 1

    def describe(self) -> dict:
        """The estimates and the current choice, for ``/v1/status``."""
        return {"best_batch": self.best(), "batches": self.batches, "probes": self.probes,
                "ms_per_sample": {str(s): round(self.per_sample(s) * 1000, 3)
                                  for s in sorted(self.costs) if self.costs[s].known}}
