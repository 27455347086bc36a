"""The HTTP side of ``edgexfer device serve``: Starlette routes over :class:`~edgexfer.runtime.service.core.ServiceCore`.

Routes (docs/service.md has examples of each):

==========================================  ================================================================
``GET /``                                   the web page (``static/index.html``, no build step)
``GET /v2``, ``/v2/health/live|ready``      Open Inference Protocol server metadata and health
``GET /v2/models/{name}[/versions/{v}]``    model metadata; ``.../ready`` its readiness
``POST /v2/models/{name}[/versions/{v}]/infer``  inference, JSON or binary tensor data (protocol.py)
``POST /v1/predict``                        raw image bytes (or UTF-8 text) or a multipart upload -> ``device predict --json``'s JSON
``GET /metrics``                            Prometheus text format
``GET /v1/status``, ``/v1/heads``           the device, as ``device status`` / ``device heads`` say it
``GET /v1/review``, ``/v1/review/{id}/image``  the review queue and its images
``POST /v1/label``                          a queued (``{"id", "label"}``) or uploaded image -> ``device learn``
``POST /v1/retrain``, ``GET /v1/retrain``   the gated retrain, in the background, and its report
``POST /v1/rollback``                       back to the previous head
==========================================  ================================================================

Errors are JSON ``{"error": "what | got | expected | what to do"}`` with a 4xx status (5xx only for a
fault of the service itself), and no error stops the server. Nothing here opens a file by a name a
request gave: images come in the body, queue entries by integer id, the page from fixed package data.

The active bundle's modality decides what a sample is. A text bundle takes UTF-8 text where an image
bundle takes encoded images: the v2 input ``text`` (BYTES, one element per text) instead of ``image``
and ``pixels``, a raw ``/v1/predict`` or ``/v1/label`` body (or an uploaded ``.txt`` file) holding one
text, review entries holding the text.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.device import Device
from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.predictor import Prediction
from edgexfer.runtime.service.core import Classified, ServiceCore
from edgexfer.runtime.service.protocol import (
    HEADER_LENGTH,
    ProtocolError,
    Tensor,
    encode_infer_response,
    parse_infer_request,
)
from edgexfer.runtime.state import StateError
from edgexfer.runtime.text import text_sha256

log = logging.getLogger("edgexfer.serve")

#: endpoints that change the device: a token is needed when the server is reachable from other hosts
MUTATING = ("/v1/label", "/v1/retrain", "/v1/rollback")
#: a body over the limit is read and dropped up to this many times the limit before the 413 (see ``body``)
DRAIN_FACTOR = 4
#: seconds between refreshes of the per-class sample counts that /metrics and /v1/status report
COUNTS_TTL = 5.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Jobs:
    """The one background retrain (a second while one runs is refused with 409)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.retrain: dict[str, Any] = {"state": "idle", "job": 0}


