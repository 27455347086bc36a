"""Fleet learning on Flower's simulation engine (``flwr[simulation]``, Ray): virtual devices, same apps.

:func:`simulate` runs a federation of ``num_devices`` virtual SuperNodes with Flower's
``run_simulation`` on its Ray backend. The ServerApp is :func:`edgexfer.fleet.server_app.build_server_app`
(``run_federation``: sampling, checks, robust merge, evaluation, the result bundle, as ``fleet serve``
runs it) and the ClientApp is :func:`edgexfer.runtime.fleet_client.build_client_app` (what a device's
SuperNode runs); the only difference is where a node's labelled features come from: a virtual node
reads its partition (Flower's ``partition-id`` node config) of a pool file (:func:`write_pool`) instead
of a device's feature cache. Messages go through Flower's in-memory SuperLink state and Ray actors,
with Flower's own serialization of records.

A pool file is an ``.npz`` with ``features`` float32 [M, D], ``labels`` [M] (class names),
``backbone_sha256`` and the partitions as ``offsets`` [N + 1] into ``indices``: node ``k`` holds
``features[indices[offsets[k]:offsets[k + 1]]]``. :func:`non_iid_partitions` draws them.

:class:`MemorySampler` samples the proportional set size (PSS: shared pages split among the processes
sharing them) of the driver and every process it started (Ray's GCS, raylet, workers) from ``/proc``.
"""
from __future__ import annotations

import functools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import InputError

__all__ = ["MemorySampler", "backend_config", "non_iid_partitions", "pool_training_set", "simulate", "write_pool"]


def non_iid_partitions(labels: Sequence[str], num_devices: int, *, seed: int = 0, sizes: tuple[int, int] = (2, 50),
                       classes_per_device: tuple[int, int] = (1, 4)) -> list[np.ndarray]:
    """One index array into ``labels`` per device: non-IID, sizes log-uniform in ``sizes``.

    Device ``k`` draws its number of classes uniformly from ``classes_per_device``, the classes at
    random, its size ``n`` log-uniformly from ``sizes`` (at least one sample per class it holds), and
    its samples at random from those classes' samples: a sample is on one device at most only while
    the pool has enough of the class; after that pool samples repeat across devices (never within one).
    """
    lo, hi = sizes
    if not 1 <= lo <= hi or num_devices < 1:
        raise InputError("partition sizes are out of range", got=f"sizes={sizes}, devices={num_devices}",
                         expected="1 <= low <= high, devices >= 1")
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    by_class = {c: np.flatnonzero(labels == c) for c in classes}
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(num_devices):
        k = int(rng.integers(classes_per_device[0], min(classes_per_device[1], len(classes)) + 1))
        held = rng.choice(len(classes), size=k, replace=False)
        n = max(k, int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
        share = rng.multinomial(n - k, np.full(k, 1.0 / k)) + 1
        picks = [rng.choice(by_class[classes[c]], size=min(int(m), len(by_class[classes[c]])), replace=False)
                 for c, m in zip(held, share)]
        parts.append(np.sort(np.concatenate(picks)).astype(np.int64))
    return parts


def write_pool(path: Path, features: np.ndarray, labels: Sequence[str], parts: Sequence[np.ndarray],
               backbone_sha256: str) -> None:
    """The pool file the virtual nodes read (see the module docstring)."""
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    np.savez(path, features=np.asarray(features, dtype=np.float32), labels=np.asarray(labels).astype(str),
             indices=np.concatenate(parts).astype(np.int64), offsets=offsets,
             backbone_sha256=np.array(backbone_sha256))


@functools.lru_cache(maxsize=2)
def _pool(path: str) -> dict[str, Any]:
    """A pool file, read once per process (each Ray worker reads it on its first message)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _pool_set(path: str, context: Any) -> tuple[str, np.ndarray, list[str]]:
    pool = _pool(path)
    k = int(context.node_config["partition-id"])
    if not 0 <= k < len(pool["offsets"]) - 1:
        raise InputError("the virtual node has no partition in the pool", got=f"partition-id {k}",
                         expected=f"0..{len(pool['offsets']) - 2}", todo="write the pool with one partition per node")
    idx = pool["indices"][pool["offsets"][k]:pool["offsets"][k + 1]]
    return str(pool["backbone_sha256"]), pool["features"][idx], pool["labels"][idx].tolist()


def pool_training_set(path: str | Path) -> Callable[[Any], tuple[str, np.ndarray, list[str]]]:
    """The ``training_set`` of :func:`~edgexfer.runtime.fleet_client.build_client_app` for virtual nodes."""
    return functools.partial(_pool_set, str(Path(path).resolve()))


def backend_config(cpus: int | None = None, *, cpus_per_client: float = 1.0, object_store_mb: int = 256,
                   worker_niceness: int = 0) -> dict[str, Any]:
    """Flower's Ray backend settings: one actor per ``cpus_per_client`` of ``cpus`` (all, by default).

    A head's local round is single-threaded L-BFGS on at most a few hundred samples, so one CPU per
    actor; the object store holds only messages of a few tens of kB (a head), so a small one. Ray runs
    its workers at nice 15 by default: on a machine shared with other work the virtual devices then get
    what the other processes leave (6 % of a core each under a load of 12, measured), so 0 here.
    """
    cpus = cpus or os.cpu_count() or 1
    return {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                          "object_store_memory": object_store_mb * 1024 * 1024,
                          "_system_config": {"worker_niceness": worker_niceness}}}


def _pss_kb(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in kB, from ``/proc/PID/smaps_rollup``; (0, 0) once it is gone."""
    pss = rss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pss, rss


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, from ``/proc/PID/stat``; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # fields from the 3rd on: utime, stime are the 14th, 15th
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _kind(pid: int) -> str:
    """What a process is: Ray names its workers ``ray::ClassName`` (``ray::IDLE`` before they start)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return "gone"
    if argv[0].startswith("ray::"):  # an actor's title gains the running method: ray::ClientAppActor.run
        return argv[0].split()[0].split(".")[0]
    if Path(argv[0]).name.startswith("python"):  # Ray's Python helpers (log monitor, dashboard): their script
        return f"python {next((Path(a).name for a in argv[1:] if a.endswith('.py')), '')}".strip()
    return Path(argv[0]).name or "?"


class MemorySampler:
    """Samples the memory of this process and its descendants every ``interval`` seconds (a thread).

    ``peaks()``: the peak of the total PSS, the driver's peak RSS, and per kind of process the most
    processes seen at once, the peak PSS and RSS of one of them and the CPU seconds of all of them
    (the driver's: the ServerApp thread and Flower's simulation engine; as last sampled).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.total_pss_kb = 0
        self.driver_rss_kb = 0
        self.kinds: dict[str, dict[str, int]] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds when last seen)
        self.samples = 0

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        from edgexfer.fleet.processes import descendants

        me = os.getpid()
        total, seen = 0, {}
        for pid in [me, *descendants(me)]:
            pss, rss = _pss_kb(pid)
            total += pss
            if pid == me:
                self.driver_rss_kb = max(self.driver_rss_kb, rss)
                self.cpu[pid] = ("driver", _cpu_seconds(pid))
                continue
            kind = _kind(pid)
            if kind == "gone" or not pss:
                continue
            self.cpu[pid] = (kind, max(self.cpu.get(pid, ("", 0.0))[1], _cpu_seconds(pid)))
            seen[kind] = seen.get(kind, 0) + 1
            entry = self.kinds.setdefault(kind, {"processes": 0, "pss_kb": 0, "rss_kb": 0})
            entry["pss_kb"], entry["rss_kb"] = max(entry["pss_kb"], pss), max(entry["rss_kb"], rss)
        for kind, n in seen.items():
            self.kinds[kind]["processes"] = max(self.kinds[kind]["processes"], n)
        self.total_pss_kb = max(self.total_pss_kb, total)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def peaks(self) -> dict[str, Any]:
        mb = 1 / 1024
        cpu: dict[str, float] = {}
        for kind, seconds in self.cpu.values():
            cpu[kind] = cpu.get(kind, 0.0) + seconds
        return {"total_pss_mb": round(self.total_pss_kb * mb, 1), "driver_rss_mb": round(self.driver_rss_kb * mb, 1),
                "by_process": {k: {"processes": v["processes"], "peak_pss_mb": round(v["pss_kb"] * mb, 1),
                                   "peak_rss_mb": round(v["rss_kb"] * mb, 1)} for k, v in sorted(self.kinds.items())},
                "cpu_seconds": {k: round(v, 1) for k, v in sorted(cpu.items())},
                "samples": self.samples, "interval_s": self.interval}


