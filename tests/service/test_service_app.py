"""The service's application in process (Starlette's TestClient): its routes, and one Device per server."""
from __future__ import annotations

import time

import pytest


def test_routes_keep_their_urls_methods_and_metric_templates():
    from edgexfer.runtime.service.app import create_app

    class NoCore:  # create_app only stores the core; no route runs here
        config = None

    app = create_app(NoCore())
    got = sorted((r.path, m) for r in app.routes for m in r.methods if m != "HEAD")
    assert got == sorted([
        ("/", "GET"), ("/static/page.js", "GET"), ("/static/page.css", "GET"),
        ("/static/microphone.js", "GET"), ("/static/recorder.js", "GET"), ("/v2", "GET"), ("/v2/health/live", "GET"), ("/v2/health/ready", "GET"),
        ("/v2/models/{name}", "GET"), ("/v2/models/{name}/ready", "GET"),
        ("/v2/models/{name}/versions/{version}", "GET"), ("/v2/models/{name}/versions/{version}/ready", "GET"),
        ("/v2/models/{name}/infer", "POST"), ("/v2/models/{name}/versions/{version}/infer", "POST"),
        ("/v2/models/{name}/config", "GET"), ("/v2/models/{name}/versions/{version}/config", "GET"),
        ("/v2/models/{name}/stats", "GET"), ("/v2/models/{name}/versions/{version}/stats", "GET"),
        ("/v1/predict", "POST"), ("/v1/status", "GET"), ("/v1/heads", "GET"), ("/v1/review", "GET"),
        ("/v1/review/{id}/image", "GET"), ("/v1/label", "POST"), ("/v1/retrain", "POST"),
        ("/v1/retrain", "GET"), ("/v1/rollback", "POST"), ("/metrics", "GET"),
        ("/openapi.json", "GET")])


def test_the_http_layer_works_through_the_core_device_only(served_state, monkeypatch):
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
    from starlette.testclient import TestClient

    from edgexfer.runtime import device as device_module
    from edgexfer.runtime.service.app import create_app
    from edgexfer.runtime.service.core import ServiceCore

    opened = []
    init = device_module.Device.__init__

    def counted(self, *args, **kwargs):
        opened.append(args)
        init(self, *args, **kwargs)

    monkeypatch.setattr(device_module.Device, "__init__", counted)
    core = ServiceCore(served_state)
    core.open()
    try:
        with TestClient(create_app(core), base_url="http://localhost") as client:  # not "testserver": a 421
            assert client.get("/v1/heads").json()["heads"][0]["version"] == 1
            assert client.get("/v1/status").json()["head"]["version"] == 1
            assert client.post("/v1/retrain", json={}).status_code == 202
            deadline = time.monotonic() + 120
            while client.get("/v1/retrain").json()["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert client.get("/v1/retrain").json()["state"] in ("done", "failed")
            assert client.post("/v1/rollback").status_code in (200, 409)  # 409: no previous head
    finally:
        core.close()
    assert len(opened) == 1, f"the server opened {len(opened)} Device objects, expected the core's one"


def test_a_database_thread_behind_skips_drift_observations_instead_of_holding_every_batch(served_state):
    """Every engine call's features go to the drift test's ring buffer in the database thread. While that
    thread is held (a slow SD card, a long test), at most MAX_PENDING_OBSERVATIONS batches wait; the others
    are counted as skipped in /metrics, answers go on, and the waiting ones are kept once it frees."""
    import threading

    import numpy as np

    from edgexfer.runtime.drift import RecentInputs
    from edgexfer.runtime.service.core import MAX_PENDING_OBSERVATIONS, ServiceCore

    core = ServiceCore(served_state)
    core.open()
    held = threading.Event()
    try:
        height, width = core.device.bundle().manifest.backbone.input.size
        pixels = np.random.default_rng(0).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        core.classify_now(pixels)  # the ring buffer opens
        core._db_thread.submit(lambda: None).result()
        with RecentInputs(core.state.cache_path) as recent:
            before = recent.count()
        blocker = core._db_thread.submit(held.wait, 60)
        calls = MAX_PENDING_OBSERVATIONS + 20
        answers = [core.classify_now(pixels) for _ in range(calls)]  # would wait forever if answers waited
        assert all(a.probabilities.shape[0] == 2 for a in answers)
        skipped = core.metrics.registry.get_sample_value("edgexfer_drift_inputs_skipped_total")
        assert skipped == 2 * 20
        held.set()
        blocker.result()
        core._db_thread.submit(lambda: None).result()
        with RecentInputs(core.state.cache_path) as recent:
            assert recent.count() == min(before + 2 * MAX_PENDING_OBSERVATIONS, recent.capacity)
        core.classify_now(pixels)  # and the observations go on
        core._db_thread.submit(lambda: None).result()
        assert core.metrics.registry.get_sample_value("edgexfer_drift_inputs_skipped_total") == skipped
    finally:
        held.set()
        core.close()
