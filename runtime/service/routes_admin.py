"""The device as ``device status``, ``heads``, ``retrain`` and ``rollback`` say it, and Prometheus' ``/metrics``.

``GET /v1/status``, ``GET /v1/heads``; ``POST /v1/retrain`` (the gated retrain, in the background) and
``GET /v1/retrain`` (its report); ``POST /v1/rollback``; ``GET /metrics``. All of them go through the
core's one :class:`~edgexfer.runtime.device.Device`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.service.core import ServiceCore
from edgexfer.runtime.service.endpoint import RetrainJobs, json_object, read_body, route
from edgexfer.runtime.service.protocol import ProtocolError, brief

log = logging.getLogger("edgexfer.serve")
#: a retrain seed at most (numpy's legacy generators take 32 bits)
MAX_SEED = 2**32 - 1


async def retrain(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    jobs: RetrainJobs = request.app.state.jobs
    raw = await read_body(request)
    doc = json_object(raw) if raw.strip() else {}
    options = _retrain_options(doc)
    with jobs.lock:
        if jobs.retrain["state"] == "running":
            raise ProtocolError(409, "a retrain is running", got=f"job {jobs.retrain['job']}",
                                expected="one at a time", todo="GET /v1/retrain until it is done")
        job = jobs.retrain["job"] + 1
        jobs.retrain = {"state": "running", "job": job, "started": time.time(), "options": options}

    def run() -> None:
        try:
            report = core.retrain(**options).to_dict()
            state = {"state": "done", "report": report}
            core.metrics.retrains.labels("accepted" if report["accepted"] else "rejected").inc()
        except EdgexferError as exc:  # reported, never raised into the server
            state = {"state": "failed", "error": str(exc)}
            core.metrics.retrains.labels("failed").inc()
        except Exception:  # a fault of ours: its text stays in the log
            log.exception("retrain job %d failed", job)
            state = {"state": "failed", "error": f"internal error | got a fault in retrain job {job} | "
                                                 "expected none | see the server's log"}
            core.metrics.retrains.labels("failed").inc()
        with jobs.lock:
            jobs.retrain = {**jobs.retrain, **state, "finished": time.time()}

    threading.Thread(target=run, name="edgexfer-retrain", daemon=True).start()
    return JSONResponse(jobs.retrain, status_code=202)


async def retrain_status(request: Request) -> Response:
    jobs: RetrainJobs = request.app.state.jobs
    with jobs.lock:
        return JSONResponse(dict(jobs.retrain))


async def rollback(request: Request) -> Response:
    active = await request.app.state.core.rollback()
    return JSONResponse({"head": active.head, "previous_head": active.previous_head})


async def status(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    cfg = core.config
    jobs: RetrainJobs = request.app.state.jobs
    model = await core.refresh()
    record_ = core.state.head_record(model.head_version)
    counts, entries = await request.app.state.counts.read(core)
    with jobs.lock:
        retrain_state = dict(jobs.retrain)
    return JSONResponse({
        "model": model.name, "bundle": {"name": model.name, "backbone_sha256": model.backbone,
                                        "arch": model.bundle.manifest.backbone.arch,
                                        "modality": model.modality,
                                        "form": model.input_modality.service_input().page_form()},
        "head": {"version": model.head_version, "previous": core.state.active().previous_head,
                 "kind": record_.kind, "classes": model.classes,
                 "source": record_.source, "metrics": _scalars(record_.metrics)},
        "backend": model.backend, "precision": cfg.precision, "execution": model.execution,
        "latency": core.metrics.latency_percentiles(),
        "cache": {"samples_per_class": counts}, "review_queue": entries,
        "retrain": retrain_state, "token_required": request.app.state.access.required,
        "batching": core.batching_status(), "drift": core.drift.status(),
        "field_accuracy": await core.field_accuracy(),
        "review_threshold": core.review_threshold(len(model.classes)), "uptime_s": round(time.time() - core.started, 1)})


async def heads(request: Request) -> Response:
    out = await request.app.state.core.heads()
    for h in out:
        h["metrics"] = _scalars(h["metrics"])
    return JSONResponse({"heads": out})


async def metrics(request: Request) -> Response:
    core: ServiceCore = request.app.state.core
    await request.app.state.counts.read(core)
    return Response(core.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _retrain_options(doc: dict[str, Any]) -> dict[str, Any]:
    """``{"policy", "tolerance", "seed"}`` of POST /v1/retrain, checked (the same options as ``device retrain``)."""
    from edgexfer.runtime.names import HEAD_POLICIES

    unknown = sorted(set(doc) - {"policy", "tolerance", "seed"})
    if unknown:
        raise ProtocolError(400, "retrain options", got=[u[:20] for u in unknown[:6]],
                            expected="policy, tolerance, seed")
    if "policy" in doc and doc["policy"] not in HEAD_POLICIES:
        raise ProtocolError(400, "retrain policy", got=brief(doc["policy"]), expected=f"one of {list(HEAD_POLICIES)}")
    tol = doc.get("tolerance", 0.01)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
        raise ProtocolError(400, "retrain tolerance", got=brief(tol), expected="a number 0..1")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ProtocolError(400, "retrain seed", got=brief(seed), expected=f"an integer 0..{MAX_SEED}")
    return {k: v for k, v in {"policy": doc.get("policy"), "tolerance": float(tol), "seed": seed}.items()
            if v is not None}


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Figures a page shows: scalars only (a head's signed golden logits stay in ``device heads --json``)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def routes() -> list[Route]:
    return [
        route("/v1/status", status, ["GET"], reveals=True),
        route("/v1/heads", heads, ["GET"], reveals=True),
        route("/v1/retrain", retrain, ["POST"], mutating=True),
        route("/v1/retrain", retrain_status, ["GET"], reveals=True),
        route("/v1/rollback", rollback, ["POST"], mutating=True),
        # per-class prediction and sample counts, the drift test's verdict: field data too (Prometheus sends the
        # token with ``authorization: {credentials_file: ...}``)
        route("/metrics", metrics, ["GET"], reveals=True),
    ]
