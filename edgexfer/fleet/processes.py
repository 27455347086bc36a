"""The Flower processes ``edgexfer fleet serve`` starts, and how they end with it.

Flower detaches its own children (``flower-superexec``, ``flwr-serverapp``) into new sessions and lets
each watch its parent's pid; nothing in Flower watches ``fleet serve``. So every process serve starts
gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG)``): a SIGKILL'd serve takes its SuperLink
and ``flwr run`` with it, and the SuperLink's own watches take the rest. :func:`stop` ends a process,
its group and every descendant it had (read from ``/proc`` before the first signal), and
:func:`require_free_port` refuses to start on an address something already listens on, so that a new
serve never talks to an orphan of an old one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from edgexfer.runtime.errors import EdgexferError

PR_SET_PDEATHSIG = 1  # from /usr/include/linux/prctl.h


class FleetError(EdgexferError):
    """The federation could not start or did not finish."""


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: nobody would send the signal
            os._exit(1)

    return preexec


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children first), from ``/proc``; [] where there is no ``/proc``."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a process this module started, its process group and all its descendants (detached ones too)."""
    if process is None:
        return
    others = descendants(process.pid) if process.poll() is None else []
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
    # Flower's detached children watch their parent's pid (about once a second): give them that, then insist
    deadline = time.monotonic() + 3.0
    while any(_alive(p) for p in others) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all([p for p in others if _alive(p)], signal.SIGTERM)
    deadline = time.monotonic() + 3.0
    while any(_alive(p) for p in others) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all([p for p in others if _alive(p)], signal.SIGKILL)


def require_free_port(host: str, port: int) -> None:
    """Fail in one line when ``host:port`` cannot be bound (an orphaned SuperLink, or anything else)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            raise FleetError("the fleet address is in use", got=f"{host}:{port}: {exc.strerror or exc}",
                             expected="a free port for the SuperLink",
                             todo=f"stop what listens there (ss -ltnp 'sport = :{port}'; an earlier fleet serve's "
                                  "SuperLink?) or choose another --address") from None
