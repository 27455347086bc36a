"""The host side of a federation: Flower's ``ServerApp`` and its rounds.

:func:`run_federation` is the whole federation as a plain function of a Flower ``Grid`` (the tests may
drive it with a stand-in): it waits for enough devices, and each round sends the global head to every
connected device, waits at most ``round_timeout`` seconds for replies, checks each reply
(:func:`~edgexfer.runtime.federated.check_update`), merges the good ones (:class:`HeadFedAvg`) and
evaluates the result on the validation features. Devices that do not answer in time, answer with an
error or send a bad head are named in the round's record; the round goes on without them. The last
head is written as a bundle (:func:`~edgexfer.fleet.result_bundle.write_result_bundle`); a federation in
which no round merged fails and writes nothing. Devices are named by the names ``fleet serve``
registered their keys under (``device_names``), else ``node-ID``.

Each event is one line on stdout (``flwr run --stream`` carries it to ``edgexfer fleet serve``):
``fleet round=2/5 asked=8 merged=7 empty=0 rejected=1 silent=0 val_accuracy=0.912 seconds=3.41``.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.fleet import checkpoint
from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.federated import (
    HeadFedAvg,
    Rejection,
    UpdateRejected,
    check_update,
    leave_out,
    require_federated_kind,
)
from edgexfer.runtime.fleet_client import STATISTICS
from edgexfer.runtime.fleet_stats import check_statistics, statistics_round
from edgexfer.runtime.heads import Head
from edgexfer.runtime.optional import lazy_attribute
from edgexfer.runtime.privacy import privacy_record

#: the records a device's reply may hold; anything else is refused (and named) as a protocol breach
REPLY_RECORDS = frozenset({"head", "update", "metrics"})


@dataclass(frozen=True)
class FleetSettings:
    """What ``edgexfer fleet serve`` passes to the ServerApp (as Flower run config)."""

    bundle: str
    out: str
    rounds: int = 3
    min_devices: int = 2
    round_timeout: float = 60.0  #: seconds a round waits for replies; late devices are left out
    wait_timeout: float = 300.0  #: seconds to wait for ``min_devices`` devices before the first round
    val_features: str = ""  #: .npz with ``features`` and ``labels`` (class names), or "" for none
    C: float = 1.0
    proximal: float = 1.0  #: FedProx mu of the devices' local training
    momentum: float = 0.8  #: server momentum of linear heads (FedAvgM)
    rows: str = "all"  #: "all" or "holders" (see edgexfer.runtime.federated)
    dp_clip: float = 0.0  #: central DP: clipping norm of each device's step (0: off)
    dp_noise: float = 0.0  #: central DP: noise multiplier (std = dp_noise·dp_clip/devices)
    max_iter: int = 200
    device_names: str = ""  #: JSON {node id: registered name} (fleet serve's --auth-keys); others are node-ID
    checkpoint: str = ""  #: directory of a checkpoint per completed round; a run continues from the last one
    #: share of the connected devices asked each round (Flower's fraction_train), at least min_devices of them;
    #: 1.0 asks every device. A large fleet samples: each round costs what the devices asked cost.
    fraction: float = 1.0
    sample_seed: int = 0  #: seed of the devices drawn each round (round r draws with seed sample_seed + r)
    #: devices to wait for before round 1 when more than min_devices (Flower's min_available_nodes): a sampled
    #: fleet's first draw is then over the whole fleet, not the first devices to connect
    min_available: int = 0
    first_round: str = "statistics"  #: "statistics" (linear heads, no DP: runtime/fleet_stats.py) or "fedprox"

    def namer(self) -> Callable[[int], str]:
        """node id -> the name its key was registered under, else ``node-ID``."""
        try:
            names = {int(k): str(v) for k, v in json.loads(self.device_names or "{}").items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise InputError("the federation's device names are malformed", got=self.device_names[:80],
                             expected="a JSON object of node id to name", todo="start it with edgexfer fleet serve") from exc
        return lambda node: names.get(int(node), f"node-{node}")

    @classmethod
    def from_run_config(cls, config: Any) -> FleetSettings:
        get = dict(config).get
        try:
            return cls(bundle=str(get("bundle")), out=str(get("out")), rounds=int(get("rounds", 3)),
                       min_devices=int(get("min-devices", 2)), round_timeout=float(get("round-timeout", 60.0)),
                       wait_timeout=float(get("wait-timeout", 300.0)), val_features=str(get("val-features", "")),
                       C=float(get("C", 1.0)), proximal=float(get("proximal", 1.0)),
                       momentum=float(get("momentum", 0.8)), rows=str(get("rows", "all")),
                       dp_clip=float(get("dp-clip", 0.0)), dp_noise=float(get("dp-noise", 0.0)),
                       max_iter=int(get("max-iter", 200)), device_names=str(get("device-names", "")),
                       checkpoint=str(get("checkpoint", "")), fraction=float(get("fraction-train", 1.0)),
                       sample_seed=int(get("sample-seed", 0)), min_available=int(get("min-available", 0)),
                       first_round=str(get("first-round", "statistics")))
        except (TypeError, ValueError) as exc:
            raise InputError("the federation's run config is malformed", got=str(exc)[:80],
                             expected="the keys edgexfer fleet serve writes", todo="start it with edgexfer fleet serve") from exc

    def to_run_config(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "out": self.out, "rounds": self.rounds, "min-devices": self.min_devices,
                "round-timeout": self.round_timeout, "wait-timeout": self.wait_timeout,
                "val-features": self.val_features, "C": self.C, "proximal": self.proximal, "momentum": self.momentum,
                "rows": self.rows, "dp-clip": self.dp_clip, "dp-noise": self.dp_noise, "max-iter": self.max_iter,
                "device-names": self.device_names, "checkpoint": self.checkpoint, "fraction-train": self.fraction,
                "sample-seed": self.sample_seed, "min-available": self.min_available, "first-round": self.first_round}

    def statistics_first(self, head: Head) -> bool:
        """Whether round 1 is the statistics round: linear heads without differential privacy."""
        return self.first_round == "statistics" and head.kind == "linear" and not self.dp_clip


def validation_accuracy(head: Head, features: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``head`` on labelled features; a label the head does not know counts as wrong."""
    predicted = np.asarray(head.classes)[head.logits(features).argmax(axis=1)]
    return float(np.mean(predicted == labels))


