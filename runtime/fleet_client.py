"""The device side of fleet learning: one round of local head training, and Flower's ``ClientApp`` around it.

:func:`train_round` is a plain function (the tests call it directly): it reads the labelled features
of the device's feature cache, trains the round's global head on them with the trainer ``device
retrain`` uses (warm-started from the global head; rows of classes without local samples frozen at
the global values), and returns the new head with the per-class sample counts. It never writes to
the device state: the active head changes only through a signed update (``edgexfer device update``).

:data:`app` is the ``ClientApp`` a SuperNode runs (``edgexfer device federate``). It is built on first
access (a module ``__getattr__``), so importing this module never needs ``flwr``: the device install
without the ``fleet`` extra still imports every runtime module. What it sends is exactly
:func:`~edgexfer.runtime.federated.pack_update`'s arrays and strings; :data:`SENT_KEYS` lists them and
the acceptance test checks the replies against it.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.federated import pack_update, require_federated_kind, update_bytes
from edgexfer.runtime.fleet_stats import MIN_CLASS_SAMPLES, ClassStatistics, class_statistics, pack_statistics
from edgexfer.runtime.heads import Head
from edgexfer.runtime.optional import lazy_attribute

#: message type of a round's training request (Flower's "train" message type)
TRAIN = "train"
#: message type of the statistics round (runtime/fleet_stats.py): Flower's "train" category, action "statistics"
STATISTICS = "train.statistics"
#: the config keys a reply carries besides the head tensors, and the metrics
SENT_KEYS = ("format", "kind", "classes", "counts", "backbone_sha256")
METRIC_KEYS = ("train_seconds", "samples", "payload_bytes")

#: defaults of the local trainer; the server's round config overrides them
DEFAULT_C = 1.0
DEFAULT_PROXIMAL = 1.0
DEFAULT_MAX_ITER = 200
DEFAULT_ROWS = "all"


@dataclass(frozen=True, eq=False)
class LocalRound:
    """The result of one round on one device."""

    head: Head  #: the round's head trained on local samples (the global head when there were none)
    counts: dict[str, int]  #: local samples per class of ``head.classes``
    backbone_sha256: str
    seconds: float
    note: str = ""  #: why nothing was trained, when nothing was

    @property
    def samples(self) -> int:
        return int(sum(self.counts.values()))


def local_training_set(state_dir: str | Path) -> tuple[str, np.ndarray, list[str]]:
    """``(backbone sha256, features float32 [N, D], labels)`` of the device's labelled cached samples."""
    from edgexfer.runtime.cache import FeatureCache
    from edgexfer.runtime.state import DeviceState

    state = DeviceState(state_dir)
    active = state.active()
    bundle = state.bundle(active.bundle)
    with FeatureCache(state.cache_path) as cache:
        _shas, features, labels = cache.labelled(active.bundle, bundle.preprocess.key())
    return active.bundle, np.asarray(features, dtype=np.float32), list(labels)


def train_round(state_dir: str | Path, global_head: Head, *, backbone_sha256: str, C: float = DEFAULT_C,
                proximal: float = DEFAULT_PROXIMAL, max_iter: int = DEFAULT_MAX_ITER, rows: str = DEFAULT_ROWS,
                fleet_samples: int = 0) -> LocalRound:
    """Train ``global_head`` on this device's cached features; read-only on the device state."""
    started = time.perf_counter()
    return round_on_samples(*local_training_set(state_dir), global_head, backbone_sha256=backbone_sha256, C=C,
                            proximal=proximal, max_iter=max_iter, rows=rows, fleet_samples=fleet_samples,
                            started=started)


def _check_round(sha: str, backbone_sha256: str, global_head: Head) -> None:
    """A round this device can answer: a head kind that merges, and the fleet's backbone."""
    require_federated_kind(global_head.kind)
    if sha != backbone_sha256:
        raise InputError("the device runs another backbone than the fleet round", got=f"backbone {sha[:12]}…",
                         expected=f"backbone {backbone_sha256[:12]}…",
                         todo="install the fleet's bundle on this device (edgexfer device install)")


def round_on_samples(sha: str, X: np.ndarray, labels: list[str], global_head: Head, *, backbone_sha256: str,
                     C: float = DEFAULT_C, proximal: float = DEFAULT_PROXIMAL, max_iter: int = DEFAULT_MAX_ITER,
                     rows: str = DEFAULT_ROWS, fleet_samples: int = 0, started: float | None = None) -> LocalRound:
    """:func:`train_round` on a training set already read (``sha`` is the backbone its features came from)."""
    started = time.perf_counter() if started is None else started
    _check_round(sha, backbone_sha256, global_head)
    head, counts, note = train_on_samples(global_head, X, labels, C=C, proximal=proximal, max_iter=max_iter,
                                          rows=rows, fleet_samples=fleet_samples)
    return LocalRound(head, counts, sha, round(time.perf_counter() - started, 3), note)


