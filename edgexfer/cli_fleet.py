"""Fleet commands: ``edgexfer flash``, ``edgexfer heads …``, ``edgexfer fleet …``, ``edgexfer device update`` and ``device federate``.

Registered in :mod:`edgexfer.cli` (``main.add_command(flash)``, ``main.add_command(heads)``,
``device.add_command(device_update)``). Heavy modules are imported inside the commands.
"""
from __future__ import annotations

from pathlib import Path

import click

from edgexfer.cli_options import device_engine_options, emit, json_option, state_option

_SIGNER = click.option("--signer-backend", type=click.Choice(["cryptography", "pure-python"]), default="cryptography",
                       show_default=True, envvar="EDGEXFER_SIGNER_BACKEND",
                       help="Ed25519 signing: pyca/cryptography, or the pure-Python reference implementation "
                            "(not constant-time; only on a trusted offline machine).")
_KEYS = click.option("--keys", "keys_dir", type=click.Path(path_type=Path), required=True,
                     help="Directory of the online keys (targets, snapshot, timestamp); never inside --repo.")
_REPO = click.option("--repo", "repo_dir", type=click.Path(path_type=Path), required=True,
                     help="Repository directory (serve it over HTTP, or copy it for `device update --dir`).")



# --------------------------------------------------------------------------------------------- heads
@click.group()
def heads():
    """Signed head updates (TUF): keygen, init, publish, promote, rotate, timestamp, list."""


@heads.command(name="keygen")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Key file to write (mode 0600).")
@click.option("--role", type=click.Choice(["root", "targets", "snapshot", "timestamp"]), default="root",
              show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
@json_option
def heads_keygen(out, role, force, as_json):
    """Create an Ed25519 key. Keep the root key offline; `init` creates the online keys itself."""
    from edgexfer.publish import keygen

    result = keygen(out, role, force=force)
    emit(result, as_json, f"{role} key {result['keyid'][:16]}… written to {out}")


@heads.command(name="init")
@_REPO
@_KEYS
@click.option("--root-key", type=click.Path(path_type=Path), required=True, help="The offline root key file.")
@_SIGNER
@json_option
def heads_init(repo_dir, keys_dir, root_key, signer_backend, as_json):
    """Create an empty update repository (root signed offline, online keys in --keys)."""
    from edgexfer.publish import HeadsRepo

    repo = HeadsRepo.init(repo_dir, keys_dir, root_key, signer_backend=signer_backend)
    result = {"repo": str(repo.root_dir), "root": str(repo.root_path())}
    emit(result, as_json, f"repository {repo_dir} created; give devices {repo.root_path()} as their trust root")


@heads.command(name="publish")
@click.argument("source", type=click.Path(path_type=Path))
@_REPO
@_KEYS
@click.option("--group", default="canary", show_default=True, help="Rollout group (devices of `all` need a promote).")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="The bundle the devices run (same backbone): the head's logits on its golden features are "
                   "signed for the devices' health check. Needed when SOURCE is a run dir or a head file.")
@click.option("--backbone-sha", default=None,
              help="Backbone sha256, when SOURCE is a bare head.safetensors (default: --bundle's).")
@click.option("--version", "version", type=int, default=None, help="Head version (default: the next one).")
@_SIGNER
@json_option
def heads_publish(source, repo_dir, keys_dir, group, bundle_dir, backbone_sha, version, signer_backend, as_json):
    """Sign and publish the head of a bundle dir, run dir or head.safetensors, with its golden logits."""
    from edgexfer.publish import HeadsRepo

    repo = HeadsRepo.open(repo_dir, keys_dir, signer_backend=signer_backend)
    r = repo.publish(source, group=group, backbone_sha256=backbone_sha, bundle=bundle_dir, version=version)
    emit(r, as_json, f"published head version {r['head_version']} ({r['kind']}, {len(r['classes'])} classes) "
                      f"for backbone {r['backbone_sha256'][:12]}… to group {group}: {r['target']}")


@heads.command(name="promote")
@_REPO
@_KEYS
@click.option("--backbone-sha", required=True)
@click.option("--version", "version", type=int, required=True)
@click.option("--from", "from_group", default="canary", show_default=True)
@click.option("--to", "to_group", default="all", show_default=True)
@_SIGNER
@json_option
def heads_promote(repo_dir, keys_dir, backbone_sha, version, from_group, to_group, signer_backend, as_json):
    """Publish a canary head to every device (the same bytes under heads/<to>/…)."""
    from edgexfer.publish import HeadsRepo

    repo = HeadsRepo.open(repo_dir, keys_dir, signer_backend=signer_backend)
    r = repo.promote(backbone_sha, version, from_group=from_group, to_group=to_group)
    emit(r, as_json, f"promoted head version {version} from {from_group} to {to_group}: {r['target']}")


