"""What every route of ``device serve`` shares: its resources, its error answers, and reading a request.

The routes are plain ``async def handler(request)`` functions in the ``routes_*`` modules. They find
what they work with in the application's state (Starlette style, set once by
:func:`~edgexfer.runtime.service.app.create_app`), never in a closure or a module global:

* ``request.app.state.core``: the :class:`~edgexfer.runtime.service.core.ServiceCore` (engine, device,
  review queue, metrics); ``request.app.state.config``: its :class:`~edgexfer.runtime.service.core.ServiceConfig`;
* ``request.app.state.access``: the token check of the endpoints that change the device or reveal its field
  data (:class:`~edgexfer.runtime.service.access.Access`);
* ``request.app.state.jobs``: the background retrain (:class:`RetrainJobs`);
* ``request.app.state.counts``: the per-class sample counts, refreshed at most every :data:`COUNTS_TTL` s.

:func:`route` wraps a handler: the token check, JSON errors with their status, and the route's metrics.
The Host and origin checks and the security headers come before any route, in
:class:`~edgexfer.runtime.service.access.BrowserSafety`.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.service.core import ServiceCore
from edgexfer.runtime.service.protocol import ProtocolError
from edgexfer.runtime.state import StateError

log = logging.getLogger("edgexfer.serve")

#: a body over the limit is read and dropped up to this many times the limit before the 413 (see ``read_body``)
DRAIN_FACTOR = 4
#: seconds between refreshes of the per-class sample counts that /metrics and /v1/status report
COUNTS_TTL = 5.0

Handler = Callable[[Request], Awaitable[Response]]


class RetrainJobs:
    """The one background retrain (a second while one runs is refused with 409)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.retrain: dict[str, Any] = {"state": "idle", "job": 0}


class SampleCounts:
    """The per-class sample counts and the review queue's length, read at most every :data:`COUNTS_TTL` s."""

    def __init__(self) -> None:
        self._at = 0.0
        self._last: tuple[dict[str, int], int] = ({}, 0)

    def expire(self) -> None:
        """The next read counts again (a sample was just learned)."""
        self._at = 0.0

    async def read(self, core: ServiceCore) -> tuple[dict[str, int], int]:
        if time.monotonic() - self._at > COUNTS_TTL:
            counts = await core.sample_counts()
            entries = await core.review(lambda q: q.count())
            core.metrics.set_counts(counts, entries)
            self._at = time.monotonic()
            self._last = (counts, entries)
        return self._last


def error(status: int, exc: EdgexferError | str) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=status)


def route(path: str, fn: Handler, methods: list[str], *, mutating: bool = False, reveals: bool = False,
          template: str | None = None) -> Route:
    """``fn`` at ``path``, answering errors as JSON; ``template``: its metrics label (default ``path``).
    ``mutating``: it changes the device; ``reveals``: it shows field data (both: the token, see ``Access``)."""
    template = template or path

    async def handler(request: Request) -> Response:
        core: ServiceCore = request.app.state.core
        started = time.perf_counter()
        try:
            if mutating or reveals:
                request.app.state.access.check(request, changes=mutating)
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

    return Route(path, handler, methods=methods)


async def not_found(request: Request, exc: Exception) -> Response:
    """The answer to a path or method no route takes (404, 405)."""
    status = getattr(exc, "status_code", 404)
    what = "no such endpoint" if status == 404 else "method not allowed" if status == 405 else "bad request"
    return error(status, f"{what} | got {request.method} {request.url.path[:120]} | expected an endpoint of "
                         "docs/service.md | GET /v2 or open / in a browser")


# ------------------------------------------------------------------------------------------ reading a request
async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 past ``max_body_bytes``.

    The excess is read and dropped (up to :data:`DRAIN_FACTOR` times the limit) before answering, so
    a client still sending its body reads the 413 instead of a broken pipe; beyond that the
    connection is closed.
    """
    limit = request.app.state.config.max_body_bytes
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


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def read_form(request: Request, raw: bytes):
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


async def read_upload(request: Request) -> tuple[bytes, str]:
    """(sample bytes, name) from a raw body or the first file of a multipart form."""
    raw = await read_body(request)
    if not is_multipart(request):
        return raw, "upload"
    form = await read_form(request, raw)
    for value in form.values():
        if hasattr(value, "read"):
            return await value.read(), str(getattr(value, "filename", None) or "upload")[:120]
    raise ProtocolError(400, "multipart upload without a file", got=sorted(form.keys()),
                        expected="a file field (e.g. curl -F file=@image.jpg)")


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(400, "request body is not JSON", got=str(exc)[:80], expected="a JSON object") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, "request body", got=type(doc).__name__, expected="a JSON object")
    return doc
