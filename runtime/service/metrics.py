"""Prometheus metrics of ``device serve`` (``/metrics``), in a registry of their own.

Families (all prefixed ``edgexfer_``):

* ``http_requests_total{endpoint,code}`` and ``http_request_duration_seconds{endpoint}``: per endpoint
  (the route's template, never the raw path, so a scanner cannot grow the label set);
* ``stage_duration_seconds{stage}``: ``decode`` per image, ``engine`` and ``head`` per batch;
* ``batch_size``: images per engine call (the dynamic batcher at work);
* ``predictions_total{label}``, ``low_confidence_total`` and ``low_confidence_ratio``;
* ``active_head_version`` and ``model_info{model,backend,precision,execution}`` (``execution``: the
  arithmetic the engine really computes in, as :mod:`edgexfer.runtime.precision` records it): the model
  that answers, set when it is switched (the service follows the device's state while idle too);
* ``model_ready``: 1 while that model is the one the device made active, 0 while a new one is loaded or
  cannot be (read at each scrape, as ``/v2/health/ready`` answers);
* ``cache_samples{label}``, ``review_queue_entries``, ``retrains_total{result}``;
* ``drift_detected``, ``drift_p_value``, ``drift_statistic``, ``drift_label_shift``, ``drift_window_confidence``:
  the last drift test (``--drift-every`` inputs), NaN before its first verdict; ``drift_inputs_skipped_total``:
  inputs whose features were not kept for it because the database thread was behind;

* ``grpc_requests_total{method,code}`` and ``grpc_request_duration_seconds{method}``: per gRPC method of
  the KServe v2 service (``--grpc-port``), ``code`` the gRPC status name.

The web page's p50/p99 come from :meth:`ServiceMetrics.latency_percentiles`, over the last
:data:`RECENT` inference requests (``/v1/predict``, ``/v2/.../infer`` and gRPC ``ModelInfer``).

Triton's model statistics (``GET /v2/models/{name}/stats``, gRPC ``ModelStatistics``) come from
:class:`ModelStatistics` (``ServiceMetrics.statistics``): per (model, version) the v2 inference requests
(HTTP and gRPC) that succeeded or failed, their time queued and computing, and the engine's batches.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "edgexfer"
#: inference latencies kept for the page's percentiles
RECENT = 1000
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
INFERENCE_ENDPOINTS = ("/v1/predict", "/v2/models/{name}/infer")
#: the gRPC method whose latencies join the page's percentiles
GRPC_INFER = "ModelInfer"


class _Duration:
    """Triton's ``StatisticDuration``: how many, and their nanoseconds in all."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(seconds * 1e9))

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class _VersionStatistics:
    def __init__(self) -> None:
        self.last_inference = 0  #: ms since the epoch
        self.inference_count = 0  #: samples of the successful requests
        self.execution_count = 0  #: engine calls (batches); a batch may hold several requests
        self.durations = {k: _Duration() for k in ("success", "fail", "queue", "compute_input", "compute_infer",
                                                   "compute_output")}
        self.batches: dict[int, _Duration] = {}  #: batch size -> engine calls of that size and their time


