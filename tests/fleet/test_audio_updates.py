"""Signed head updates of an audio bundle (issue 26 point 3): a head that learned a word on one device from
five recordings is published (TUF, Ed25519) and another device takes it after its health check, which runs
the bundle's golden clips through the audio engine and the new head.

Torch-free (runs in the device venv): the spoken14 bundle without "zero", ONNX Runtime, SQLite cache, TUF over
loopback HTTP.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgexfer.runtime.device import Device
from edgexfer.runtime.predictor import SampleError
from edgexfer.runtime.state import DeviceState
from edgexfer.runtime.updates import update

pytest.importorskip("tuf", reason="needs the `updates` extra (tuf)")
pytest.importorskip("soundfile", reason="needs the `audio` extra")

NEW_WORD = "zero"  # tests/conftest.py AUDIO_NEW_WORD: the device audio bundle is trained without it


@pytest.fixture(scope="module")
def audio_installed(tmp_path_factory, device_audio_bundle) -> Path:
    state = tmp_path_factory.mktemp("audio-update-template") / "state"
    with Device(state) as dev:
        dev.install(device_audio_bundle)
    return state


def test_an_audio_head_that_learned_a_word_on_one_device_reaches_another_signed(
        repo, server, audio_installed, device_audio_bundle, spoken14, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    for dest in (teacher, student):
        shutil.copytree(audio_installed, dest, symlinks=True)
    five = sorted((spoken14 / "train" / NEW_WORD).glob("*.wav"))[:5]
    with Device(teacher) as dev:
        dev.learn(five, NEW_WORD)
        assert dev.retrain(policy="fewshot").accepted
        learned = DeviceState(teacher).active().head
    head_file = DeviceState(teacher).heads_dir / str(learned) / "head.safetensors"
    published = repo.publish(head_file, group="all", bundle=device_audio_bundle)
    report = update(student, server.url, root=repo.root_path())
    assert report.status == "updated", report
    assert report.health["integrity"]["passed"] and report.health["engine"]["passed"]
    assert DeviceState(student).head_record(report.active_head).sha256 == published["sha256"]
    clips = sorted((spoken14 / "test" / NEW_WORD).glob("*.wav"))
    with Device(student) as dev:
        assert NEW_WORD in dev.status()["head"]["classes"]
        right = [not isinstance(r, SampleError) and r.label == NEW_WORD for r in dev.predict(clips, top_k=1)]
    assert sum(right) >= 12, f"{sum(right)} of {len(right)}"  # the student never heard the word
