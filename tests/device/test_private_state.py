"""A device's state is private: 0700 folders and 0600 files; ``device status`` warns about one that is not."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from edgexfer.runtime.device import Device

DEMO = Path(__file__).resolve().parents[2] / "data" / "clipart8-demo"


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if not path.is_symlink():
                out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    out["."] = stat.S_IMODE(root.stat().st_mode)
    return out


def _edgexfer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgexfer.cli", *args], capture_output=True, text=True)


def test_a_new_state_is_0700_with_0600_files_even_under_a_permissive_umask(tmp_path, device_bundle):
    state = tmp_path / "state"
    old = os.umask(0o022)  # the usual umask: what the library must not rely on
    try:
        with Device(state) as dev:
            dev.install(device_bundle)
            dev.learn(sorted((DEMO / "fruit").iterdir())[:12], "fruit")
            dev.retrain(tolerance=1.0)
    finally:
        os.umask(old)
    modes = _modes(state)
    assert {"features.sqlite", "active.json", "heads/2/head.json", "heads/2/head.safetensors", "last_retrain.json",
            "lock"} <= set(modes)
    loose = {p: f"{m:04o}" for p, m in modes.items() if m & 0o077}
    assert not loose, f"readable by others: {loose}"
    assert modes["."] == 0o700 and modes["heads"] == 0o700 and modes["features.sqlite"] == 0o600
    status = json.loads(_edgexfer("device", "status", "--state", str(state), "--json").stdout)
    assert status["warnings"] == []


def test_device_status_warns_about_a_state_others_can_read(tmp_path, device_bundle):
    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(device_bundle)
    os.chmod(state, 0o755)
    os.chmod(state / "features.sqlite", 0o644)
    out = _edgexfer("device", "status", "--state", str(state))
    assert out.returncode == 0
    warning = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "readable by others" in warning[0] and "features.sqlite mode 0644" in warning[0]
    assert f"chmod -R go-rwx {state}" in warning[0]
