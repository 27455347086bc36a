"""``GET /``: the web page, files of package data (``static/``: index.html, page.js, page.css, and for the Record
button microphone.js and recorder.js, its AudioWorklet module; no build step).

The page's script and style are files of their own, never inline, so its Content-Security-Policy
(:func:`~edgexfer.runtime.service.access.page_policy`) admits them as ``'self'`` and nothing else runs.
"""
from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgexfer.runtime.service.access import page_policy
from edgexfer.runtime.service.endpoint import Handler, route

#: what the page is made of: URL path -> (file under static/, media type)
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
    "/static/microphone.js": ("microphone.js", "text/javascript; charset=utf-8"),
    "/static/recorder.js": ("recorder.js", "text/javascript; charset=utf-8"),
}


def _page_file(name: str, media_type: str) -> Handler:
    """The handler that answers with ``static/NAME``."""
    async def page(request: Request) -> Response:
        data = resources.files("edgexfer.runtime.service").joinpath("static", name).read_bytes()
        # the HTML's policy: its own files (and inline code by its hashes, should any come back); nothing else
        headers = {"Content-Security-Policy": page_policy(data)} if name.endswith(".html") else {}
        return Response(data, media_type=media_type, headers=headers)
    return page


def routes() -> list[Route]:
    return [route(path, _page_file(name, media_type), ["GET"]) for path, (name, media_type) in PAGE_FILES.items()]
