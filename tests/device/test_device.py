"""The device workflow on a real state directory: install, predict, learn, retrain, gate, rollback."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime.device import Device
from edgexfer.runtime.errors import EdgexferError, HeadError
from edgexfer.runtime.predictor import Prediction, SampleError
from edgexfer.runtime.state import DeviceState

DEMO = Path(__file__).resolve().parents[2] / "data" / "clipart8-demo"


def _images(cls: str, n: int, skip: int = 0) -> list[Path]:
    return sorted((DEMO / cls).iterdir())[skip:skip + n]


@pytest.fixture
def device(tmp_path, device_bundle):
    dev = Device(tmp_path / "state")
    dev.install(device_bundle)
    yield dev
    dev.close()


def test_install_verifies_copies_and_activates(device, device_bundle):
    st = device.status()
    assert st["head"]["version"] == 1 and st["backend"] == "onnxruntime"
    sha = st["bundle"]["backbone_sha256"]
    assert (device.state.bundles_dir / sha / "manifest.json").is_file()
    again = device.install(device_bundle)  # idempotent: same bundle, same head version
    assert again["head"] == 1 and not again["new_bundle"]


def test_install_refuses_a_tampered_bundle_and_keeps_the_device_as_it_was(device, device_bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(device_bundle, bad)
    blob = bytearray((bad / "backbone.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "backbone.onnx").write_bytes(bytes(blob))
    before = device.state.active_path.read_bytes()
    with pytest.raises(EdgexferError) as err:
        device.install(bad)
    assert "backbone.onnx: sha256 differs" in str(err.value)
    assert device.state.active_path.read_bytes() == before


def test_reexported_bundle_with_the_same_backbone_installs_its_new_head(device, device_bundle, tmp_path, reseal):
    """A better head exported with the same frozen backbone is a new bundle content, not the old one again."""
    from edgexfer.runtime.heads import Head

    newer = tmp_path / "newer"
    shutil.copytree(device_bundle, newer)
    head = Head.load(newer / "head.safetensors")
    scaled = Head(head.kind, head.classes, {"W": head.tensors["W"] * 1.25, "b": head.tensors["b"]}, head.temperature)
    scaled.save(tmp_path / "scaled.safetensors")
    reseal(newer, "head.safetensors", (tmp_path / "scaled.safetensors").read_bytes())
    # as a re-export would: the golden logits are those of the new head (the golden check compares them)
    golden = dict(np.load(newer / "golden.npz"))
    golden["logits"] = scaled.logits(golden["features"])
    buf = io.BytesIO()
    np.savez(buf, **golden)
    reseal(newer, "golden.npz", buf.getvalue())
    old_content = (device.state.bundles_dir / device.state.active().bundle).resolve()

    result = device.install(newer)
    assert result["new_bundle"] and result["head"] == 2 and result["bundle"] == device.state.active().bundle
    active = device.state.active()
    assert (active.head, active.previous_head) == (2, 1)
    np.testing.assert_array_equal(device.state.load_head(2).tensors["W"], scaled.tensors["W"])
    assert device.bundle().root != old_content and device.bundle().head_path.read_bytes() == \
        (newer / "head.safetensors").read_bytes()
    assert old_content.is_dir()  # the previous content stays for processes that still read it
    assert device.rollback().head == 1


def test_predict_labels_good_inputs_and_reports_bad_ones(device):
    apple = _images("fruit", 1)[0]
    bad_array = np.full((224, 224, 3), 0.5, dtype=np.float32)
    results = device.predict([apple, b"not an image", bad_array, apple.read_bytes()[:200]])
    assert isinstance(results[0], Prediction) and results[0].label == "fruit" and results[0].backend == "onnxruntime"
    assert all(isinstance(r, SampleError) for r in results[1:])
    assert "dtype" in results[2].error


def test_learn_runs_the_backbone_once_per_new_image(device):
    images = _images("music", 5)
    first = device.learn(images, "music")
    assert (first.added, first.backbone_runs) == (5, 5)
    again = device.learn(images, "music")
    assert (again.added, again.already_known, again.backbone_runs) == (0, 5, 0)
    assert device.status()["cache"]["samples_per_class"] == {"music": 5}


def test_learn_keeps_good_samples_when_some_are_bad(device, tmp_path):
    txt = tmp_path / "notes.jpg"
    txt.write_text("hello")
    report = device.learn([*_images("tools", 2), txt, tmp_path / "missing.png"], "tools")
    assert report.added == 2 and len(report.errors) == 2
    assert device.status()["cache"]["samples_per_class"] == {"tools": 2}


def test_learn_keeps_features_only_for_what_the_per_class_capacity_keeps(device):
    capped = Device(device.state.root, per_class_capacity=3)
    try:
        report = capped.learn(_images("fruit", 6), "fruit")
        status = capped.status()
    finally:
        capped.close()
    # one batch: the capacity admits 3 of the 6 before the backbone runs, on those 3 only
    assert (report.added, report.dropped, report.backbone_runs, report.capacity) == (3, 3, 3, 3)
    # the dropped ones left no row and no features behind
    assert status["cache"] == {"samples_per_class": {"fruit": 3}, "features_for_backbone": 3}


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def test_retrain_adds_a_class_then_rollback_returns_to_the_bundle_head(device):
    # a new class the bundle never saw: plain coloured squares, easy to separate
    rng = np.random.default_rng(0)
    squares = [_png(tuple(int(v) for v in rng.integers(0, 256, 3))) for _ in range(12)]
    assert device.learn(squares, "squares").added == 12
    device.learn(_images("fruit", 6, skip=20), "fruit")
    report = device.retrain()
    assert report.accepted and report.version == 2
    assert report.classes[-1] == "squares" and len(report.classes) == 9
    assert report.exemplar_count > 0
    assert device.status()["head"]["version"] == 2
    result = device.predict([_png((10, 200, 30))])[0]
    assert isinstance(result, Prediction) and result.label == "squares"
    device.rollback()
    assert device.status()["head"]["version"] == 1
    statuses = {h["version"]: (h["status"], h["active"]) for h in device.heads()}
    assert statuses == {1: ("accepted", True), 2: ("accepted", False)}


def test_a_candidate_that_fails_the_gate_is_kept_as_rejected(device):
    device.learn(_images("sports", 8), "sports")
    device.learn(_images("music", 8), "music")
    # an impossible gate: the new head would have to beat the active one by 2 points of accuracy
    report = device.retrain(tolerance=-2.0)
    assert not report.accepted and report.active_head == 1
    assert device.state.active().head == 1
    rejected = device.state.head_record(report.version)
    assert rejected.status == "rejected" and "holdout_accuracy" in rejected.metrics
    last = json.loads(device.state.last_retrain_path.read_text())
    assert last["accepted"] is False


def test_a_head_bound_to_another_backbone_is_refused(device):
    active = device.state.active()
    _, head = device.active_head()
    record = device.state.add_head(head, backbone_sha256="0" * 64, parent=active.head, status="candidate", source="update")
    with pytest.raises(HeadError) as err:
        device.state.activate_head(record.version)
    assert "bound to another backbone" in str(err.value)
    assert device.state.active() == active


def test_no_model_installed_is_a_clear_error(tmp_path):
    with pytest.raises(EdgexferError) as err:
        Device(tmp_path / "empty").status()
    assert "edgexfer device install" in str(err.value)


def test_state_survives_a_fresh_process(device):
    """A second Device on the same directory sees the same active pair (nothing lives only in memory)."""
    device.learn(_images("vehicles", 3), "vehicles")
    other = Device(device.state.root)
    assert other.status()["cache"]["samples_per_class"] == {"vehicles": 3}
    assert DeviceState(device.state.root).active() == device.state.active()


def test_state_from_before_bundle_contents_is_refused_before_anything_changes(tmp_path, device_bundle):
    """A real bundles/<sha>/ directory (an older edgexfer's layout): one line, nothing copied or activated."""
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.state import StateError

    state = DeviceState(tmp_path / "state")
    sha = Bundle.open(device_bundle).manifest.backbone.sha256
    shutil.copytree(device_bundle, state.bundles_dir / sha)
    with Device(state.root) as dev, pytest.raises(StateError, match="older edgexfer.*remove") as err:
        dev.install(device_bundle)
    assert "\n" not in str(err.value)
    assert [p.name for p in state.bundles_dir.iterdir()] == [sha] and not state.active_path.exists()
