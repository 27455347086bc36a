"""Fleet learning of heads: what a device sends after a round, how it is checked, how heads are merged.

Pure numpy, used by both sides: the device packs its round's head with :func:`pack_update`, the server
unpacks each reply with :func:`check_update` (which names the device in every rejection) and merges
the accepted ones with :class:`HeadFedAvg`. No network code lives here; Flower carries these arrays.

What travels from a device, and nothing else: the head's tensors (float32), the class names, the
per-class sample counts, the head kind and the backbone sha256. Never an image, a feature vector or a
sample id.

How heads merge:

``linear``     FedProx: every device trains **every** row of the global head, warm-started from it,
               with the proximal term ``mu/2·||(W, b) - (W, b)_global||²`` and its L2 strength scaled to
               its share of the fleet's samples (``C·N/n``), so the average of the devices' heads
               (weighted by their sample counts) approximates a step on the objective of the central
               head on the union of their samples. A device's samples are the only negatives its
               classes' rivals get: that is why rows of the classes a device does not hold are trained
               and averaged too. Server momentum (FedAvgM) speeds the rounds up. A class **new to the
               fleet** (learned locally on some devices) is averaged only over the devices that hold
               samples of it, weighted by those counts, and added: the other devices have no row for it,
               and averaging it with zeros would erase it.
               The literal alternative - every row averaged only over the devices holding samples of its
               class, the rows of other classes frozen during local training (``rows="holders"``) - is
               kept as an option but measured worse on non-IID devices (clipart8, 8 devices of 2-4
               classes: 0.48-0.57 against 0.69 central, unstable over rounds): a device never sees
               negatives for the classes it holds from the classes it does not, so those rows grow
               without bound on other classes' samples.
``prototype``  ``P[c]`` is the count-weighted mean of the holders' unit class means, normalised again
               (each device's prototype is the normalised mean of its unit features, so this is the
               fleet's class mean up to the per-device norms, which are not sent). ``scale`` stays.
``mlp``        refused: the hidden units of independently trained networks are not aligned (any
               permutation is an equally good network), so averaging them is not meaningful after
               more than a few local steps. Fleets with mlp heads learn centrally.

A class new to the fleet (a device learned it locally) is appended after the global classes, in name
order, so the merged head's class order is deterministic.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.heads import Head
from edgexfer.runtime.names import HEAD_KINDS

#: version tag of the reply a device sends; the server refuses any other
UPDATE_FORMAT = "edgexfer.fleet-update/1"

#: how rows of classes the fleet already knows are averaged (see the module docstring)
ROW_POLICIES = ("all", "holders")

#: head kinds fleet learning merges (see the module docstring for why mlp is not one)
FEDERATED_KINDS = ("linear", "prototype")

# A count beyond this is not a device's sample count: it is an attempt to outweigh the fleet.
MAX_SAMPLES_PER_CLASS = 10_000_000


class UpdateRejected(EdgexferError):
    """A device's reply cannot be merged (non-finite weights, wrong shape, another backbone, ...)."""


@dataclass(frozen=True, eq=False)
class HeadUpdate:
    """One device's checked reply for one round."""

    device: str  #: how the round report names the device (its node id or name)
    head: Head  #: the head the device trained this round
    counts: dict[str, int]  #: samples per class the device trained on (0 for classes it does not hold)

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))


@dataclass(frozen=True)
class Rejection:
    device: str
    reason: str  #: one line: what | got | expected | what to do

    def to_dict(self) -> dict[str, str]:
        return {"device": self.device, "reason": self.reason}


@dataclass(frozen=True, eq=False)
class RoundResult:
    """The merged head of one round and what went into it."""

    head: Head
    accepted: list[str]  #: devices whose heads were merged
    empty: list[str]  #: devices that answered with no samples (nothing to merge)
    rejected: list[Rejection]
    counts: dict[str, int]  #: fleet samples per class over the accepted devices
    contributors: dict[str, int] = field(default_factory=dict)  #: devices holding samples, per class
    added_classes: list[str] = field(default_factory=list)  #: classes new to the fleet this round

    def report(self) -> dict[str, Any]:
        return {"accepted": list(self.accepted), "empty": list(self.empty),
                "rejected": [r.to_dict() for r in self.rejected], "counts": dict(self.counts),
                "contributors": dict(self.contributors), "added_classes": list(self.added_classes),
                "classes": list(self.head.classes)}


# ---------------------------------------------------------------------------------------- wire format

