"""Start ``device serve``: open the engine, bind the socket, run uvicorn (HTTP or HTTPS) until SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.optional import require
from edgexfer.runtime.service.core import ServiceConfig, ServiceCore


def read_token(path: str | Path) -> str:
    """The token in ``path`` (one line). A file others can read is refused: the token guards the device."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise InputError("cannot read the token file", got=f"{path}: {exc.strerror}", expected="a readable file",
                         todo="create it with: umask 077; openssl rand -hex 32 > FILE") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InputError("token file is readable by others", got=f"{path} mode {stat.S_IMODE(mode):04o}",
                         expected="mode 0600 or 0400", todo=f"chmod 600 {path}")
    if len(text) < 16 or "\n" in text:
        raise InputError("token", got=f"{len(text)} characters" + (" over several lines" if "\n" in text else ""),
                         expected="one line of at least 16 characters", todo="openssl rand -hex 32 > FILE")
    return text


def check_tls(cert: str | Path | None, key: str | Path | None) -> bool:
    """Whether TLS is asked for (both files given); the pair is loaded once here, so that a wrong file is a
    one-line error at start instead of a traceback from uvicorn."""
    if (cert is None) != (key is None):
        raise InputError("TLS needs a certificate and its key", got="--tls-cert" if key is None else "--tls-key",
                         expected="both --tls-cert FILE and --tls-key FILE", todo="give both, or neither")
    if cert is None:
        return False
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
        raise InputError("cannot load the TLS certificate and key", got=f"{cert}, {key}: {why}",
                         expected="a PEM certificate (chain) and its PEM private key, unencrypted",
                         todo="openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                              "-keyout key.pem -out cert.pem -days 365 -subj /CN=NAME") from None
    return True


def serve(state: str | Path | None, *, host: str = "127.0.0.1", port: int = 8080, config: ServiceConfig | None = None,
          token_file: str | Path | None = None, access_log: bool = False, allow_hosts: Iterable[str] = (),
          tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
          on_ready: Callable[[str], None] | None = None, grpc_port: int | None = None) -> None:
    """Run the service in this thread until interrupted. ``port=0`` picks a free port; ``on_ready`` gets the URL.
    ``allow_hosts``: more ``Host`` names to answer (``--allow-host``); ``tls_cert``, ``tls_key``: serve HTTPS.
    ``grpc_port``: serve KServe v2 over gRPC there too (0: a free port), in the same event loop."""
    for module in ("starlette", "uvicorn", "multipart", "prometheus_client",
                   *(("grpc", "google.protobuf") if grpc_port is not None else ())):
        require(module, "edgexfer device serve")
    import uvicorn

    from edgexfer.runtime.service.access import HostAllowList
    from edgexfer.runtime.service.app import create_app, is_loopback

    token = read_token(token_file) if token_file is not None else None
    tls = check_tls(tls_cert, tls_key)
    hosts = HostAllowList(host, allow_hosts)  # a wrong --allow-host fails here, before the engine opens
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    core = ServiceCore(state, config)
    model = core.open()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says TCP; without
    # it every response (headers, then body: two writes) waits ~40 ms for the client's delayed ACK (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        # listening before "listening on" is printed: connections wait in the backlog until uvicorn accepts
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        core.close()
        raise InputError("cannot listen", got=f"{host}:{port}: {exc.strerror}", expected="a free port on this host",
                         todo="pick another --port, or stop what listens there") from None
    bound = sock.getsockname()[1]
    url = f"{'https' if tls else 'http'}://{host if ':' not in host else f'[{host}]'}:{bound}/"
    app = create_app(core, token=token, host=host, allow_hosts=hosts.extra)
    tls_files = {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)} if tls else {}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="off",
                                           timeout_graceful_shutdown=5, **tls_files))
    log = logging.getLogger("edgexfer.serve")
    log.info("model %s head %d on %s/%s (%s); batching max %d, %.1f ms", model.name, model.head_version,
             model.backend, core.config.precision, model.execution.get("inference_precision"),
             core.config.max_batch, core.config.max_queue_delay_ms)
    if not is_loopback(host) and token is None:
        log.warning("listening on %s without --token-file: label, retrain, rollback and the field data "
                    "(review, heads, status) answer 403", host)
    log.info("answering Host names: %s", hosts.expected())

    def announce(grpc_address: str | None = None) -> None:
        if grpc_address is not None:
            print(f"gRPC (KServe v2) listening on {grpc_address}", file=sys.stderr, flush=True)
        print(f"listening on {url} (pid {os.getpid()})", file=sys.stderr, flush=True)
        if on_ready is not None:
            on_ready(url)

    try:
        if grpc_port is None:
            announce()
            server.run(sockets=[sock])
        else:
            from edgexfer.runtime.service.grpc_service import serve_both

            serve_both(server, [sock], core, host, grpc_port, announce,
                       (Path(tls_cert), Path(tls_key)) if tls else None)
    finally:
        core.close()
        sock.close()