@heads.command(name="rotate")
@click.argument("role", type=click.Choice(["targets", "snapshot", "timestamp"]))
@_REPO
@_KEYS
@click.option("--root-key", type=click.Path(path_type=Path), required=True, help="The offline root key file.")
@_SIGNER
@json_option
def heads_rotate(role, repo_dir, keys_dir, root_key, signer_backend, as_json):
    """Replace an online role's key (new root version signed with the offline root key)."""
    from edgexfer.publish import HeadsRepo

    repo = HeadsRepo.open(repo_dir, keys_dir, signer_backend=signer_backend)
    r = repo.rotate(role, root_key)
    emit(r, as_json, f"{role} key rotated to {r['keyid'][:16]}…; root is now version {r['root_version']}")


@heads.command(name="list")
@_REPO
@json_option
def heads_list(repo_dir, as_json):
    """Every published head: group, backbone, version, kind, classes (no keys needed)."""
    from edgexfer.publish import list_heads

    rows = list_heads(repo_dir)
    text = "\n".join(f"{h.get('group', '?'):<8} {str(h.get('backbone_sha256', '?'))[:12]}…  v{h.get('head_version', '?'):<3} "
                     f"{h.get('kind', '?'):<9} {len(h.get('classes', []))} classes  {h['path']}" for h in rows)
    emit({"heads": rows}, as_json, text or "no heads published yet")


@heads.command(name="timestamp")
@_REPO
@_KEYS
@click.option("--days", type=float, default=None, help="Lifetime (default 7).")
@_SIGNER
@json_option
def heads_timestamp(repo_dir, keys_dir, days, signer_backend, as_json):
    """Re-sign the timestamp (run from cron well within its lifetime)."""
    from edgexfer.publish import HeadsRepo

    version = HeadsRepo.open(repo_dir, keys_dir, signer_backend=signer_backend).resign_timestamp(days)
    emit({"timestamp_version": version}, as_json, f"timestamp re-signed (version {version})")


# --------------------------------------------------------------------------------------------- device
@click.command(name="update")
@state_option
@click.option("--repo", "repo_url", default=None, help="Repository URL (http://HOST:PORT/PATH).")
@click.option("--dir", "local_dir", type=click.Path(path_type=Path), default=None,
              help="A copy of the repository directory (air-gapped devices).")
@click.option("--group", default="all", show_default=True, help="Rollout group of this device (e.g. canary).")
@click.option("--root", "root", type=click.Path(path_type=Path), default=None,
              help="Trust root (the repository's 1.root.json); needed the first time only.")
@device_engine_options
@json_option
def device_update(state, repo_url, local_dir, group, root, backend, precision, as_json):
    """Fetch, verify, install and health-check the newest signed head; roll back on failure.

    The health check: the signed golden logits reproduced by the head (fp32 tolerance) and by this
    device's engine plus the head (the precision's tolerance); on a labelled holdout of at least 20
    samples, a one-sided McNemar test (p <= 0.05: the new head is worse, rolled back).
    """
    import sys

    from edgexfer.runtime.updates import update

    r = update(state, repo_url, local_dir=local_dir, group=group, root=root, backend=backend, precision=precision)
    text = {"updated": f"head {r.active_head} active (update version {r.update_version}, {r.target}); {r.reason}",
            "recovered": f"finished an interrupted update; head {r.active_head} active",
            "up-to-date": f"up to date: head {r.active_head} active",
            }.get(r.status, f"{r.status.upper()}: {r.reason}; head {r.active_head} stays active")
    for s in r.skipped:
        text += f"\nskipped {s['target']}: {s['reason']}"
    emit(r.to_dict(), as_json, text)
    if r.status in ("rejected", "rolled-back"):
        sys.exit(1)


# --------------------------------------------------------------------------------------------- flash
@click.command(name="flash")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="ssh://USER@HOST[:PORT]/STATE_DIR")
@click.option("--identity", "-i", type=click.Path(path_type=Path), default=None, help="SSH private key file.")
@click.option("--remote-edgexfer", default="edgexfer", show_default=True,
              help="The edgexfer command on the target (e.g. /opt/edgexfer/bin/edgexfer).")
