"""Helpers of the fleet tests: a loopback HTTP server, head variants, the signing backend."""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.heads import Head
from edgexfer.runtime.optional import is_installed

#: the constant-time signer when pyca/cryptography is installed, else the explicit reference one
SIGNER = "cryptography" if is_installed("cryptography") else "pure-python"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class LoopbackServer:
    """``http.server`` serving one directory on 127.0.0.1 in a thread."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()



def variant_head(bundle: Bundle, path: Path, *, scale: float = 1.01, permute: bool = False) -> Path:
    """A head for the bundle's backbone: the bundle's own, rescaled (same decisions) or with rows permuted
    (wrong decisions: fails the health check)."""
    head = bundle.head()
    W, b = head.tensors["W"], head.tensors["b"]
    if permute:
        order = np.roll(np.arange(len(head.classes)), 1)
        W, b = W[order], b[order]
    Head(head.kind, head.classes, {"W": (W * scale).astype(np.float32), "b": b}, head.temperature).save(path)
    return path


def _client_reply(state, message):
    """The real ClientApp's reply to ``message`` on the device state ``state`` (in this process)."""
    from flwr.app import Context, RecordDict

    from edgexfer.runtime.fleet_client import app

    return app(message, Context(run_id=1, node_id=7, node_config={"state": str(state)}, state=RecordDict(),
                                run_config={}))


class ReplayGrid:
    """A stand-in for Flower's Grid: each node's reply comes from the real ClientApp, then ``tamper``."""

    def __init__(self, states, tamper):
        self.states = {1000 + i: s for i, s in enumerate(states)}
        self.tamper = tamper

    def get_node_ids(self):
        return list(self.states)

    def send_and_receive(self, messages, timeout=None):
        for message in messages:
            node = message.metadata.dst_node_id
            yield self.tamper(node, _client_reply(self.states[node], message))
