"""Who may use ``device serve``, and how: the Host allow-list, the browser-origin checks, the token, the headers.

A browser on the device (or on a machine that reaches it) runs pages from anywhere, and every page can
send requests to the service. Three things keep those pages from using it:

* **The Host allow-list** (:class:`HostAllowList`, checked by :class:`BrowserSafety` on every request)
  against DNS rebinding: a name the attacker controls, pointed at 127.0.0.1 after the page loaded, makes the
  browser treat the service as the attacker's origin. Such a request carries the attacker's name in
  ``Host`` and gets a 421. IP literals, ``localhost``, the bound name, the machine's own name and
  ``--allow-host`` names are allowed: none of them can be rebound by someone else's DNS.
* **Same-origin requests only** (:class:`BrowserSafety`): a browser says where a request comes from
  (``Sec-Fetch-Site``; ``Origin``). A request from another site or origin gets a 403 before any route
  runs, whatever its method, except a navigation to the page ``/`` itself. Clients that are not browsers
  (curl, tritonclient, httpx) send neither header and are not affected, as in Go's
  ``net/http.CrossOriginProtection``.
* **A body a cross-site form cannot send** (:meth:`Access.check`): the endpoints that change the device
  take JSON, a multipart upload, or nothing; ``text/plain`` and form-encoded bodies (what a page can send
  without asking the server first) get a 415 unless the request carries the token. That holds even for a
  browser too old to send ``Origin``.

The token (``--token-file``), once given, guards the endpoints that change the device; beyond loopback it
also guards the ones that reveal field data (the review queue and its images, heads, status, the retrain
report, and ``/metrics``: its per-class counts and drift verdict say what the device sees). Every response carries the security headers of :data:`SECURITY_HEADERS`; the page gets a
Content-Security-Policy of its own that admits its inline script and styles by their hashes
(:func:`page_policy`), so no other script can run in it.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import socket
from collections.abc import Iterable
from functools import lru_cache
from html.parser import HTMLParser

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.service.protocol import ProtocolError

#: what ``Sec-Fetch-Site`` may say: the page itself, or a user typing the URL / opening a bookmark
SAFE_SITES = ("same-origin", "none")
#: paths another site may link to (a navigation, never a change)
LINKABLE = ("/",)
#: the policy of every response but the page: nothing loads, nothing frames it
STRICT_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
#: on every response (a route's own value wins): no sniffing a review image into HTML, no URL leaking in
#: a Referer, no framing (clickjacking the rollback button), no other origin embedding field data, no
#: cached field data
SECURITY_HEADERS = (
    ("content-security-policy", STRICT_POLICY),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
    ("cross-origin-resource-policy", "same-origin"),
    ("cross-origin-opener-policy", "same-origin"),
    ("cache-control", "no-store"),
)
#: the ``endpoint`` label of requests refused here, before any route (``edgexfer_http_requests_total``)
REFUSED = "refused"
#: bodies that change the device without the token: JSON, a multipart upload, or none
CHANGE_BODIES = ("", "application/json", "multipart/form-data")
_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_name(netloc: str) -> str | None:
    """The name in a ``Host`` header or an origin's ``host[:port]``: lower case, no port, no brackets, no
    trailing dot; None when it is not one."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        name, bracket, port = netloc[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
        return name if ":" in name and _is_ip(name) else None
    name, _, port = netloc.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    return name if _NAME.match(name) else None


def allowed_host_name(value: str) -> str:
    """An ``--allow-host`` value, checked: a host name or address, no scheme, no port, no path."""
    name = host_name(value)
    if name is None or value.strip().lower().rstrip(".") not in (name, f"[{name}]"):
        raise InputError("--allow-host", got=repr(value)[:80], expected="a host name such as jetson-17.example.com",
                         todo="give the name only: no scheme, port or path")
    return name


class HostAllowList:
    """The names a request's ``Host`` may carry: IP literals, ``localhost`` and ``*.localhost``, the bound
    address, this machine's name (and ``NAME.local``), and ``extra`` (``--allow-host``)."""

    def __init__(self, bound: str, extra: Iterable[str] = ()) -> None:
        self.extra = tuple(dict.fromkeys(allowed_host_name(n) for n in extra))
        machine = socket.gethostname().lower().rstrip(".")
        own = [n for n in (bound.lower(), machine, f"{machine}.local") if n and not _is_ip(n)]
        self.names = frozenset((*own, *self.extra))

    def allows(self, name: str) -> bool:
        return _is_ip(name) or name == "localhost" or name.endswith(".localhost") or name in self.names

    def expected(self) -> str:
        return ", ".join(["an IP address", "localhost", *sorted(self.names)])


