"""``edgexfer flash BUNDLE_DIR --target ssh://USER@HOST[:PORT]/STATE_DIR``: install a bundle on a device.

Uses the system ``ssh``/``scp`` with key authentication only (``BatchMode=yes``: never a password
prompt). Steps, each timed and reported:

1. preflight   one ssh call prints architecture, Python, the target's edgexfer version, the L4T release
               (``/etc/nv_tegra_release``), TensorRT, the engines its edgexfer can import and the free
               disk under STATE_DIR; too little space (staging copy + installed copy + a device-built
               engine, :data:`DISK_FACTOR` times the bundle) stops here
2. copy        ``scp -r`` into ``STATE_DIR/.flash-staging-<id>/bundle``
3. verify      ``sha256sum -c`` on the target against the manifest's sha256 of every file
4. install     ``edgexfer device install`` on the staged bundle, which on the target
               a. copies it into ``bundles/<sha>`` and verifies it again,
               b. builds or picks the engine: with TensorRT and a GPU it builds the plan from the bundle's
                  TensorRT kit into ``engines/<key>/`` (key: TensorRT version, GPU/SM, precision, backbone),
                  reusing it when nothing changed; OpenVINO compiles once into its model cache there;
                  ONNX Runtime uses the bundle's model,
               c. runs the golden check (golden images through that engine and the bundle's head, within
                  the precision's tolerance); a mismatch stops before anything is activated,
               d. switches ``active.json`` atomically.
               The staging directory is removed on success and on failure.
5. updates     optionally the update trust root (``--trust-root``, kept if the device has one) and a copy
               of the update repository (``--updates-repo`` → ``STATE_DIR/updates-repo``, for
               ``edgexfer device update --dir`` on air-gapped devices)
6. report      the whole report is written to ``STATE_DIR/flash/<utc>.json`` on the target

Any failure leaves the same (bundle, head) pair active. Before step 4 only the staging directory is
touched, and it is removed; a failed engine build or golden check in step 4 can leave the inactive copy
under ``bundles/<sha>`` (reused by the next flash of that bundle), never a partial engine.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from edgexfer import __version__
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.timing import StepTimer

#: room needed on the target, in multiples of the bundle size (staging copy + installed copy + an engine built
#: on the device: a TensorRT plan or an OpenVINO blob is about the size of the backbone)
DISK_FACTOR = 3.2
SSH_TIMEOUT = 15


class FlashError(EdgexferError):
    """Flashing a device failed; the device keeps what it had."""


@dataclass(frozen=True)
class Target:
    user: str
    host: str
    port: int
    state_dir: str

    @classmethod
    def parse(cls, url: str) -> Target:
        parsed = urlparse(url)
        if parsed.scheme != "ssh" or not parsed.username or not parsed.hostname or not parsed.path.startswith("/") \
                or len(parsed.path) < 2:
            raise FlashError("flash target", got=repr(url), expected="ssh://USER@HOST[:PORT]/ABSOLUTE/STATE_DIR",
                             todo="e.g. ssh://nvidia@jetson.local/var/lib/edgexfer")
        try:
            port = parsed.port or 22
        except ValueError:
            raise FlashError("flash target port", got=repr(url), expected="a port number 1-65535",
                             todo="fix the URL") from None
        return cls(parsed.username, parsed.hostname, port, parsed.path.rstrip("/") or "/")

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}"


class RemoteShell:
    """Runs commands on the target through the system ssh/scp with key authentication only."""

    def __init__(self, target: Target, *, identity: Path | None = None, ssh_options: list[str] | None = None,
                 ssh: str = "ssh", scp: str = "scp"):
        self.target = target
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT}"]
        if identity is not None:
            opts += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        for o in ssh_options or []:
            opts += ["-o", o]
        self.opts = opts
        self.ssh, self.scp = ssh, scp

    def run(self, command: str, *, stdin: str | None = None, check: bool = True, what: str = "remote command",
            timeout: float = 600) -> subprocess.CompletedProcess:
        argv = [self.ssh, "-p", str(self.target.port), *self.opts, self.target.login, command]
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 255:
            raise _ssh_failure(self.target, proc.stderr)
        if check and proc.returncode != 0:
            raise FlashError(f"{what} failed on {self.target.host}", got=_last_line(proc.stderr or proc.stdout),
                             expected="exit status 0", todo="see the message; the device keeps its active bundle")
        return proc

    def copy(self, local: Path, remote: str) -> None:
        argv = [self.scp, "-q", "-r", "-P", str(self.target.port), *self.opts, str(local),
                f"{self.target.login}:{remote}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            if "Permission denied" in proc.stderr or "Connection" in proc.stderr:
                raise _ssh_failure(self.target, proc.stderr)
            raise FlashError("copying the bundle failed", got=_last_line(proc.stderr), expected="scp exit 0",
                             todo="check free space and permissions of the state directory on the target")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def _ssh_failure(target: Target, stderr: str) -> FlashError:
    line = _last_line(stderr)
    if "Permission denied" in stderr:
        return FlashError("the target refused the ssh key", got=line, expected=f"key login as {target.user}",
                          todo=f"ssh-copy-id -p {target.port} {target.login} (or pass --identity KEY)")
    return FlashError("cannot reach the target over ssh", got=line, expected=f"sshd on {target.host}:{target.port}",
                      todo="check the host, port, network and that the device is powered on")


def _preflight_script(target: Target, remote_edgexfer: str, remote_python: str | None) -> str:
    q = shlex.quote
    # the interpreter that runs the target's edgexfer: --remote-python, else the console script's
    # shebang (pip writes the venv's python there), else python3; the table shows which one
    if remote_python:
        pick = f"PY={q(remote_python)}"
    else:
        pick = (f'EX="$(command -v {q(remote_edgexfer)})"; PY="$(head -n1 "$EX" 2>/dev/null | sed -n "s/^#!//p")"; '
                '[ -x "$PY" ] || PY=python3')
    # each line is KEY=VALUE; a missing tool prints an empty value instead of failing the script
    return f"""
{pick}
echo "arch=$(uname -m)"
echo "python=$($PY -c 'import platform; print(platform.python_version())' 2>/dev/null)"
echo "edgexfer=$({q(remote_edgexfer)} --version 2>/dev/null | awk '{{print $NF}}')"
echo "l4t=$(head -n1 /etc/nv_tegra_release 2>/dev/null)"
echo "tensorrt=$($PY -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null)"
echo "engines=$($PY -c 'from edgexfer.runtime.backends.registry import available_backends as a; print(",".join(a()))' 2>/dev/null)"
D={q(target.state_dir)}; while [ ! -d "$D" ]; do D=$(dirname "$D"); done
echo "free_bytes=$(df -Pk "$D" | awk 'NR==2 {{printf "%.0f", $4 * 1024}}')"
echo "active=$(cat {q(target.state_dir)}/active.json 2>/dev/null | tr -d '\\n ')"
echo "python_path=$PY"
"""


def preflight(shell: RemoteShell, remote_edgexfer: str, remote_python: str | None) -> dict[str, str]:
    out = shell.run(_preflight_script(shell.target, remote_edgexfer, remote_python), what="preflight").stdout
    info = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    return {k: info.get(k, "") for k in ("arch", "python", "edgexfer", "l4t", "tensorrt", "engines", "free_bytes",
                                         "active", "python_path")}


def preflight_table(info: dict[str, str]) -> str:
    rows = [("architecture", info["arch"]), ("python", f"{info['python'] or 'not found'} ({info['python_path']})"),
            ("edgexfer runtime", info["edgexfer"] or "not found"), ("L4T / JetPack", info["l4t"] or "not a Jetson"),
            ("TensorRT", info["tensorrt"] or "not installed"), ("engines", info["engines"] or "none"),
            ("free disk", f"{_free_bytes(info) / 1e6:.0f} MB"),
            ("active", info["active"] or "nothing installed"), ("opset check", info.get("opset_check", ""))]
    return "\n".join(f"  {k:<17} {v}" for k, v in rows)


def flash(bundle_dir: str | Path, target_url: str, *, identity: Path | None = None, remote_edgexfer: str = "edgexfer",
          remote_python: str | None = None, ssh_options: list[str] | None = None, trust_root: Path | None = None,
          updates_repo: Path | None = None,
          backend: str = "auto", precision: str = "fp32", ssh: str = "ssh", scp: str = "scp",
          log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Flash one device (see the module docstring); returns the report, also stored on the target."""
    timer = StepTimer()
    bundle = Bundle.open(bundle_dir, verify=True)
    m = bundle.manifest
    target = Target.parse(target_url)
    shell = RemoteShell(target, identity=identity, ssh_options=ssh_options, ssh=ssh, scp=scp)
    q = shlex.quote

    info = preflight(shell, remote_edgexfer, remote_python)
    try:
        info["opset_check"] = _check_tensorrt_opset(info["tensorrt"], m.tools.get("opset"))
    finally:
        log(f"preflight {target.login}:{target.port}\n{preflight_table(info)}")
    if not info["edgexfer"]:
        raise FlashError("edgexfer is not runnable on the target", got=f"{remote_edgexfer!r} not found",
                         expected="the device install of edgexfer",
                         todo="pip install 'edgexfer[onnxruntime]' on the device, or pass --remote-edgexfer PATH")
    if not info["engines"]:
        raise FlashError("no inference engine is importable on the target", got=f"python {info['python_path'] or '?'}",
                         expected="edgexfer.runtime with onnxruntime, openvino or tensorrt",
                         todo="pip install 'edgexfer[onnxruntime]' on the device, or pass --remote-python")
    size = sum(f.bytes for f in m.files.values())
    free = _free_bytes(info)
    if free < DISK_FACTOR * size:
        raise FlashError("not enough free disk on the target", got=f"{free / 1e6:.1f} MB free",
                         expected=f">= {DISK_FACTOR * size / 1e6:.1f} MB ({DISK_FACTOR}x the bundle)",
                         todo=f"free space under {target.state_dir} and retry; nothing was copied")
    timer.lap("preflight")

    staging = f"{target.state_dir}/.flash-staging-{uuid.uuid4().hex[:12]}"
    remote_bundle = f"{staging}/bundle"
    shell.run(f"mkdir -p {q(staging)}", what="creating the staging directory")
    try:
        shell.copy(bundle.root, remote_bundle)
        timer.lap("copy")
        sums = "".join(f"{e.sha256}  {rel}\n" for rel, e in sorted(m.files.items()))
        proc = shell.run(f"cd {q(remote_bundle)} && sha256sum -c --quiet -", stdin=sums, check=False)
        if proc.returncode != 0:
            bad = [ln.split(":")[0] for ln in proc.stdout.splitlines() if "FAILED" in ln]
            raise FlashError("the copy on the target does not match the bundle", got=f"sha256 differs: {', '.join(bad) or proc.stderr.strip()[:200]}",
                             expected="every sha256 as in manifest.json",
                             todo="flash again (a flaky link or a failing disk corrupts copies); nothing was activated")
        timer.lap("verify")
        proc = shell.run(f"{q(remote_edgexfer)} device install {q(remote_bundle)} --state {q(target.state_dir)} "
                         f"--backend {q(backend)} --precision {q(precision)} --json", check=False, what="device install",
                         timeout=3600)  # a TensorRT build on a small Jetson takes minutes
        if proc.returncode != 0:
            raise FlashError("device install failed on the target", got=_last_line(proc.stderr or proc.stdout),
                             expected="an engine for the target and golden outputs within tolerance",
                             todo="the previous bundle stays active; fix what the message says and flash again")
        install = _json_line(proc.stdout)
        timer.lap("install")
        for step in ("engine", "golden"):
            timer.seconds[step] = install.get("steps", {}).get(step, 0.0)
        golden, engine = install.get("golden", {}), install.get("engine", {})
        extras = _copy_update_material(shell, staging, trust_root, updates_repo)
        timer.lap("update-material")
    finally:
        shell.run(f"rm -rf {q(staging)}", check=False)
    seconds = timer.with_total()
    report = {"target": f"ssh://{target.login}:{target.port}{target.state_dir}", "host_edgexfer": __version__,
              "bundle": {"name": m.name, "backbone_sha256": m.backbone.sha256, "bytes": size},
              "preflight": info, "engine": engine, "golden": golden, "install": install, "updates": extras, "seconds": seconds,
              "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    name = f"{target.state_dir}/flash/{report['utc'].replace(':', '')}-{uuid.uuid4().hex[:6]}.json"
    shell.run(f"mkdir -p {q(target.state_dir + '/flash')} && cat > {q(name)}", stdin=json.dumps(report, indent=2) + "\n",
              what="storing the flash report")
    how = "built" if engine.get("built") else "reused" if engine.get("key") else "picked"
    log(f"engine {engine.get('backend')}/{engine.get('precision')} {how} ({engine.get('source')}); golden "
        f"top-1 agreement {golden.get('top1_agreement', 0):.3f}, max feature diff "
        f"{golden.get('max_abs_feature_diff', float('nan')):.2g}; head {install.get('head')} active; report {name}")
    return report


def _copy_update_material(shell: RemoteShell, staging: str, trust_root: Path | None,
                          updates_repo: Path | None) -> dict[str, str]:
    """Optionally install the update trust root and a copy of the update repository (air-gapped devices).

    A trust root already on the device is kept: TUF rotates it through signed root versions, and a
    flash must not quietly replace what the device trusts. The report says which happened.
    """
    q = shlex.quote
    state = shell.target.state_dir
    out: dict[str, str] = {}
    if trust_root is not None:
        proc = shell.run(f"mkdir -p {q(state + '/trust')} && if [ -e {q(state + '/trust/root.json')} ]; then "
                         f"echo kept-existing; else cat > {q(state + '/trust/.root.json.flash')} && "
                         f"mv {q(state + '/trust/.root.json.flash')} {q(state + '/trust/root.json')} && echo installed; fi",
                         stdin=Path(trust_root).read_text(), what="installing the trust root")
        out["trust_root"] = proc.stdout.strip()
    if updates_repo is not None:
        if not (Path(updates_repo) / "metadata").is_dir():
            raise FlashError("not an update repository", got=str(updates_repo), expected="REPO/metadata and REPO/targets",
                             todo="pass the --repo directory of `edgexfer heads init`")
        shell.copy(Path(updates_repo), f"{staging}/updates-repo")
        dest = f"{state}/updates-repo"
        # swap whole directories so `device update --dir` never sees half a copy
        shell.run(f"rm -rf {q(dest + '.old')} && if [ -e {q(dest)} ]; then mv {q(dest)} {q(dest + '.old')}; fi && "
                  f"mv {q(staging + '/updates-repo')} {q(dest)} && rm -rf {q(dest + '.old')}",
                  what="installing the update repository copy")
        out["updates_repo"] = dest
    return out


def _check_tensorrt_opset(tensorrt_version: str, opset: object) -> str:
    """Stop when the target's TensorRT ONNX parser cannot read the bundle's opset (per the lint tables)."""
    if not tensorrt_version:
        return "no TensorRT on the target"
    from edgexfer.converters.trt_lint import supported_ops

    parts = tensorrt_version.split(".")
    tables = supported_ops()["targets"]
    key = next((k for k in (".".join(parts[:2]), parts[0]) if k in tables), None)
    if key is None or not isinstance(opset, int):
        return f"not checked: no operator table for TensorRT {tensorrt_version} (tables: {', '.join(tables)})"
    table = tables[key]
    if (table["opset_max"] is not None and opset > table["opset_max"]) or \
            (table["opset_min"] is not None and opset < table["opset_min"]):
        raise FlashError("the bundle's ONNX opset is not supported by the target's TensorRT",
                         got=f"opset {opset}, TensorRT {tensorrt_version}",
                         expected=f"opset {table['opset_min'] or 'any'}..{table['opset_max'] or 'any'}",
                         todo="re-export with a supported opset, or flash with --backend onnxruntime; nothing was copied")
    return f"opset {opset} ok for TensorRT {tensorrt_version}"


def _free_bytes(info: dict[str, str]) -> int:
    try:
        return int(float(info.get("free_bytes") or 0))
    except ValueError:
        raise FlashError("preflight could not read the free disk space", got=repr(info.get("free_bytes")),
                         expected="a number of bytes from df", todo="check that df works on the target") from None


def _json_line(text: str) -> dict[str, Any]:
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                break
    # `device install --json` prints an indented object over several lines
    match = re.search(r"\{.*\}", text or "", re.S)
    if match:
        try:
            return json.loads(match.group(0))
        except ValueError:
            pass
    return {}
