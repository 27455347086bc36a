"""Flower's Deployment Engine, driven for edgexfer: a SuperLink and the run on the host, a SuperNode per device.

``edgexfer fleet serve`` (:func:`serve`): starts ``flower-superlink`` with TLS from ``--tls-dir`` and
SuperNode authentication, registering every ``*.pub`` key of ``--auth-keys`` (both required unless
``--insecure``, a test network), its Control and Runtime APIs answering only this host
(:mod:`edgexfer.fleet.superlink_guard`); writes the Flower App (a ``pyproject.toml`` naming edgexfer's
``ServerApp`` and ``ClientApp``) and submits it with ``flwr run``; the ServerApp writes the result
bundle. Every Flower process serve starts ends with it (:mod:`edgexfer.fleet.processes`).
``edgexfer device federate`` (:func:`federate`): runs ``flower-supernode`` for one device state,
retrying activation while the server has not registered its key yet.

Nothing is installed or downloaded at run time: the SuperLink runs with
``--disable-runtime-dependency-installation`` and the SuperNodes without
``--allow-runtime-dependency-installation``; both sides run the edgexfer that is installed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgexfer.fleet.keys import make_node_key, make_tls  # noqa: F401 (their home before issue 24)
from edgexfer.fleet.processes import FleetError, parent_death_signal, require_free_port, stop
from edgexfer.runtime.errors import InputError

#: TLS files a --tls-dir holds (made by `edgexfer fleet tls`, or by openssl: docs/fleet.md)
TLS_FILES = ("ca.crt", "server.pem", "server.key")
DEFAULT_ADDRESS = "0.0.0.0:9092"
#: seconds between a SuperExec's looks for work (Flower's FLWR_SUPEREXEC_TASK_POLL_INTERVAL, default 1.0)
SUPEREXEC_POLL_S = 0.1

APP_PYPROJECT = """\
# Written by edgexfer fleet serve: the Flower App of a head federation. Its code is the installed
# edgexfer (same version on the host and the devices); nothing is installed at run time.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgexfer-fleet"
version = "1.0.0"
description = "Fleet learning of edgexfer heads"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgexfer"

[tool.flwr.app.components]
serverapp = "edgexfer.fleet.server_app:app"
clientapp = "edgexfer.runtime.fleet_client:app"
"""


def parse_address(address: str, what: str = "--address") -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"{what} is not HOST:PORT", got=repr(address), expected="e.g. 0.0.0.0:9092 or 10.0.0.5:9092",
                         todo=f"pass {what} HOST:PORT")
    return host.strip("[]"), int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of Flower's processes: this Python's scripts first (SuperLink and SuperNode start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by name), and their own FLWR_HOME."""
    # Flower's switches for its legacy gRPC Control/Fleet servers would open ports the guard does not cover
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_INTERNAL_GRPC_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(flwr_home)
    # the SuperExec of a SuperLink or SuperNode looks for work (a ClientApp or ServerApp to start) every
    # second by default: 0.1 s takes up to 0.9 s off each round on every device
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", str(SUPEREXEC_POLL_S))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def flower_tool(name: str) -> str:
    """Path of a Flower console script of this Python (``flower-superlink``, ``flwr``, ...)."""
    from edgexfer.runtime.optional import require

    require("flwr", "fleet learning")
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        raise FleetError(f"Flower's {name} is not installed", got="not on PATH", expected=f"{name} beside {sys.executable}",
                         todo="pip install 'edgexfer[fleet]'")
    return found


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None,
                  log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path and log_path.exists() else []
            raise FleetError("the Flower SuperLink exited at start", got=f"exit code {process.returncode}: "
                             f"{tail[0][:200] if tail else 'no log'}", expected="a running SuperLink",
                             todo=f"see {log_path} (port in use? bad TLS files?)")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FleetError("the Flower SuperLink did not open its port", got=f"{host}:{port} closed after {timeout:g} s",
                     expected="a listening SuperLink", todo=f"see {log_path}")


def check_tls_dir(tls_dir: Path) -> dict[str, Path]:
    files = {name: tls_dir / name for name in TLS_FILES}
    missing = [name for name, path in files.items() if not path.is_file()]
    if missing:
        raise InputError("the TLS directory is incomplete", got=f"{tls_dir}: no {', '.join(missing)}",
                         expected=f"{', '.join(TLS_FILES)}", todo=f"make them with: edgexfer fleet tls --out {tls_dir}")
    return files


# --------------------------------------------------------------------------------------------- host

