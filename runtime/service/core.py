"""The service's engine side: one engine, a dynamic batcher, and the model that follows the device's state.

Threads, and what each owns:

* the **engine thread** (one): the server's one :class:`~edgexfer.runtime.device.Device`'s engine,
  and the served (bundle, head). Every batch, every ``learn`` and every switch of the model runs here, one at
  a time, so the engine never sees two callers. A batch runs with one head and one engine, and every result
  names that head's version: requests in flight when the device's state changes finish on the engine they
  were batched for, and the switch comes between two batches.
* the **follower** (one thread, :meth:`ServiceCore.open` starts it): every :data:`FOLLOW_INTERVAL` s it
  stats ``active.json`` (one ``stat``). When another process (``device install``, ``retrain``, ``update``,
  ``rollback``) replaced it, the follower has the engine thread load the new head, or open the new bundle's
  engine, at once: what the server answers, its metadata, versions and metrics follow the device within a
  fraction of a second, with no request to trigger it. Requests, metadata and ``/v1/status`` also check
  the ``stat`` themselves (:meth:`ServiceCore.served`), so the first of them after a change is answered by
  the new state even before the follower's next look.
* the **database thread** (one): the review queue and the per-class sample counts, one SQLite
  connection each (connections belong to the thread that opened them).
* the **batcher** (an asyncio task): gathers concurrent requests until a batch size or
  ``max_queue_delay_ms`` after the first one, as Triton's dynamic batcher does, and hands the batch
  to the engine thread. The size is at most ``max_batch``: the one that cost least per sample so far,
  from a moving average of each size's measured cost, with other sizes probed now and then
  (:mod:`edgexfer.runtime.service.batching`), so that batching never serves slower than single calls.
  Requests that arrive while a batch runs form the next one. It waits only for requests already on
  their way (received, still decoding: :meth:`ServiceCore.incoming`): a lone request runs at once
  instead of paying the queue delay.

The server is **ready** (:meth:`ServiceCore.ready`) while the model it serves is the one ``active.json``
names: not while a new bundle's engine is being opened, nor while the new state cannot be loaded. Then the
previous model keeps answering (the error is logged once, and loading is tried again every
:data:`RETRY_INTERVAL` s and at every change of ``active.json``).

Decoding (Pillow) runs in the web framework's worker threads, in parallel, before a request joins the queue.

The bundle's modality (:mod:`edgexfer.runtime.modalities`) decides what a sample is: it decodes the bytes
a request sent (an image to its resized uint8 pixels ``[H, W, 3]``, UTF-8 to a normalised text) and
feeds a batch to the engine (texts are tokenized in the engine thread, a batch padded to its longest text).
Samples decoded for a model that was switched out before their batch ran are refused with
:class:`ModelSwitched`; the routes then decode the same bytes again for the new model.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.device import Device, LearnReport
from edgexfer.runtime.drift import DEFAULT_EVERY, DEFAULT_WINDOW, DriftMonitor
from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.field_accuracy import FieldLabels
from edgexfer.runtime.heads import Head
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.modalities.base import Modality
from edgexfer.runtime.predictor import classify_values
from edgexfer.runtime.preprocess import DEFAULT_MAX_PIXELS
from edgexfer.runtime.review import DEFAULT_REVIEW_CAPACITY, ReviewQueue, review_threshold
from edgexfer.runtime.service.batching import BatchSizer
from edgexfer.runtime.service.metrics import ServiceMetrics

if TYPE_CHECKING:
    from edgexfer.runtime.retrain import RetrainReport
    from edgexfer.runtime.state import ActiveState

log = logging.getLogger("edgexfer.serve")
T = TypeVar("T")
#: seconds between two looks of the follower at ``active.json`` (one ``stat`` each)
FOLLOW_INTERVAL = 0.25
#: seconds before a state that could not be loaded is tried again (sooner if ``active.json`` changes again)
RETRY_INTERVAL = 5.0
#: engine calls whose features may wait for the database thread (the drift test's ring buffer) at once
MAX_PENDING_OBSERVATIONS = 64


def _concat(parts: Sequence[Sequence[Any]]) -> list[Any]:
    """Requests' sample values as one batch, in order (a pixels tensor gives its rows)."""
    return [value for part in parts for value in part]