def train_on_samples(global_head: Head, X: np.ndarray, labels: list[str], *, C: float = DEFAULT_C,
                     proximal: float = DEFAULT_PROXIMAL, max_iter: int = DEFAULT_MAX_ITER, rows: str = DEFAULT_ROWS,
                     fleet_samples: int = 0) -> tuple[Head, dict[str, int], str]:
    """One round's local training on features ``X`` with class names ``labels``: ``(head, counts, note)``.

    Linear heads, ``rows="all"`` (see :mod:`edgexfer.runtime.federated`): every row is trained, with
    the proximal term ``proximal`` (> 0) towards the global head, unweighted samples and the L2
    strength scaled to this device's share of the fleet (``C·fleet_samples/n``; the server sends the
    last round's total, 0 in the first round: ``C`` as it is). ``rows="holders"``: the rows of classes
    without local samples stay frozen at the global values, class-balanced weights (``device retrain``'s
    previous policy).

    Classes the device learned that the fleet does not know yet are appended (in name order). With no
    samples, or a linear head with samples of a single class (nothing to tell apart), the global head
    comes back with zero counts and ``note`` says why: the server counts the device as answered, not merged.
    """
    require_federated_kind(global_head.kind)
    new = sorted(set(labels) - set(global_head.classes))
    classes = tuple(global_head.classes) + tuple(new)
    counts = {c: 0 for c in classes}
    for label in labels:
        counts[label] += 1
    present = [c for c in classes if counts[c] > 0]
    unchanged = {c: 0 for c in global_head.classes}
    if not labels:
        return global_head, unchanged, "no labelled samples"
    if X.shape[1] != global_head.feature_dim:
        raise InputError("cached features do not fit the round's head", got=f"D={X.shape[1]}",
                         expected=f"D={global_head.feature_dim}", todo="recompute features (device install)")
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[label] for label in labels], dtype=np.int64)
    if global_head.kind == "linear":
        if len(present) < 2:
            return global_head, unchanged, f"samples of one class only ({present[0]}): nothing to tell apart"
        from edgexfer.runtime.head_training import fit_linear

        # the device's settings of `device retrain` (float32 products, 1e-5 gradient tolerance)
        if rows == "all":
            if not proximal > 0:
                raise InputError("training every row needs a proximal term", got=f"proximal={proximal}",
                                 expected="proximal > 0 (e.g. 1.0)", todo="start the fleet with --proximal > 0")
            local_C = C * fleet_samples / len(labels) if fleet_samples > 0 else C
            head = fit_linear(X, y, classes, C=local_C, class_weight=None, warm_start=global_head, tol=1e-5,
                              matmul_dtype="float32", max_iter=max_iter, proximal=proximal)
        else:
            frozen = [c for c in global_head.classes if counts[c] == 0]
            head = fit_linear(X, y, classes, C=C, warm_start=global_head, frozen_classes=frozen, tol=1e-5,
                              matmul_dtype="float32", max_iter=max_iter, proximal=proximal)
    else:
        from edgexfer.runtime.head_training import fit_prototype

        head = fit_prototype(X, y, classes, warm_start=global_head,
                             scale=float(global_head.tensors["scale"].reshape(())))
    return head, counts, ""


def statistics_round(state_dir: str | Path, global_head: Head, *, backbone_sha256: str,
                     min_count: int = MIN_CLASS_SAMPLES) -> tuple[ClassStatistics, str, float]:
    """This device's class statistics (:func:`~edgexfer.runtime.fleet_stats.class_statistics`) of its
    cached features: ``(statistics, backbone sha256, seconds)``; read-only on the device state."""
    started = time.perf_counter()
    return statistics_on_samples(*local_training_set(state_dir), global_head, backbone_sha256=backbone_sha256,
                                 min_count=min_count, started=started)


def statistics_on_samples(sha: str, X: np.ndarray, labels: list[str], global_head: Head, *, backbone_sha256: str,
                          min_count: int = MIN_CLASS_SAMPLES, started: float | None = None
                          ) -> tuple[ClassStatistics, str, float]:
    """:func:`statistics_round` on a training set already read (``sha``: the backbone its features came from)."""
    started = time.perf_counter() if started is None else started
    _check_round(sha, backbone_sha256, global_head)
    X = np.asarray(X, dtype=np.float32)
    if X.shape[0] and X.shape[1] != global_head.feature_dim:
        raise InputError("cached features do not fit the round's head", got=f"D={X.shape[1]}",
                         expected=f"D={global_head.feature_dim}", todo="recompute features (device install)")
    X = X.reshape(len(labels), global_head.feature_dim)
    # never below the fleet's floor: a server cannot ask a device for the statistics of fewer samples
    stats = class_statistics(X, labels, global_head.classes, min_count=max(int(min_count), MIN_CLASS_SAMPLES))
    return stats, sha, round(time.perf_counter() - started, 3)


