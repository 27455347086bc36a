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

import asyncio
import logging
import secrets
import threading
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.service.core import ServiceCore
from edgexfer.runtime.service.protocol import ProtocolError, parse_json
from edgexfer.runtime.state import StateError

log = logging.getLogger("edgexfer.serve")

#: a body over the limit is read and dropped up to this many times the limit before the 413 (see ``read_body``)
DRAIN_FACTOR = 4
#: request Content-Encodings decoded (RFC 9110 8.4.1): tritonclient's request_compression_algorithm sends
#: gzip or deflate (zlib-wrapped; a raw deflate stream, as some clients send it, is taken too)
BODY_ENCODINGS = ("gzip", "x-gzip", "deflate", "identity")
#: encodings stacked on one body at most
MAX_ENCODINGS = 2
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
        except Exception:  # a fault of ours: logged, answered without its text, and the server goes on
            incident = secrets.token_hex(4)
            log.exception("internal error %s on %s %s", incident, request.method, template)
            response = error(500, f"internal error | got fault {incident} on {request.method} {template} | "
                                  "expected none | see the server's log")
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
    """The request body, decoded if its ``Content-Encoding`` is gzip or deflate; refused with 413 past
    ``max_body_bytes`` (as sent, and again once decoded: a zip bomb stops at the limit), 415 for another
    encoding.

    The excess of a body sent too large is read and dropped (up to :data:`DRAIN_FACTOR` times the
    limit) before answering, so a client still sending its body reads the 413 instead of a broken
    pipe; beyond that the connection is closed.
    """
    limit = request.app.state.config.max_body_bytes
    encodings = content_encodings(request.headers.get("content-encoding", ""))
    declared = request.headers.get("content-length")
    size_text = (f"{int(declared):,} bytes" if declared is not None and declared.isascii() and declared.isdigit()
                 and len(declared) <= 18 else None)
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
    raw = b"".join(chunks)
    if encodings:
        raw = await asyncio.to_thread(decode_body, raw, encodings, limit)
    return raw


def content_encodings(header: str) -> list[str]:
    """The codings of a ``Content-Encoding`` header in the order they were applied (identity dropped); 415
    for one this server does not decode."""
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    unknown = [c for c in codings if c not in BODY_ENCODINGS]
    if unknown or len(codings) > MAX_ENCODINGS:
        raise ProtocolError(415, "request Content-Encoding", got=repr(header[:40]),
                            expected=f"gzip, deflate or identity (at most {MAX_ENCODINGS})",
                            todo="send the body uncompressed, or gzip it")
    return [c for c in codings if c != "identity"]


def decode_body(raw: bytes, encodings: list[str], limit: int) -> bytes:
    """Undo ``encodings`` (last applied first), never producing more than ``limit`` bytes (413)."""
    for coding in reversed(encodings):
        raw = _inflate(raw, coding, limit)
    return raw


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    gzip = coding in ("gzip", "x-gzip")
    # deflate is zlib-wrapped by the RFC (a header whose 16-bit value is a multiple of 31); raw deflate otherwise
    zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
    wbits = 16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS
    out = bytearray()
    pending = data
    try:
        while pending:
            inflater = zlib.decompressobj(wbits)
            while True:
                out += inflater.decompress(pending, limit + 1 - len(out))
                if len(out) > limit:
                    raise ProtocolError(413, "request body too large once decompressed",
                                        got=f"{len(data):,} {coding} bytes that inflate past {limit:,}",
                                        expected=f"at most {limit:,} bytes decompressed",
                                        todo="send smaller or fewer images")
                pending = inflater.unconsumed_tail
                if inflater.eof or not pending:
                    break
            if not inflater.eof:
                raise zlib.error("truncated")
            pending = inflater.unused_data
            if not gzip and pending:  # one deflate stream per body; gzip may have several members
                raise zlib.error("data after the stream")
            pending = pending if pending.strip(b"\0") else b""
    except zlib.error:
        raise ProtocolError(400, f"request body is not valid {coding}", got=f"{len(data):,} bytes",
                            expected=f"a complete {coding} stream (Content-Encoding: {coding})",
                            todo="compress the whole body, or drop the Content-Encoding header") from None
    return bytes(out)


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
    except Exception as exc:  # starlette raises its own MultiPartException / HTTPException; its text stays in the log
        log.info("malformed multipart upload on %s: %s", request.url.path[:120], exc)
        raise ProtocolError(400, "malformed multipart upload", got=f"{len(raw):,} bytes the form parser refused",
                            expected="multipart/form-data with a boundary, at most 4 files and 16 fields",
                            todo="upload with curl -F file=@image.jpg (or any HTTP client's multipart)") from None


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
    doc = parse_json(raw, "request body")
    if not isinstance(doc, dict):
        raise ProtocolError(400, "request body", got=type(doc).__name__, expected="a JSON object")
    return doc