@click.option("--remote-python", default=None,
              help="Python of the target's edgexfer (default: from the edgexfer script's #! line, else python3).")
@click.option("--ssh-option", "-o", "ssh_options", multiple=True, help="Extra ssh -o options (repeatable).")
@click.option("--trust-root", type=click.Path(path_type=Path), default=None,
              help="Also install this update trust root (1.root.json) on the target.")
@click.option("--updates-repo", type=click.Path(path_type=Path), default=None,
              help="Also copy this update repository to STATE_DIR/updates-repo (for `device update --dir`).")
@device_engine_options
@json_option
def flash(bundle_dir, target, identity, remote_edgexfer, remote_python, ssh_options, trust_root, updates_repo, backend, precision,
          as_json):
    """Install a bundle on a device over ssh: preflight, copy, verify, install, golden check."""
    from edgexfer.flash import flash as run_flash

    r = run_flash(bundle_dir, target, identity=identity, remote_edgexfer=remote_edgexfer, remote_python=remote_python,
                  ssh_options=list(ssh_options), trust_root=trust_root, updates_repo=updates_repo, backend=backend,
                  precision=precision, log=lambda s: click.echo(s, err=True))
    emit(r, as_json, f"flashed {r['bundle']['name']} to {target}: head {r['install']['head']} active; "
                      f"golden {r['golden']['top1_agreement']:.3f} agreement; {r['seconds']['total']:.1f} s")


# --------------------------------------------------------------------------------------------- fleet learning
@click.group()
def fleet():
    """Fleet learning of heads with Flower: devices train together; only head weights and counts travel."""


@fleet.command(name="serve")
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), required=True,
              help="The bundle the devices run: its head starts the federation.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Result bundle to write (same backbone and engines, the federated head, reports/fleet.json).")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--min-devices", type=click.IntRange(min=1), default=2, show_default=True,
              help="Devices to wait for before round 1; a round merges only if this many answered.")
@click.option("--address", default="0.0.0.0:9092", show_default=True, help="SuperLink HOST:PORT (Fleet and Control API).")
@click.option("--tls-dir", type=click.Path(path_type=Path), default=None,
              help="ca.crt, server.pem, server.key (edgexfer fleet tls). Required unless --insecure.")
@click.option("--auth-keys", type=click.Path(path_type=Path), default=None,
              help="Directory of the devices' public keys (*.pub): only these join. Required unless --insecure.")
@click.option("--insecure", is_flag=True,
              help="Start without --tls-dir / --auth-keys (plain HTTP, any device joins): a test network only.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted federation with the same --out from its last completed round.")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), default=None,
              help="ImageFolder tree to measure each round's head on (features computed here, once); the best "
                   "round's head is the result.")
@click.option("--round-timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds a round waits for replies; devices that answer later are left out of that round.")
@click.option("--wait-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds to wait for --min-devices devices before the first round.")
@click.option("--proximal", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="FedProx mu of the devices' local training (> 0 with --rows all).")
@click.option("--momentum", type=click.FloatRange(min=0, max=1, max_open=True), default=0.8, show_default=True,
              help="Server momentum of linear heads (FedAvgM); 0: plain averaging.")
@click.option("--rows", type=click.Choice(["all", "holders"]), default="all", show_default=True,
              help="Known rows averaged over all devices (all) or only the devices holding the class (holders).")
