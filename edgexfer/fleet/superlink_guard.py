"""``flower-superlink`` whose Control and Runtime APIs answer only the server's own host.

Flower 1.42 serves its Fleet, Control and Runtime APIs on one HTTP port, and its open-source Control API
has no credentials: anyone who can reach the port can ``flwr supernode register`` a key of their own,
which is all SuperNode authentication checks (issue 24, D2). ``edgexfer fleet serve`` therefore runs
the SuperLink through :func:`main`: the same ``flower-superlink``, with an ASGI middleware in front of
Flower's own that answers 403 to every request from another host except the Fleet API's
(``/v1/fleet/...``, what a SuperNode uses) and the health check. Registering keys (``--auth-keys``),
submitting the run and the ServerApp's Runtime API all come from the server's host.

Run as ``python -m edgexfer.fleet.superlink_guard [flower-superlink options]``.
"""
from __future__ import annotations

import ipaddress
import json
from typing import Any

#: paths another host may reach: the Fleet API (SuperNodes) and the health check
REMOTE_PATHS = ("/v1/fleet/", "/health")


def remote_allowed(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p) for p in REMOTE_PATHS)


def is_local(client: Any) -> bool:
    """Whether an ASGI ``client`` (host, port) is this host's loopback (a unix socket counts as local)."""
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)


class LocalControlOnly:
    """ASGI middleware: non-Fleet requests from another host get a 403 JSON body, Flower never sees them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and not remote_allowed(scope.get("path", "")) and not is_local(scope.get("client")):
            body = json.dumps({"detail": "this API answers only the fleet server's own host"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def install() -> None:
    """Put :class:`LocalControlOnly` first in the middleware of every SuperLink app this process creates."""
    from flwr.superlink import main as superlink_main
    from starlette.middleware import Middleware

    flower_middleware = getattr(superlink_main, "_get_middleware", None)
    if flower_middleware is None:  # pragma: no cover - another Flower: refuse rather than run unguarded
        raise SystemExit("edgexfer: this Flower has no flwr.superlink.main._get_middleware; the SuperLink's Control API "
                         "cannot be limited to this host | see constraints.txt for the Flower edgexfer is tested with")
    if getattr(flower_middleware, "edgexfer_guard", False):
        return

    def middleware() -> list[Any]:
        return [Middleware(LocalControlOnly), *flower_middleware()]

    middleware.edgexfer_guard = True  # type: ignore[attr-defined]
    superlink_main._get_middleware = middleware


def main() -> None:
    from flwr.superlink.cli.flower_superlink import flower_superlink

    install()
    flower_superlink()


if __name__ == "__main__":
    main()
