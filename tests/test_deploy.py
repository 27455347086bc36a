"""The systemd units under deploy/systemd/: hardened, and clean under ``systemd-analyze verify``."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "deploy" / "systemd"
INSTALLED_BINARY = "/opt/edgexfer/venv/bin/edgexfer"


def _verify(unit: Path, tmp_path: Path, instance: str | None = None) -> list[str]:
    """Complaints of ``systemd-analyze verify`` about the unit (it exits 0 on unknown keys: read its output)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here (Debian: apt install systemd)")
    # verify checks that ExecStart's program exists: point it at this environment's edgexfer
    local = tmp_path / unit.name
    local.write_text(unit.read_text().replace(INSTALLED_BINARY, str(Path(sys.executable).parent / "edgexfer")))
    target = local if instance is None else local.with_name(unit.name.replace("@.", f"@{instance}."))
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(target)], capture_output=True, text=True,
                         cwd=tmp_path)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if unit.name.split("@")[0] in line]
    return lines + ([f"exit code {out.returncode}"] if out.returncode else [])


@pytest.mark.parametrize("name", ["edgexfer-serve.service", "edgexfer-watch@.service"])
def test_unit_passes_systemd_analyze_verify(name, tmp_path):
    unit = UNITS / name
    assert _verify(unit, tmp_path, "front-door" if "@" in name else None) == []


@pytest.mark.parametrize("name", ["edgexfer-serve.service", "edgexfer-watch@.service"])
def test_unit_is_hardened_and_keeps_the_state_private(name):
    text = (UNITS / name).read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, flags=re.M))
    assert settings["User"] == "edgexfer" and settings["StateDirectory"] == "edgexfer"
    assert settings["StateDirectoryMode"] == "0700" and settings["UMask"] == "0077"
    assert settings["ProtectSystem"] == "strict" and settings["NoNewPrivileges"] == "yes"
    assert settings["Restart"] == "on-failure" and settings["CapabilityBoundingSet"] == ""
    assert "--state ${STATE_DIRECTORY}" in settings["ExecStart"]
    if name == "edgexfer-serve.service":
        assert settings["LoadCredential"] == "token:/etc/edgexfer/token"
        assert "--token-file ${CREDENTIALS_DIRECTORY}/token" in settings["ExecStart"]


def test_the_verifier_catches_a_broken_unit(tmp_path):
    """The check above can fail: a misspelt hardening key is reported."""
    broken = tmp_path / "broken" / "edgexfer-serve.service"
    broken.parent.mkdir()
    broken.write_text((UNITS / "edgexfer-serve.service").read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    assert any("NoNewPrivilege" in line for line in _verify(broken, tmp_path))


def test_the_units_pass_options_the_commands_have():
    from click.testing import CliRunner

    from edgexfer.cli import main

    for name, command in (("edgexfer-serve.service", "serve"), ("edgexfer-watch@.service", "watch")):
        exec_start = re.search(r"^ExecStart=(.*)$", (UNITS / name).read_text(), flags=re.M).group(1)
        options = set(re.findall(r"(--[a-z-]+)", exec_start))
        result = CliRunner().invoke(main, ["device", command, "--help"])
        if command == "watch" and result.exit_code != 0:
            pytest.skip("device watch is not in this build")
        assert result.exit_code == 0, result.output
        assert options <= set(re.findall(r"(--[a-z-]+)", result.output)), options
