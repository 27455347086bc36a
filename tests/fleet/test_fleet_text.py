"""Fleet learning on texts: three text devices (real SuperNodes on loopback) federate a MiniLM head.

One device learned a topic the bundle does not know ("love"); after the federation the fleet's head
knows it too, and no text or feature vector travelled: only the head and counts.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from federation_support import Deployment

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.device import Device

pytest.importorskip("flwr", reason="fleet learning needs the `fleet` extra (flwr)")

REPO = Path(__file__).resolve().parents[2]
PER_DEVICE_CLASS = 12  #: texts of one class on one device
VAL_PER_CLASS = 15


def _fortunes7() -> Path:
    path = REPO.parent / "shared" / "datasets" / "fortunes7"
    if not path.is_dir():
        pytest.skip(f"the shared fortunes7 data set is not at {path}")
    return path


def test_three_text_devices_federate_a_head_that_learns_a_topic_one_device_taught(device_text_bundle, tmp_path):
    fortunes = _fortunes7()
    known = list(Bundle.open(device_text_bundle).head().classes)
    assert "love" not in known and len(known) >= 3
    demo = {p.name for p in (REPO / "data" / "fortunes-demo").rglob("*.txt")}
    rng = random.Random(0)
    files = {}
    for c in [*known, "love"]:
        pool = sorted(p for p in (fortunes / c).glob("*.txt") if p.name not in demo)
        rng.shuffle(pool)
        files[c] = pool
    val = tmp_path / "val"
    for c, pool in files.items():
        (val / c).mkdir(parents=True)
        for f in pool[:VAL_PER_CLASS]:
            shutil.copy(f, val / c / f.name)
    # non-IID: each device holds two known topics; device 0 also learned "love", which the fleet never saw
    holdings = [[known[0], known[1], "love"], [known[1], known[2]], [known[2], known[0]]]
    template = tmp_path / "template"
    with Device(template) as dev:
        dev.install(device_text_bundle)
    states, used = [], {c: VAL_PER_CLASS for c in files}
    for k, topics in enumerate(holdings):
        state = tmp_path / f"device-{k}"
        shutil.copytree(template, state, symlinks=True)
        with Device(state) as dev:
            for c in topics:
                take = files[c][used[c]:used[c] + PER_DEVICE_CLASS]
                used[c] += PER_DEVICE_CLASS
                report = dev.learn([str(p) for p in take], c)
                assert report.added == len(take) and not report.errors
        states.append(state)

    deployment = Deployment(tmp_path)
    try:
        deployment.serve("--bundle", str(device_text_bundle), "--out", str(tmp_path / "out"), "--rounds", "3",
                         "--min-devices", "3", "--val", str(val), "--round-timeout", "90", "--wait-timeout", "180", "--insecure")
        for state in states:
            deployment.join(state, "--insecure")
        code, out = deployment.result(timeout=3 * 60 + 240)
    finally:
        deployment.close()
    assert code == 0, deployment.server_log.read_text()[-3000:]
    result = Bundle.open(json.loads(out)["out"])
    assert result.modality == "text" and "love" in result.head().classes  # the new topic reached the fleet's head
    report = json.loads((result.root / "reports" / "fleet.json").read_text())
    dim = result.manifest.backbone.feature_dim
    n = len(result.head().classes)
    assert [r["kind"] for r in report["rounds"]] == ["statistics", "fedprox", "fedprox"]
    for r in report["rounds"]:
        assert len(r["accepted"]) == 3 and not r["rejected"] and not r["silent"]
        for device in r["devices"].values():
            received = device["received"]
            assert received["records"] == ["head", "metrics", "update"]
            if r["kind"] == "statistics":  # round 1: per-class sums and the within-class scatter factor
                assert set(received["arrays"]) == {"sums", "scatter_factor"}
                assert received["arrays"]["sums"] in ([n - 1, dim], [n, dim])
                assert received["arrays"]["scatter_factor"][0] <= sum(device["counts"].values())
                continue
            # then only head tensors (the new row included) and counts travelled
            assert set(received["arrays"]) == {"W", "b"} and received["arrays"]["W"][1] == dim
            assert received["arrays"]["W"][0] in (n - 1, n) and received["bytes"] < 10_000
    assert report["final_counts"]["love"] == PER_DEVICE_CLASS

    # the fleet's head on held-out texts of every topic, the new one included (edgexfer eval reads text data)
    from edgexfer.evaluate import evaluate

    scores = evaluate(result.root, val, progress=False)
    kept = report["rounds"][report["kept_round"] - 1]  # the best round on --val is the result
    assert scores["accuracy"] == pytest.approx(kept["val_accuracy"], abs=1e-9)
    love_texts = sorted((val / "love").glob("*.txt"))
    with Device(tmp_path / "device-1") as dev:  # a device that never saw a love text takes the fleet's head
        dev.install(result.root)
        answers = dev.predict([str(p) for p in love_texts])
    love_right = np.mean([a.label == "love" for a in answers])
    print(f"text fleet: accuracy {scores['accuracy']:.3f} on {len(list(val.rglob('*.txt')))} held-out texts; "
          f"love {love_right:.2f} on a device that never saw one")
    assert scores["accuracy"] >= 0.6 and love_right >= 0.5