@dataclass
class SuperLink:
    """A running ``flower-superlink`` and how to reach its Control API."""

    process: subprocess.Popen
    host: str
    port: int
    workdir: Path
    root_certificates: Path | None

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    def connection_toml(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        lines = ["[superlink]", 'default = "fleet"', "", "[superlink.fleet]", f'address = "{host}:{self.port}"']
        if self.root_certificates is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.root_certificates}"')
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        stop(self.process)


def start_superlink(address: str, workdir: Path, *, tls_dir: Path | None = None, node_auth: bool = False,
                    timeout: float = 60.0) -> SuperLink:
    host, port = parse_address(address)
    require_free_port(host, port)  # never let a new serve talk to an orphaned SuperLink of an old one
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "flwr-home"
    home.mkdir(exist_ok=True)
    flower_tool("flower-superlink")
    # flower-superlink with its Control and Runtime APIs limited to this host (superlink_guard)
    cmd = [sys.executable, "-m", "edgexfer.fleet.superlink_guard", "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation", "--database", str(workdir / "superlink.db")]
    root = None
    if tls_dir is None:
        cmd.append("--insecure")
    else:
        files = check_tls_dir(Path(tls_dir).resolve())  # the SuperLink runs in workdir: absolute paths only
        cmd += ["--ssl-ca-certfile", str(files["ca.crt"]), "--ssl-certfile", str(files["server.pem"]),
                "--ssl-keyfile", str(files["server.key"])]
        root = files["ca.crt"].resolve()
    if node_auth:
        cmd.append("--enable-supernode-auth")
    log_path = workdir / "superlink.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=flower_env(home), cwd=workdir,
                               start_new_session=True, preexec_fn=parent_death_signal())  # noqa: PLW1509
    log.close()
    link = SuperLink(process, host, port, workdir, root)
    (home / "config.toml").write_text(link.connection_toml())
    try:
        wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout, process, log_path)
    except BaseException:
        link.stop()
        raise
    return link


def register_supernodes(link: SuperLink, keys_dir: Path) -> dict[str, str]:
    """Register every ``*.pub`` key of ``keys_dir`` with the SuperLink; returns node id -> name (the file stem)."""
    keys = sorted(keys_dir.glob("*.pub"))
    if not keys:
        raise InputError("no SuperNode public keys to register", got=f"no *.pub in {keys_dir}",
                         expected="one OpenSSH ECDSA public key per device",
                         todo=f"make them with: edgexfer fleet keygen --out {keys_dir}/DEVICE.key")
    names: dict[str, str] = {}
    for key in keys:
        name = key.name.removesuffix(".pub").removesuffix(".key")
        result = subprocess.run([flower_tool("flwr"), "supernode", "register", str(key.resolve()), "fleet",
                                 "--name", name], capture_output=True, text=True, env=flower_env(link.flwr_home),
                                cwd=link.workdir, timeout=60)
        if result.returncode != 0:
            raise FleetError("a SuperNode key was not registered", got=f"{key.name}: "
                             f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}",
                             expected="flwr supernode register to succeed", todo="check the key (edgexfer fleet keygen)")
        # "SuperNode 2800370736776253741 registered successfully."
        found = re.search(r"SuperNode (\d+) registered", result.stdout)
        if not found:
            raise FleetError("a SuperNode key was registered without a node id", got=result.stdout.strip()[-200:],
                             expected="'SuperNode ID registered successfully'", todo="check the Flower version (constraints.txt)")
        names[found.group(1)] = name
    return names


def absolute(path: Path | None) -> Path | None:
    """``path`` made absolute against this process's cwd: Flower's processes run in other directories."""
    return None if path is None else Path(path).expanduser().resolve()


def require_secure(tls_dir: Path | None, auth_keys: Path | None, insecure: bool) -> None:
    """A fleet server needs TLS and node keys; only ``--insecure`` (a test network) starts without them."""
    missing = [name for name, value in (("--tls-dir", tls_dir), ("--auth-keys", auth_keys)) if value is None]
    if missing and not insecure:
        raise InputError("fleet serve needs TLS and the devices' keys", got=f"no {' and no '.join(missing)}",
                         expected="--tls-dir DIR (edgexfer fleet tls) and --auth-keys DIR (*.pub of edgexfer fleet keygen)",
                         todo="make them as docs/fleet.md says, or pass --insecure on a test network only")