class BrowserSafety:
    """ASGI middleware in front of every route: the Host allow-list (421), same-origin browser requests
    only (403), and the security headers on every response."""

    def __init__(self, app: ASGIApp, hosts: HostAllowList) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS:
                    if key not in headers:
                        headers.append(key, value)
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            await JSONResponse(refused.body(), status_code=refused.status)(scope, receive, send_with_headers)
            scope["app"].state.core.metrics.request(REFUSED, refused.status, 0.0)  # an attack shows in /metrics
            return
        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope: Scope) -> ProtocolError | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None:  # HTTP/1.0 clients may leave it out; browsers never do
            name = host_name(host)
            if name is None or not self.hosts.allows(name):
                return ProtocolError(421, "this server does not answer to that host name",
                                     got=f"Host: {host[:100]}", expected=self.hosts.expected(),
                                     todo="if that name is this device, restart with --allow-host NAME")
        if scope["method"] in ("GET", "HEAD") and scope["path"] in LINKABLE:
            return None
        site = headers.get("sec-fetch-site")
        if site is not None and site not in SAFE_SITES:
            return ProtocolError(403, "a request from another site", got=f"Sec-Fetch-Site: {site[:40]}",
                                 expected="requests from this server's own page, or from a client that is not "
                                          "a browser", todo="use the page at / of this server")
        origin = headers.get("origin")
        if origin is not None and not self.same_origin(origin, host):
            return ProtocolError(403, "a request from another origin", got=f"Origin: {origin[:100]}",
                                 expected=f"this server's own origin (http(s)://{(host or '?')[:100]})",
                                 todo="use the page at / of this server")
        return None

    def same_origin(self, origin: str, host: str | None) -> bool:
        """``Origin`` is the server's own (its host and port as the request's ``Host`` says them), or a page
        served under an ``--allow-host`` name (a reverse proxy that rewrites ``Host``)."""
        scheme, sep, netloc = origin.strip().partition("://")
        if not sep or scheme.lower() not in ("http", "https") or host is None:
            return False  # "null" (a sandboxed frame, a file: page, a redirect) included
        if netloc.lower() == host.strip().lower():
            return True
        return host_name(netloc) in self.hosts.extra


class Access:
    """The token: once given, the endpoints that change the device need it; beyond loopback they need one
    (403 without a token file), and so do the endpoints that reveal field data. Without the token, a change
    comes as JSON, a multipart upload or no body (:data:`CHANGE_BODIES`)."""

    def __init__(self, token: str | None, host: str) -> None:
        self.token = token
        self.host = host
        #: the token is needed to change the device
        self.required = token is not None or not is_loopback(host)
        #: the token is needed to read the device's field data
        self.reading_required = not is_loopback(host)

    def check(self, request: Request, *, changes: bool) -> None:
        """A request to an endpoint that changes the device (``changes``) or reveals its field data."""
        given = request.headers.get("authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-edgexfer-token", "")
        valid = self.token is not None and hmac.compare_digest(given.encode(), self.token.encode())
        if (self.required if changes else self.reading_required) and not valid:
            does = "changes the device" if changes else "reveals the device's field data"
            if self.token is None:
                raise ProtocolError(403, f"this endpoint {does} and the server listens beyond loopback",
                                    got=f"--host {self.host} without --token-file",
                                    expected="a token file", todo="restart with --token-file FILE")
            raise ProtocolError(401, f"missing or wrong token (this endpoint {does})",
                                got="no token" if not given else "a wrong token",
                                expected="Authorization: Bearer <the token in --token-file>",
                                todo="send the token in the Authorization header")
        if changes and not valid:
            media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
            if media not in CHANGE_BODIES and not (media.startswith("application/") and media.endswith("+json")):
                raise ProtocolError(415, "a change to the device comes as JSON", got=f"Content-Type: {media[:60]}",
                                    expected="application/json (or a multipart upload to /v1/label)",
                                    todo="curl: add -H 'Content-Type: application/json'")


# ------------------------------------------------------------------------------------------------ the page
class _InlineCode(HTMLParser):
    """The page's inline scripts, style elements and style attributes, as the browser hashes them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self.style_attributes: list[str] = []
        self._open: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("style") is not None:
            self.style_attributes.append(found["style"] or "")
        if tag == "script" and "src" not in found:
            self.scripts.append("")
            self._open = self.scripts
        elif tag == "style":
            self.styles.append("")
            self._open = self.styles

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open[-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._open = None


def _hashes(texts: list[str]) -> str:
    return " ".join(dict.fromkeys(
        f"'sha256-{base64.b64encode(hashlib.sha256(t.encode()).digest()).decode()}'" for t in texts))


@lru_cache(maxsize=4)
def page_policy(html: bytes) -> str:
    """The page's Content-Security-Policy: its own inline script and styles (by their sha256), images from
    itself, uploads (``blob:``) and its empty icon (``data:``), audio from itself and uploads or recordings
    (``blob:``), requests to itself only; nothing else. The recorder's AudioWorklet module is a script
    file of its own (``script-src 'self'``)."""
    parsed = _InlineCode()
    # the browser hashes the text after the HTML parser's newline normalisation
    parsed.feed(html.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n"))
    parsed.close()
    attributes = f"'unsafe-hashes' {_hashes(parsed.style_attributes)}" if parsed.style_attributes else "'none'"
    return "; ".join([
        "default-src 'none'",
        f"script-src 'self' {_hashes(parsed.scripts)}".rstrip(),
        f"style-src 'self' {_hashes(parsed.styles)}".rstrip(),
        f"style-src-attr {attributes}",
        "img-src 'self' blob: data:",
        "media-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