def _round_message(head: Head, settings: FleetSettings, backbone_sha256: str, node: int, server_round: int,
                   fleet_samples: int, message_type: str = "train") -> Any:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    config = ConfigRecord({"kind": head.kind, "classes": json.dumps(list(head.classes)),
                           "backbone_sha256": backbone_sha256, "round": server_round, "C": settings.C,
                           "proximal": settings.proximal, "max_iter": settings.max_iter, "rows": settings.rows,
                           "fleet_samples": fleet_samples})
    arrays = ArrayRecord({name: Array(np.ascontiguousarray(t)) for name, t in head.tensors.items()})
    return Message(RecordDict({"head": arrays, "config": config}), dst_node_id=node, message_type=message_type)


def _reply_to_update(reply: Any, device: str, head: Head, backbone_sha256: str,
                     check: Callable[..., Any] = check_update) -> tuple[Any, dict[str, Any]]:
    """Check one reply with ``check`` (a head update, or statistics in round 1); raises
    :class:`UpdateRejected` (naming ``device``) for anything unmergeable."""
    if reply.has_error():
        raise UpdateRejected(f"update from device {device}: the device failed",
                             got=str(reply.error.reason).splitlines()[0][:200] if reply.error.reason else "no reason",
                             expected="a trained head", todo="see the device's log (edgexfer device federate)")
    content = reply.content
    records = set(content.keys())
    if "error" in records:
        reason = content["error"].get("reason", "no reason")
        raise UpdateRejected(f"update from device {device}: the device could not train", got=str(reason)[:300],
                             expected="a trained head", todo="fix the device (see the reason)")
    if not records <= REPLY_RECORDS or not {"head", "update"} <= records:
        raise UpdateRejected(f"update from device {device}: unexpected records in the reply", got=sorted(records),
                             expected=f"exactly {sorted(REPLY_RECORDS)}", todo="the device runs another ClientApp")
    arrays = {name: content["head"][name].numpy() for name in content["head"].keys()}
    config = dict(content["update"])
    metrics = dict(content["metrics"]) if "metrics" in records else {}
    update = check(device, arrays, config, global_head=head, backbone_sha256=backbone_sha256)
    received = {"records": sorted(records), "arrays": {k: list(v.shape) for k, v in arrays.items()},
                "config_keys": sorted(config), "bytes": int(sum(v.nbytes for v in arrays.values())
                                                            + sum(len(str(k)) + len(str(v)) for k, v in config.items()))}
    return update, {"metrics": metrics, "received": received}