# ------------------------------------------------------------------------------------------ ClientApp

def head_from_records(arrays: Any, config: Any) -> tuple[Head, dict[str, Any]]:
    """The round's global head and settings from the server's message (``ArrayRecord``, ``ConfigRecord``)."""
    try:
        classes = json.loads(config["classes"])
        tensors = {name: np.asarray(arrays[name].numpy(), dtype=np.float32) for name in arrays.keys()}
        head = Head(str(config["kind"]), tuple(classes), tensors, None)
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError("the server's round message is malformed", got=str(exc)[:80],
                         expected="the global head's tensors and config", todo="run the same edgexfer on both sides") from exc
    settings = {"backbone_sha256": str(config["backbone_sha256"]), "C": float(config.get("C", DEFAULT_C)),
                "proximal": float(config.get("proximal", DEFAULT_PROXIMAL)),
                "max_iter": int(config.get("max_iter", DEFAULT_MAX_ITER)),
                "rows": str(config.get("rows", DEFAULT_ROWS)), "fleet_samples": int(config.get("fleet_samples", 0))}
    return head, settings


def state_training_set(context: Any) -> tuple[str, np.ndarray, list[str]]:
    """The training set of a SuperNode's device: the labelled features of its state (node config ``state``)."""
    state_dir = context.node_config.get("state")
    if not state_dir:
        raise InputError("the SuperNode has no device state", got="no node-config 'state'",
                         expected="--node-config 'state=\"/var/lib/edgexfer\"'", todo="use edgexfer device federate")
    return local_training_set(state_dir)


def build_client_app(training_set: Callable[[Any], tuple[str, np.ndarray, list[str]]] = state_training_set) -> Any:
    """The ``ClientApp``; ``training_set(context)`` gives ``(backbone sha256, features, labels)`` of the node.

    A device reads its state (:func:`state_training_set`); Flower's simulation engine passes a function
    of the virtual node's ``partition-id`` (:mod:`edgexfer.fleet.simulation`): the rest is the same code.
    """
    from edgexfer.runtime.optional import require

    require("flwr", "fleet learning (edgexfer device federate)")
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        global_head, settings = head_from_records(msg.content["head"], msg.content["config"])
        try:
            result = round_on_samples(*training_set(context), global_head, started=started, **settings)
        except EdgexferError as exc:
            # the one-line reason reaches the server's round report
            reply = RecordDict({"error": ConfigRecord({"reason": exc.one_line()})})
            return Message(reply, reply_to=msg)
        arrays, config = pack_update(result.head, result.counts, result.backbone_sha256)
        metrics = {"train_seconds": float(result.seconds), "samples": result.samples,
                   "payload_bytes": update_bytes(arrays, config)}
        content = RecordDict({"head": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "update": ConfigRecord(config), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    @client_app.train("statistics")
    def statistics(msg: Message, context: Context) -> Message:
        started = time.perf_counter()
        global_head, settings = head_from_records(msg.content["head"], msg.content["config"])
        try:
            stats, sha, seconds = statistics_on_samples(
                *training_set(context), global_head, backbone_sha256=settings["backbone_sha256"], started=started,
                min_count=int(msg.content["config"].get("min_class_samples", MIN_CLASS_SAMPLES)))
        except EdgexferError as exc:
            reply = RecordDict({"error": ConfigRecord({"reason": exc.one_line()})})
            return Message(reply, reply_to=msg)
        arrays, config = pack_statistics(stats, sha)
        metrics = {"train_seconds": float(seconds), "samples": stats.total, "payload_bytes": update_bytes(arrays, config)}
        content = RecordDict({"head": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              "update": ConfigRecord(config), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    return client_app


# Flower loads "edgexfer.runtime.fleet_client:app": built on first access, so that importing this module needs no flwr
__getattr__ = lazy_attribute(__name__, "app", build_client_app)


# "app" is listed for Flower's static check of the App's components (it looks for the name in the module)
__all__ = ["LocalRound", "SENT_KEYS", "STATISTICS", "app", "build_client_app", "head_from_records",  # noqa: F822
           "local_training_set", "round_on_samples", "state_training_set", "statistics_on_samples", "statistics_round",
           "train_on_samples", "train_round"]