class ModelStatistics:
    """Triton's model statistics, kept per (model name, version): the counters behind ``/v2/models/{name}/stats``.

    Per request (``request``): ``success``/``fail`` count requests and their whole time in the server;
    ``queue`` is the time waiting for the engine, ``compute_input`` decoding, ``compute_infer`` the engine
    call of the request's batch, ``compute_output`` the answer's tensors and the review queue. Per batch
    (``execution``): ``execution_count`` and ``batch_stats``; every engine call counts (``/v1/predict``'s too),
    as Triton counts every execution of the model.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], _VersionStatistics] = {}

    def _of(self, name: str, version: str) -> _VersionStatistics:
        key = (name, version)
        if key not in self._models:
            self._models[key] = _VersionStatistics()
        return self._models[key]

    def execution(self, name: str, version: str, batch_size: int, seconds: float) -> None:
        with self._lock:
            stats = self._of(name, version)
            stats.execution_count += 1
            stats.batches.setdefault(batch_size, _Duration()).add(seconds)

    def request(self, name: str, version: str, *, ok: bool, samples: int, total: float, queue: float = 0.0,
                compute_input: float = 0.0, compute_infer: float = 0.0, compute_output: float = 0.0) -> None:
        with self._lock:
            stats = self._of(name, version)
            stats.last_inference = int(time.time() * 1000)
            if not ok:
                stats.durations["fail"].add(total)
                return
            stats.inference_count += samples
            for key, seconds in (("success", total), ("queue", queue), ("compute_input", compute_input),
                                 ("compute_infer", compute_infer), ("compute_output", compute_output)):
                stats.durations[key].add(seconds)

    def report(self, name: str, version: str | None = None, served: str | None = None) -> list[dict[str, Any]]:
        """Triton's ``model_stats`` entries of ``name``: one per version that answered since start and the
        one ``served`` now (zeros before its first request), or only the ``version`` asked for."""
        with self._lock:
            keys = {k for k in self._models if k[0] == name} | ({(name, served)} if served is not None else set())
            out = []
            for key in sorted((k for k in keys if version in (None, k[1])), key=lambda k: (len(k[1]), k[1])):
                stats = self._models.get(key) or _VersionStatistics()
                out.append({
                    "name": key[0], "version": key[1], "last_inference": stats.last_inference,
                    "inference_count": stats.inference_count, "execution_count": stats.execution_count,
                    "inference_stats": {k: d.as_dict() for k, d in stats.durations.items()},
                    "batch_stats": [{"batch_size": size, "compute_input": {"count": d.count, "ns": 0},
                                     "compute_infer": d.as_dict(), "compute_output": {"count": d.count, "ns": 0}}
                                    for size, d in sorted(stats.batches.items())]})
            return out


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram(f"{PREFIX}_http_request_duration_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stages = Histogram(f"{PREFIX}_stage_duration_seconds",
                                "Time per stage: decode (per image), engine and head (per batch)", ["stage"],
                                buckets=_STAGE_BUCKETS, registry=r)
        self.batches = Histogram(f"{PREFIX}_batch_size", "Images per engine call", buckets=(1, 2, 4, 8, 16, 32, 64),
                                 registry=r)
        self.predictions = Counter(f"{PREFIX}_predictions", "Predictions by predicted class", ["label"], registry=r)
        self.low_confidence = Counter(f"{PREFIX}_low_confidence", "Predictions below the review threshold",
                                      registry=r)
        self.low_confidence_ratio = Gauge(f"{PREFIX}_low_confidence_ratio",
                                          "Share of predictions below the review threshold since start", registry=r)
        self.head_version = Gauge(f"{PREFIX}_active_head_version", "Version of the head that answers", registry=r)
        self.model_ready = Gauge(f"{PREFIX}_model_ready",
                                 "1 while the model that answers is the one the device made active", registry=r)
        self.model_info = Gauge(f"{PREFIX}_model_info", "The model that answers (value 1)",
                                ["model", "backend", "precision", "execution"], registry=r)
        self.cache_samples = Gauge(f"{PREFIX}_cache_samples", "Labelled samples in the feature cache per class",
                                   ["label"], registry=r)
        self.review_entries = Gauge(f"{PREFIX}_review_queue_entries", "Inputs waiting in the review queue",
                                    registry=r)
        # the last drift test (edgexfer.runtime.drift), read at every scrape: NaN before the first verdict
        self.drift_detected = Gauge(f"{PREFIX}_drift_detected",
                                    "1 when the last drift test found the inputs changed since training", registry=r)
        self.drift_p_value = Gauge(f"{PREFIX}_drift_p_value", "p-value of the last drift test (MMD, permutations)",
                                   registry=r)
        self.drift_statistic = Gauge(f"{PREFIX}_drift_statistic", "MMD^2 of the last drift test", registry=r)
        self.drift_label_shift = Gauge(f"{PREFIX}_drift_label_shift",
                                       "Total variation between the tested window's answers and the training ones",
                                       registry=r)
        self.drift_confidence = Gauge(f"{PREFIX}_drift_window_confidence",
                                      "Mean confidence of the answers in the tested window", registry=r)
        self.drift_skipped = Counter(f"{PREFIX}_drift_inputs_skipped",
                                     "Inputs not kept for the drift test: the database thread was behind", registry=r)
        self.retrains = Counter(f"{PREFIX}_retrains", "Retrains run by the service, by result", ["result"], registry=r)
        self.grpc_requests = Counter(f"{PREFIX}_grpc_requests", "gRPC requests by method and status code",
                                     ["method", "code"], registry=r)
        self.grpc_latency = Histogram(f"{PREFIX}_grpc_request_duration_seconds", "gRPC request latency by method",
                                      ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.statistics = ModelStatistics()
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=RECENT)
        self._total = 0
        self._low = 0

    # ---------------------------------------------------------------------------- recording
    def request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if endpoint in INFERENCE_ENDPOINTS and code < 400:
            with self._lock:
                self._recent.append(seconds)

    def grpc_request(self, method: str, code: str, seconds: float) -> None:
        self.grpc_requests.labels(method, code).inc()
        self.grpc_latency.labels(method).observe(seconds)
        if method == GRPC_INFER and code == "OK":
            with self._lock:
                self._recent.append(seconds)

    def stage(self, stage: str, seconds: float) -> None:
        self.stages.labels(stage).observe(seconds)

    def batch(self, size: int) -> None:
        self.batches.observe(size)

    def prediction(self, label: str, low_confidence: bool) -> None:
        self.predictions.labels(label).inc()
        with self._lock:
            self._total += 1
            self._low += int(low_confidence)
            self.low_confidence_ratio.set(self._low / self._total)
        if low_confidence:
            self.low_confidence.inc()

    def set_model(self, model: Any, backend: str, precision: str, execution: dict[str, Any]) -> None:
        self.head_version.set(model.head_version)
        self.model_info.clear()
        self.model_info.labels(model.name, backend, precision, str(execution.get("inference_precision", precision))).set(1)

    def follow_readiness(self, ready: Callable[[], bool]) -> None:
        """``model_ready`` is ``ready()`` at every scrape."""
        self.model_ready.set_function(lambda: float(ready()))

    def follow_drift(self, last: Callable[[], Any]) -> None:
        """The drift gauges are ``last()``'s report (a :class:`~edgexfer.runtime.drift.DriftReport` or None) at
        every scrape."""
        def read(pick: Callable[[Any], Any]) -> Callable[[], float]:
            def value() -> float:
                report = last()
                got = None if report is None or report.drift is None else pick(report)
                return float("nan") if got is None else float(got)
            return value
        self.drift_detected.set_function(read(lambda r: r.drift))
        self.drift_p_value.set_function(read(lambda r: r.p_value))
        self.drift_statistic.set_function(read(lambda r: r.statistic))
        self.drift_label_shift.set_function(read(lambda r: r.label_shift))
        self.drift_confidence.set_function(read(lambda r: r.confidence["window"]))

    def set_counts(self, counts: dict[str, int], review_entries: int) -> None:
        self.cache_samples.clear()
        for label, n in counts.items():
            self.cache_samples.labels(label).set(n)
        self.review_entries.set(review_entries)

    # ---------------------------------------------------------------------------- reading
    def latency_percentiles(self) -> dict[str, float | int | None]:
        with self._lock:
            recent = np.array(self._recent, dtype=np.float64)
        if not len(recent):
            return {"count": 0, "p50_ms": None, "p99_ms": None}
        return {"count": int(len(recent)), "p50_ms": round(float(np.percentile(recent, 50)) * 1000, 2),
                "p99_ms": round(float(np.percentile(recent, 99)) * 1000, 2)}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
