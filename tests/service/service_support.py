"""A real ``edgexfer device serve`` process on loopback, for the service tests (host and device venvs)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "clipart8-demo"


def demo_images(n: int | None = None) -> list[Path]:
    """The demo images, one class after another, sorted."""
    paths = sorted(p for p in DEMO.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return paths[:n] if n is not None else paths


def new_class_images(n: int, seed: int = 0) -> list[bytes]:
    """JPEGs of a class the demo bundle does not know: coloured checkerboards of random sizes.

    The demo bundle was trained on the demo images, so its head is right on all of them and a retrain on
    them alone can only tie; a new class is what a device learns in the field, and its retrain passes the gate.
    """
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cell = int(rng.integers(12, 40))
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        yy, xx = np.mgrid[0:224, 0:224] // cell
        pixels = np.where(((yy + xx) % 2 == 0)[..., None], a, b).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """``edgexfer ARGS`` in a fresh process of this interpreter (another process, as on a device)."""
    out = subprocess.run([sys.executable, "-m", "edgexfer.cli", *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, cwd=REPO)
    if check and out.returncode != 0:
        raise AssertionError(f"edgexfer {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out


@contextlib.contextmanager
def running_server(state: Path, *args: str, timeout: float = 60.0) -> Iterator[Server]:
    """Start ``device serve --state STATE --port 0 ARGS``; yields once it listens; stops it (SIGTERM) after."""
    log = state.parent / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "edgexfer.cli", "device", "serve", "--state", str(state),
                                 "--port", "0", *args], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            text = log.read_text(errors="replace")
            found = re.search(r"listening on (https?://\S+)", text)
            if found:
                url = found.group(1).rstrip("/")
            elif proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"device serve did not start (rc {proc.poll()}):\n{text[-3000:]}")
            else:
                time.sleep(0.05)
        yield Server(url, proc, log)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path):
        self.url, self.proc, self.log = url, proc, log

    @property
    def hostport(self) -> str:
        return self.url.removeprefix("http://")

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60.0) -> tuple[int, dict, bytes]:
        """(status, headers, body); never raises for an HTTP error status."""
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def json(self, method: str, path: str, payload: object | None = None, headers: dict | None = None,
             body: bytes | None = None) -> tuple[int, dict]:
        if payload is not None:
            body = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        status, _, raw = self.request(method, path, body, headers)
        return status, json.loads(raw)

    def alive(self) -> bool:
        return self.proc.poll() is None