def fresh_workdir(workdir: Path, resume: bool) -> None:
    """A new working directory for a federation; with ``resume`` only its checkpoints are kept."""
    if resume:
        if not any((workdir / "checkpoints").glob("round-*")):
            raise InputError("there is no federation to resume", got=f"no checkpoint in {workdir / 'checkpoints'}",
                             expected="a completed round of an earlier fleet serve with the same --out",
                             todo="start without --resume")
        for entry in workdir.iterdir():
            if entry.name != "checkpoints":
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        return
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)


class _Interrupted(BaseException):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_sigterm() -> Callable[[], None]:
    """SIGTERM unwinds ``serve`` (so ``finally`` stops Flower's processes); returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupted(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupted)
    return lambda: signal.signal(signal.SIGTERM, previous)


# long: one federation from start to end (checks, SuperLink, keys, App, run, result), each step short
def serve(bundle: Path, out: Path, *, rounds: int, min_devices: int, address: str = DEFAULT_ADDRESS,
          tls_dir: Path | None = None, val: Path | None = None, auth_keys: Path | None = None, insecure: bool = False,
          resume: bool = False, round_timeout: float = 60.0, wait_timeout: float = 300.0, C: float = 1.0, proximal: float = 1.0,
          momentum: float = 0.8, rows: str = "all", dp_clip: float = 0.0, dp_noise: float = 0.0, fraction: float = 1.0, min_available: int = 0,
          first_round: str = "statistics", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole federation; returns a summary with the result bundle's path and the round records.

    Without ``tls_dir`` and ``auth_keys`` it refuses to start unless ``insecure``. Every path is made
    absolute first. SIGTERM (or SIGKILL: the children get a parent-death signal) stops every Flower
    process it started; a federation in which no round merged fails and writes no bundle. Each completed
    round is checkpointed beside ``out`` (``.OUT.fleet/checkpoints``); ``resume`` continues from the last.
    """
    import json

    from edgexfer.fleet.server_app import FleetSettings
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.federated import require_federated_kind

    require_secure(tls_dir, auth_keys, insecure)
    bundle, out, tls_dir, val, auth_keys = (absolute(p) for p in (bundle, out, tls_dir, val, auth_keys))
    source = Bundle.open(bundle, verify=True)
    require_federated_kind(source.manifest.head.kind)
    if out.exists():
        raise InputError("--out exists", got=str(out), expected="a new directory", todo="choose another --out")
    if rounds < 1 or min_devices < 1:
        raise InputError("--rounds and --min-devices must be >= 1", got=f"{rounds}, {min_devices}", expected=">= 1")
    if tls_dir is not None:
        check_tls_dir(tls_dir)
    workdir = out.with_name(f".{out.name}.fleet")
    checkpoints = workdir / "checkpoints"
    fresh_workdir(workdir, resume)
    val_features = ""
    if val is not None:
        val_path = workdir / "val-features.npz"
        count = write_val_features(source, val, val_path)
        log(f"fleet validation images={count} data={val}")
        val_features = str(val_path)
    started = time.perf_counter()
    undo = _on_sigterm()
    link = run = None
    lines: list[str] = []
    try:
        link = start_superlink(address, workdir, tls_dir=tls_dir, node_auth=auth_keys is not None)
        log(f"fleet superlink listening={link.host}:{link.port} tls={'on' if tls_dir else 'off'} "
            f"node_auth={'on' if auth_keys else 'off'} log={workdir / 'superlink.log'}")
        names: dict[str, str] = {}
        if auth_keys is not None:
            names = register_supernodes(link, auth_keys)
            log(f"fleet registered supernodes={','.join(names.values())}")
        settings = FleetSettings(bundle=str(source.root), out=str(out), rounds=rounds, min_devices=min_devices,
                                 round_timeout=round_timeout, wait_timeout=wait_timeout, val_features=val_features,
                                 C=C, proximal=proximal, momentum=momentum, rows=rows,
                                 dp_clip=dp_clip, dp_noise=dp_noise, device_names=json.dumps(names, sort_keys=True),
                                 checkpoint=str(checkpoints), fraction=fraction,
                                 min_available=min_available, first_round=first_round)
        app_dir = workdir / "app"
        app_dir.mkdir()
        # the run's settings are the App's config (Flower refuses run-config keys the App does not declare)
        (app_dir / "pyproject.toml").write_text(APP_PYPROJECT + "\n[tool.flwr.app.config]\n" + "".join(
            f"{k} = {_toml_value(v)}\n" for k, v in settings.to_run_config().items()))
        cmd = [flower_tool("flwr"), "run", str(app_dir), "fleet", "--stream"]
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir,
                               env=flower_env(link.flwr_home), start_new_session=True,
                               preexec_fn=parent_death_signal())  # noqa: PLW1509
        assert run.stdout is not None
        for line in run.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.startswith("fleet "):  # the ServerApp's event lines
                log(line)
        run.wait()
    except _Interrupted as exc:
        log(f"fleet stopped signal={signal.Signals(exc.signum).name}: Flower's processes stopped")
        raise SystemExit(128 + exc.signum) from None
    finally:
        undo()
        stop(run)
        if link is not None:
            link.stop()
        (workdir / "flwr-run.log").write_text("\n".join(lines) + "\n")
    if not (out / "manifest.json").is_file():
        failed = [line[line.index("fleet failed"):] for line in lines if "fleet failed" in line]
        raise FleetError("the federation did not write its result", got=failed[-1][:300] if failed else
                         f"flwr run exit code {run.returncode}", expected=f"a bundle in {out}",
                         todo=f"see {workdir}/flwr-run.log and {workdir}/superlink.log")
    record = json.loads((out / "reports" / "fleet.json").read_text())
    return {"out": str(out), "seconds": round(time.perf_counter() - started, 2), "rounds": record["rounds"],
            "kept_round": record.get("kept_round", len(record["rounds"])),
            "start_val_accuracy": record.get("start_val_accuracy"), "workdir": str(workdir)}


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value) if isinstance(value, float) else str(value)