def pack_update(head: Head, counts: Mapping[str, int], backbone_sha256: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """What a device sends: ``(arrays, config)``. Arrays are the head's tensors; config is strings only."""
    arrays = {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in head.tensors.items()}
    config = {
        "format": UPDATE_FORMAT,
        "kind": head.kind,
        "classes": json.dumps(list(head.classes)),
        "counts": json.dumps([int(counts.get(c, 0)) for c in head.classes]),
        "backbone_sha256": backbone_sha256,
    }
    return arrays, config


def check_update(device: str, arrays: Mapping[str, Any], config: Mapping[str, Any], *, global_head: Head,
                 backbone_sha256: str) -> HeadUpdate:
    """Turn one device's reply into a :class:`HeadUpdate`, or raise :class:`UpdateRejected` naming the device.

    The reply must be for the round's backbone and head kind, carry finite float32 tensors of the
    global head's shapes (plus one row per class new to the fleet), and non-negative integer counts,
    one per class. Nothing is repaired: a bad reply is refused whole.
    """

    def reject(what: str, got: object, expected: object, todo: str = "the device is dropped from this round; "
               "check its edgexfer version and its state") -> UpdateRejected:
        return UpdateRejected(f"update from device {device}: {what}", got=got, expected=expected, todo=todo)

    if config.get("format") != UPDATE_FORMAT:
        raise reject("unknown update format", repr(config.get("format"))[:60], repr(UPDATE_FORMAT),
                     "update edgexfer on the device to the server's version")
    sha = config.get("backbone_sha256")
    if sha != backbone_sha256:
        raise reject("head is for another backbone", f"backbone {str(sha)[:12]}…", f"backbone {backbone_sha256[:12]}…",
                     "install the fleet's bundle on the device (edgexfer device install / flash)")
    kind = config.get("kind")
    if kind != global_head.kind:
        raise reject("head is of another kind", repr(kind)[:20], repr(global_head.kind))
    try:
        classes = json.loads(config.get("classes", "null"))
        counts = json.loads(config.get("counts", "null"))
    except (TypeError, ValueError) as exc:
        raise reject("classes or counts are not JSON", str(exc)[:80], "JSON lists") from exc
    if (not isinstance(classes, list) or not all(isinstance(c, str) and c.strip() for c in classes)
            or len(set(classes)) != len(classes)):
        raise reject("malformed class list", repr(classes)[:80], "a list of unique, non-empty class names")
    if list(classes[:global_head.num_classes]) != list(global_head.classes):
        raise reject("class list does not start with the round's classes", repr(classes)[:80],
                     f"{list(global_head.classes)[:8]} then any new classes")
    if (not isinstance(counts, list) or len(counts) != len(classes)
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_SAMPLES_PER_CLASS for n in counts)):
        raise reject("malformed sample counts", repr(counts)[:80],
                     f"{len(classes)} integers in 0..{MAX_SAMPLES_PER_CLASS}, one per class")
    required = HEAD_KINDS[kind]
    if set(arrays) != set(required):
        raise reject("wrong tensors", sorted(arrays), sorted(required))
    expected_shapes = _expected_shapes(global_head, len(classes))
    tensors: dict[str, np.ndarray] = {}
    for name in required:
        value = np.asarray(arrays[name])
        if value.dtype != np.float32:
            raise reject(f"tensor '{name}' is not float32", str(value.dtype), "float32")
        if value.shape != expected_shapes[name]:
            raise reject(f"tensor '{name}' has the wrong shape", list(value.shape), list(expected_shapes[name]),
                         "the device runs another head or backbone; it is dropped from this round")
        if not np.all(np.isfinite(value)):
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise reject(f"tensor '{name}' holds NaN or infinity", f"{bad} non-finite values", "finite weights",
                         "the device's training diverged or it is faulty; it is dropped from this round")
        tensors[name] = value
    try:
        head = Head(kind, tuple(classes), tensors, None)
    except EdgexferError as exc:
        raise reject(f"head is not valid ({exc.what})", exc.got, exc.expected) from exc
    return HeadUpdate(device=device, head=head, counts=dict(zip(classes, counts)))


def _expected_shapes(global_head: Head, n_classes: int) -> dict[str, tuple[int, ...]]:
    d = global_head.feature_dim
    if global_head.kind == "linear":
        return {"W": (n_classes, d), "b": (n_classes,)}
    if global_head.kind == "prototype":
        return {"P": (n_classes, d), "scale": tuple(global_head.tensors["scale"].shape)}
    h = global_head.tensors["W1"].shape[0]
    return {"W1": (h, d), "b1": (h,), "W2": (n_classes, h), "b2": (n_classes,)}


# ---------------------------------------------------------------------------------------- aggregation