#: how often the ServerApp asks the SuperLink for replies (Flower's HttpGrid.send_and_receive sleeps 3 s)
PULL_INTERVAL_S = 0.1


def exchange(grid: Any, messages: list[Any], timeout: float, interval: float = PULL_INTERVAL_S) -> list[Any]:
    """Send ``messages`` and collect their replies until all came or ``timeout`` seconds passed: what
    ``grid.send_and_receive`` does, polling every ``interval`` s instead of every 3 s (up to 3 s a round)."""
    if not hasattr(grid, "push_messages"):  # a stand-in grid of the tests
        return list(grid.send_and_receive(messages, timeout=timeout))
    waiting = set(grid.push_messages(messages))
    replies: list[Any] = []
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if waiting:
            time.sleep(interval)
    return replies


def sample_nodes(node_ids: Any, settings: FleetSettings, server_round: int) -> list[int]:
    """The devices asked in ``server_round``: all of them, or a ``settings.fraction`` drawn with the round's seed."""
    nodes = sorted(int(n) for n in node_ids)
    if not 0.0 < settings.fraction <= 1.0:
        raise InputError("the share of devices asked per round is out of range", got=settings.fraction,
                         expected="0 < fraction <= 1", todo="pass --fraction between 0 and 1")
    if settings.fraction >= 1.0:
        return nodes
    k = min(len(nodes), max(settings.min_devices, math.ceil(settings.fraction * len(nodes))))
    rng = random.Random(settings.sample_seed + server_round)
    return sorted(rng.sample(nodes, k))


def require_a_merged_round(rounds: list[dict[str, Any]], min_devices: int) -> None:
    """A federation in which no round merged has nothing to write: fail, naming each round's count."""
    if not any(r["merged"] for r in rounds):
        raise InputError("no round of the federation merged", got="; ".join(
            f"round {r['round']}: {len(r['accepted'])} of {r['asked']} merged" for r in rounds),
            expected=f">= {min_devices} good replies (--min-devices) in at least one round",
            todo="see each round's rejected and silent devices; no bundle was written")


def _resume(settings: FleetSettings, head: Head, strategy: HeadFedAvg, sha: str, log: Callable[[str], None]
            ) -> tuple[Head, list[dict[str, Any]], int, tuple[int, float, Head] | None]:
    """(head, round records, fleet samples, best round so far) of the last checkpoint, or of a new federation."""
    found = checkpoint.load(Path(settings.checkpoint), sha, strategy) if settings.checkpoint else None
    if found is None:
        return head, [], 0, None
    log(f"fleet resume after_round={len(found.rounds)} checkpoint={settings.checkpoint}")
    best = None
    if found.best is not None:
        best = (found.best[0], float(found.rounds[found.best[0] - 1]["val_accuracy"]), found.best[1])
    return found.head, found.rounds, found.fleet_samples, best


