"""A fleet server you can put on a network (issue 24): secure by default, no key registered from another host,
relative paths, no Flower process outliving ``fleet serve``, devices that wait for their key to be registered.

Plain processes, no rounds: ``edgexfer fleet serve`` and ``device federate`` as a user starts them, and
``flwr`` as an intruder on another host would use it (this machine's non-loopback address plays that host).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from federation_support import Deployment, flower_home, free_port, host_address, process_tree, running

pytest.importorskip("flwr", reason="fleet learning needs the `fleet` extra (flwr)")

pytestmark = pytest.mark.slow

FLWR = str(Path(sys.executable).parent / "flwr")


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FLWR, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "FLWR_HOME": str(home)})


def _status(url: str, ca: Path) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as answer:
        return answer.code


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while running(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return running(pids)


def test_serve_needs_tls_and_keys_takes_relative_paths_and_lets_no_other_host_register_a_key(device_bundle, tmp_path):
    from edgexfer.fleet.deployment import make_node_key, make_tls

    address = host_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to play another host from")
    deployment = Deployment(tmp_path)
    try:
        # secure by default: no TLS, no keys and no --insecure is refused before anything starts
        deployment.serve("--bundle", str(device_bundle), "--out", str(tmp_path / "never"), "--wait-timeout", "5")
        code, _ = deployment.result(timeout=60)
        assert code != 0 and "fleet serve needs TLS and the devices' keys" in deployment.server_log.read_text()
        assert not (tmp_path / "never").exists()

        make_tls(tmp_path / "tls", [address])
        make_node_key(tmp_path / "keys" / "device-0.key")
        make_node_key(tmp_path / "intruder" / "intruder.key")
        # D1: relative --tls-dir and --auth-keys, as docs/fleet.md writes them (Flower runs in another directory)
        deployment.serve("--bundle", str(device_bundle), "--out", "out", "--rounds", "1", "--min-devices", "1",
                         "--wait-timeout", "300", "--tls-dir", "tls", "--auth-keys", "keys", host="0.0.0.0", cwd=tmp_path)
        deployment.wait_for_log("fleet registered supernodes=device-0", timeout=120)

        # D2: another host holding the fleet's public ca.crt cannot register a key of its own
        ca = tmp_path / "tls" / "ca.crt"
        intruder = flower_home(tmp_path / "intruder" / "home", f"{address}:{deployment.port}", ca)
        refused = _flwr(intruder, "supernode", "register", str(tmp_path / "intruder" / "intruder.key.pub"), "fleet")
        assert refused.returncode != 0 and "registered successfully" not in refused.stdout, refused.stdout
        assert "answers only the fleet server's own host" in refused.stdout + refused.stderr
        # ...nor reach any other Control or Runtime route; the Fleet API (the devices') stays open to it
        base = f"https://{address}:{deployment.port}"
        assert _status(f"{base}/v1/control/list-nodes", ca) == 403
        assert _status(f"{base}/v1/runtime/pull-messages", ca) == 403
        assert _status(f"{base}/v1/fleet/get-run", ca) != 403  # Flower's own answer to an empty request
        # on the server's host: the one registered key is the only node
        listed = _flwr(tmp_path / ".out.fleet" / "flwr-home", "supernode", "list", "fleet", "--format", "json")
        assert len(json.loads(listed.stdout)["nodes"]) == 1, listed.stdout
    finally:
        deployment.close()


def test_stopping_serve_stops_every_flower_process_and_a_new_serve_never_uses_an_orphan(device_bundle, tmp_path):
    deployment = Deployment(tmp_path)
    args = ("--bundle", str(device_bundle), "--rounds", "1", "--min-devices", "1", "--wait-timeout", "300", "--insecure")
    try:
        # an address something listens on (an orphaned SuperLink, say) is refused in one line, never talked to
        with socket.socket() as held:
            held.bind(("127.0.0.1", deployment.port))
            held.listen()
            deployment.serve(*args, "--out", str(tmp_path / "held"))
            code, _ = deployment.result(timeout=60)
        assert code != 0 and "the fleet address is in use" in deployment.server_log.read_text()

        for sig, out in ((signal.SIGKILL, "first"), (signal.SIGTERM, "second")):
            # the second serve starts on the same port: the first one's processes are gone
            deployment.serve(*args, "--out", str(tmp_path / out))
            deployment.wait_for_log("fleet superlink listening", timeout=120)
            deadline = time.monotonic() + 60
            while not any("flwr-serverapp" in _cmdline(p) for p in process_tree(deployment.server.pid)):
                assert time.monotonic() < deadline, "no ServerApp process started"
                time.sleep(0.2)  # until `flwr run` submitted the run and the ServerApp waits for devices
            tree = process_tree(deployment.server.pid)
            # the SuperLink, its SuperExec, the ServerApp (all in sessions of their own) and flwr run
            assert len(tree) >= 4, [_cmdline(p) for p in tree]
            os.kill(deployment.server.pid, sig)  # serve alone: not its group, as a service manager may do
            code = deployment.server.wait(30)
            assert code == -sig or code == 128 + sig, code
            left = _wait_gone(tree, 20)
            assert not left, subprocess.run(["ps", "-o", "pid,ppid,cmd", "-p", ",".join(map(str, left))],
                                             capture_output=True, text=True).stdout
    finally:
        deployment.close()


def test_a_device_started_before_its_key_is_registered_retries_and_joins(make_device, tmp_path):
    from edgexfer.fleet.deployment import make_node_key, make_tls, register_supernodes, start_superlink

    make_tls(tmp_path / "tls", ["127.0.0.1"])
    make_node_key(tmp_path / "keys" / "device-0.key")
    state = make_device()
    (state / "fleet" / "apps" / "old-app").mkdir(parents=True)  # an App copy a former federation left
    link = start_superlink(f"127.0.0.1:{free_port()}", tmp_path / "link", tls_dir=tmp_path / "tls", node_auth=True)
    deployment = Deployment(tmp_path, port=link.port)
    try:
        node = deployment.join(state, "--tls-ca", str(tmp_path / "tls" / "ca.crt"),
                               "--auth-key", str(tmp_path / "keys" / "device-0.key"))
        log = tmp_path / "node-0.log"
        deadline = time.monotonic() + 60
        while "retrying in" not in log.read_text(errors="replace"):
            assert node.poll() is None, f"device federate exited {node.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        assert "Failed to activate SuperNode" in log.read_text(errors="replace")
        register_supernodes(link, tmp_path / "keys")  # the server registers the key a little later
        deadline = time.monotonic() + 90
        while True:
            nodes = json.loads(_flwr(link.flwr_home, "supernode", "list", "fleet", "--format", "json").stdout)["nodes"]
            if nodes and nodes[0]["status"] == "online":
                break
            assert node.poll() is None, f"device federate exited {node.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, (nodes, log.read_text()[-2000:])
            time.sleep(1)
        assert not (state / "fleet" / "apps").exists()  # no App copies pile up on the device
    finally:
        deployment.close()
        link.stop()
