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
