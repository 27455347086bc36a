"""The update health check (issue 10): signed golden logits, the local holdout, McNemar's test.

Real heads repository served over loopback HTTP, real device state directories, the real bundle and
ONNX Runtime, real `train` runs for the head with more classes. The split and the decision on plain
arrays: tests/fleet/test_holdout.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fleet_support import SIGNER, LoopbackServer, variant_head

from edgexfer.publish import HeadsRepoError
from edgexfer.runtime.device import Device
from edgexfer.runtime.heads import Head
from edgexfer.runtime.holdout import MIN_HOLDOUT_SAMPLES
from edgexfer.runtime.state import DeviceState
from edgexfer.runtime.updates import update

pytest.importorskip("tuf", reason="needs the `updates` extra (tuf)")

DEMO = Path(__file__).resolve().parents[2] / "data" / "clipart8-demo"


def _learn(state: Path, per_class: int, classes: dict[str, str]) -> None:
    """Label ``per_class`` demo images of each folder with the given name (``{"music": "drums"}``)."""
    with Device(state) as dev:
        for folder, label in classes.items():
            dev.learn(sorted((DEMO / folder).iterdir())[:per_class], label)


def _rescaled(head: Head, path: Path) -> Path:
    """The same decisions as ``head`` (weights times 1.01): another file, another sha256."""
    t = head.tensors
    Head(head.kind, head.classes, {"W": (t["W"] * 1.01).astype(np.float32), "b": t["b"]}, head.temperature).save(path)
    return path


# ------------------------------------------------------------------------------------------ the local holdout
def test_small_holdout_skips_the_local_comparison_and_says_so(repo, server, bundle, make_device, tmp_path):
    """9 holdout samples cannot tell two heads apart: the signed figures stand, the report says why."""
    state = make_device()
    _learn(state, 12, {"fruit": "fruit", "tools": "tools", "music": "drums"})
    with Device(state) as dev:
        dev.retrain()  # accepted or not: the holdout is what matters here
    published = repo.publish(variant_head(bundle, tmp_path / "v.safetensors"), group="all", bundle=bundle.root)
    r = update(state, server.url, root=repo.root_path())
    assert r.status == "updated", r
    assert r.reason == ("health check passed; local comparison skipped: 9 holdout samples < 20; "
                        "the publisher's signed figures stand")
    assert r.health["local"]["compared"] is False and r.health["local"]["holdout_count"] == 9
    assert r.health["publisher"] == json.loads(published["metrics"])
    assert DeviceState(state).head_record(r.active_head).status == "accepted"


def test_a_clearly_worse_head_is_rolled_back_by_mcnemar_on_the_holdout(repo, server, bundle, make_device, tmp_path):
    """A head with permuted rows is intact (it reproduces its own signed logits) but wrong: 21 holdout samples
    show it. "drums" is a label no head knows: an error for both, and it puts the class order to the test."""
    state = make_device()
    _learn(state, 28, {"fruit": "fruit", "tools": "tools", "music": "drums"})
    with Device(state) as dev:
        retrained = dev.retrain()  # rejected here (the frozen "music" row wins on drums); its holdout counts
    assert retrained.holdout_count == 21 >= MIN_HOLDOUT_SAMPLES
    active = DeviceState(state).active()
    repo.publish(variant_head(bundle, tmp_path / "p.safetensors", permute=True), group="all", bundle=bundle.root)
    r = update(state, server.url, root=repo.root_path())
    assert r.status == "rolled-back", r
    local = r.health["local"]
    assert local["compared"] and local["new_is_worse"] and local["holdout_count"] == 21
    assert local["previous_only"] >= 10 and local["p_value"] <= 0.05
    assert local["accuracy_new"] < local["accuracy_previous"] <= 2 / 3  # drums: wrong for both heads
    assert "new head worse on the local holdout" in r.reason and "McNemar one-sided p = " in r.reason
    assert r.health["integrity"]["passed"] and r.health["engine"]["passed"]  # the head itself is intact
    # the health check held out exactly the samples retrain held out (one split: same seed, same class order)
    assert local["holdout_digest"] == DeviceState(state).head_record(retrained.version).metrics["holdout_digest"]
    assert DeviceState(state).active() == active
    # a head that decides as the active one does passes the same comparison
    current = DeviceState(state).load_head(active.head)
    repo.publish(_rescaled(current, tmp_path / "same.safetensors"), group="all", bundle=bundle.root)
    r = update(state, server.url)
    assert r.status == "updated", r
    assert r.health["local"]["compared"] and not r.health["local"]["new_is_worse"]
    assert r.health["local"]["previous_only"] == r.health["local"]["new_only"] == 0
    assert "McNemar one-sided p = 1 > 0.05" in r.reason


# ------------------------------------------------------------------------------------------ more classes
def test_head_with_more_classes_reaches_the_device(three_then_six_classes, tmp_path):
    """Bundle trained on 3 classes on the device; the host trains 6 on the same backbone; publish + update."""
    from edgexfer.cli import main

    bundle3, run6 = three_then_six_classes
    state = tmp_path / "device"
    with Device(state) as dev:
        dev.install(bundle3)
    runner = CliRunner()
    env = {"EDGEXFER_SIGNER_BACKEND": SIGNER}
    repo_dir, keys = tmp_path / "repo", tmp_path / "keys"

    def run(*args: str):
        return runner.invoke(main, list(args), env=env)

    assert run("heads", "keygen", "--out", str(tmp_path / "root.key")).exit_code == 0
    assert run("heads", "init", "--repo", str(repo_dir), "--keys", str(keys), "--root-key",
               str(tmp_path / "root.key")).exit_code == 0
    # a run dir has no golden set of its own: the devices' bundle is needed, and said so in one line
    res = run("heads", "publish", str(run6), "--repo", str(repo_dir), "--keys", str(keys))
    assert res.exit_code == 1 and "error: a run directory or head file needs the bundle the devices run" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = run("heads", "publish", str(run6 / "head.safetensors"), "--repo", str(repo_dir), "--keys", str(keys),
              "--bundle", str(bundle3), "--backbone-sha", "ab" * 32)
    assert res.exit_code == 1 and "error: the bundle has another backbone than the head" in res.output
    res = run("heads", "publish", str(run6), "--repo", str(repo_dir), "--keys", str(keys), "--group", "all",
              "--bundle", str(bundle3), "--json")
    assert res.exit_code == 0, res.output
    published = json.loads(res.output)
    assert len(published["classes"]) == 6 and published["golden_logits"]["shape"] == [8, 6]

    srv = LoopbackServer(repo_dir)
    try:
        res = run("device", "update", "--state", str(state), "--repo", srv.url, "--root",
                  str(repo_dir / "metadata" / "1.root.json"), "--json")
    finally:
        srv.close()
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["status"] == "updated" and r["active_head"] == 2, r
    assert r["reason"].startswith("health check passed; local comparison skipped: 0 holdout samples < 20")
    assert r["health"]["engine"]["outputs"]["logits"]["top1_agreement"] == 1.0
    with Device(state) as dev:
        status = dev.status()
    assert status["head"]["version"] == 2 and len(status["head"]["classes"]) == 6
    assert status["head"]["source"] == "update"


def test_publish_refuses_a_bundle_of_another_backbone(repo, bundle, tmp_path, reseal):
    import shutil

    other = tmp_path / "other-bundle"
    shutil.copytree(bundle.root, other)
    data = bytearray((other / "backbone.onnx").read_bytes())
    data[-1] ^= 1  # another backbone file: another backbone sha256
    reseal(other, "backbone.onnx", bytes(data))
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["backbone"]["sha256"] = manifest["files"]["backbone.onnx"]["sha256"]
    manifest["head"]["backbone_sha256"] = manifest["backbone"]["sha256"]
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(HeadsRepoError, match=r"^the bundle has another backbone than the head \| got bundle backbone"):
        repo.publish(bundle.root, bundle=other)