def write_val_features(bundle: Any, data_dir: Path, path: Path) -> int:
    """Features of labelled validation data through the bundle's fp32 backbone, saved for the ServerApp.

    An image bundle reads an ImageFolder tree; a text bundle a folder per class of .txt files or a
    .csv/.jsonl file of text,label (tokenized by the bundle's tokenizer).
    """
    import numpy as np

    from edgexfer.modalities import host_modality
    from edgexfer.runtime.backends.registry import open_reference

    with open_reference(bundle.backbone_path) as engine:
        features, labels = host_modality(bundle.modality).validation_features(bundle, engine, data_dir)
    np.savez(path, features=features.astype(np.float32), labels=labels)
    return len(labels)


# --------------------------------------------------------------------------------------------- device

def supernode_command(state: Path, server: str, *, tls_ca: Path | None = None, auth_key: Path | None = None,
                      runtime_port: int | None = None, insecure: bool = False) -> list[str]:
    parse_address(server, "--server")
    if tls_ca is None and not insecure:
        raise InputError("no TLS root certificate for the server", got="neither --tls-ca nor --insecure",
                         expected="--tls-ca CA_FILE (the fleet's ca.crt)",
                         todo="copy the server's ca.crt to the device and pass --tls-ca; --insecure only on a test network")
    cmd = [flower_tool("flower-supernode"), "--superlink", server,
           "--node-config", f'state="{Path(state).resolve()}"',
           "--port", str(runtime_port or free_port()), "--max-wait-time", "600"]
    cmd += ["--insecure"] if tls_ca is None else ["--root-certificates", str(Path(tls_ca).resolve())]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
    return cmd


#: Flower 1.42 signs every fleet request with the device's wall clock; the SuperLink refuses (HTTP 401,
#: and the SuperNode then stops) a timestamp more than 5 s ahead of its own clock or 305 s behind it
CLOCK_AHEAD_LIMIT_S = 5.0
CLOCK_BEHIND_LIMIT_S = 305.0


def server_clock_offset(server: str, *, insecure: bool, timeout: float = 5.0) -> float | None:
    """This device's wall clock minus the fleet server's, in seconds; None when the server does not answer.

    Read from the HTTP ``Date`` header of any answer of the SuperLink's fleet API (1 s resolution,
    truncated, so the figure errs towards "ahead" by up to a second plus the round trip). Only a header is
    read, so the server certificate is not verified here: with a clock far enough off, verification
    itself would fail, and the point is to name the clock.
    """
    import email.utils
    import ssl
    import urllib.error
    import urllib.request

    context = None
    if not insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    url = f"{'http' if insecure else 'https'}://{server}/"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            date = answer.headers.get("Date")
    except urllib.error.HTTPError as answer:  # a 404 carries the Date header too
        date = answer.headers.get("Date")
    except (urllib.error.URLError, OSError, ValueError):
        return None
    if not date:
        return None
    try:
        server_time = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    return time.time() - server_time


