"""How many samples the dynamic batcher puts in one engine call: chosen from what each batch size costs.

A fixed batch size can lose. On a quiet 2-core EPYC, ``device serve`` with 16 clients gained 1.40x from
batches of 8; on the same machine at load average 5-8 the same setting gave 0.91x and 0.69x of unbatched
throughput, because an engine call then cost 13 ms per image in a batch of 8 against 8 ms alone (the
engine's intra-op threads, the decoding threads of the next requests and other processes all want the two
cores, and a long call is preempted more). Which size wins depends on the engine, the CPU and the load of
the moment, so :class:`BatchSizer` measures it while serving instead of trusting a default.

* **What is measured**: for each cap on the batch size (1 and ``max_batch``: :func:`candidate_sizes`), the
  batcher's seconds per sample while that cap is in force: the sum of the batch cycles (from the moment
  the batcher holds a batch's first request until the engine's answer is back: the wait for company, the
  hand-over to the engine thread and the engine) over the samples they served. With requests waiting,
  the engine thread is busy all the time and throughput is exactly samples / those seconds.
* **Windows, not single calls**: a cap is measured over a window of calls (``4 * max_batch`` samples or
  twice the requests waiting, whichever is more, or 0.5 s), after its first one or two calls are dropped. A
  single call says little: the 8 answers of a batch of 8 come back at once, their clients send 8 new
  requests at once, and the decoding of those lands on whatever call runs next. A first version timed
  single probe calls and chose batches of 4-8 where single calls served 1.4x faster.
* **Choice**: ``max_batch``, unless single calls are estimated ``margin`` (10 %) cheaper per sample (the
  median of each cap's last 3 windows: at load average 8-11 single windows were off by 10x when the
  scheduler starved the server). Batching is the default because it won in every measured setting but the
  most loaded; noise keeps it. The other cap is measured again in windows of its own (probes), spaced by
  what it is expected to lose against the best (a window's seconds times the share of throughput it
  gives up) so that probes lose at most ``probe_share`` (1 %) of the time: a cap nearly as
  good is probed often, a much worse one seldom. A probe disturbs more than its window (the clients it
  answers one at a time fall out of step), so each probe that confirms the best cap doubles the wait for
  the next, up to :data:`MAX_BACKOFF` times; a probe that changes the best starts again from 1. A cap's
  figures are stale when the cap that was best as they were measured now costs more than ``change`` (50 %)
  more or less (the load changed): a stale cap is probed at once, whatever the wait, and its old windows
  are dropped; the wait itself is kept (the probe measures the new load; spacing probes out again after
  every change put one into most 3-s slices of the load study). A cap is only tried when enough
  requests wait to fill it. The first window is ``max_batch`` (what a fixed batcher would run); a cap
  never measured is tried as soon as enough requests wait for it, the largest first.
* The first call of each batch size is dropped (OpenVINO compiles its dynamic-batch model then, and every
  engine allocates), and the estimates start again when another engine serves (another bundle).

Why measured, and not per-engine defaults: the defaults would have to be measured on every CPU and at every
load (the same engine and CPU wanted 8 when quiet and 1 when loaded), and a device's load changes by the
minute. Measuring costs the probes. The engine's thread count was measured too (benchmarks/README.md,
"Dynamic batching that never loses"): one intra-op thread instead of the default two is ~10-15 % cheaper
per call under a CPU hog and ~35-40 % dearer on a quiet machine, so no fixed count helps at every load,
and the engines keep their defaults.

Not thread-safe: the batcher (one asyncio task) is its only user.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

#: a cap's estimate is the median of its last KEEP windows (a window that the scheduler starved, which
#: happens at load average 8-11 on 2 cores, moves it by one rank, not by its size)
KEEP = 3
#: at most this share of the batcher's time goes to windows of caps that are not the best
PROBE_SHARE = 0.01
#: single calls must be estimated this much cheaper per sample than batches to be chosen over them
MARGIN = 0.1
#: a window ends after this many seconds of measured calls (and at least 2 calls), even if short of samples
WINDOW_SECONDS = 0.5
#: a window that counted no call for this many seconds starts again under the best cap (traffic paused)
IDLE_SECONDS = 1.0
#: a window of the chosen cap this far (relative) from its estimate: the load changed, probe the others soon
CHANGE = 0.5
#: a probe that leaves the best cap the best doubles the wait for the next one, up to this factor; a probe
#: that changes the best starts again from 1 (a quiet 2-core EPYC served 251-262 req/s in 3-s slices with a
#: probe of single calls against 280-307 without, benchmarks/results/serve_batching.json)
MAX_BACKOFF = 8


def candidate_sizes(max_batch: int) -> tuple[int, ...]:
    """The caps measured: single calls and ``max_batch``.

    Caps between them were measured too at first (1, 2, 4, 8): probing three losing caps cost more than
    they ever won. With the study's 16 clients on a quiet 2-core EPYC that sizer served 1.23-1.25x of
    unbatched where a fixed 8 served 1.41-1.44x, and under its CPU hog 1.16-1.36x against 1.40-1.47x
    (benchmarks/README.md, 2026-12-07).
    """
    return (1, max_batch) if max_batch > 1 else (1,)


@dataclass
class CapCost:
    """What serving under one cap costs: seconds per sample, the median of its last windows."""

    recent: list[float] = field(default_factory=list)  #: seconds per sample of its last KEEP windows
    windows: int = 0
    last: int = 0  #: the number of the last window measured under this cap
    #: (cap, its seconds per sample) of the best cap when this one was measured: the load it saw
    ref: tuple[int, float] = (0, 0.0)

    @property
    def per_sample(self) -> float:
        return float(statistics.median(self.recent))


class BatchSizer:
    """The batch size for the next engine call, from the measured cost of each cap (see the module).

    ``limit(waiting)`` before gathering a batch: the most samples it may hold. ``record(size, seconds, engine)``
    after it ran.
    """

    def __init__(self, max_batch: int, *, keep: int = KEEP, probe_share: float = PROBE_SHARE,
                 change: float = CHANGE, window_seconds: float = WINDOW_SECONDS, margin: float = MARGIN) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} < 1")
        self.max_batch = max_batch
        self.candidates = candidate_sizes(max_batch)
        self.keep, self.probe_share, self.change, self.margin = keep, probe_share, change, margin
        self.window_seconds = window_seconds
        self.reset()

    def reset(self, engine: Hashable = None) -> None:
        """Forget every estimate (another engine serves)."""
        self.engine = engine
        self.costs: dict[int, CapCost] = {}
        self.seen_sizes: set[int] = set()  # batch sizes that ran at least once (their first call is dropped)
        self.batches = 0
        self.windows = 0
        self.probes = 0
        self.cap = self.max_batch
        self._probing = False
        self._window_samples = 0  # none open: the first limit() opens one
        self._skip = 0  # samples still to drop at the start of the window
        self._samples, self._seconds, self._calls, self._skipped = 0, 0.0, 0, 0
        self._since_probe = 0.0  # seconds of batches under the best cap since the last probe window
        self._lone = False  # the next record() is of a lone request's call: not measured
        self._backoff = 1  # the wait for the next probe, in multiples of the probe-share rule's
        self._last_counted = time.monotonic()  # when a call last counted in a window

    # ------------------------------------------------------------------------------------------ estimates
    def per_sample(self, cap: int) -> float | None:
        """Estimated seconds per sample under ``cap`` (None: not measured yet)."""
        cost = self.costs.get(cap)
        return cost.per_sample if cost is not None and cost.recent else None

    def best(self) -> int:
        """``max_batch``, unless single calls are estimated ``margin`` cheaper per sample.

        Batching is the default and must lose clearly to be left: batches of 8 served 1.4x of unbatched in
        every measured setting but the most loaded (benchmarks/README.md), and at load average 8-11 windows
        of the same cap differ by 2x, so a choice on small differences follows noise.
        """
        batch, single = self.per_sample(self.max_batch), self.per_sample(1)
        if single is not None and batch is not None and single < (1 - self.margin) * batch:
            return 1
        return self.max_batch

    # ------------------------------------------------------------------------------------------ choosing
    def limit(self, waiting: int | None = None) -> int:
        """The most samples the next batch may hold: the best cap, or another one being measured.

        ``waiting``: the samples that could join batches now (None: enough for any cap).
        """
        room = self.max_batch if waiting is None else max(1, waiting)
        if room == 1:
            # one request: every cap runs it alone, so the call measures no cap (lone requests would
            # make single calls and batches look alike) and the window in force waits for company
            self._lone = True
            return self.cap
        if self._samples < self._window_samples and time.monotonic() - self._last_counted > IDLE_SECONDS:
            # the window in force saw no company for a while (a probe of single calls must not meet the
            # next burst): it starts again under the best cap
            self._open_window(self.best(), False, room)
        if self._samples < self._window_samples and (self._seconds < self.window_seconds or self._calls < 2):
            # the window goes on, unless enough requests wait for a cap never measured (a burst after a
            # quiet spell) and this window already measured something
            fresh = [c for c in self.candidates if c <= room and c != self.cap and c not in self.costs]
            if not fresh or (self.cap not in self.costs and self._calls < 2):
                return self.cap
        if self._samples:
            self._close_window()
        best = self.best()
        others = [cap for cap in self.candidates if cap != best and cap <= room]
        target, probe = best, False
        unknown = [cap for cap in others if cap not in self.costs]
        if not self.costs:  # the first window: max_batch, as a fixed batcher would (quiet machines gain 1.4x)
            pass
        elif unknown:  # never measured: now, the largest first (a burst of requests is what lets them fill)
            target, probe = unknown[-1], True
        elif others:
            # stale ones first (measured before the load changed), then the one measured longest ago
            oldest = min(others, key=lambda cap: (not self.stale(cap), self.costs[cap].last))
            # measured at another load: probed at once (what it costs now decides whether the best still
            # is); otherwise when the time since the last probe has paid for it
            if self.stale(oldest) or (self._since_probe * self.probe_share
                                      >= self._probe_loss(oldest, best) * self._backoff):
                target, probe = oldest, True
        self._open_window(target, probe, room)
        return target

    def _probe_loss(self, cap: int, best: int) -> float:
        """What a window of ``cap`` is expected to lose against the best cap, in seconds (at least 1 % of it):
        a cap nearly as good is probed often, a much worse one seldom."""
        ps, ps_best = self.costs[cap].per_sample, self.costs[best].per_sample
        samples = self._window_samples or 4 * self.max_batch
        window = min(samples * ps, self.window_seconds)
        return window * max(0.01, 1 - ps_best / ps)

    def stale(self, cap: int) -> bool:
        """Whether ``cap`` was measured at another load: the cap that was best then now costs more than
        ``change`` (50 %) more or less than it did."""
        ref_cap, ref = self.costs[cap].ref
        now = self.per_sample(ref_cap)
        return ref_cap != cap and now is not None and abs(now - ref) > self.change * ref

    def _open_window(self, cap: int, probe: bool, room: int) -> None:
        self.cap, self._probing = cap, probe
        self.probes += probe
        if probe:
            self._since_probe = 0.0
        # drop the calls that still carry the previous cap's burst of answers: about one round of the waiting
        # requests; then measure at least 4 * max_batch samples or two rounds of them
        self._skip = max(self.max_batch, room)
        self._window_samples = max(4 * self.max_batch, 2 * room)
        self._samples, self._seconds, self._calls, self._skipped = 0, 0.0, 0, 0

    def _close_window(self) -> None:
        was_best = self.best()
        self.windows += 1
        measured = self._seconds / self._samples
        cost = self.costs.setdefault(self.cap, CapCost())
        if cost.windows and self.stale(self.cap):
            cost.recent.clear()  # its figures are from another load
        cost.recent = [*cost.recent, measured][-self.keep:]
        cost.windows += 1
        cost.last = self.windows
        best = self.best()
        cost.ref = (best, self.costs[best].per_sample)
        if self._probing:  # a probe that confirmed the best: wait longer for the next one
            self._backoff = min(2 * self._backoff, MAX_BACKOFF) if best == was_best else 1
        self._samples, self._seconds, self._calls, self._skipped = 0, 0.0, 0, 0

    def record(self, size: int, seconds: float, engine: Hashable = None) -> None:
        """A batch of ``size`` samples took ``seconds`` (from its first request's turn to the engine's answer)."""
        if engine != self.engine:
            self.reset(engine)
        if size < 1 or seconds < 0:
            return
        self.batches += 1
        if self._lone:
            self._lone = False
            return
        self._last_counted = time.monotonic()
        if not self._probing:
            self._since_probe += seconds
        if size not in self.seen_sizes:  # the first call of a size compiles or allocates: not what it costs
            self.seen_sizes.add(size)
            return
        if self._skip > 0 and self._skipped < 2:  # at most 2 calls: a slow cap must not hold the batcher long
            self._skip -= size
            self._skipped += 1
            return
        self._samples += size
        self._seconds += seconds
        self._calls += 1

    def describe(self) -> dict:
        """The estimates and the current choice, for ``/v1/status``."""
        return {"best_batch": self.best(), "batch_limit_now": self.cap, "batches": self.batches,
                "windows": self.windows, "probe_windows": self.probes,
                "ms_per_sample": {str(cap): round(c.per_sample * 1000, 3)
                                  for cap, c in sorted(self.costs.items()) if c.recent}}