def simulate(settings: Any, pool: Path, num_devices: int, *, backend: dict[str, Any] | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """Run the federation of ``settings`` (a :class:`~edgexfer.fleet.server_app.FleetSettings`) on
    ``num_devices`` virtual nodes reading ``pool``; returns ``run_federation``'s record with ``seconds``
    (the whole simulation, Ray's start included) and ``memory`` (:meth:`MemorySampler.peaks`)."""
    from edgexfer.runtime.optional import require

    require("ray", "Flower's simulation engine (pip install 'edgexfer[fleet-sim]')")
    from flwr.simulation import run_simulation

    from edgexfer.fleet.server_app import build_server_app
    from edgexfer.runtime.fleet_client import build_client_app

    with np.load(pool, allow_pickle=False) as data:
        partitions = len(data["offsets"]) - 1
    if partitions != num_devices:
        raise InputError("the pool's partitions do not match the virtual nodes", got=f"{partitions} partitions",
                         expected=f"{num_devices}", todo="write the pool with one partition per node")
    from threadpoolctl import threadpool_limits

    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    # one BLAS thread in the driver: the ServerApp's products are small, and a threaded OpenBLAS call from
    # the ServerApp's thread once spun for minutes in exec_blas before round 1 (seen with 1,000 nodes)
    with MemorySampler(interval=1.0) as memory, threadpool_limits(limits=1, user_api="blas"):
        run_simulation(server_app=build_server_app(settings, on_record=records.append),
                       client_app=build_client_app(pool_training_set(pool)), num_supernodes=num_devices,
                       backend_config=backend or backend_config(), verbose_logging=verbose)
    if not records:
        raise InputError("the simulated federation did not finish", got="no record from the ServerApp",
                         expected="a record", todo="see the log above (fleet failed reason=...)")
    return {**records[0], "seconds": round(time.perf_counter() - started, 2), "memory": memory.peaks()}
