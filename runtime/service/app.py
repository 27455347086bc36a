"""The HTTP side of ``edgexfer device serve``: Starlette routes over :class:`~edgexfer.runtime.service.core.ServiceCore`.

Routes (docs/service.md has examples of each):

==========================================  ================================================================
``GET /``                                   the web page (``static/index.html``, no build step)
``GET /v2``, ``/v2/health/live|ready``      Open Inference Protocol server metadata and health
``GET /v2/models/{name}[/versions/{v}]``    model metadata; ``.../ready`` its readiness
``POST /v2/models/{name}[/versions/{v}]/infer``  inference, JSON or binary tensor data (protocol.py)
``POST /v1/predict``                        raw image bytes (or UTF-8 text) or a multipart upload -> ``device predict --json``'s JSON
``GET /metrics``                            Prometheus text format
``GET /openapi.json``                       an OpenAPI 3.1 document of all of these (:mod:`.openapi`)
``GET /v1/status``, ``/v1/heads``           the device, as ``device status`` / ``device heads`` say it
``GET /v1/review``, ``/v1/review/{id}/image``  the review queue and its images
``POST /v1/label``                          a queued (``{"id", "label"}``) or uploaded image -> ``device learn``
``POST /v1/retrain``, ``GET /v1/retrain``   the gated retrain, in the background, and its report
``POST /v1/rollback``                       back to the previous head
==========================================  ================================================================

Before any route, :class:`~edgexfer.runtime.service.access.BrowserSafety` answers a foreign ``Host`` (421)
and a browser request from another site or origin (403), and puts the security headers on every response;
:mod:`.access` says why.

The handlers live in one module per group: :mod:`.routes_page` (the page), :mod:`.routes_v2` (the
Open Inference Protocol), :mod:`.routes_v1` (predict, review, label), :mod:`.routes_admin` (status,
heads, retrain, rollback, metrics). What they share (the resources in the app's state, the JSON errors,
the body and form readers) is in :mod:`.endpoint`; decoding and queueing samples in :mod:`.samples`.

Errors are JSON ``{"error": "what | got | expected | what to do"}`` with a 4xx status (5xx only for a
fault of the service itself), and no error stops the server. Nothing here opens a file by a name a
request gave: images come in the body, queue entries by integer id, the page from fixed package data.

The active bundle's modality decides what a sample is. A text bundle takes UTF-8 text where an image
bundle takes encoded images: the v2 input ``text`` (BYTES, one element per text) instead of ``image``
and ``pixels``, a raw ``/v1/predict`` or ``/v1/label`` body (or an uploaded ``.txt`` file) holding one
text, review entries holding the text.
"""
from __future__ import annotations

from collections.abc import Iterable

from starlette.applications import Starlette
from starlette.middleware import Middleware

from edgexfer.runtime.service import openapi, routes_admin, routes_page, routes_v1, routes_v2
from edgexfer.runtime.service.access import Access, BrowserSafety, HostAllowList, is_loopback
from edgexfer.runtime.service.core import ServiceCore
from edgexfer.runtime.service.endpoint import RetrainJobs, SampleCounts, not_found

__all__ = ["MUTATING", "create_app", "is_loopback"]

#: endpoints that change the device: a token is needed when the server is reachable from other hosts
MUTATING = ("/v1/label", "/v1/retrain", "/v1/rollback")


def create_app(core: ServiceCore, *, token: str | None = None, host: str = "127.0.0.1",
               allow_hosts: Iterable[str] = ()) -> Starlette:
    """The ASGI application. ``token``: needed by the mutating endpoints (always, once given); with no
    token those endpoints answer 403 unless ``host`` is a loopback address. Beyond loopback the endpoints
    that reveal field data need it too. ``allow_hosts``: ``Host`` names answered besides IP addresses,
    ``localhost``, ``host`` and this machine's name (``--allow-host``)."""
    routes = [*routes_page.routes(), *routes_v2.routes(), *routes_v1.routes(), *routes_admin.routes(),
              *openapi.routes()]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found},
                    middleware=[Middleware(BrowserSafety, hosts=HostAllowList(host, allow_hosts))])
    # what the handlers work with (edgexfer.runtime.service.endpoint says who reads what)
    app.state.core = core
    app.state.config = core.config
    app.state.access = Access(token, host)
    app.state.jobs = RetrainJobs()
    app.state.counts = SampleCounts()
    return app
