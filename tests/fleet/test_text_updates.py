"""Signed head updates of a text bundle (issue 15): a head that learned a new topic on one device is
published (TUF, Ed25519) and another device takes it after its health check, which runs the bundle's
golden texts through the text engine; a head whose signed logits are not reproduced is rolled back.

Torch-free (runs in the device venv): real text bundle, ONNX Runtime, SQLite cache, TUF over loopback HTTP.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fleet_support import variant_head

from edgexfer.publish import head_target_path
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.device import Device
from edgexfer.runtime.heads import Head
from edgexfer.runtime.state import DeviceState
from edgexfer.runtime.updates import signed_golden, update

pytest.importorskip("tuf", reason="needs the `updates` extra (tuf)")

REPO = Path(__file__).resolve().parents[2]
LOVE = sorted((REPO / "data" / "fortunes-love").glob("*.txt"))


@pytest.fixture(scope="module")
def text_installed(tmp_path_factory, device_text_bundle) -> Path:
    state = tmp_path_factory.mktemp("text-update-template") / "state"
    with Device(state) as dev:
        dev.install(device_text_bundle)
    return state


@pytest.fixture
def text_device(tmp_path, text_installed):
    counter = iter(range(100))

    def make() -> Path:
        dest = tmp_path / f"text-device-{next(counter)}"
        shutil.copytree(text_installed, dest, symlinks=True)
        return dest

    return make


def test_a_head_that_learned_a_topic_on_one_device_reaches_another_signed(repo, server, text_device,
                                                                          device_text_bundle):
    teacher, student = text_device(), text_device()
    with Device(teacher) as dev:
        dev.learn([], "love", texts=[p.read_text() for p in LOVE[:10]])
        assert dev.retrain().accepted
        learned = DeviceState(teacher).active().head
    head_file = DeviceState(teacher).heads_dir / str(learned) / "head.safetensors"
    published = repo.publish(head_file, group="all", bundle=device_text_bundle)
    report = update(student, server.url, root=repo.root_path())
    assert report.status == "updated", report
    assert report.health["integrity"]["passed"] and report.health["engine"]["passed"]
    with Device(student) as dev:
        assert dev.status()["head"]["classes"][-1] == "love"
        labels = [r.label for r in dev.predict(LOVE[10:])]
    assert DeviceState(student).head_record(report.active_head).sha256 == published["sha256"]
    assert labels.count("love") >= 7, labels  # the student never saw a love text


def test_a_text_head_whose_signed_logits_are_not_reproduced_is_rolled_back(repo, server, text_device,
                                                                           device_text_bundle, tmp_path):
    state = text_device()
    bundle = Bundle.open(device_text_bundle)
    good = variant_head(bundle, tmp_path / "good.safetensors")
    other = Head.load(variant_head(bundle, tmp_path / "other.safetensors", permute=True))
    sha = bundle.manifest.backbone.sha256
    custom = {"backbone_sha256": sha, "classes": list(bundle.manifest.head.classes), "kind": "linear",
              "head_version": 2, "metrics": "{}", "group": "all", **signed_golden(other, bundle.golden()["features"])}
    repo.add_target(head_target_path("all", sha, 2), good.read_bytes(), custom)
    before = DeviceState(state).active()
    report = update(state, server.url, root=repo.root_path())
    assert report.status == "rolled-back", report
    assert not report.health["engine"]["passed"]  # the golden texts through the text engine and the new head
    assert DeviceState(state).active() == before

