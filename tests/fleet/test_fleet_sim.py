"""The fleet on Flower's simulation engine (Ray): the deployment's ServerApp and ClientApp on virtual nodes.

Needs the ``fleet-sim`` extra (``flwr[simulation]``, Ray), which ``make test`` does not install: skipped
without it. One small federation (20 virtual devices, 2 rounds, a fraction asked per round) through
``flwr.simulation.run_simulation``; the 1,000-device study is benchmarks/fleet_sim.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgexfer.fleet.result_bundle import write_result_bundle
from edgexfer.fleet.server_app import FleetSettings, sample_nodes
from edgexfer.fleet.simulation import (
    backend_config,
    non_iid_partitions,
    pool_training_set,
    simulate,
    write_pool,
)
from edgexfer.runtime.heads import Head


def test_partitions_are_non_iid_and_sized():
    labels = np.repeat(np.array(list("abcdefgh")), 50)
    parts = non_iid_partitions(labels, 300, seed=1)
    sizes = [len(p) for p in parts]
    held = [len(set(labels[p])) for p in parts]
    assert min(sizes) >= 1 and max(sizes) <= 50 and np.median(sizes) < 20
    assert set(held) == {1, 2, 3, 4}
    assert all(len(set(p.tolist())) == len(p) for p in parts)  # no sample twice on one device


def test_sampling_asks_a_fraction_drawn_anew_each_round():
    settings = FleetSettings(bundle="b", out="o", min_devices=2, fraction=0.1)
    first, second = sample_nodes(range(1000), settings, 1), sample_nodes(range(1000), settings, 2)
    assert len(first) == len(second) == 100 and first != second
    assert first == sample_nodes(reversed(range(1000)), settings, 1)  # the same draw for the same round
    assert len(sample_nodes(range(5), settings, 1)) == 2  # at least min_devices
    assert sample_nodes(range(5), FleetSettings(bundle="b", out="o"), 1) == list(range(5))


class PoolGrid:
    """An in-process stand-in for Flower's Grid: node 1000 + k answers with the same ClientApp, partition k."""

    def __init__(self, pool, devices):
        from edgexfer.runtime.fleet_client import build_client_app

        self.app = build_client_app(pool_training_set(pool))
        self.devices = devices

    def get_node_ids(self):
        return [1000 + k for k in range(self.devices)]

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, RecordDict

        for message in messages:
            k = int(message.metadata.dst_node_id) - 1000
            yield self.app(message, Context(run_id=1, node_id=1000 + k, state=RecordDict(), run_config={},
                                            node_config={"partition-id": k, "num-partitions": self.devices}))


@pytest.mark.slow
def test_the_simulation_engine_carries_the_deployment_apps_to_the_in_process_result(tmp_path, bundle):
    """20 virtual devices on Ray end with the head of the same rounds run in process: the engine carries the
    ServerApp's messages to the ClientApp and back unchanged."""
    pytest.importorskip("ray", reason="needs the fleet-sim extra (pip install -e '.[fleet-sim]'): Ray")
    pytest.importorskip("flwr", reason="needs the fleet extra")
    from edgexfer.fleet.server_app import run_federation

    with np.load(bundle.root / "exemplars.npz") as data:
        features = data["features"].astype(np.float32)
        labels = np.asarray(bundle.head().classes)[data["labels"]]
    rng = np.random.default_rng(0)
    val = np.sort(rng.permutation(len(labels))[:40])
    pool = np.setdiff1d(np.arange(len(labels)), val)
    parts = non_iid_partitions(labels[pool], 20, seed=0, sizes=(4, 12), classes_per_device=(2, 3))
    write_pool(tmp_path / "pool.npz", features[pool], labels[pool], parts, bundle.manifest.backbone.sha256)
    np.savez(tmp_path / "val.npz", features=features[val], labels=labels[val])
    head = bundle.head()
    zero = Head(head.kind, head.classes, {k: np.zeros_like(v) for k, v in head.tensors.items()})
    start = write_result_bundle(bundle, zero, tmp_path / "start", {"rounds": []})

    def settings(out):
        return FleetSettings(bundle=str(start.root), out=str(tmp_path / out), rounds=3, min_devices=2,
                             round_timeout=60, wait_timeout=30, val_features=str(tmp_path / "val.npz"),
                             min_available=20)

    record = simulate(settings("ray"), tmp_path / "pool.npz", 20, backend=backend_config(2))
    local = run_federation(PoolGrid(tmp_path / "pool.npz", 20), settings("local"), log=lambda line: None)

    assert [r["asked"] for r in record["rounds"]] == [20, 20, 20]
    # round 1 is the statistics round: a device with fewer than 5 samples of every class it holds sends none
    # (runtime/fleet_stats.py MIN_CLASS_SAMPLES) and answers empty
    assert all(len(r["accepted"]) + len(r["empty"]) == 20 and not r["rejected"] and not r["silent"]
               for r in record["rounds"])
    assert record["rounds"][0]["kind"] == "statistics" and len(record["rounds"][0]["accepted"]) >= 2
    reply = next(iter(record["rounds"][0]["devices"].values()))
    assert reply["received"]["records"] == ["head", "metrics", "update"]
    # the same merged counts each round, the same head at the end: to the order replies arrive in, which
    # changes float sums, and unconverged local fits (max_iter) carry that into the next round (3e-5 seen)
    assert [r["counts"] for r in record["rounds"]] == [r["counts"] for r in local["rounds"]]
    ray_head, local_head = (Head.load(tmp_path / out / "head.safetensors") for out in ("ray", "local"))
    for name, tensor in local_head.tensors.items():
        np.testing.assert_allclose(ray_head.tensors[name], tensor, atol=2e-3 * np.abs(tensor).max())
    assert record["memory"]["by_process"]["ray::ClientAppActor"]["processes"] >= 1