@click.option("--dp-clip", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Differential privacy (central, fixed clipping): clip each device's step to this L2 norm; 0: off.")
@click.option("--dp-noise", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Noise multiplier with --dp-clip: Gaussian noise of std dp_noise*dp_clip/devices on the mean step.")
@click.option("--C", "C", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Inverse L2 strength of the devices' linear heads (as in device retrain).")
@click.option("--fraction", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Share of the connected devices asked each round (drawn anew per round, at least --min-devices): "
                   "a large fleet samples (docs/fleet.md).")
@click.option("--min-available", type=click.IntRange(min=0), default=0, show_default=True,
              help="Devices to wait for before round 1 when more than --min-devices (with --fraction: the first "
                   "draw is then over the fleet, not the first devices to connect).")
@click.option("--first-round", type=click.Choice(["statistics", "fedprox"]), default="statistics", show_default=True,
              help="Round 1 of a linear head: devices send per-class sums and their within-class scatter, merged "
                   "into a head (statistics; off with --dp-clip), or train FedProx like the other rounds "
                   "(fedprox: only heads leave the devices). docs/fleet.md says what each sends.")
@json_option
def fleet_serve(bundle_dir, out_dir, rounds, min_devices, address, tls_dir, auth_keys, insecure, resume, val_dir, round_timeout,
                wait_timeout, proximal, momentum, rows, dp_clip, dp_noise, C, fraction, min_available, first_round, as_json):
    """Run a federation: a Flower SuperLink and the ServerApp; writes OUT as a bundle with the federated head.

    TLS (--tls-dir) and node keys (--auth-keys) are required unless --insecure; the SuperLink's Control
    API answers only this host. Stopping this command stops every Flower process it started.
    """
    from edgexfer.fleet.deployment import absolute, serve

    # Flower's processes run in another directory: every path is made absolute here
    bundle_dir, out_dir, tls_dir, auth_keys, val_dir = (absolute(p) for p in (bundle_dir, out_dir, tls_dir, auth_keys, val_dir))
    r = serve(bundle_dir, out_dir, rounds=rounds, min_devices=min_devices, address=address, tls_dir=tls_dir, val=val_dir,
              auth_keys=auth_keys, insecure=insecure, resume=resume, round_timeout=round_timeout, wait_timeout=wait_timeout, C=C, proximal=proximal,
              momentum=momentum, rows=rows, dp_clip=dp_clip, dp_noise=dp_noise, fraction=fraction, min_available=min_available,
              first_round=first_round, log=lambda line: click.echo(line, err=True))
    last = r["rounds"][r["kept_round"] - 1]
    acc = f"; validation accuracy {last['val_accuracy']:.4f}" if last.get("val_accuracy") is not None else ""
    emit(r, as_json, f"federated head written to {r['out']} after {len(r['rounds'])} rounds "
                     f"(round {r['kept_round']} kept, {len(last['accepted'])} devices merged in it){acc}; {r['seconds']:.1f} s")


@fleet.command(name="tls")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Directory for ca.crt, ca.key, server.pem, server.key.")
@click.option("--host", "hosts", multiple=True, help="Name or IP the devices use for the server (repeatable); "
                                                     "localhost and 127.0.0.1 are always added.")
@click.option("--days", type=click.IntRange(min=1), default=365, show_default=True)
@json_option
def fleet_tls(out_dir, hosts, days, as_json):
    """Make a CA and the SuperLink's certificate (ECDSA P-256). Give devices ca.crt; keep ca.key offline."""
    from edgexfer.fleet.keys import make_tls

    r = make_tls(out_dir, list(hosts), days)
    emit(r, as_json, f"TLS files in {out_dir}: give devices {r['ca.crt']} (--tls-ca); move ca.key offline")


@fleet.command(name="keygen")
@click.option("--out", "out_file", type=click.Path(path_type=Path), required=True, help="Private key file (0600); KEY.pub beside it.")
@json_option
def fleet_keygen(out_file, as_json):
    """Make a device's SuperNode key pair (ECDSA P-384, OpenSSH format) for --auth-keys / --auth-key."""
    from edgexfer.fleet.keys import make_node_key

    r = make_node_key(out_file)
    emit(r, as_json, f"key pair {r['private']} (stays on the device) and {r['public']} (to the server's --auth-keys)")


@click.command(name="federate")
@state_option
@click.option("--server", required=True, help="The fleet server's SuperLink HOST:PORT.")
@click.option("--tls-ca", type=click.Path(path_type=Path), default=None, help="The fleet's ca.crt.")
@click.option("--auth-key", type=click.Path(path_type=Path), default=None, help="This device's private key (fleet keygen).")
@click.option("--insecure", is_flag=True, help="Plain HTTP without --tls-ca (a test network only).")
@click.option("--runtime-port", type=int, default=None, help="Local port of the SuperNode's runtime API (default: a free one).")
def device_federate(state, server, tls_ca, auth_key, insecure, runtime_port):
    """Join the fleet as a Flower SuperNode: train the rounds' heads on the cached features, send only weights.

    Images and features never leave the device, and the active head does not change: a federated
    head arrives as a signed update (edgexfer device update). Runs until stopped.
    """
    import sys

    from edgexfer.fleet.deployment import federate
    from edgexfer.runtime.state import default_state_dir

    sys.exit(federate(state or default_state_dir(), server, tls_ca=tls_ca, auth_key=auth_key, insecure=insecure,
                      runtime_port=runtime_port))