def require_federated_kind(kind: str) -> None:
    if kind not in FEDERATED_KINDS:
        raise InputError("fleet learning cannot merge this head kind", got=repr(kind),
                         expected=f"one of {list(FEDERATED_KINDS)}",
                         todo="train a linear or prototype head for fleet learning (mlp hidden units of "
                              "different devices do not line up)")


class HeadFedAvg:
    """Per-class, sample-weighted FedAvg of heads (see the module docstring for each kind).

    ``min_devices`` is the least number of accepted, non-empty replies a round needs to change the
    head; with fewer, :meth:`aggregate` returns the global head unchanged (and says so in the result).
    ``rows`` is ``"all"`` (FedAvg of every known row over all devices, weighted by their samples) or
    ``"holders"`` (each row over the devices holding its class only). ``momentum`` is the server
    momentum of linear heads (FedAvgM; 0 turns it off); the strategy keeps it between rounds.
    """

    def __init__(self, *, min_devices: int = 1, rows: str = "all", momentum: float = 0.0,
                 dp_clip: float | None = None, dp_noise: float = 0.0, seed: int | None = None) -> None:
        if isinstance(min_devices, bool) or not isinstance(min_devices, int) or min_devices < 1:
            raise InputError("min_devices is out of range", got=repr(min_devices), expected="an integer >= 1")
        if rows not in ROW_POLICIES:
            raise InputError("rows is unknown", got=repr(rows), expected=f"one of {list(ROW_POLICIES)}")
        if not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise InputError("momentum is out of range", got=repr(momentum), expected="0 <= momentum < 1")
        if dp_clip is not None and (not isinstance(dp_clip, (int, float)) or not dp_clip > 0 or rows != "all"):
            raise InputError("dp_clip needs a positive clipping norm and rows='all'", got=f"{dp_clip!r}, rows={rows!r}",
                             expected="dp_clip > 0 with rows='all'")
        if not isinstance(dp_noise, (int, float)) or dp_noise < 0 or (dp_noise and dp_clip is None):
            raise InputError("dp_noise needs dp_clip and a multiplier >= 0", got=repr(dp_noise), expected=">= 0 with dp_clip")
        self.min_devices = min_devices
        self.rows = rows
        self.momentum = float(momentum)
        self.dp_clip = None if dp_clip is None else float(dp_clip)
        self.dp_noise = float(dp_noise)
        self._rng = np.random.default_rng(seed)
        self._velocity: dict[str, np.ndarray] = {}  # class -> last step of its row (W and b)

    def aggregate(self, global_head: Head, updates: Sequence[HeadUpdate],
                  rejected: Sequence[Rejection] = ()) -> RoundResult:
        """Merge ``updates`` (already checked by :func:`check_update`) into a new global head."""
        require_federated_kind(global_head.kind)
        live = [u for u in updates if u.total > 0]
        empty = [u.device for u in updates if u.total == 0]
        # with differential privacy only the clipped, noised rows of known classes change: a new class's
        # row would come from its holders alone, unclipped
        new_classes = [] if self.dp_clip is not None else sorted(
            {c for u in live for c in u.head.classes[global_head.num_classes:] if u.counts.get(c, 0) > 0})
        classes = tuple(global_head.classes) + tuple(new_classes)
        counts = {c: int(sum(u.counts.get(c, 0) for u in live)) for c in classes}
        contributors = {c: int(sum(1 for u in live if u.counts.get(c, 0) > 0)) for c in classes}
        if len(live) < self.min_devices:
            return RoundResult(head=global_head, accepted=[u.device for u in live], empty=empty,
                               rejected=list(rejected), counts={c: counts[c] for c in global_head.classes},
                               contributors={c: contributors[c] for c in global_head.classes})
        if global_head.kind == "linear" and self.dp_clip is not None:
            head = self._linear_private(global_head, live)
        elif global_head.kind == "linear":
            head = self._linear(global_head, live, classes)
        else:
            head = self._prototype(global_head, live, classes)
        return RoundResult(head=head, accepted=[u.device for u in live], empty=empty, rejected=list(rejected),
                           counts=counts, contributors=contributors, added_classes=list(new_classes))

    @staticmethod
    def _rows(updates: Sequence[HeadUpdate], name: str, cls: str) -> tuple[list[np.ndarray], list[int]]:
        rows, weights = [], []
        for u in updates:
            n = u.counts.get(cls, 0)
            if n > 0:
                rows.append(u.head.tensors[name][u.head.classes.index(cls)].astype(np.float64))
                weights.append(n)
        return rows, weights

    def _linear(self, global_head: Head, updates: Sequence[HeadUpdate], classes: tuple[str, ...]) -> Head:
        d = global_head.feature_dim
        known = global_head.num_classes
        W = np.zeros((len(classes), d))
        b = np.zeros(len(classes))
        W[:known] = global_head.tensors["W"]
        b[:known] = global_head.tensors["b"]
        for i, cls in enumerate(classes):
            if i < known and self.rows == "all":
                # every device trained this row (its samples are the row's negatives): FedAvg by samples
                weights = [u.total for u in updates]
                rows = [u.head.tensors["W"][i].astype(np.float64) for u in updates]
                biases = [float(u.head.tensors["b"][i]) for u in updates]
            else:
                rows, weights = self._rows(updates, "W", cls)
                biases = [float(v) for v in self._rows(updates, "b", cls)[0]]
            if not rows:
                continue  # no device holds the class: the global row stays
            w = np.asarray(weights, dtype=np.float64) / sum(weights)
            row, bias = w @ np.stack(rows), float(w @ np.asarray(biases))
            if i < known and self.momentum:
                step = np.append(row - W[i], bias - b[i]) + self.momentum * self._velocity.get(cls, 0.0)
                self._velocity[cls] = step
                row, bias = W[i] + step[:-1], b[i] + step[-1]
            W[i], b[i] = row, bias
        return Head("linear", classes, {"W": W.astype(np.float32), "b": b.astype(np.float32)})

    def _linear_private(self, global_head: Head, updates: Sequence[HeadUpdate]) -> Head:
        """Central DP with fixed clipping (as Flower's ``DifferentialPrivacyServerSideFixedClipping``).

        Each device's step ``(W, b) - (W, b)_global`` is clipped to L2 norm ``dp_clip``; the steps are
        averaged **unweighted** (a device's self-reported counts must not scale its influence past the
        clipping bound), and Gaussian noise of standard deviation ``dp_noise·dp_clip/m`` is added to
        every coordinate (m devices). The privacy unit is a device's whole update; the counts are not
        covered (they travel in the clear). Momentum then applies to the noised step (post-processing).
        """
        known = global_head.num_classes
        W0, b0 = global_head.tensors["W"].astype(np.float64), global_head.tensors["b"].astype(np.float64)
        steps = []
        for u in updates:
            step = np.concatenate([(u.head.tensors["W"][:known] - W0).ravel(), u.head.tensors["b"][:known] - b0])
            norm = float(np.linalg.norm(step))
            steps.append(step * min(1.0, self.dp_clip / norm) if norm > 0 else step)
        m = len(steps)
        mean = np.mean(steps, axis=0) + self._rng.normal(0.0, self.dp_noise * self.dp_clip / m, size=steps[0].shape)
        if self.momentum:
            mean = mean + self.momentum * self._velocity.get("*", 0.0)
            self._velocity["*"] = mean
        W = W0 + mean[: W0.size].reshape(W0.shape)
        b = b0 + mean[W0.size:]
        return Head("linear", global_head.classes, {"W": W.astype(np.float32), "b": b.astype(np.float32)})

    def _prototype(self, global_head: Head, updates: Sequence[HeadUpdate], classes: tuple[str, ...]) -> Head:
        d = global_head.feature_dim
        P = np.zeros((len(classes), d))
        P[:global_head.num_classes] = global_head.tensors["P"]
        for i, cls in enumerate(classes):
            rows, weights = self._rows(updates, "P", cls)
            if not rows:
                continue
            mean = np.asarray(weights, dtype=np.float64) @ np.stack(rows)
            norm = float(np.linalg.norm(mean))
            if norm > 1e-12 * sum(weights):  # opposite prototypes cancelling out: keep the global row
                P[i] = mean / norm
        return Head("prototype", classes, {"P": P.astype(np.float32),
                                           "scale": np.array(global_head.tensors["scale"], dtype=np.float32)})

    def state(self) -> dict[str, Any]:
        """What the strategy carries from round to round, for a checkpoint (``fleet serve --resume``):
        ``{"velocity": {class or "*": step}, "rng": the noise generator's state}``."""
        return {"velocity": {c: np.asarray(v).tolist() for c, v in self._velocity.items()},
                "rng": self._rng.bit_generator.state}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state` of an earlier run with the same settings."""
        self._velocity = {str(c): np.asarray(v, dtype=np.float64) for c, v in state.get("velocity", {}).items()}
        if state.get("rng"):
            self._rng.bit_generator.state = state["rng"]


def update_bytes(arrays: Mapping[str, np.ndarray], config: Mapping[str, str]) -> int:
    """Payload size of one reply (tensor bytes plus config strings), for the round report and the study."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()) + sum(len(k) + len(v) for k, v in config.items()))
