"""``edgexfer flash`` against a real OpenSSH server on 127.0.0.1 (temporary host and user keys).

The "device" is a temporary state directory on this machine; its edgexfer is this venv's.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgexfer.flash import FlashError, Target, _check_tensorrt_opset, flash
from edgexfer.runtime.device import Device
from edgexfer.runtime.state import DeviceState

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
VENV_BIN = Path(sys.executable).parent
REMOTE_EDGEXFER = str(VENV_BIN / "edgexfer")



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSshd:
    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = _free_port()
        self.user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "user_key")], check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "stranger_key")], check=True)
        shutil.copy(root / "user_key.pub", root / "authorized_keys")
        host_pub = (root / "host_key.pub").read_text().split()[:2]
        (root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_pub)}\n")
        (root / "sshd_config").write_text(f"""
ListenAddress 127.0.0.1
Port {self.port}
HostKey {root / 'host_key'}
PidFile {root / 'sshd.pid'}
AuthorizedKeysFile {root / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
""")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read().decode()[-500:]) from None
                time.sleep(0.05)
        self.ssh_options = [f"UserKnownHostsFile={root / 'known_hosts'}", "StrictHostKeyChecking=yes"]

    def url(self, state: Path, port: int | None = None) -> str:
        return f"ssh://{self.user}@127.0.0.1:{port or self.port}{state}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("needs OpenSSH (apt-get install -y openssh-server openssh-client)")
    if not Path(REMOTE_EDGEXFER).exists():
        pytest.skip("needs the edgexfer entry point in the venv")
    server = LoopbackSshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.close()


def _flash(sshd, bundle, state: Path, **kw):
    kw.setdefault("identity", sshd.root / "user_key")
    return flash(bundle.root, kw.pop("url", None) or sshd.url(state), remote_edgexfer=REMOTE_EDGEXFER,
                 ssh_options=sshd.ssh_options, **kw)


def _untouched(state: Path, before: bytes | None) -> None:
    active = state / "active.json"
    assert (active.read_bytes() if active.exists() else None) == before
    assert not list(state.glob(".flash-staging-*")) if state.exists() else True


def test_flash_happy_path_installs_and_stores_report(sshd, bundle, tmp_path):
    state = tmp_path / "device" / "state"
    lines: list[str] = []
    report = _flash(sshd, bundle, state, log=lines.append)
    assert "architecture" in lines[0] and "free disk" in lines[0]
    assert report["install"]["head"] == 1 and report["install"]["bundle"] == bundle.manifest.backbone.sha256
    assert report["golden"]["top1_agreement"] == 1.0 and report["golden"]["max_abs_feature_diff"] <= 1e-3
    assert report["preflight"]["edgexfer"] == "0.1.0" and report["preflight"]["arch"]
    assert "onnxruntime" in report["preflight"]["engines"].split(",")
    assert Path(report["preflight"]["python_path"]).parent == VENV_BIN  # from the edgexfer script's #! line
    assert set(report["seconds"]) >= {"preflight", "copy", "verify", "golden", "install", "total"}
    print("flash seconds:", json.dumps(report["seconds"]))
    st = DeviceState(state)
    assert st.active().bundle == bundle.manifest.backbone.sha256
    stored = list((state / "flash").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["install"]["head"] == 1
    assert not list(state.glob(".flash-staging-*"))


def test_flash_cli_carries_trust_root_and_repository_for_air_gapped_updates(sshd, bundle, repo, tmp_path):
    """Through the click commands: flash with --trust-root and --updates-repo, then `device update --dir`."""
    pytest.importorskip("tuf")
    from click.testing import CliRunner
    from fleet_support import variant_head

    from edgexfer.cli_fleet import device_update
    from edgexfer.cli_fleet import flash as flash_cmd

    published = repo.publish(variant_head(bundle, tmp_path / "h.safetensors"), group="all", bundle=bundle.root)
    state = tmp_path / "state"
    args = [str(bundle.root), "--target", sshd.url(state), "--identity", str(sshd.root / "user_key"),
            "--remote-edgexfer", REMOTE_EDGEXFER, "--trust-root", str(repo.root_path()), "--json"]
    for o in sshd.ssh_options:
        args += ["-o", o]
    runner = CliRunner()
    res = runner.invoke(flash_cmd, [*args, "--updates-repo", str(repo.root_dir)])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["updates"] == {"trust_root": "installed", "updates_repo": f"{state}/updates-repo"}
    # no --root: flash installed the trust root
    res = runner.invoke(device_update, ["--state", str(state), "--dir", str(state / "updates-repo"), "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["status"] == "updated" and DeviceState(state).head_record(r["active_head"]).sha256 == published["sha256"]
    # flashing again keeps the trust root the device has (TUF rotates it), and the bundle it has
    res = runner.invoke(flash_cmd, args)
    assert res.exit_code == 0, res.output
    again = json.loads(res.stdout)
    assert again["updates"]["trust_root"] == "kept-existing" and again["install"]["new_bundle"] is False
    assert len(list((state / "flash").glob("*.json"))) == 2
    # a refused key through the CLI: exit status 1 and one line (main's error handler adds "error: ")
    res = runner.invoke(flash_cmd, [*args[:3], "--identity", str(sshd.root / "stranger_key"), *args[5:]])
    assert res.exit_code == 1 and "refused the ssh key" in str(res.exception)


def test_flash_builds_the_engine_on_the_target_once_keyed_by_the_cache_key(sshd, openvino_bundle, tmp_path):
    """Step 3 with a real engine: OpenVINO compiles on the target into state/engines/<key>/ on the first flash
    and the second flash reuses it. (TensorRT takes the same path with its plan: tests/device, `gpu`.)"""
    from edgexfer.runtime.bundle import Bundle

    ov = Bundle.open(openvino_bundle, verify=True)
    state = tmp_path / "state"
    first = _flash(sshd, ov, state, backend="openvino")
    key = first["engine"]["key"]
    assert first["engine"]["backend"] == "openvino" and first["engine"]["built"] is True
    assert (state / "engines" / key / "engine_key.json").is_file() and list((state / "engines" / key).glob("*.blob"))
    assert first["golden"]["backend"] == "openvino" and first["golden"]["max_abs_feature_diff"] <= 1e-3
    assert set(first["seconds"]) >= {"engine", "golden"}
    second = _flash(sshd, ov, state, backend="openvino")
    assert second["engine"]["built"] is False and second["engine"]["key"] == key
    assert second["install"]["new_bundle"] is False


def test_golden_mismatch_on_the_target_keeps_the_previous_bundle_active(sshd, bundle, tmp_path, reseal):
    import io

    import numpy as np

    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(bundle.root)
    before = (state / "active.json").read_bytes()
    bad = tmp_path / "bad-bundle"
    shutil.copytree(bundle.root, bad)
    golden = dict(np.load(bad / "golden.npz"))
    golden["features"] = golden["features"] * 1.5  # a reference the engine no longer reproduces
    buf = io.BytesIO()
    np.savez(buf, **golden)
    reseal(bad, "golden.npz", buf.getvalue())
    from edgexfer.runtime.bundle import Bundle

    with pytest.raises(FlashError, match=r"device install failed.*golden check.*features \(golden, 8 images\): max \|diff\|"):
        _flash(sshd, Bundle.open(bad, verify=True), state)
    _untouched(state, before)
    assert DeviceState(state).head_versions() == [1]


def test_unreachable_host_is_a_clear_error(sshd, bundle, tmp_path):
    state = tmp_path / "state"
    closed_port = _free_port()
    with pytest.raises(FlashError, match="cannot reach the target"):
        _flash(sshd, bundle, state, url=sshd.url(state, port=closed_port))
    assert not state.exists()


def test_refused_key_is_a_clear_error(sshd, bundle, tmp_path):
    state = tmp_path / "state"
    with pytest.raises(FlashError, match="refused the ssh key"):
        _flash(sshd, bundle, state, identity=sshd.root / "stranger_key")
    assert not state.exists()


def test_corrupted_copy_is_refused_and_device_unchanged(sshd, bundle, tmp_path):
    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(bundle.root)
    before = (state / "active.json").read_bytes()
    # an scp that flips one byte of what it delivered ("in transit")
    wrapper = tmp_path / "flaky-scp"
    wrapper.write_text(f"""#!/bin/sh
scp "$@" || exit $?
for last; do :; done
{sys.executable} -c "import sys; p = sys.argv[1]; b = bytearray(open(p, 'rb').read()); b[-7] ^= 1; open(p, 'wb').write(b)" "${{last#*:}}/head.safetensors"
""")
    wrapper.chmod(0o755)
    with pytest.raises(FlashError, match="does not match the bundle.*head.safetensors"):
        _flash(sshd, bundle, state, scp=str(wrapper))
    _untouched(state, before)


def test_full_target_disk_stops_before_copying(sshd, bundle, tmp_path):
    small = tmp_path / "small-disk"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        state = small / "state"
        with pytest.raises(FlashError, match="not enough free disk"):
            _flash(sshd, bundle, state)
        assert not state.exists() or not any(state.iterdir())
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_target_url_is_parsed_strictly():
    t = Target.parse("ssh://nvidia@127.0.0.1:2222/var/lib/edgexfer")
    assert (t.user, t.host, t.port, t.state_dir) == ("nvidia", "127.0.0.1", 2222, "/var/lib/edgexfer")
    for bad in ("127.0.0.1:/x", "ssh://127.0.0.1/x", "ssh://u@h", "http://u@h/x", "ssh://u@h:99999/x"):
        with pytest.raises(FlashError):
            Target.parse(bad)


def test_tensorrt_opset_mismatch_stops_before_copying():
    assert _check_tensorrt_opset("", 17) == "no TensorRT on the target"
    assert _check_tensorrt_opset("8.6.2.3", 17).startswith("opset 17 ok")
    with pytest.raises(FlashError, match="opset 18, TensorRT 8.5.2"):
        _check_tensorrt_opset("8.5.2", 18)
    assert _check_tensorrt_opset("7.1.3", 17).startswith("not checked")
