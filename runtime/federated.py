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

A device that lies (issue 24, D3: one device claiming 9,000,000 samples per class with its weights
scaled by -50 took the head from 0.405 to 0.024). Counts and tensors are the device's word, so the
merge bounds what any one device can do with them:

- **Weight**: wherever counts weigh devices (every row's FedAvg, a new class's holders, prototypes),
  each count is capped at the *lower median* of the counts being merged (:func:`bounded_weights`): no
  device weighs more than the median device, of two neither outweighs the other, a lone holder keeps
  its count. Chosen over a share of the round total (a liar's claim inflates the total it is capped
  by) and over a fixed plausible maximum (any fixed number is either too low for a large device or
  far above a small fleet: :data:`MAX_SAMPLES_PER_CLASS` only refuses the absurd). Honest devices
  above the median lose some weight: 8 and 32 non-IID devices end 10 rounds within 1 and 3 points of
  the uncapped merge (0.665 against 0.671, 0.652 against 0.621; benchmarks/README.md section 11).
  The devices' next round scales its L2 strength by :attr:`RoundResult.fleet_samples`, the capped sum,
  so a claimed total cannot steer their training either.
- **Norm**: a device's step on the known rows, ``(W, b) - (W, b)_global``, is scaled down to at most
  :data:`CLIP_MULTIPLE` (1.5) times the lower median step norm of the round (:func:`clip_factors`);
  a row of a class new to the fleet has no global row to step from, so each holder's ``(W, b)`` row is
  scaled down to the norm of the largest known row of the merged head. 1.0 cost honest fleets 3-9
  points after 5 rounds (it clips half of the honest devices every round); 1.5 measured within noise.
- **Robust rule where it fits**: a new class held by 3 or more devices takes the coordinate-wise median
  of their rows (a majority of holders outvotes one). The known rows are **not** merged by a median,
  trimmed mean or Krum: on non-IID devices the honest steps are nearly orthogonal or opposed (cosine
  -0.4 to +0.3 between one device's step and the others' mean, 4 and 8 clipart8 devices), so a robust
  rule throws away exactly the information that only some devices hold; the coordinate-wise median
  cost 29 points from a zero head (0.366 against 0.652 after 5 rounds) and Krum would keep one device.

What this does not do: a device whose step is of ordinary size but points the wrong way (a negated
step) cannot be told from an honest non-IID device, and is merged with the median device's weight:
round 1 costs at most 8 points beyond the device's absence, but over 5 rounds (server momentum carries
it) up to 14-17 (docs/fleet.md "A device that lies", benchmarks/fleet_study.py ``--attacks``). What a device holds alone it can always
withhold or spoil. The devices' own check of the published head (runtime/updates.py's health check
on their labelled samples) is the second line.
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

#: a device's step is clipped to this many times the round's (lower) median step norm (see "A device that lies")
CLIP_MULTIPLE = 1.5


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


