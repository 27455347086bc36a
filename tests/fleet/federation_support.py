"""Helpers of the fleet-learning tests: non-IID device states from clipart8, and a real local deployment.

A federation here is real Flower processes on loopback: ``edgexfer fleet serve`` (a SuperLink and the
ServerApp, through ``flwr run``) and one ``edgexfer device federate`` (a SuperNode) per device state.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgexfer.runtime.device import Device

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "clipart8-demo"
HELD_OUT_PER_CLASS = 21


@dataclass
class Fleet:
    states: list[Path]
    val_dir: Path
    held: list[dict[str, int]]  #: per device: class -> samples


def make_fleet(bundle: Path, clipart8: Path, root: Path, n_devices: int, seed: int = 0) -> Fleet:
    """``n_devices`` states, each holding 2-4 classes of clipart8 (every class on at least one device).

    21 images per class are held out (never on a device; none of the demo images the bundle's head
    was trained on); each device's images go through ``Device.learn``, so their features are computed
    by the device's own engine and cache.
    """
    classes = sorted(p.name for p in clipart8.iterdir() if p.is_dir())
    split_rng, owner_rng = random.Random(seed), random.Random(seed + 1)
    held = [owner_rng.sample(classes, owner_rng.randint(2, 4)) for _ in range(n_devices)]
    for i, c in enumerate(classes):
        if not any(c in h for h in held):
            held[i % n_devices].append(c)
    val_dir = root / "val"
    parts: list[dict[str, list[str]]] = [{} for _ in range(n_devices)]
    for c in classes:
        files = sorted(p for p in (clipart8 / c).iterdir() if p.is_file())
        demo = {p.name for p in (DEMO / c).iterdir()} if (DEMO / c).is_dir() else set()
        rest = [f for f in files if f.name not in demo]
        split_rng.shuffle(rest)
        val = set(rest[:HELD_OUT_PER_CLASS])
        (val_dir / c).mkdir(parents=True)
        for f in val:
            (val_dir / c / f.name).symlink_to(f)
        owners = [k for k in range(n_devices) if c in held[k]]
        for j, f in enumerate(f for f in files if f not in val):
            parts[owners[j % len(owners)]].setdefault(c, []).append(str(f))
    template = root / "template"
    with Device(template) as dev:
        dev.install(bundle)
    states = []
    for k in range(n_devices):
        state = root / f"device-{k}"
        shutil.copytree(template, state, symlinks=True)
        with Device(state) as dev:
            for c, paths in sorted(parts[k].items()):
                dev.learn(paths, c)
        states.append(state)
    return Fleet(states, val_dir, [{c: len(v) for c, v in sorted(p.items())} for p in parts])


#: a sitecustomize that sets a wrong wall clock in the processes that have it on PYTHONPATH
WRONG_CLOCK = Path(__file__).resolve().parent / "wrong_clock"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edgexfer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgexfer.cli", *args]


@dataclass
class Deployment:
    """``fleet serve`` plus SuperNodes as child processes; :meth:`close` stops whatever is left."""

    root: Path
    port: int = field(default_factory=free_port)
    server: subprocess.Popen | None = None
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def serve(self, *args: str, host: str = "127.0.0.1", cwd: Path | None = None) -> subprocess.Popen:
        self.server_log = self.root / "serve.log"
        self.server = subprocess.Popen(
            edgexfer_cmd("fleet", "serve", "--address", f"{host}:{self.port}", "--json", *args),
            stdout=subprocess.PIPE, stderr=open(self.server_log, "wb"), start_new_session=True, text=True, cwd=cwd)
        return self.server

    def join(self, state: Path, *args: str, clock_offset_s: float | None = None) -> subprocess.Popen:
        """Start ``device federate``; with ``clock_offset_s`` the device's wall clock (and its ClientApp
        processes') is that many seconds off (``wrong_clock/sitecustomize.py`` says how)."""
        log = open(self.root / f"node-{len(self.nodes)}.log", "wb")
        cmd = edgexfer_cmd("device", "federate", "--state", str(state), "--server", f"127.0.0.1:{self.port}", *args)
        env = None
        if clock_offset_s is not None:
            path = os.pathsep.join(filter(None, [str(WRONG_CLOCK), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": path, "EDGEXFER_TEST_CLOCK_OFFSET_S": str(clock_offset_s)}
        node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.nodes.append(node)
        return node

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server_log.exists() and text in self.server_log.read_text(errors="replace"):
                return
            if self.server is not None and self.server.poll() is not None:
                raise AssertionError(f"fleet serve exited: {self.server_log.read_text()[-2000:]}")
            time.sleep(0.5)
        raise AssertionError(f"no {text!r} in the server log after {timeout} s: {self.server_log.read_text()[-2000:]}")

    def result(self, timeout: float) -> tuple[int, str]:
        assert self.server is not None
        out, _ = self.server.communicate(timeout=timeout)
        return self.server.returncode, out

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL the process group: the device's SuperNode dies mid-round, nothing is cleaned up."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    def close(self) -> None:
        for p in [*self.nodes, self.server]:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in [*self.nodes, self.server]:
            if p is not None:
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def accuracy(head, features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(head.classes)[head.logits(features).argmax(1)] == labels))


def process_tree(pid: int) -> set[int]:
    """Live descendants of ``pid`` from /proc (Flower detaches its children into new sessions: not the group)."""
    from edgexfer.fleet.processes import descendants

    return set(descendants(pid))


def running(pids: set[int]) -> set[int]:
    """The pids of ``pids`` that still run (zombies count as gone)."""
    alive = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive


def host_address() -> str | None:
    """This machine's address on its default route (not loopback): where another host would reach it."""
    import ipaddress

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))  # UDP: nothing is sent, the kernel only picks the interface
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def flower_home(path: Path, address: str, ca: Path) -> Path:
    """An FLWR_HOME whose default SuperLink is ``address`` over TLS with ``ca``: what ``flwr`` on another host has."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.toml").write_text(f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "{address}"\n'
                                      f'root-certificates = "{ca.resolve()}"\n')
    return path
