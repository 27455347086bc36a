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
def test_small_holdout_compares_on_all_labelled_samples(repo, server, bundle, make_device, tmp_path):
    """9 holdout samples cannot decide McNemar's test: the heads are compared on all 36 labelled samples. A
    signed head that does not know "drums", a class the device learned, gets its drums wrong: rolled back."""
    state = make_device()
    _learn(state, 12, {"fruit": "fruit", "tools": "tools", "music": "drums"})
    with Device(state) as dev:
        retrained = dev.retrain()
    assert retrained.accepted and "drums" in DeviceState(state).load_head(DeviceState(state).active().head).classes
    repo.publish(variant_head(bundle, tmp_path / "v.safetensors"), group="all", bundle=bundle.root)
    r = update(state, server.url, root=repo.root_path())
    assert r.status == "rolled-back", r
    local = r.health["local"]
    assert local["compared"] and local["method"] == "all-samples" and local["holdout_count"] == 9
    assert local["samples"] == 36 and local["new_is_worse"]
    assert local["previous_only"] - local["new_only"] > 0.1 * 36 and local["accuracy_new"] <= 2 / 3  # drums
    assert r.reason.endswith("(9 holdout samples < 20)") and "new head worse on the local labelled samples" in r.reason
    # a head that decides as the active one does passes the same comparison, and the report says how it was judged
    current = DeviceState(state).load_head(DeviceState(state).active().head)
    published = repo.publish(_rescaled(current, tmp_path / "same.safetensors"), group="all", bundle=bundle.root)
    r = update(state, server.url)
    assert r.status == "updated", r
    assert r.reason.startswith("health check passed; accuracy on all 36 labelled samples ")
    assert r.reason.endswith("(0 only the previous head gets right, 0 only the new one): not more than 0.10 worse "
                             "(9 holdout samples < 20)")
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
    assert r["reason"].startswith("health check passed; local comparison skipped: no labelled samples on the device")
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


# ------------------------------------------------------------------------------------------ a poisoned fleet head
def _poisoned(bundle, path: Path, classes: list[str]) -> Path:
    """The bundle's head with the rows of ``classes`` rotated among them: intact, signed, and wrong on them."""
    head = bundle.head()
    order = list(range(len(head.classes)))
    where = [head.classes.index(c) for c in classes]
    for i, j in zip(where, where[1:] + where[:1]):
        order[i] = j
    W, b = head.tensors["W"][order], head.tensors["b"][order]
    Head(head.kind, head.classes, {"W": W, "b": b}, head.temperature).save(path)
    return path


def test_a_poisoned_fleet_head_is_refused_by_a_device_with_11_labelled_samples(repo, server, bundle, make_device,
                                                                               tmp_path):
    """Issue 24: a fleet head signed with ``fleet_samples: 54000043`` and 0.595 accuracy (the active head
    0.845) installed, because the device had fewer than 20 holdout samples and skipped the comparison.
    Now it is compared on all 11 labelled samples and rolled back; a head as good as the active one passes."""
    state = make_device()
    with Device(state) as dev:
        for folder, n in (("fruit", 4), ("tools", 4), ("music", 3)):
            dev.learn(sorted((DEMO / folder).iterdir())[:n], folder)
    repo.publish(variant_head(bundle, tmp_path / "good.safetensors", scale=1.02), group="all", bundle=bundle.root,
                 metrics={"fleet_samples": 412, "val_accuracy": 0.845})
    good = update(state, server.url, root=repo.root_path())
    assert good.status == "updated", good
    assert good.health["local"]["method"] == "all-samples" and good.health["local"]["samples"] == 11
    assert not good.health["local"]["new_is_worse"] and good.health["local"]["holdout_count"] < MIN_HOLDOUT_SAMPLES
    active = DeviceState(state).active()

    poisoned = _poisoned(bundle, tmp_path / "poisoned.safetensors", ["fruit", "tools", "hardware"])
    repo.publish(poisoned, group="all", bundle=bundle.root, metrics={"fleet_samples": 54000043, "val_accuracy": 0.595})
    r = update(state, server.url)
    assert r.status == "rolled-back", r
    local = r.health["local"]
    assert local["compared"] and local["method"] == "all-samples" and local["new_is_worse"]
    assert local["samples"] == 11 and local["accuracy_new"] < local["accuracy_previous"] - 0.1
    assert "new head worse on the local labelled samples: accuracy on all 11 labelled samples" in r.reason
    assert r.health["integrity"]["passed"] and r.health["engine"]["passed"]  # signed and intact: only wrong
    assert r.health["publisher"]["fleet_samples"] == 54000043
    assert DeviceState(state).active() == active