def leave_out(updates: Sequence[Any], rejected: Sequence[Rejection], liars: Mapping[str, int]
              ) -> tuple[list[Any], list[Rejection]]:
    """``(updates, rejected)`` with the replies of ``liars`` (device: the round it was caught lying in, by
    :func:`edgexfer.runtime.fleet_stats.outlier_devices`) moved to the rejections: a device that lied once
    is not merged again in the same federation. A liar caught in round 1 and merged in rounds 2-3 still
    cost up to 10 points (benchmarks/README.md, "One lying device over the three rounds")."""
    kept = [u for u in updates if u.device not in liars]
    return kept, [*rejected, *(Rejection(u.device, UpdateRejected(
        f"reply of device {u.device}: the device lied in round {liars[u.device]}", got="a reply",
        expected="no replies from it in this federation",
        todo="check the device's data and edgexfer; it can join the next federation").one_line())
        for u in updates if u.device in liars)]


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
    weights: dict[str, float] = field(default_factory=dict)  #: per device, its samples capped at the median device's
    clipped: dict[str, float] = field(default_factory=dict)  #: devices whose step was scaled down, by that factor

    @property
    def fleet_samples(self) -> int:
        """The fleet's samples as the merge counted them (capped per device): what devices scale their L2 by."""
        return int(sum(self.weights.values()))

    def report(self) -> dict[str, Any]:
        return {"accepted": list(self.accepted), "empty": list(self.empty),
                "rejected": [r.to_dict() for r in self.rejected], "counts": dict(self.counts),
                "contributors": dict(self.contributors), "added_classes": list(self.added_classes),
                "weights": dict(self.weights), "clipped": dict(self.clipped), "classes": list(self.head.classes)}


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
    """Per-class, sample-weighted FedAvg of heads (see the module docstring for each kind), with each
    device's weight and step bounded (module docstring, "A device that lies").

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
        """Merge ``updates`` (already checked by :func:`check_update`) into a new global head.

        Robustly (see "A device that lies" in the module docstring): a device weighs at most as much
        as the median device, and its step is clipped to the median step's norm.
        """
        require_federated_kind(global_head.kind)
        live = [u for u in updates if u.total > 0]
        empty = [u.device for u in updates if u.total == 0]
        new_classes = sorted({c for u in live for c in u.head.classes[global_head.num_classes:] if u.counts.get(c, 0) > 0})
        classes = tuple(global_head.classes) + tuple(new_classes)
        counts = {c: int(sum(u.counts.get(c, 0) for u in live)) for c in classes}
        contributors = {c: int(sum(1 for u in live if u.counts.get(c, 0) > 0)) for c in classes}
        weights = dict(zip([u.device for u in live], bounded_weights([u.total for u in live]).tolist()))
        if len(live) < self.min_devices:
            return RoundResult(head=global_head, accepted=[u.device for u in live], empty=empty,
                               rejected=list(rejected), counts={c: counts[c] for c in global_head.classes},
                               contributors={c: contributors[c] for c in global_head.classes})
        clipped: dict[str, float] = {}
        if global_head.kind == "linear" and self.dp_clip is not None:
            head = self._linear_private(global_head, live, classes)
        elif global_head.kind == "linear":
            head, clipped = self._linear(global_head, live, classes)
        else:
            head = self._prototype(global_head, live, classes)
        return RoundResult(head=head, accepted=[u.device for u in live], empty=empty, rejected=list(rejected),
                           counts=counts, contributors=contributors, added_classes=list(new_classes),
                           weights=weights, clipped=clipped)

    @staticmethod
    def _rows(updates: Sequence[HeadUpdate], name: str, cls: str) -> tuple[list[np.ndarray], list[int], list[int]]:
        """``(rows, counts, positions in updates)`` of the devices holding samples of ``cls``."""
        rows, weights, where = [], [], []
        for k, u in enumerate(updates):
            n = u.counts.get(cls, 0)
            if n > 0:
                rows.append(u.head.tensors[name][u.head.classes.index(cls)].astype(np.float64))
                weights.append(n)
                where.append(k)
        return rows, weights, where

    def _linear(self, global_head: Head, updates: Sequence[HeadUpdate],
                classes: tuple[str, ...]) -> tuple[Head, dict[str, float]]:
        d = global_head.feature_dim
        known = global_head.num_classes
        W = np.zeros((len(classes), d))
        b = np.zeros(len(classes))
        W0, b0 = global_head.tensors["W"].astype(np.float64), global_head.tensors["b"].astype(np.float64)
        W[:known], b[:known] = W0, b0
        # each device's step on the known rows, (W, b) - (W, b)_global, scaled down to the median step's norm
        steps = [np.concatenate([u.head.tensors["W"][:known] - W0, (u.head.tensors["b"][:known] - b0)[:, None]], axis=1)
                 for u in updates]
        factors = clip_factors([float(np.linalg.norm(s)) for s in steps])
        totals = bounded_weights([u.total for u in updates])
        for i, cls in enumerate(classes[:known]):
            if self.rows == "all":
                # every device trained this row (its samples are the row's negatives): FedAvg by (bounded) samples
                who, weights = list(range(len(updates))), totals
            else:
                _, n, who = self._rows(updates, "W", cls)
                weights = bounded_weights(n)
            if not who:
                continue  # no device holds the class: the global row stays
            w = weights / weights.sum()
            step = sum(w[j] * factors[k] * steps[k][i] for j, k in enumerate(who))
            if self.momentum:
                step = step + self.momentum * self._velocity.get(cls, 0.0)
                self._velocity[cls] = step
            W[i], b[i] = W[i] + step[:-1], b[i] + step[-1]
        # a class new to the fleet has no global row to step from: each holder's row (W, b) is bounded by
        # the largest row of the merged known classes (a row scaled up would win every prediction)
        bound = float(np.max(np.linalg.norm(np.column_stack([W[:known], b[:known]]), axis=1))) if known else 0.0
        for i, cls in enumerate(classes[known:], start=known):
            rows, n, who = self._rows(updates, "W", cls)
            rows = [np.append(r, updates[k].head.tensors["b"][updates[k].head.classes.index(cls)])
                    for r, k in zip(rows, who)]
            limit = bound if bound > 0 else float(np.sort([np.linalg.norm(r) for r in rows])[(len(rows) - 1) // 2])
            rows = [r * min(1.0, limit / float(np.linalg.norm(r))) if np.linalg.norm(r) > 0 else r for r in rows]
            if len(rows) >= 3:  # a majority of honest holders outvotes one row per coordinate
                row = np.median(np.stack(rows), axis=0)
            else:
                w = bounded_weights(n)
                row = (w / w.sum()) @ np.stack(rows)
            W[i], b[i] = row[:-1], row[-1]
        clipped = {u.device: round(f, 6) for u, f in zip(updates, factors) if f < 1.0}
        return Head("linear", classes, {"W": W.astype(np.float32), "b": b.astype(np.float32)}), clipped

    def _linear_private(self, global_head: Head, updates: Sequence[HeadUpdate], classes: tuple[str, ...]) -> Head:
        """Central DP with fixed clipping (as Flower's ``DifferentialPrivacyServerSideFixedClipping``).

        Each device's step ``[W | b] - [W | b]_global`` over every row is clipped to L2 norm ``dp_clip``;
        the steps are averaged **unweighted** (a device's self-reported counts must not scale its
        influence past the clipping bound), and Gaussian noise of standard deviation ``dp_noise·dp_clip/m``
        is added to every coordinate (m devices). A class new to the fleet steps from a zero row: its
        holders' rows are part of their clipped steps, the others' step on it is zero, so the new row is
        the holders' share of the mean (from the next round every device trains it). The privacy unit is
        a device's whole update (runtime/privacy.py gives ε); the counts and the class names are not
        covered (they travel in the clear). Momentum then applies to the noised step (post-processing).
        """
        known, rows = global_head.num_classes, len(classes)
        start = np.zeros((rows, global_head.feature_dim + 1))
        start[:known] = np.column_stack([global_head.tensors["W"], global_head.tensors["b"]])
        steps = []
        for u in updates:
            own = np.column_stack([u.head.tensors["W"], u.head.tensors["b"]]).astype(np.float64)
            step = np.zeros_like(start)
            step[:known] = own[:known] - start[:known]
            for i, cls in enumerate(classes[known:], start=known):
                if u.counts.get(cls, 0) > 0 and cls in u.head.classes:
                    step[i] = own[u.head.classes.index(cls)]
            norm = float(np.linalg.norm(step))
            steps.append(step * min(1.0, self.dp_clip / norm) if norm > 0 else step)
        m = len(steps)
        mean = np.mean(steps, axis=0) + self._rng.normal(0.0, self.dp_noise * self.dp_clip / m, size=start.shape)
        if self.momentum:
            before = np.asarray(self._velocity.get("*", np.zeros((0, start.shape[1]))))
            if before.ndim != 2 or before.shape[1] != start.shape[1] or before.shape[0] > rows:
                before = np.zeros((0, start.shape[1]))  # a checkpoint of the flat layout: momentum starts again
            mean = mean + self.momentum * np.vstack([before, np.zeros((rows - before.shape[0], start.shape[1]))])
            self._velocity["*"] = mean
        merged = start + mean
        return Head("linear", classes, {"W": merged[:, :-1].astype(np.float32), "b": merged[:, -1].astype(np.float32)})

    def _prototype(self, global_head: Head, updates: Sequence[HeadUpdate], classes: tuple[str, ...]) -> Head:
        # prototype rows are unit length (Head refuses others): only a device's weight can be inflated
        d = global_head.feature_dim
        P = np.zeros((len(classes), d))
        P[:global_head.num_classes] = global_head.tensors["P"]
        for i, cls in enumerate(classes):
            rows, n, _ = self._rows(updates, "P", cls)
            if not rows:
                continue
            weights = bounded_weights(n)
            mean = weights @ np.stack(rows)
            norm = float(np.linalg.norm(mean))
            if norm > 1e-12 * weights.sum():  # opposite prototypes cancelling out: keep the global row
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


def _lower_median(values: Sequence[float]) -> float:
    """The median, the lower of the two middle values for an even count (so of two, the smaller)."""
    return float(np.sort(np.asarray(values, dtype=np.float64))[(len(values) - 1) // 2])


def bounded_weights(counts: Sequence[int]) -> np.ndarray:
    """Merge weights of devices claiming ``counts`` samples: each count capped at the lower median of them.

    No device weighs more than the median device, however many samples it claims; of two devices
    neither outweighs the other. A lone holder keeps its count (there is nothing to compare it with).
    """
    if not len(counts):
        return np.zeros(0)
    return np.minimum(np.asarray(counts, dtype=np.float64), _lower_median(counts))


def clip_factors(norms: Sequence[float]) -> list[float]:
    """Per device, the factor that clips its step to ``CLIP_MULTIPLE`` times the lower median step norm (<= 1)."""
    if not len(norms):
        return []
    bound = CLIP_MULTIPLE * _lower_median(norms)
    return [min(1.0, bound / n) if n > bound else 1.0 for n in norms]


def update_bytes(arrays: Mapping[str, np.ndarray], config: Mapping[str, str]) -> int:
    """Payload size of one reply (tensor bytes plus config strings), for the round report and the study."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()) + sum(len(k) + len(v) for k, v in config.items()))