@dataclass(frozen=True)
class ServiceConfig:
    backend: str = "auto"
    precision: str = "fp32"
    #: dynamic batching: the most samples (images or texts) in one engine call (1: no batching)
    max_batch: int = 8
    #: how long the first request of a batch waits for others
    max_queue_delay_ms: float = 2.0
    #: predictions below this top probability go to the review queue (0: none); None: 1.25 times chance,
    #: 1/C for the answering head's C classes (:func:`edgexfer.runtime.review.review_threshold`)
    review_threshold: float | None = None
    review_capacity: int = DEFAULT_REVIEW_CAPACITY
    max_body_bytes: int = 32 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: samples (images or texts) in one request at most
    max_images: int = 64
    top_k: int = 3
    #: the drift test (:mod:`edgexfer.runtime.drift`) runs again after this many inputs (0: never), on the latest
    #: ``drift_window`` of them
    drift_every: int = DEFAULT_EVERY
    drift_window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        for name, low in (("max_batch", 1), ("review_capacity", 1), ("max_body_bytes", 1024), ("max_pixels", 1),
                          ("max_images", 1), ("top_k", 1), ("drift_every", 0), ("drift_window", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"serve option {name}", got=repr(value), expected=f"an integer >= {low}")
        if not 0 <= self.max_queue_delay_ms <= 1000:
            raise InputError("serve option max_queue_delay_ms", got=self.max_queue_delay_ms, expected="0..1000 ms")
        if self.review_threshold is not None and not 0 <= self.review_threshold <= 1:
            raise InputError("serve option review_threshold", got=self.review_threshold, expected="0..1")


@dataclass(frozen=True)
class ActiveModel:
    """What answers right now: one (bundle, head) pair, as ``active.json`` named it."""

    bundle: Bundle
    backbone: str
    head: Head
    head_version: int
    backend: str  #: the engine's backend name
    execution: dict[str, Any]  #: what the engine computes in (edgexfer.runtime.precision.execution_record)
    #: the bundle's modality: decodes, feeds and describes its samples
    input_modality: Modality

    @property
    def modality(self) -> str:
        """The modality's name, for records."""
        return self.bundle.modality

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def classes(self) -> list[str]:
        return list(self.head.classes)


@dataclass(frozen=True)
class Classified:
    """The answer for one request's samples: rows in input order, and the head that produced them."""

    probabilities: np.ndarray  #: float32 [N, C]
    features: np.ndarray  #: float32 [N, D]
    classes: list[str]
    head_version: int
    backend: str
    precision: str
    execution: dict[str, Any]
    #: the engine call of the batch these rows were computed in (Triton's compute_infer)
    engine_seconds: float = 0.0

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        out = []
        for row in self.probabilities:
            order = np.argsort(-row)[:min(k, len(self.classes))]
            out.append([(self.classes[j], float(row[j])) for j in order])
        return out


class ModelSwitched(InputError):
    """Samples decoded for a model that another bundle replaced before their batch ran (decode them again)."""


@dataclass
class _Pending:
    samples: Sequence[Any]  #: N sample values (pixels [H, W, 3], texts, ...), or an [N, ...] tensor of them
    modality: Modality  #: the one that decoded them
    future: asyncio.Future
    want_features: bool


class ServiceCore:
    """The engine, the batcher and the head, for :mod:`edgexfer.runtime.service.app` and ``device watch``."""

    def __init__(self, state_dir: str | Path | None, config: ServiceConfig | None = None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.config = config or ServiceConfig()
        self.metrics = metrics or ServiceMetrics()
        self.metrics.follow_readiness(self.ready)
        self.device = Device(state_dir, backend=self.config.backend, precision=self.config.precision)
        self.state = self.device.state
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="edgexfer-engine")
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="edgexfer-db")
        self._db_local = threading.local()
        self._model: ActiveModel | None = None
        #: ``active.json``'s stat when the served model was loaded from it
        self._signature: tuple[int, int, int] | None = None
        #: whether the last state tried could not be loaded: its stat, and when to try it again
        self._failing = False
        self._failed: tuple[int, int, int] | None = None
        self._retry_at = 0.0
        self._follower: threading.Thread | None = None
        self._closing = threading.Event()
        self._queue: asyncio.Queue[_Pending] | None = None
        self._batcher: asyncio.Task | None = None
        #: inference requests received and not yet answered by the engine (event-loop thread only)
        self._incoming = 0
        #: the batch size of each engine call, from what each size cost so far (the batcher's only)
        self._sizer = BatchSizer(self.config.max_batch)
        #: every engine call's features, kept and tested in the database thread (``/v1/status``, ``/metrics``)
        self.drift = DriftMonitor(self.state.cache_path, every=self.config.drift_every, window=self.config.drift_window)
        #: batches whose features may wait for the database thread at once (see :meth:`_observe`)
        self._observing = threading.BoundedSemaphore(MAX_PENDING_OBSERVATIONS)
        self.metrics.follow_drift(lambda: self.drift.last)
        self.started = time.time()

    # ---------------------------------------------------------------------------- lifecycle
    def open(self) -> ActiveModel:
        """Open the engine and load the active head (in the engine thread), and start following the device's
        state; raises if the device has none."""
        model = self._engine_thread.submit(self._current).result()
        if self._follower is None:
            self._follower = threading.Thread(target=self._follow, name="edgexfer-follow", daemon=True)
            self._follower.start()
        return model

    def close(self) -> None:
        self._closing.set()
        if self._follower is not None:
            self._follower.join()
            self._follower = None
        if self._batcher is not None:
            self._batcher.cancel()
            self._batcher = None
        self._engine_thread.submit(self.device.close).result()
        self._engine_thread.shutdown(wait=True)

        def close_db() -> None:
            for obj in vars(self._db_local).values():
                obj.close()
            self.drift.close()

        self._db_thread.submit(close_db).result()
        self._db_thread.shutdown(wait=True)

    @property
    def model(self) -> ActiveModel:
        """The model of the last batch (or of :meth:`open`)."""
        if self._model is None:
            raise RuntimeError("ServiceCore.open() was not called")
        return self._model

    # ---------------------------------------------------------------------------- the active head
    def _stat(self) -> tuple[int, int, int] | None:
        """``active.json``'s identity now (None: there is none); any thread."""
        try:
            st = os.stat(self.state.active_path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def ready(self) -> bool:
        """Whether the served model is the one ``active.json`` names (its engine open): the health/readiness
        answers of both transports (HTTP and gRPC). Any thread, one ``stat``.

        False while a new state is being loaded, and while it cannot be (the previous model still answers).
        """
        return self._model is not None and self._stat() == self._signature

    def _current(self) -> ActiveModel:
        """The active (bundle, head), reloaded when ``active.json`` changed. Engine thread only."""
        signature = self._stat()
        if signature is not None and signature == self._signature and self._model is not None:
            return self._model
        if self._failing and signature == self._failed and time.monotonic() < self._retry_at:
            return self._model  # this state failed to load a moment ago: the previous model goes on
        try:
            active = self.state.active()
            model = self._model
            if model is None or active.head != model.head_version or active.bundle != model.backbone:
                bundle = self.state.bundle(active.bundle)
                head = self.state.load_head(active.head, feature_dim=bundle.manifest.backbone.feature_dim)
                engine = self.device.engine(bundle)  # reopened only if the bundle changed
                # the same backbone and input: its modality goes on (a tokenizer is read and checked once)
                same = model is not None and model.bundle.manifest.backbone == bundle.manifest.backbone
                modality = model.input_modality if same else modality_of(bundle)
                self._model = ActiveModel(bundle, active.bundle, head, active.head, engine.name,
                                          dict(engine.execution), modality)
                self.metrics.set_model(self._model, engine.name, self.config.precision, engine.execution)
                if model is not None:
                    log.info("serving %s head %s (was %s head %s)", self._model.name, active.head, model.name,
                             model.head_version)
            self._signature, self._failing = signature, False
        except Exception as exc:
            if self._model is None:
                raise
            if not self._failing or signature != self._failed:
                # keep serving what worked (not ready meanwhile); tried again later or at the next change
                log.warning("cannot switch to the new active state, still serving %s head %s: %s",
                            self._model.name, self._model.head_version,
                            exc if isinstance(exc, EdgexferError) else f"{type(exc).__name__}: {exc}")
            self._failing, self._failed, self._retry_at = True, signature, time.monotonic() + RETRY_INTERVAL
        return self._model

    def _follow(self) -> None:
        """The follower thread: load what another process made active, without waiting for a request."""
        while not self._closing.wait(FOLLOW_INTERVAL):
            if self._stat() == self._signature and self._model is not None:
                continue
            try:
                self._engine_thread.submit(self._current).result()
            except RuntimeError:  # the engine thread is shut down: the core is closing
                return
            except Exception:  # never raised by _current once a model is served; logged, and the loop goes on
                log.exception("cannot follow the device's state")

    async def refresh(self) -> ActiveModel:
        """The active model now (reloaded if another process switched it), between batches."""
        return await self.in_engine_thread(self._current)

    async def served(self) -> ActiveModel:
        """The model that answers now: reloaded first (in the engine thread, between batches) when
        ``active.json`` changed since it was loaded, so a request after a change is answered by the new state."""
        if self._model is None or self._stat() != self._signature:
            return await self.refresh()
        return self._model

    # ---------------------------------------------------------------------------- decoding (any thread)
    def decode(self, data: bytes, source: str, modality: Modality) -> Any:
        """Bytes sent for one sample -> its value (:meth:`Modality.decode`; images bounded by ``max_pixels``).

        ``modality``: the served one's when the request was read (:meth:`served`). Raises :class:`InputError`
        for a bad, oversized or undecodable sample.
        """
        started = time.perf_counter()
        value = modality.decode(data, source, max_pixels=self.config.max_pixels)
        self.metrics.stage("decode", time.perf_counter() - started)
        return value

    # ---------------------------------------------------------------------------- classification
    def _run(self, batch: Sequence[Any], modality: Modality | None = None
             ) -> tuple[np.ndarray, np.ndarray, ActiveModel, Any, float]:
        """One engine call (in chunks) and the head, with the head of this moment. Engine thread only."""
        model = self._current()
        engine = self.device.engine(model.bundle)
        if modality is not None and modality is not model.input_modality:
            # another bundle was installed between decoding and this batch: its input may differ (the
            # modality, the input size); the routes decode the request again for it
            raise ModelSwitched("samples decoded for the previous model", got=modality.plural,
                                expected=f"{model.input_modality.plural} for the active bundle {model.name}",
                                todo="send the request again")
        started = time.perf_counter()
        probabilities, features = classify_values(model.input_modality, engine, model.head, batch,
                                                  timed=self.metrics.stage)
        seconds = time.perf_counter() - started
        self.metrics.batch(len(batch))
        self.metrics.statistics.execution(model.name, str(model.head_version), len(batch), seconds)
        self._observe(model, features, probabilities)
        return probabilities, features, model, engine, seconds

    def _observe(self, model: ActiveModel, features: np.ndarray, probabilities: np.ndarray) -> None:
        """Keep a batch's features for the drift test, in the database thread; the answer does not wait.

        At most :data:`MAX_PENDING_OBSERVATIONS` batches wait for that thread: one behind (a slow SD card's
        commits, a long test) skips batches, counted in ``edgexfer_drift_inputs_skipped_total``, instead of
        holding every batch's features in memory for as long as the load lasts.
        """
        if not self._observing.acquire(blocking=False):
            self.metrics.drift_skipped.inc(len(features))
            return

        def observe() -> None:
            try:
                self.drift.observe(model.bundle, model.head, features, probabilities)
            finally:
                self._observing.release()

        try:
            self._db_thread.submit(observe)
        except RuntimeError:  # the database thread is shut down: the core is closing
            self._observing.release()

    def _classified(self, probs: np.ndarray, feats: np.ndarray, model: ActiveModel, engine: Any,
                    seconds: float = 0.0) -> Classified:
        return Classified(probs, feats, model.classes, model.head_version, engine.name, self.config.precision,
                          dict(engine.execution), seconds)

    def classify_now(self, pixels: np.ndarray) -> Classified:
        """Classify one batch at once, without the batcher (``device watch``); blocks the calling thread."""
        return self._engine_thread.submit(lambda: self._classified(*self._run(pixels))).result()

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Mark an inference request as on its way (from its arrival, before decoding, to its answer).

        The batcher waits for company only while more requests are on their way than it holds.
        """
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def classify(self, samples: Sequence[Any], modality: Modality, want_features: bool = False) -> Classified:
        """Classify sample values that ``modality`` decoded (a list, or an [N, ...] tensor of them) through
        the dynamic batcher."""
        loop = asyncio.get_running_loop()
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._batcher = loop.create_task(self._batch_loop())
        future: asyncio.Future = loop.create_future()
        await self._queue.put(_Pending(samples, modality, future, want_features))
        return await future

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        nxt: _Pending | None = None
        while True:
            first = nxt if nxt is not None else await queue.get()
            nxt = None
            began = time.perf_counter()  # the batch's cycle: from its first request's turn to the answers
            # the size that costs least per sample now, or a probe of another (requests on their way: about
            # the samples that could join)
            limit = self._sizer.limit(max(self._incoming, len(first.samples)))
            items, count = [first], len(first.samples)
            deadline = loop.time() + self.config.max_queue_delay_ms / 1000
            while count < limit:
                if not queue.empty():
                    nxt = queue.get_nowait()
                else:
                    left = deadline - loop.time()
                    if left <= 0 or self._incoming <= len(items):  # nobody else is on the way
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if count + len(nxt.samples) > limit or nxt.modality is not first.modality:
                    break  # it heads the next batch
                items.append(nxt)
                count += len(nxt.samples)
                nxt = None
            ran = await self._run_batch(loop, items)
            if ran is not None:
                self._sizer.record(ran[1], time.perf_counter() - began, ran[0])

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[_Pending]) -> tuple[Any, int] | None:
        """Run one batch and answer its requests: (what identifies the engine that ran it, samples), None: none ran."""
        live = [it for it in items if not it.future.done()]  # a client that went away is not computed
        if not live:
            return None
        try:
            probs, feats, model, engine, seconds = await loop.run_in_executor(
                self._engine_thread, self._run, _concat([it.samples for it in live]), live[0].modality)
        except Exception as exc:  # every waiting request gets the error; the loop goes on
            for it in live:
                if not it.future.done():
                    it.future.set_exception(exc)
            return None
        start = 0
        for it in live:
            n = len(it.samples)
            if not it.future.done():
                it.future.set_result(self._classified(probs[start:start + n], feats[start:start + n], model, engine,
                                                      seconds))
            start += n
        return (model.backbone, engine.name), start

    def batching_status(self) -> dict[str, Any]:
        """The batcher's settings and its measured choice of batch size (``/v1/status``)."""
        return {"max_batch": self.config.max_batch, "max_queue_delay_ms": self.config.max_queue_delay_ms,
                **self._sizer.describe()}

    # ---------------------------------------------------------------------------- engine-thread jobs
    async def in_engine_thread(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the engine thread, between batches (``learn`` runs the backbone)."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn)

    async def learn(self, items: Sequence[bytes], label: str, source: str) -> LearnReport:
        return await self.in_engine_thread(lambda: self.device.learn(list(items), label, source=source))

    # ---------------------------------------------------------------------------- the device's state
    # Retrain, rollback and heads work on the state directory and the feature cache (under the state's
    # lock where they write) and never touch the engine, so they run outside the engine thread and
    # batches go on meanwhile. The new head is then loaded in the engine thread (``_current``) before they
    # return, so what the server answers, describes and calls ready is the new head once they have answered.
    def retrain(self, **options: Any) -> RetrainReport:
        """``device retrain`` in the calling thread (the server's background retrain job)."""
        report = self.device.retrain(**options)
        with contextlib.suppress(RuntimeError):  # the engine thread is shut down: the server is stopping
            self._engine_thread.submit(self._current).result()
        return report

    async def rollback(self) -> ActiveState:
        active = await asyncio.to_thread(self.device.rollback)
        await self.refresh()
        return active

    async def heads(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.device.heads)

    # ---------------------------------------------------------------------------- database thread
    def _db(self, name: str) -> Any:
        obj = getattr(self._db_local, name, None)
        if obj is None:
            if name == "review":
                obj = ReviewQueue(self.state.cache_path, capacity=self.config.review_capacity)
            elif name == "field":
                obj = FieldLabels(self.state.cache_path)
            else:
                obj = FeatureCache(self.state.cache_path)
            setattr(self._db_local, name, obj)
        return obj

    def review_sync(self, fn: Callable[[ReviewQueue], T]) -> T:
        return self._db_thread.submit(lambda: fn(self._db("review"))).result()

    async def review(self, fn: Callable[[ReviewQueue], T]) -> T:
        """Run ``fn(queue)`` in the database thread."""
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, lambda: fn(self._db("review")))

    async def field_accuracy(self) -> dict[str, Any]:
        """Labels given on site against the answers of the head active then (:mod:`edgexfer.runtime.field_accuracy`)."""
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, lambda: self._db("field").report())

    async def sample_counts(self) -> dict[str, int]:
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, lambda: self._db("cache").counts())

    def review_threshold(self, class_count: int) -> float:
        """The low-confidence threshold for a head of ``class_count`` classes: ``--review-threshold`` if given,
        else :func:`~edgexfer.runtime.review.review_threshold` (it follows the head's number of classes)."""
        fixed = self.config.review_threshold
        return fixed if fixed is not None else review_threshold(class_count)

    def wants_review(self, probability: float, class_count: int) -> bool:
        """Whether a prediction of a head of ``class_count`` classes goes to the review queue."""
        return probability < self.review_threshold(class_count)
