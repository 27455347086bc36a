"""Fleet learning of an audio head (issue 26 point 3, "federate"): three devices of the spoken14 bundle that
never heard "zero" learn their own words, one of them "zero" from 5 recordings; the ServerApp's rounds (the
statistics round, then FedProx) over the real ClientApp give a head that knows "zero" on every device.
Flower's Grid is replayed in this process (tests/fleet/fleet_support.py ``ReplayGrid``); the deployment over
real SuperNodes is tested with images (test_fleet_learning.py) and texts (test_fleet_text.py)."""
from __future__ import annotations

import shutil
import warnings

import pytest
from fleet_support import ReplayGrid

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.device import Device

pytest.importorskip("flwr", reason="fleet learning needs the `fleet` extra (flwr)")
pytest.importorskip("soundfile", reason="needs the `audio` extra")

NEW_WORD = "zero"  # tests/conftest.py AUDIO_NEW_WORD: the device audio bundle is trained without it
#: what each device hears and labels: a few clips of its words, and "zero" on device 0 only
WORDS = (("zero", "yes", "no"), ("yes", "up", "down"), ("no", "left", "right"))


@pytest.fixture(autouse=True)
def flower_task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def test_three_audio_devices_federate_a_head_that_knows_the_word_one_device_learned(
        device_audio_bundle, spoken14, tmp_path):
    from edgexfer.fleet.server_app import FleetSettings, run_federation

    template = tmp_path / "template"
    with Device(template) as dev:
        dev.install(device_audio_bundle)
    states = []
    for k, words in enumerate(WORDS):
        state = tmp_path / f"device-{k}"
        shutil.copytree(template, state, symlinks=True)
        with Device(state) as dev:
            for word in words:
                clips = sorted((spoken14 / "train" / word).glob("*.wav"))
                dev.learn(clips[k * 6:k * 6 + (5 if word == NEW_WORD else 6)], word, augment=0)
        states.append(state)
    settings = FleetSettings(bundle=str(device_audio_bundle), out=str(tmp_path / "out"), rounds=2, min_devices=2)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record = run_federation(ReplayGrid(states, lambda node, reply: reply), settings, log=lines.append)
    assert [r["kind"] for r in record["rounds"]] == ["statistics", "fedprox"]
    assert all(len(r["accepted"]) == 3 for r in record["rounds"]), record["rounds"]
    merged = Bundle.open(tmp_path / "out")
    assert NEW_WORD in merged.head().classes
    # a device that never heard the word takes the fleet's head and recognises it in unseen voices
    with Device(states[1]) as dev:
        dev.install(tmp_path / "out")
        results = dev.predict(sorted((spoken14 / "test" / NEW_WORD).glob("*.wav")), top_k=1)
    right = sum(r.label == NEW_WORD for r in results)
    print(f"{right} of {len(results)} unseen {NEW_WORD!r} clips; rounds", [r["val_accuracy"] for r in record["rounds"]])
    assert right >= 10, f"{right} of {len(results)} unseen '{NEW_WORD}' clips"
