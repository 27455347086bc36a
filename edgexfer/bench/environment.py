"""What a figure was measured on: CPU (model and the ISA flags engines decide on), cores, governor, load,
library versions; on a Jetson also power mode, clocks and temperatures (``environment`` in bench.json)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from edgexfer.bench.report import CpuRecord, Environment, Jetson
from edgexfer.runtime.cpu import cpu_features

#: report name -> distribution whose version is recorded
VERSIONS: tuple[tuple[str, str], ...] = (
    ("edgexfer", "edgexfer"), ("numpy", "numpy"), ("pillow", "pillow"), ("onnxruntime", "onnxruntime"),
    ("openvino", "openvino"), ("tensorrt", "tensorrt"), ("torch", "torch"),
    ("mlperf_loadgen", "mlcommons-loadgen"), ("matplotlib", "matplotlib"))


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(args: list[str], timeout: float = 5.0) -> dict[str, Any]:
    if shutil.which(args[0]) is None:
        return {"available": False}
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return {"available": True, "returncode": done.returncode,
                "output": (done.stdout or done.stderr).strip()[:2000]}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": True, "error": str(exc)[:200]}


def _tegrastats_line(seconds: float = 1.5) -> str | None:
    """One line of tegrastats (Jetson), read from a process this function starts and stops."""
    if shutil.which("tegrastats") is None:
        return None
    try:
        proc = subprocess.Popen(["tegrastats", "--interval", "500"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None
    try:
        time.sleep(seconds)
    finally:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    lines = [ln for ln in (out or "").splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _jetson() -> Jetson | None:
    tegra = _read("/etc/nv_tegra_release")
    dt_model = _read("/proc/device-tree/model")
    if not (tegra or (dt_model and "jetson" in dt_model.lower())):
        return None
    return Jetson(model=(dt_model or "").rstrip("\x00") or None, l4t=tegra.splitlines()[0] if tegra else None,
                  nvpmodel=_command(["nvpmodel", "-q"]), jetson_clocks=_command(["jetson_clocks", "--show"]),
                  tegrastats=_tegrastats_line())


def capture_environment(threads: int | None) -> Environment:
    """CPU (model and the ISA flags that decide what engines compute), cores, governor, load, library
    versions; on a Jetson also power mode, clocks and temperatures."""
    cpuinfo = _read("/proc/cpuinfo") or ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.lower().startswith(("model name", "hardware", "cpu model"))), platform.processor() or None)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    temps = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        kind, temp = _read(str(zone / "type")), _read(str(zone / "temp"))
        if temp and temp.lstrip("-").isdigit():
            temps[kind or zone.name] = int(temp) / 1000.0
    hidden = [f.strip() for f in os.environ.get("EDGEXFER_HIDE_CPU_FLAGS", "").split(",") if f.strip()]
    return Environment(
        cpu_model=model,
        # what keys engines and decides precisions: flags, not the model name (see edgexfer.runtime.cpu)
        cpu=CpuRecord(**cpu_features().to_dict(), hidden_flags=hidden),
        machine=platform.machine(),
        logical_cores=os.cpu_count(),
        cores_usable=affinity,
        threads_requested=threads,
        governor=_read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        load_average_1_5_15=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        os=platform.platform(),
        python=platform.python_version(),
        versions={name: _version(dist) for name, dist in VERSIONS},
        temperatures_c=temps or None,
        jetson=_jetson(),
    )


def cpu_line(env: dict[str, Any]) -> str:
    """``CPU model (machine; ISA: flag, flag)`` of a bench.json ``environment``: what a figure was measured
    on, for every table."""
    cpu = env.get("cpu") or {}
    flags = ", ".join(cpu.get("flags") or []) or "no extended ISA"
    hidden = f"; hidden from edgexfer: {', '.join(cpu['hidden_flags'])}" if cpu.get("hidden_flags") else ""
    return f"CPU {cpu.get('model') or env.get('cpu_model')} ({cpu.get('machine') or env.get('machine')}; " \
           f"ISA: {flags}{hidden})"