def check_clock(server: str, *, insecure: bool) -> None:
    """Fail in one line when this device's clock is too far off for Flower to accept its requests."""
    offset = server_clock_offset(server, insecure=insecure)
    if offset is None:
        return  # not reachable yet: the SuperNode retries, and the clock is checked again if it stops
    if offset - 1.0 > CLOCK_AHEAD_LIMIT_S or offset < -CLOCK_BEHIND_LIMIT_S:
        where = f"{offset:.0f} s ahead of" if offset > 0 else f"{-offset:.0f} s behind"
        raise InputError(
            "this device's clock is off from the fleet server's: Flower refuses its signed requests",
            got=f"the device clock {where} the server {server}",
            expected=f"at most {CLOCK_AHEAD_LIMIT_S:.0f} s ahead and {CLOCK_BEHIND_LIMIT_S:.0f} s behind",
            todo="sync the clock (timedatectl set-ntp true, or chronyc makestep) and start device federate again")


#: what the SuperNode prints when the SuperLink refuses to activate it (its key not registered, yet or at all)
ACTIVATION_REFUSED = "Failed to activate SuperNode"
ACTIVATION_ATTEMPTS = 8
ACTIVATION_BACKOFF_S = (1.0, 30.0)  #: first wait, longest wait (doubling): 1+2+4+8+16+30+30 s over 8 attempts


def _run_supernode(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, threading.Thread, list[bool]]:
    """Start the SuperNode with its output copied to ours; the list is set when activation was refused."""
    # same process group as this command: a service manager (or a test) that stops the group stops both
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    refused: list[bool] = []

    def copy() -> None:
        assert process.stdout is not None
        out = getattr(sys.stdout, "buffer", None)
        for line in process.stdout:
            if ACTIVATION_REFUSED.encode() in line:
                refused.append(True)
            if out is not None:
                out.write(line)
                out.flush()
            else:
                sys.stdout.write(line.decode(errors="replace"))

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return process, thread, refused


def _clean_apps(home: Path) -> None:
    """Flower keeps a copy of every run's App package under FLWR_HOME/apps: edgexfer's is installed, drop them."""
    shutil.rmtree(home / "apps", ignore_errors=True)


def federate(state: Path, server: str, *, tls_ca: Path | None = None, auth_key: Path | None = None,
             insecure: bool = False, runtime_port: int | None = None,
             activation_attempts: int = ACTIVATION_ATTEMPTS, log: Callable[[str], None] | None = None) -> int:
    """Run this device's SuperNode in the foreground until it is stopped; returns its exit code.

    The device's clock is checked against the server's first (and again when the SuperNode stops by
    itself): a wrong clock is a one-line error, not a SuperNode that stops without saying why. When the
    server refuses to activate the SuperNode (with ``--auth-keys`` its key is registered only once the
    SuperLink is up), it is started again after 1, 2, 4, ... 30 s, at most ``activation_attempts`` times.
    """
    from edgexfer.runtime.state import DeviceState

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    state = Path(state)
    DeviceState(state).active()  # a device with no bundle installed has nothing to federate: fail now
    check_clock(server, insecure=insecure)
    home = state / "fleet"
    home.mkdir(mode=0o700, exist_ok=True)
    _clean_apps(home)
    cmd = supernode_command(state, server, tls_ca=tls_ca, auth_key=auth_key, runtime_port=runtime_port,
                            insecure=insecure)
    process: subprocess.Popen | None = None

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through `finally`, which stops the SuperNode

    signal.signal(signal.SIGTERM, terminate)
    try:
        for attempt in range(1, max(1, activation_attempts) + 1):
            process, thread, refused = _run_supernode(cmd, flower_env(home))
            code = process.wait()
            thread.join(5)
            if code == 0 or not refused:
                break
            if attempt == activation_attempts:
                say(InputError("the fleet server refused to activate this device", got=f"{attempt} attempts",
                               expected="this device's key (--auth-key) registered by the server",
                               todo="put its KEY.pub in the server's --auth-keys and restart fleet serve").one_line())
                return code
            wait = min(ACTIVATION_BACKOFF_S[0] * 2 ** (attempt - 1), ACTIVATION_BACKOFF_S[1])
            say(f"device federate: the fleet server refused to activate this SuperNode (attempt {attempt}/"
                f"{activation_attempts}; its key may not be registered yet); retrying in {wait:g} s")
            time.sleep(wait)
        check_clock(server, insecure=insecure)  # it stopped by itself: a clock that went wrong is the usual cause
        return code
    except KeyboardInterrupt:
        return 130
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _clean_apps(home)