def create_app(core: ServiceCore, *, token: str | None = None, host: str = "127.0.0.1") -> Starlette:
    """The ASGI application. ``token``: needed by the mutating endpoints (always, once given); with no
    token those endpoints answer 403 unless ``host`` is a loopback address."""
    cfg = core.config
    jobs = _Jobs()
    counts_at = [0.0]
    last_counts: list[tuple[dict[str, int], int]] = [({}, 0)]
    token_required = token is not None or not is_loopback(host)

    def error(status: int, exc: EdgexferError | str) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=status)

    def endpoint(template: str, *, mutating: bool = False):
        """Wraps a handler: JSON errors, the token check, and the metrics of the route's template."""
        def wrap(fn: Callable[[Request], Awaitable[Response]]):
            async def handler(request: Request) -> Response:
                started = time.perf_counter()
                try:
                    if mutating:
                        _check_token(request)
                    response = await fn(request)
                except ProtocolError as exc:
                    response = error(exc.status, exc)
                except StateError as exc:
                    response = error(409, exc)
                except EdgexferError as exc:
                    response = error(400, exc)
                except Exception as exc:  # a fault of ours: logged, answered, and the server goes on
                    log.exception("internal error on %s", template)
                    response = error(500, f"internal error | got {type(exc).__name__}: {exc} | expected none | "
                                          "see the server's log")
                core.metrics.request(template, response.status_code, time.perf_counter() - started)
                return response
            return handler
        return wrap

    def _check_token(request: Request) -> None:
        if not token_required:
            return
        if token is None:
            raise ProtocolError(403, "this endpoint changes the device and the server listens beyond loopback",
                                got=f"--host {host} without --token-file",
                                expected="a token file", todo="restart with --token-file FILE")
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-edgexfer-token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ProtocolError(401, "missing or wrong token", got="no token" if not given else "a wrong token",
                                expected="Authorization: Bearer <the token in --token-file>",
                                todo="send the token in the Authorization header")

    async def body(request: Request) -> bytes:
        """The request body, refused with 413 past ``max_body_bytes``.

        The excess is read and dropped (up to :data:`DRAIN_FACTOR` times the limit) before answering, so
        a client still sending its body reads the 413 instead of a broken pipe; beyond that the
        connection is closed.
        """
        limit = cfg.max_body_bytes
        declared = request.headers.get("content-length")
        size_text = f"{int(declared):,} bytes" if declared is not None and declared.isdigit() else None
        if size_text is not None and int(declared) > DRAIN_FACTOR * limit:
            raise ProtocolError(413, "request body too large", got=size_text, expected=f"at most {limit:,} bytes",
                                todo="send smaller or fewer images")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > DRAIN_FACTOR * limit:
                break
        if size > limit:
            raise ProtocolError(413, "request body too large", got=size_text or f"more than {limit:,} bytes",
                                expected=f"at most {limit:,} bytes", todo="send smaller or fewer images")
        return b"".join(chunks)

    def kind() -> str:
        """What one sample is for the active bundle: "image" or "text"."""
        return core.model.modality

    async def decode_all(items: list[bytes]) -> Any:
        """Encoded images -> pixels [N, H, W, 3]; or, for a text bundle, UTF-8 bytes -> a list of texts."""
        what = kind()
        if not items:
            raise ProtocolError(400, f"no {what} in the request", got=f"0 {what}s", expected="at least one")
        if len(items) > cfg.max_images:
            raise ProtocolError(413, f"too many {what}s in one request", got=len(items),
                                expected=f"at most {cfg.max_images}", todo="split the request")
        samples = []
        for i, data in enumerate(items):
            try:
                if what == "text":
                    samples.append(await asyncio.to_thread(core.decode_text, data, str(i)))
                else:
                    samples.append(await asyncio.to_thread(core.decode, data))
            except InputError as exc:
                what_ = exc.what if what == "text" else f"image {i}: {exc.what}"
                raise ProtocolError(400, what_, got=exc.got, expected=exc.expected, todo=exc.todo) from None
        return samples if what == "text" else np.stack(samples)

    async def record(result: Classified, images: list[bytes] | None, source: str,
                     texts: list[str] | None = None) -> list[int | None]:
        """Count predictions; queue the low-confidence ones that came as encoded images or as texts."""
        queued: list[int | None] = []
        for i, row in enumerate(result.top(cfg.top_k)):
            label, p = row[0]
            low = core.wants_review(p)
            core.metrics.prediction(label, low)
            entry = None
            if low and texts is not None:
                text = texts[i]
                entry = await core.review(lambda q, text=text, row=row: q.add(
                    sha256=text_sha256(text), image=text.encode("utf-8"), media_type="text/plain; charset=utf-8",
                    label=row[0][0], probability=row[0][1],
                    top_k=[{"label": lbl, "probability": round(pp, 6)} for lbl, pp in row],
                    head=result.head_version, source=source))
            elif low and images is not None:
                data = images[i]
                entry = await core.review(lambda q, data=data, row=row: q.add(
                    sha256=FeatureCache.content_sha256(data), image=data, media_type=_media_type(data),
                    label=row[0][0], probability=row[0][1],
                    top_k=[{"label": lbl, "probability": round(pp, 6)} for lbl, pp in row],
                    head=result.head_version, source=source))
            queued.append(entry)
        return queued

    def model_named(name: str, version: str | None = None):
        model = core.model
        if name != model.name:
            raise ProtocolError(404, "unknown model", got=repr(name[:80]), expected=repr(model.name),
                                todo="GET /v2/models/" + model.name + " for its metadata")
        if version is not None and version != str(model.head_version):
            raise ProtocolError(404, f"model {name} version", got=repr(version[:20]),
                                expected=f"'{model.head_version}' (the active head)",
                                todo="leave the version out to use the active head")
        return model

    # ------------------------------------------------------------------------------------------ v2
    async def server_metadata(request: Request) -> Response:
        from edgexfer import __version__

        return JSONResponse({"name": "edgexfer", "version": __version__,
                             "extensions": ["binary_tensor_data", "model_repository_health"]})

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    async def model_metadata(request: Request) -> Response:
        model = model_named(request.path_params["name"], request.path_params.get("version"))
        spec = model.bundle.preprocess
        if model.modality == "text":
            inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        else:
            inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                      {"name": "pixels", "datatype": "UINT8", "shape": [-1, spec.height, spec.width, 3]}]
        return JSONResponse({
            "name": model.name, "versions": [str(model.head_version)],
            "platform": f"edgexfer_{model.backend}",
            "inputs": inputs,
            "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(model.classes)]},
                        {"name": "features", "datatype": "FP32",
                         "shape": [-1, model.bundle.manifest.backbone.feature_dim]}],
            "parameters": {"classes": model.classes, "head_version": model.head_version, "modality": model.modality,
                           "precision": cfg.precision}})

    async def model_ready(request: Request) -> Response:
        model = model_named(request.path_params["name"], request.path_params.get("version"))
        return JSONResponse({"name": model.name, "ready": True})

    async def infer(request: Request) -> Response:
        with core.incoming():
            return await _infer(request)

    async def _infer(request: Request) -> Response:
        model_named(request.path_params["name"], request.path_params.get("version"))
        req = parse_infer_request(await body(request), request.headers.get(HEADER_LENGTH))
        text = kind() == "text"
        unknown = sorted(set(req.inputs) - ({"text"} if text else {"image", "pixels"}))
        if unknown or len(req.inputs) != 1:
            raise ProtocolError(400, "inference inputs", got=sorted(req.inputs),
                                expected="the input 'text' (BYTES, UTF-8) of this text model" if text else
                                "exactly one of 'image' (BYTES) or 'pixels' (UINT8 [N,H,W,3])")
        wanted = list(req.outputs) or ["label", "probabilities"]
        bad = [n for n in wanted if n not in ("label", "probabilities", "features")]
        if bad:
            raise ProtocolError(400, "requested outputs", got=bad, expected="label, probabilities, features")
        tensor = next(iter(req.inputs.values()))
        images: list[bytes] | None = None
        texts: list[str] | None = None
        if tensor.name == "text":
            if tensor.datatype != "BYTES":
                raise ProtocolError(400, "input 'text' datatype", got=tensor.datatype, expected="BYTES (UTF-8 text)")
            texts = await decode_all(list(tensor.data))
            pixels = texts
        elif tensor.name == "image":
            if tensor.datatype != "BYTES":
                raise ProtocolError(400, "input 'image' datatype", got=tensor.datatype, expected="BYTES")
            images = list(tensor.data)
            pixels = await decode_all(images)
        else:
            if tensor.datatype != "UINT8":
                raise ProtocolError(400, "input 'pixels' datatype", got=tensor.datatype, expected="UINT8")
            if len(tensor.shape) == 4 and tensor.shape[0] > cfg.max_images:
                raise ProtocolError(413, "too many images in one request", got=tensor.shape[0],
                                    expected=f"at most {cfg.max_images}")
            if len(tensor.shape) == 4 and tensor.shape[0] == 0:
                raise ProtocolError(400, "no image in the request", got="0 images", expected="at least one")
            try:
                pixels = core.check_pixels(np.asarray(tensor.data))
            except InputError as exc:
                raise ProtocolError(400, exc.what, got=exc.got, expected=exc.expected, todo=exc.todo) from None
        result = await core.classify(pixels, want_features="features" in wanted)
        await record(result, images, "serve:v2", texts)
        n = len(result.probabilities)
        labels = [result.classes[int(j)].encode() for j in np.argmax(result.probabilities, axis=1)]
        made = {"label": Tensor("label", "BYTES", [n], labels),
                "probabilities": Tensor("probabilities", "FP32", [n, len(result.classes)], result.probabilities),
                "features": Tensor("features", "FP32", list(result.features.shape), result.features)}
        content, headers = encode_infer_response(
            core.model.name, str(result.head_version), req, [made[w] for w in wanted],
            {"head_version": result.head_version, "classes": json.dumps(result.classes),
             "backend": result.backend, "precision": result.precision})
        headers["X-Edgexfer-Head"] = str(result.head_version)
        return Response(content, media_type="application/json" if HEADER_LENGTH not in headers
                        else "application/octet-stream", headers=headers)

    # ------------------------------------------------------------------------------------------ v1
    async def predict(request: Request) -> Response:
        with core.incoming():
            return await _predict(request)

    async def _predict(request: Request) -> Response:
        data, name = await upload(request)
        samples = await decode_all([data])
        result = await core.classify(samples)
        text = isinstance(samples, list)
        queued = await record(result, None if text else [data], f"serve:{name}", samples if text else None)
        top = result.top(cfg.top_k)[0]
        pred = Prediction(name, top[0][0], top[0][1], top, result.backend, result.precision)
        return JSONResponse({"head": result.head_version, "execution": result.execution,
                             "results": [pred.to_dict()], "review_id": queued[0]},
                            headers={"X-Edgexfer-Head": str(result.head_version)})

    async def upload(request: Request) -> tuple[bytes, str]:
        """(sample bytes, name) from a raw body or the first file of a multipart form."""
        raw = await body(request)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return raw, "upload"
        form = await _form(request, raw)
        for value in form.values():
            if hasattr(value, "read"):
                return await value.read(), str(getattr(value, "filename", None) or "upload")[:120]
        raise ProtocolError(400, "multipart upload without a file", got=sorted(form.keys()),
                            expected="a file field (e.g. curl -F file=@image.jpg)")

    async def label(request: Request) -> Response:
        raw = await body(request)
        ctype = request.headers.get("content-type", "")
        entry_id: int | None = None
        if ctype.startswith("multipart/form-data"):
            form = await _form(request, raw)
            name = form.get("label")
            files = [v for v in form.values() if hasattr(v, "read")]
            if not files:
                raise ProtocolError(400, "label upload without a file", got=sorted(form.keys()),
                                    expected="a file and a 'label' field")
            data, source = await files[0].read(), f"serve:upload:{files[0].filename or 'upload'}"[:160]
        else:
            doc = _json_object(raw)
            name, entry_id = doc.get("label"), doc.get("id")
            if isinstance(entry_id, bool) or not isinstance(entry_id, int):
                raise ProtocolError(400, "review entry id", got=repr(entry_id)[:40],
                                    expected='{"id": <integer from GET /v1/review>, "label": "<class>"}')
            found = await core.review(lambda q: q.image(entry_id))
            if found is None:
                raise ProtocolError(404, "no such review entry", got=entry_id, expected="an id from GET /v1/review",
                                    todo="the entry was labelled already or dropped (the queue is bounded)")
            data, source = found[0], f"serve:review:{entry_id}"
        if not isinstance(name, str):
            raise ProtocolError(400, "label", got=repr(name)[:40], expected="a class name")
        report = await core.learn([data], name, source)
        if report.errors:
            raise ProtocolError(400, f"cannot learn this {kind()}", got=report.errors[0]["error"],
                                expected=f"an {kind()}" if kind() == "image" else "UTF-8 text")
        if entry_id is not None:
            await core.review(lambda q: q.remove(entry_id))
        counts_at[0] = 0.0
        return JSONResponse({**report.to_dict(), "review_id": entry_id})

    async def retrain(request: Request) -> Response:
        raw = await body(request)
        doc = _json_object(raw) if raw.strip() else {}
        options = _retrain_options(doc)
        with jobs.lock:
            if jobs.retrain["state"] == "running":
                raise ProtocolError(409, "a retrain is running", got=f"job {jobs.retrain['job']}",
                                    expected="one at a time", todo="GET /v1/retrain until it is done")
            job = jobs.retrain["job"] + 1
            jobs.retrain = {"state": "running", "job": job, "started": time.time(), "options": options}

        def run() -> None:
            try:
                with Device(core.state.root) as dev:
                    report = dev.retrain(**options).to_dict()
                state = {"state": "done", "report": report}
                core.metrics.retrains.labels("accepted" if report["accepted"] else "rejected").inc()
            except Exception as exc:  # reported, never raised into the server
                state = {"state": "failed", "error": str(exc)}
                core.metrics.retrains.labels("failed").inc()
            with jobs.lock:
                jobs.retrain = {**jobs.retrain, **state, "finished": time.time()}

        threading.Thread(target=run, name="edgexfer-retrain", daemon=True).start()
        return JSONResponse(jobs.retrain, status_code=202)

    async def retrain_status(request: Request) -> Response:
        with jobs.lock:
            return JSONResponse(dict(jobs.retrain))

    async def rollback(request: Request) -> Response:
        def run() -> dict[str, Any]:
            with Device(core.state.root) as dev:
                active = dev.rollback()
            return {"head": active.head, "previous_head": active.previous_head}

        return JSONResponse(await asyncio.to_thread(run))

    async def status(request: Request) -> Response:
        model = await core.refresh()
        record_ = core.state.head_record(model.head_version)
        counts, entries = await refresh_counts()
        with jobs.lock:
            retrain_state = dict(jobs.retrain)
        return JSONResponse({
            "model": model.name, "bundle": {"name": model.name, "backbone_sha256": model.backbone,
                                            "arch": model.bundle.manifest.backbone.arch,
                                            "modality": model.modality},
            "head": {"version": model.head_version, "kind": record_.kind, "classes": model.classes,
                     "source": record_.source, "metrics": _scalars(record_.metrics)},
            "backend": model.backend, "precision": cfg.precision, "execution": model.execution,
            "latency": core.metrics.latency_percentiles(),
            "cache": {"samples_per_class": counts}, "review_queue": entries,
            "retrain": retrain_state, "token_required": token_required,
            "batching": {"max_batch": cfg.max_batch, "max_queue_delay_ms": cfg.max_queue_delay_ms},
            "review_threshold": cfg.review_threshold, "uptime_s": round(time.time() - core.started, 1)})

    async def heads(request: Request) -> Response:
        def run() -> list[dict[str, Any]]:
            with Device(core.state.root) as dev:
                out = dev.heads()
            for h in out:
                h["metrics"] = _scalars(h["metrics"])
            return out

        return JSONResponse({"heads": await asyncio.to_thread(run)})

    async def review_list(request: Request) -> Response:
        entries = await core.review(lambda q: [e.to_dict() for e in q.entries()])
        return JSONResponse({"entries": entries, "threshold": cfg.review_threshold})

    async def review_image(request: Request) -> Response:
        entry_id = request.path_params["id"]
        found = await core.review(lambda q: q.image(entry_id))
        if found is None:
            raise ProtocolError(404, "no such review entry", got=entry_id, expected="an id from GET /v1/review")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "max-age=3600"})

    async def metrics(request: Request) -> Response:
        await refresh_counts()
        return Response(core.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def refresh_counts() -> tuple[dict[str, int], int]:
        if time.monotonic() - counts_at[0] > COUNTS_TTL:
            counts = await core.sample_counts()
            entries = await core.review(lambda q: q.count())
            core.metrics.set_counts(counts, entries)
            counts_at[0] = time.monotonic()
            last_counts[0] = (counts, entries)
        return last_counts[0]

    async def page(request: Request) -> Response:
        html = resources.files("edgexfer.runtime.service").joinpath("static/index.html").read_bytes()
        return Response(html, media_type="text/html; charset=utf-8")

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        what = "no such endpoint" if status == 404 else "method not allowed" if status == 405 else "bad request"
        return error(status, f"{what} | got {request.method} {request.url.path[:120]} | expected an endpoint of "
                             "docs/service.md | GET /v2 or open / in a browser")

    def route(path: str, fn, methods: list[str], *, mutating: bool = False, template: str | None = None) -> Route:
        return Route(path, endpoint(template or path, mutating=mutating)(fn), methods=methods)

    infer_t = "/v2/models/{name}/infer"
    routes = [
        route("/", page, ["GET"]),
        route("/v2", server_metadata, ["GET"]),
        route("/v2/health/live", live, ["GET"]),
        route("/v2/health/ready", ready, ["GET"]),
        route("/v2/models/{name}", model_metadata, ["GET"]),
        route("/v2/models/{name}/ready", model_ready, ["GET"]),
        route("/v2/models/{name}/versions/{version}", model_metadata, ["GET"], template="/v2/models/{name}"),
        route("/v2/models/{name}/versions/{version}/ready", model_ready, ["GET"], template="/v2/models/{name}/ready"),
        route(infer_t, infer, ["POST"]),
        route("/v2/models/{name}/versions/{version}/infer", infer, ["POST"], template=infer_t),
        route("/v1/predict", predict, ["POST"]),
        route("/v1/status", status, ["GET"]),
        route("/v1/heads", heads, ["GET"]),
        route("/v1/review", review_list, ["GET"]),
        route("/v1/review/{id:int}/image", review_image, ["GET"]),
        route("/v1/label", label, ["POST"], mutating=True),
        route("/v1/retrain", retrain, ["POST"], mutating=True),
        route("/v1/retrain", retrain_status, ["GET"]),
        route("/v1/rollback", rollback, ["POST"], mutating=True),
        route("/metrics", metrics, ["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})
    app.state.core = core
    return app


async def _form(request: Request, raw: bytes):
    """Parse a multipart body that was already read (and size-checked)."""
    sent = [False]

    async def receive() -> dict[str, Any]:
        if sent[0]:
            return {"type": "http.disconnect"}
        sent[0] = True
        return {"type": "http.request", "body": raw, "more_body": False}

    try:
        return await Request(request.scope, receive).form(max_files=4, max_fields=16)
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException
        raise ProtocolError(400, "malformed multipart upload", got=str(exc)[:80],
                            expected="multipart/form-data with a file field") from None


def _retrain_options(doc: dict[str, Any]) -> dict[str, Any]:
    """``{"policy", "tolerance", "seed"}`` of POST /v1/retrain, checked (the same options as ``device retrain``)."""
    from edgexfer.runtime.names import HEAD_POLICIES

    unknown = sorted(set(doc) - {"policy", "tolerance", "seed"})
    if unknown:
        raise ProtocolError(400, "retrain options", got=unknown, expected="policy, tolerance, seed")
    if "policy" in doc and doc["policy"] not in HEAD_POLICIES:
        raise ProtocolError(400, "retrain policy", got=repr(doc["policy"])[:40], expected=f"one of {list(HEAD_POLICIES)}")
    tol = doc.get("tolerance", 0.01)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
        raise ProtocolError(400, "retrain tolerance", got=repr(tol)[:40], expected="a number 0..1")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ProtocolError(400, "retrain seed", got=repr(seed)[:40], expected="a non-negative integer")
    return {k: v for k, v in {"policy": doc.get("policy"), "tolerance": float(tol), "seed": seed}.items()
            if v is not None}


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(400, "request body is not JSON", got=str(exc)[:80], expected="a JSON object") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, "request body", got=type(doc).__name__, expected="a JSON object")
    return doc


def _media_type(data: bytes) -> str:
    for magic, media in ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"),
                         (b"BM", "image/bmp")):
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """Figures a page shows: scalars only (a head's signed golden logits stay in ``device heads --json``)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
