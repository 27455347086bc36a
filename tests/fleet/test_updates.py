"""Signed field updates of heads (issue 6): host repository, device update, rejections, crashes.

Real TUF metadata signed with Ed25519, served by a real HTTP server on 127.0.0.1, real device state
directories with the real bundle and ONNX Runtime doing the health check.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner
from fleet_support import SIGNER, LoopbackServer, variant_head

from edgexfer.publish import HeadsRepo, HeadsRepoError, KeyFile, _make_signer, head_target_path, keygen
from edgexfer.runtime.device import Device
from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.heads import HEAD_FORMAT, Head
from edgexfer.runtime.state import CRASH_ENV, DeviceState
from edgexfer.runtime.updates import STEPS, UpdateError, signed_golden, update

pytest.importorskip("tuf", reason="needs the `updates` extra (tuf)")

FLEET_SIZE = 20


def _root(repo: HeadsRepo) -> Path:
    return repo.root_path()


def _active(state: Path) -> tuple[int, str]:
    st = DeviceState(state)
    a = st.active()
    return a.head, st.head_record(a.head).sha256


def _publish_better(repo: HeadsRepo, bundle, tmp_path: Path, *, group: str = "all", **kw) -> dict:
    # not the tensors of variant_head's default: a head rejected earlier must not come back byte for byte
    # (safetensors orders its metadata at random, so equal tensors give equal bytes only sometimes)
    path = variant_head(bundle, tmp_path / f"better-{time.monotonic_ns()}.safetensors", scale=1.02)
    return repo.publish(path, group=group, bundle=bundle.root, **kw)


def _raw_head(bundle, tensors: dict[str, np.ndarray], classes=None) -> bytes:
    """Safetensors bytes with edgexfer head metadata around arbitrary tensors (bypasses Head checks)."""
    meta = {"format": HEAD_FORMAT, "kind": "linear", "classes": json.dumps(classes or list(bundle.manifest.head.classes)),
            "temperature": "null"}
    return safetensors.numpy.save(tensors, metadata=meta)


def _custom(bundle, version: int, group: str = "all", head: Head | None = None) -> dict:
    """Custom target metadata as `publish` signs it, for the bundle's head (or ``head``'s golden logits)."""
    return {"backbone_sha256": bundle.manifest.backbone.sha256, "classes": list(bundle.manifest.head.classes),
            "kind": "linear", "head_version": version, "metrics": "{}", "group": group,
            **signed_golden(head or bundle.head(), bundle.golden()["features"])}


# ------------------------------------------------------------------------------------------ happy path
def test_fleet_updates_concurrently_and_status_shows_new_head(repo, server, bundle, make_device, tmp_path):
    devices = [make_device() for _ in range(FLEET_SIZE)]
    published = _publish_better(repo, bundle, tmp_path)

    def one(state: Path):
        t = time.perf_counter()
        report = update(state, server.url, root=_root(repo))
        return report, time.perf_counter() - t

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=FLEET_SIZE) as pool:
        results = list(pool.map(one, devices))
    wall = time.perf_counter() - started
    per_device = sorted(seconds for _, seconds in results)
    figures = {"devices": FLEET_SIZE, "wall_seconds": round(wall, 2), "median_seconds": round(per_device[len(per_device) // 2], 2),
               "max_seconds": round(per_device[-1], 2)}
    print("fleet update:", json.dumps(figures))
    for (report, _), state in zip(results, devices):
        assert report.status == "updated", report
        assert report.update_version == published["head_version"] == 2
        with Device(state) as dev:
            status = dev.status()
        assert status["head"]["version"] == report.active_head == 2
        assert status["head"]["source"] == "update" and status["head"]["previous"] == 1
        assert DeviceState(state).head_record(2).sha256 == published["sha256"]
        assert DeviceState(state).head_record(2).status == "accepted"
        with Device(state) as dev:  # the new head serves predictions
            golden = bundle.golden()
            assert dev.predict([_png(golden["images"][0])])[0].label in bundle.manifest.head.classes
    # a second round is a no-op
    again = update(devices[0], server.url)
    assert again.status == "up-to-date" and again.active_head == 2


def _png(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_canary_first_then_promote_to_all(repo, server, bundle, make_device, tmp_path):
    canary, other = make_device(), make_device()
    published = _publish_better(repo, bundle, tmp_path, group="canary")
    assert update(canary, server.url, group="canary", root=_root(repo)).status == "updated"
    assert update(other, server.url, root=_root(repo)).status == "up-to-date"
    assert _active(other)[0] == 1
    repo.promote(bundle.manifest.backbone.sha256, published["head_version"])
    r = update(other, server.url)
    assert r.status == "updated" and r.target.startswith("heads/all/")
    assert _active(other)[1] == published["sha256"]


def test_air_gapped_directory_verifies_the_same_metadata(repo, bundle, make_device, tmp_path):
    published = _publish_better(repo, bundle, tmp_path)
    copy = tmp_path / "usb"
    shutil.copytree(repo.root_dir, copy)
    state = make_device()
    r = update(state, local_dir=copy, root=copy / "metadata" / "1.root.json")
    assert r.status == "updated" and _active(state)[1] == published["sha256"]
    # a tampered copy is refused the same way as over HTTP
    state2 = make_device()
    target = next((copy / "targets").rglob("*.head.safetensors"))
    _flip_byte(target)
    with pytest.raises(UpdateError, match="LengthOrHashMismatch|hash"):
        update(state2, local_dir=copy, root=copy / "metadata" / "1.root.json")
    assert _active(state2)[0] == 1


def test_online_key_rotation_is_followed_by_devices(repo, server, bundle, make_device, tmp_path):
    state = make_device()
    _publish_better(repo, bundle, tmp_path)
    assert update(state, server.url, root=_root(repo)).status == "updated"
    root_key = tmp_path / "offline" / "root.key"
    for role in ("timestamp", "snapshot", "targets"):
        r = repo.rotate(role, root_key)
        assert r["retired"] and r["keyid"] not in r["retired"]
    published = _publish_better(repo, bundle, tmp_path)
    r = update(state, server.url)
    assert r.status == "updated" and r.update_version == published["head_version"] == 3
    assert json.loads((state / "trust" / "root.json").read_text())["signed"]["version"] == 4
    with pytest.raises(HeadsRepoError, match="root key does not match"):
        other = tmp_path / "other-root.key"
        keygen(other)
        repo.rotate("targets", other)


# ------------------------------------------------------------------------------------------ rejections
def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_unknown_signing_key_is_refused(repo, server, bundle, make_device, tmp_path):
    state = make_device()
    assert update(state, server.url, root=_root(repo)).status == "up-to-date"  # trust bootstrapped
    # an attacker's repository with the same layout, signed by keys the device never trusted
    keygen(tmp_path / "evil-root.key")
    evil = HeadsRepo.init(tmp_path / "evil", tmp_path / "evil-keys", tmp_path / "evil-root.key", signer_backend=SIGNER)
    for _ in range(3):
        _publish_better(evil, bundle, tmp_path)
    evil_server = LoopbackServer(evil.root_dir)
    try:
        with pytest.raises(UpdateError, match="Unsigned|signature|threshold|BadVersion|RepositoryError"):
            update(state, evil_server.url)
    finally:
        evil_server.close()
    assert _active(state)[0] == 1
    # one role re-signed by an unknown key inside the real repository: refused as well
    ts = repo.load("timestamp")
    ts.signed.version += 1
    ts.signatures.clear()
    ts.sign(_make_signer(KeyFile.load(tmp_path / "evil-root.key"), SIGNER))
    repo._write(ts, "timestamp")
    with pytest.raises(UpdateError, match="Unsigned"):
        update(state, server.url)
    assert _active(state)[0] == 1


def test_tampered_head_file_is_refused(repo, server, bundle, make_device, tmp_path):
    state = make_device()
    _publish_better(repo, bundle, tmp_path)
    _flip_byte(next(repo.targets_dir.rglob("*.head.safetensors")))
    with pytest.raises(UpdateError, match="LengthOrHashMismatch"):
        update(state, server.url, root=_root(repo))
    assert _active(state)[0] == 1 and DeviceState(state).head_versions() == [1]


def test_expired_metadata_is_refused(repo, server, bundle, make_device, tmp_path):
    state = make_device()
    _publish_better(repo, bundle, tmp_path, expiry_days={"timestamp": -1})
    with pytest.raises(UpdateError, match="Expired"):
        update(state, server.url, root=_root(repo))
    assert _active(state)[0] == 1
    repo.resign_timestamp()  # the operator's cron job fixes it
    assert update(state, server.url).status == "updated"


def test_replayed_or_older_version_is_not_installed(repo, server, bundle, make_device, tmp_path):
    state = make_device()
    _publish_better(repo, bundle, tmp_path, version=3)
    assert update(state, server.url, root=_root(repo)).active_head == 2
    before = _active(state)
    # an older head published later, and the same version again under another group
    _publish_better(repo, bundle, tmp_path, version=2)
    repo.promote(bundle.manifest.backbone.sha256, 3, from_group="all", to_group="fleet-b")
    r = update(state, server.url, group="fleet-b")
    assert r.status == "up-to-date"
    assert any("version 2 <= accepted 3" in s["reason"] for s in r.skipped)
    assert any("version 3 <= accepted 3" in s["reason"] for s in r.skipped)
    assert _active(state) == before
    # the accepted version survives a rollback of the head on the device (anti-rollback is durable)
    with Device(state) as dev:
        dev.rollback()
    assert update(state, server.url).status == "up-to-date" and _active(state)[0] == 1


def test_head_for_another_backbone_is_not_installed(repo, server, bundle, make_device, tmp_path):
    state = make_device()
    data = variant_head(bundle, tmp_path / "h.safetensors").read_bytes()
    other = "ab" * 32  # publish() needs that backbone's bundle: sign the target through the repository API
    repo.add_target(head_target_path("all", other, 2), data, {**_custom(bundle, 2), "backbone_sha256": other})
    r = update(state, server.url, root=_root(repo))
    assert r.status == "up-to-date" and _active(state)[0] == 1
    # signed metadata that lies about the backbone: the file's feature length still gives it away
    small = _raw_head(bundle, {"W": np.zeros((8, 16), np.float32), "b": np.zeros(8, np.float32)})
    repo.add_target(head_target_path("all", bundle.manifest.backbone.sha256, 7), small, _custom(bundle, 7))
    r = update(state, server.url)
    assert r.status == "rejected" and "feature_dim" in r.reason and _active(state)[0] == 1


@pytest.mark.parametrize("case", ["wrong-shape", "nan", "extra-tensor", "pickle", "pt-zip"])
def test_malformed_signed_payload_is_rejected_and_not_retried(case, repo, server, bundle, make_device):
    state = make_device()
    head = bundle.head()
    W, b = np.array(head.tensors["W"]), np.array(head.tensors["b"])
    if case == "wrong-shape":
        data = _raw_head(bundle, {"W": W[:, :-1].copy(), "b": b})
    elif case == "nan":
        W[3, 5] = np.nan
        data = _raw_head(bundle, {"W": W, "b": b})
    elif case == "extra-tensor":
        data = _raw_head(bundle, {"W": W, "b": b, "payload": np.zeros(4, np.float32)})
    elif case == "pickle":  # protocol-4 pickle header bytes, written by hand: nothing here unpickles
        data = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94."
    else:  # torch.save writes a zip archive
        data = b"PK\x03\x04" + b"\x00" * 200
    repo.add_target(head_target_path("all", bundle.manifest.backbone.sha256, 2), data, _custom(bundle, 2))
    r = update(state, server.url, root=_root(repo))
    assert r.status == "rejected", r
    assert _active(state)[0] == 1 and DeviceState(state).head_versions() == [1]
    again = update(state, server.url)
    assert again.status == "up-to-date" and any("rejected before" in s["reason"] for s in again.skipped)


def test_target_path_with_dotdot_is_skipped(repo, server, bundle, make_device, tmp_path):
    state = make_device()
    data = variant_head(bundle, tmp_path / "h.safetensors").read_bytes()
    with pytest.raises(EdgexferError):
        head_target_path("all", "../../etc", 2)
    sha = bundle.manifest.backbone.sha256
    repo.add_target(f"heads/all/{sha}/../../../escape/2/head.safetensors", data, _custom(bundle, 2))
    r = update(state, server.url, root=_root(repo))
    assert r.status == "up-to-date" and any("plain relative" in s["reason"] for s in r.skipped)
    assert _active(state)[0] == 1 and not (state / "escape").exists()


def test_publish_refuses_pickle_and_pt_files(repo, tmp_path):
    pt = tmp_path / "head.pt"
    pt.write_bytes(b"PK\x03\x04")
    with pytest.raises(HeadsRepoError, match="only safetensors"):
        repo.publish(pt, backbone_sha256="ab" * 32)


# ------------------------------------------------------------------------------------------ health check
def _resign_golden_logits(repo: HeadsRepo, path: str, change) -> None:
    """Re-sign the targets metadata with ``change(logits)`` in place of ``path``'s signed golden logits
    (a publisher bug or an insider: the signatures are valid, the expectation is wrong)."""
    import base64

    targets = repo.load("targets")
    custom = targets.signed.targets[path].unrecognized_fields["custom"]["edgexfer"]
    enc = custom["golden_logits"]
    logits = np.frombuffer(base64.b64decode(enc["base64"]), "<f4").reshape(enc["shape"]).copy()
    enc["base64"] = base64.b64encode(np.ascontiguousarray(change(logits), "<f4").tobytes()).decode()
    repo.commit_targets(targets)


@pytest.mark.parametrize("case", ["logits-of-another-head", "one-logit-off-by-0.01"])
def test_signed_logits_not_reproduced_roll_back_and_are_not_retried(case, repo, server, bundle, make_device, tmp_path):
    state = make_device()
    good = variant_head(bundle, tmp_path / "good.safetensors")
    sha = bundle.manifest.backbone.sha256
    if case == "logits-of-another-head":  # signed with the logits of a head whose rows are permuted
        other = Head.load(variant_head(bundle, tmp_path / "other.safetensors", permute=True))
        repo.add_target(head_target_path("all", sha, 2), good.read_bytes(), _custom(bundle, 2, head=other))
    else:
        path = repo.publish(good, group="all", bundle=bundle.root)["target"]

        def nudge(logits: np.ndarray) -> np.ndarray:
            logits[3, 1] += 0.01
            return logits

        _resign_golden_logits(repo, path, nudge)
    before = DeviceState(state).active()
    r = update(state, server.url, root=_root(repo))
    assert r.status == "rolled-back", r
    assert "signed logits not reproduced: logits (new head on the golden reference features" in r.reason
    assert "signed logits not reproduced: logits (onnxruntime/fp32 engine and new head on the golden images" in r.reason
    assert not r.health["integrity"]["passed"] and not r.health["engine"]["passed"]
    assert DeviceState(state).active() == before
    assert DeviceState(state).head_record(2).status == "rejected"
    again = update(state, server.url)
    assert again.status == "up-to-date" and any("rejected before" in s["reason"] for s in again.skipped)
    assert DeviceState(state).head_versions() == [1, 2]
    # a good head published afterwards still goes through
    _publish_better(repo, bundle, tmp_path)
    r = update(state, server.url)
    assert r.status == "updated" and r.health["integrity"]["passed"] and r.health["engine"]["passed"], r


@pytest.mark.parametrize("case", ["unsigned", "another-golden-set", "wrong-shape", "not-base64"])
def test_unverifiable_signed_logits_are_rejected_before_staging(case, repo, server, bundle, make_device, tmp_path):
    state = make_device()
    data = variant_head(bundle, tmp_path / "h.safetensors").read_bytes()
    custom = _custom(bundle, 2)
    if case == "unsigned":  # a head published by an edgexfer that did not sign golden logits
        del custom["golden_logits"], custom["golden_features_sha256"]
        expect = "update carries no signed golden logits | got no golden_logits and no golden_features_sha256"
    elif case == "another-golden-set":
        custom["golden_features_sha256"] = "0" * 64
        expect = "signed golden logits are for another golden set | got signed for golden features 0000"
    elif case == "wrong-shape":
        custom["golden_logits"] = {**custom["golden_logits"], "shape": [4, 16]}
        expect = "signed golden logits do not fit | got shape [4, 16]"
    else:
        custom["golden_logits"] = {**custom["golden_logits"], "base64": "not base64!"}
        expect = "signed golden logits are malformed | got no valid base64"
    repo.add_target(head_target_path("all", bundle.manifest.backbone.sha256, 2), data, custom)
    r = update(state, server.url, root=_root(repo))
    assert r.status == "rejected" and r.reason.startswith(expect), r.reason
    assert "\n" not in r.reason
    assert _active(state)[0] == 1 and DeviceState(state).head_versions() == [1]  # nothing staged, nothing lost


# ------------------------------------------------------------------------------------------ crashes
_UPDATE_SCRIPT = ("import sys; from edgexfer.runtime.updates import update; "
                  "r = update(sys.argv[1], sys.argv[2], root=sys.argv[3]); print(r.status)")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_sigkill_at_every_step_leaves_old_or_new_head(repo, server, bundle, make_device, tmp_path):
    published = _publish_better(repo, bundle, tmp_path)
    env_base = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    states = {step: make_device() for step in STEPS}
    procs = {step: subprocess.Popen([sys.executable, "-c", _UPDATE_SCRIPT, str(state), server.url, str(_root(repo))],
                                    env={**env_base, CRASH_ENV: f"update-{step}"}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for step, state in states.items()}
    for step, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, (step, out, err)
        st = DeviceState(states[step])
        active = st.active()
        record = st.head_record(active.head)
        assert active.bundle == bundle.manifest.backbone.sha256
        st.load_head(active.head, feature_dim=1280 if bundle.manifest.backbone.feature_dim == 1280 else None)
        assert record.sha256 in (file_sha256(bundle.head_path), published["sha256"]), step
        expect_new = STEPS.index(step) >= STEPS.index("switch")
        assert (record.sha256 == published["sha256"]) == expect_new, step
    # a second run completes everywhere
    for step, state in states.items():
        out = subprocess.run([sys.executable, "-c", _UPDATE_SCRIPT, str(state), server.url, str(_root(repo))],
                             env=env_base, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (step, out.stderr)
        assert out.stdout.strip() in ("updated", "recovered", "up-to-date"), (step, out.stdout)
        st = DeviceState(state)
        record = st.head_record(st.active().head)
        assert record.sha256 == published["sha256"] and record.status == "accepted", step
        assert json.loads((state / "trust" / "accepted.json").read_text())[bundle.manifest.backbone.sha256]["version"] == 2
        assert not list((state / "heads").glob(".tmp-*"))
        assert st.head_versions() == [1, 2], step  # a head staged before the kill is reused, not staged twice


# ------------------------------------------------------------------------------------------ host side
def test_signing_backends_agree(tmp_path):
    pytest.importorskip("cryptography", reason="needs pyca/cryptography to compare with")
    keygen(tmp_path / "k.key", role="targets")
    key = KeyFile.load(tmp_path / "k.key")
    a = _make_signer(key, "cryptography").sign(b"payload")
    b = _make_signer(key, "pure-python").sign(b"payload")
    assert a.signature == b.signature


def test_key_files_are_private_and_strict(tmp_path):
    keygen(tmp_path / "root.key")
    assert (tmp_path / "root.key").stat().st_mode & 0o077 == 0
    with pytest.raises(HeadsRepoError, match="exists already"):
        keygen(tmp_path / "root.key")
    (tmp_path / "bad.key").write_text('{"schema": "x"}')
    with pytest.raises(HeadsRepoError, match="wrong format"):
        KeyFile.load(tmp_path / "bad.key")
    with pytest.raises(HeadsRepoError, match="inside the served repository"):
        HeadsRepo(tmp_path / "r", tmp_path / "r" / "keys")


def test_cli_publish_promote_and_device_update(tmp_path, bundle, make_device):
    from edgexfer.cli_fleet import device_update, heads

    runner = CliRunner()
    env = {"EDGEXFER_SIGNER_BACKEND": SIGNER}
    repo_dir, keys = tmp_path / "cli-repo", tmp_path / "cli-keys"

    def ok(cmd, args):
        res = runner.invoke(cmd, args, env=env)
        assert res.exit_code == 0, res.output
        return res.output

    ok(heads, ["keygen", "--out", str(tmp_path / "root.key")])
    ok(heads, ["init", "--repo", str(repo_dir), "--keys", str(keys), "--root-key", str(tmp_path / "root.key")])
    out = json.loads(ok(heads, ["publish", str(bundle.root), "--repo", str(repo_dir), "--keys", str(keys), "--json"]))
    assert out["group"] == "canary" and out["head_version"] == 2
    assert json.loads(out["metrics"])["val_accuracy"] == bundle.manifest.head.metrics["val_accuracy"]
    ok(heads, ["promote", "--repo", str(repo_dir), "--keys", str(keys), "--backbone-sha", out["backbone_sha256"],
               "--version", "2"])
    listed = json.loads(ok(heads, ["list", "--repo", str(repo_dir), "--json"]))["heads"]
    assert [(h["group"], h["head_version"]) for h in listed] == [("all", 2), ("canary", 2)]
    ok(heads, ["timestamp", "--repo", str(repo_dir), "--keys", str(keys), "--days", "2"])
    ok(heads, ["rotate", "timestamp", "--repo", str(repo_dir), "--keys", str(keys), "--root-key", str(tmp_path / "root.key")])
    srv = LoopbackServer(repo_dir)
    try:
        state = make_device()
        res = json.loads(ok(device_update, ["--state", str(state), "--repo", srv.url, "--root",
                                            str(repo_dir / "metadata" / "1.root.json"), "--json"]))
        # the bundle's own head, republished: same decisions, so it passes and becomes head 2
        assert res["status"] == "updated" and res["active_head"] == 2
        record = DeviceState(state).head_record(2)
        assert record.metrics["val_accuracy"] == bundle.manifest.head.metrics["val_accuracy"]
    finally:
        srv.close()


def test_publish_from_a_run_directory(repo, request):
    pytest.importorskip("torch", reason="a run directory is made by `edgexfer train` (host install)")
    run = request.getfixturevalue("demo_run")
    with pytest.raises(HeadsRepoError, match="needs the bundle the devices run .*--bundle BUNDLE_DIR"):
        repo.publish(run.run_dir, group="canary")
    published = repo.publish(run.run_dir, group="canary", bundle=request.getfixturevalue("demo_bundle").bundle)
    run_json = json.loads((run.run_dir / "run.json").read_text())
    assert published["backbone_sha256"] == run_json["backbone"]["onnx_sha256"]
    assert published["head_version"] == 2 and published["group"] == "canary"
    assert "val_accuracy" in json.loads(published["metrics"])
    assert [h["head_version"] for h in repo.heads()] == [2]


def test_update_arguments_fail_with_one_line_errors(repo, server, make_device, tmp_path):
    state = make_device()
    with pytest.raises(UpdateError, match="no update trust root yet .*--root"):
        update(state, server.url)
    with pytest.raises(UpdateError, match="exactly one of --repo URL and --dir DIR"):
        update(state, server.url, local_dir=repo.root_dir, root=_root(repo))
    with pytest.raises(UpdateError, match="http"):
        update(state, "ftp://127.0.0.1/x", root=_root(repo))
    not_root = tmp_path / "x.json"
    not_root.write_text('{"signed": {"_type": "targets"}}')
    with pytest.raises(UpdateError, match="not TUF root metadata"):
        update(make_device(), server.url, root=not_root)
    with pytest.raises(UpdateError, match="update refused at download"):
        update(state, "http://127.0.0.1:9/nothing")  # the discard port: nothing listens on loopback
