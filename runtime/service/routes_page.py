"""``GET /``: the web page, one file of package data (``static/index.html``, no build step)."""
from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgexfer.runtime.service.access import page_policy
from edgexfer.runtime.service.endpoint import route


async def page(request: Request) -> Response:
    html = resources.files("edgexfer.runtime.service").joinpath("static/index.html").read_bytes()
    # its own inline script and styles may run, by their hashes; nothing else (access.page_policy)
    return Response(html, media_type="text/html; charset=utf-8",
                    headers={"Content-Security-Policy": page_policy(html)})


def routes() -> list[Route]:
    return [route("/", page, ["GET"])]