# long: one federation: wait for devices, then per round the exchange, the merge, its record and checkpoint
def run_federation(grid: Any, settings: FleetSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``settings.rounds`` rounds on ``grid`` and write the result bundle; returns the record."""
    from edgexfer.fleet.result_bundle import write_result_bundle
    from edgexfer.runtime.bundle import Bundle

    bundle = Bundle.open(settings.bundle, verify=True)
    head = bundle.head()
    require_federated_kind(head.kind)
    sha = bundle.manifest.backbone.sha256
    strategy = HeadFedAvg(min_devices=settings.min_devices, rows=settings.rows, momentum=settings.momentum,
                          dp_clip=settings.dp_clip or None, dp_noise=settings.dp_noise)
    val = None
    if settings.val_features:
        with np.load(settings.val_features, allow_pickle=False) as data:
            val = (data["features"].astype(np.float32), data["labels"].astype(str))
    start_accuracy = validation_accuracy(head, *val) if val is not None else None
    log(f"fleet start bundle={bundle.manifest.name} kind={head.kind} classes={len(head.classes)} rounds={settings.rounds} "
        f"min_devices={settings.min_devices} round_timeout={settings.round_timeout:g}"
        + (f" val_accuracy={start_accuracy:.4f}" if start_accuracy is not None else ""))

    deadline = time.monotonic() + settings.wait_timeout
    wanted = max(settings.min_devices, settings.min_available)
    while len(list(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise InputError("too few devices joined the federation", got=f"{len(list(grid.get_node_ids()))} device(s)",
                             expected=f">= {wanted} within {settings.wait_timeout:g} s",
                             todo="start edgexfer device federate on more devices, or lower --min-devices")
        time.sleep(0.5)

    name = settings.namer()
    # fleet_samples: the last round's total: devices scale their L2 strength to their share of it
    head, rounds, fleet_samples, best = _resume(settings, head, strategy, sha, log)
    liars = {device: r["round"] for r in rounds for device in r.get("outliers", [])}  # left out for good
    for server_round in range(len(rounds) + 1, settings.rounds + 1):
        started = time.perf_counter()
        statistics = server_round == 1 and settings.statistics_first(head)
        nodes = sample_nodes(grid.get_node_ids(), settings, server_round)
        messages = [_round_message(head, settings, sha, node, server_round, fleet_samples,
                                   STATISTICS if statistics else "train") for node in nodes]
        replies = exchange(grid, messages, settings.round_timeout)
        updates, rejected, devices, answered = _check_replies(
            replies, messages, name, head, sha, check_statistics if statistics else check_update,
            lambda device, why, r=server_round: log(f"fleet round={r} rejected device={device} reason={why}"))
        silent = [name(n) for n in nodes if n not in answered]
        updates, rejected = leave_out(updates, rejected, liars)
        if statistics:
            result: Any = statistics_round(head, updates, rejected, min_devices=settings.min_devices, C=settings.C)
            merged = result.pooled is not None
            liars.update({device: server_round for device in result.outliers})
            for device in result.outliers:
                log(f"fleet round={server_round} rejected device={device} reason=a class mean far outside the fleet's "
                    "(left out of the rest of this federation)")
        else:
            result = strategy.aggregate(head, updates, rejected)
            merged = len(result.accepted) >= settings.min_devices
        head = result.head
        if result.accepted:
            fleet_samples = result.fleet_samples
        seconds = time.perf_counter() - started
        accuracy = validation_accuracy(head, *val) if val is not None else None
        record = {"round": server_round, "kind": "statistics" if statistics else "fedprox", "asked": len(nodes),
                  **result.report(), "silent": silent, "seconds": round(seconds, 3), "val_accuracy": accuracy,
                  "devices": devices, "merged": merged}
        if settings.dp_clip:  # central DP: what the private rounds released so far (runtime/privacy.py)
            private = sum(1 for r in rounds if r.get("merged")) + bool(merged)
            record["privacy"] = privacy_record(settings.dp_noise, settings.dp_clip, private)
        rounds.append(record)
        if merged and accuracy is not None and (best is None or accuracy > best[1]):
            best = (server_round, accuracy, head)  # ties keep the earlier round
        if settings.checkpoint:
            checkpoint.save(Path(settings.checkpoint), head, rounds, fleet_samples, strategy, sha,
                            best=(best[0], best[2]) if best else None)
        log(f"fleet round={server_round}/{settings.rounds} kind={record['kind']} asked={len(nodes)} "
            f"merged={len(result.accepted)} empty={len(result.empty)} rejected={len(result.rejected)} silent={len(silent)}"
            + (f" val_accuracy={accuracy:.4f}" if accuracy is not None else "") + f" seconds={seconds:.2f}"
            + ("" if merged else f" (fewer than {settings.min_devices} devices merged: head unchanged)"))
    require_a_merged_round(rounds, settings.min_devices)
    kept = len(rounds)
    if best is not None:  # with --val, the best round's head (by validation accuracy) is the result
        kept, _, head = best
        log(f"fleet kept round={kept} val_accuracy={best[1]:.4f} (the best on --val of {len(rounds)} rounds)")
    if settings.dp_clip and rounds:
        privacy = rounds[-1]["privacy"]
        log(f"fleet privacy epsilon={privacy['epsilon'] if isinstance(privacy['epsilon'], str) else round(privacy['epsilon'], 3)} "
            f"delta={privacy['delta']:g} rounds={privacy['rounds']} noise_multiplier={settings.dp_noise:g} "
            f"clip={settings.dp_clip:g} (unit: one device's update; no amplification by sampling claimed)")
    record = {"rounds": rounds, "settings": settings.to_run_config(), "start_val_accuracy": start_accuracy,
              "final_counts": rounds[kept - 1]["counts"] if rounds else {}, "kept_round": kept}
    out = write_result_bundle(bundle, head, Path(settings.out), record)
    log(f"fleet done out={out.root} head_version={out.manifest.head.version} classes={len(head.classes)}")
    return record


def _check_replies(replies: list[Any], messages: list[Any], name: Callable[[int], str], head: Head, sha: str,
                   check: Callable[..., Any], on_reject: Callable[[str, str], None]
                   ) -> tuple[list[Any], list[Rejection], dict[str, Any], set[int]]:
    """``(updates, rejections, per-device details, nodes that answered)`` of a round's replies."""
    # which node a reply is about: an error the SuperLink writes for a node that stopped answering
    # comes from the SuperLink itself, and only its reply-to id names the message (and the node)
    sent = {(m.metadata.message_id or m.object_id): int(m.metadata.dst_node_id) for m in messages}
    updates: list[Any] = []
    rejected: list[Rejection] = []
    devices: dict[str, Any] = {}
    answered = set()
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id or "", int(reply.metadata.src_node_id))
        answered.add(node)
        device = name(node)
        try:
            update, info = _reply_to_update(reply, device, head, sha, check)
        except EdgexferError as exc:
            rejected.append(Rejection(device, exc.one_line()))
            on_reject(device, exc.one_line())
            continue
        updates.append(update)
        counts = update.stats.counts if hasattr(update, "stats") else update.counts
        devices[device] = {"counts": counts, **info}
    return updates, rejected, devices, answered


def build_server_app(settings: FleetSettings | None = None, on_record: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """The ``ServerApp``: its settings from Flower's run config (``fleet serve``), or ``settings`` when given
    (Flower's simulation engine, whose Python entry point passes no run config); ``on_record`` gets the record."""
    from edgexfer.runtime.optional import require

    require("flwr", "fleet learning (edgexfer fleet serve)")
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_settings = settings or FleetSettings.from_run_config(context.run_config)
        try:
            record = run_federation(grid, run_settings, log=lambda line: print(line, flush=True))
        except EdgexferError as exc:
            print(f"fleet failed reason={exc.one_line()}", flush=True)
            raise
        if on_record is not None:
            on_record(record)

    return server_app


# Flower loads "edgexfer.fleet.server_app:app": built on first access, so that importing this module needs no flwr
__getattr__ = lazy_attribute(__name__, "app", build_server_app)


# "app" is listed for Flower's static check of the App's components (it looks for the name in the module)
__all__ = ["FleetSettings", "app", "build_server_app", "run_federation", "sample_nodes", "validation_accuracy"]  # noqa: F822 (module __getattr__)
