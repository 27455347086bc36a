"""Fleet learning of a linear head: accuracy per round against central training, for 8 and 32 devices.

Flower's simulation engine needs Ray (``flwr[simulation]``, the ``fleet-sim`` extra: ``benchmarks/fleet_sim.py``
runs 1,000 devices on it); this study is an **in-process simulation that runs the same code as a real deployment**: each
device's round is :func:`edgexfer.runtime.fleet_client.train_on_samples` (what the ClientApp runs on the
device's feature cache), its reply goes through :func:`~edgexfer.runtime.federated.pack_update` and
:func:`~edgexfer.runtime.federated.check_update` (what the ServerApp receives and checks), and the
merge is :class:`~edgexfer.runtime.federated.HeadFedAvg` with the settings of ``edgexfer fleet serve``.
A real 8-SuperNode deployment on the same kind of split gave the same accuracies round for round (the
code is deterministic); what the simulation does not measure is Flower's transport and process start-up
(14-22 s per round with 8 SuperNodes on a 2-core machine, docs/fleet.md).

Data: clipart8; 21 images per class held out (never on a device; none of the demo images the bundle's
head was trained on); the rest spread over the devices so that each device holds 2-4 classes (non-IID),
a class's images split evenly among the devices holding it. Central: ``fit_linear`` (the host's trainer)
on the union of the devices' samples. Bytes: the float32 tensors plus the strings of each message.

Robustness (``--attacks``, issue 24 D3): device 0 of 4 lies (:data:`ATTACKS`, :func:`lie`); accuracy per
round for each start head (zero, the bundle's, its first half of classes: the devices add the others)
and split seed 0-3, against the honest fleet and the fleet without the device (``absent``).

Three rounds (``--three-rounds``, issue 24): from a zero head, the statistics round first
(runtime/fleet_stats.py) against FedProx from the start, 4 and 8 devices, split seeds 0-9.

Usage: python benchmarks/fleet_study.py BUNDLE_DIR CLIPART8_DIR [--rounds 20] [--devices 8 32] [--out benchmarks/results]
       python benchmarks/fleet_study.py BUNDLE_DIR CLIPART8_DIR --three-rounds --rounds 3
       python benchmarks/fleet_study.py BUNDLE_DIR CLIPART8_DIR --attacks --rounds 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cpu import cpu_features
from edgexfer.runtime.federated import HeadFedAvg, check_update, leave_out, pack_update, update_bytes
from edgexfer.runtime.fleet_client import train_on_samples
from edgexfer.runtime.fleet_stats import (
    ClassStatistics,
    check_statistics,
    class_statistics,
    pack_statistics,
    statistics_round,
)
from edgexfer.runtime.head_training import fit_linear
from edgexfer.runtime.heads import Head

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_PER_CLASS = 21


def features_of(bundle: Bundle, data: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from edgexfer.fleet.deployment import write_val_features
    from edgexfer.runtime.imagefolder import scan_image_folder

    if not cache.exists():
        write_val_features(bundle, data, cache)
    folder = scan_image_folder(data)
    with np.load(cache) as d:
        return d["features"], d["labels"].astype(str), [p.name for p in folder.paths]


def split(labels: np.ndarray, names: list[str], n_devices: int, seed: int = 0):
    """(held-out indices, one index list per device); same rule as tests/fleet/federation_support.py."""
    demo = REPO / "data" / "clipart8-demo"
    classes = sorted(set(labels))
    split_rng, owner_rng = random.Random(seed), random.Random(seed + 1)
    held = [owner_rng.sample(classes, owner_rng.randint(2, 4)) for _ in range(n_devices)]
    for i, c in enumerate(classes):
        if not any(c in h for h in held):
            held[i % n_devices].append(c)
    val, parts = [], [[] for _ in range(n_devices)]
    for c in classes:
        idx = [i for i in np.flatnonzero(labels == c)]
        seen = {p.name for p in (demo / c).iterdir()} if (demo / c).is_dir() else set()
        rest = [i for i in idx if names[i] not in seen]
        split_rng.shuffle(rest)
        val += rest[:HELD_OUT_PER_CLASS]
        owners = [k for k in range(n_devices) if c in held[k]]
        for j, i in enumerate(i for i in idx if i not in set(rest[:HELD_OUT_PER_CLASS])):
            parts[owners[j % len(owners)]].append(i)
    return np.array(val), [np.array(p, dtype=np.int64) for p in parts]


def accuracy(head, X, y) -> float:
    return float(np.mean(np.asarray(head.classes)[head.logits(X).argmax(1)] == y))


def zero_head(head: Head) -> Head:
    """A head that knows nothing (zero weights, chance accuracy): the federation has to learn it all."""
    return Head(head.kind, head.classes, {k: np.zeros_like(v) for k, v in head.tensors.items()})


#: how the lying device (device 0) of the robustness runs answers: (claimed count per class, its tensors)
ATTACKS = ("d3", "huge-norm", "sign-flip", "counts", "absent")


def lie(attack: str, global_head: Head, local: Head, counts: dict[str, int]) -> tuple[Head, dict[str, int]]:
    """Device 0's reply in a robustness run, made from its honest round (``local``, ``counts``).

    ``d3``: issue 24's D3, 9,000,000 samples claimed per class and every tensor scaled by -50;
    ``huge-norm``: its step from the global head times 1000, honest counts; ``sign-flip``: its step
    negated, 9,000,000 samples per class; ``counts``: honest tensors, 9,000,000 samples per class;
    ``absent``: no samples (the device is not merged), the reference a liar is measured against.
    """
    huge = {c: 9_000_000 for c in local.classes}
    if attack == "absent":  # the reference: what the fleet loses without the device's samples
        return global_head, {c: 0 for c in global_head.classes}
    if attack == "counts":
        return local, huge
    if attack == "d3":
        return Head(local.kind, local.classes, {k: (-50 * v).astype(np.float32) for k, v in local.tensors.items()}), huge
    factor = 1000.0 if attack == "huge-norm" else -1.0
    known = global_head.num_classes
    tensors = {}
    for k, v in local.tensors.items():
        t = v.astype(np.float64).copy()
        t[:known] = global_head.tensors[k] + factor * (t[:known] - global_head.tensors[k])
        tensors[k] = t.astype(np.float32)
    return Head(local.kind, local.classes, tensors), (counts if attack == "huge-norm" else huge)


def half_head(head: Head) -> Head:
    """The head's first half of classes only: the devices hold the others too, and add them (new classes)."""
    keep = len(head.classes) // 2
    return Head(head.kind, head.classes[:keep], {k: v[:keep] for k, v in head.tensors.items()})


def simulate(bundle: Bundle, X, labels, names, n_devices: int, rounds: int, *, proximal: float, momentum: float,
             rows: str = "all", start: str = "zero", dp_clip: float | None = None, dp_noise: float = 0.0,
             quiet: bool = False, attack: str | None = None, seed: int = 0, first_round: str = "fedprox"):
    val, parts = split(labels, names, n_devices, seed)
    head = {"bundle": bundle.head, "zero": lambda: zero_head(bundle.head()), "half": lambda: half_head(bundle.head())}[start]()
    sha = bundle.manifest.backbone.sha256
    classes = tuple(bundle.head().classes)
    union = np.concatenate(parts)
    central = fit_linear(X[union], np.array([classes.index(c) for c in labels[union]]), classes)
    strategy = HeadFedAvg(min_devices=1, rows=rows, momentum=momentum, dp_clip=dp_clip, dp_noise=dp_noise, seed=0)
    down_arrays, down_config = pack_update(head, {}, sha)
    out = {"devices": n_devices, "samples_per_device": [int(len(p)) for p in parts],
           "classes_per_device": [int(len(set(labels[p]))) for p in parts],
           "central_accuracy": accuracy(central, X[val], labels[val]), "start_accuracy": accuracy(head, X[val], labels[val]),
           "held_out": int(len(val)), "rounds": []}
    fleet_samples = 0
    liars: dict[str, int] = {}  # devices caught lying, left out for good (as run_federation does)
    for r in range(1, rounds + 1):
        updates, up_bytes, train_seconds = [], [], []
        if r == 1 and first_round == "statistics" and dp_clip is None:
            head, fleet_samples, record, caught = statistics_first(head, X, labels, parts, sha, attack)
            liars.update({device: 1 for device in caught})
            out["rounds"].append({"round": 1, "kind": "statistics", "accuracy": accuracy(head, X[val], labels[val]),
                                  "bytes_down_per_device": update_bytes(down_arrays, down_config), **record})
            if not quiet:
                print(f"{n_devices} devices round 1 (statistics): accuracy {out['rounds'][-1]['accuracy']:.3f} "
                      f"(central {out['central_accuracy']:.3f})", flush=True)
            continue
        for k, p in enumerate(parts):
            t = time.perf_counter()
            local, counts, _ = train_on_samples(head, X[p], list(labels[p]), proximal=proximal, rows=rows,
                                                fleet_samples=fleet_samples)
            if attack and k == 0:
                local, counts = lie(attack, head, local, counts)
            train_seconds.append(time.perf_counter() - t)
            arrays, config = pack_update(local, counts, sha)
            up_bytes.append(update_bytes(arrays, config))
            updates.append(check_update(f"device-{k}", arrays, config, global_head=head, backbone_sha256=sha))
        t = time.perf_counter()
        result = strategy.aggregate(head, *leave_out(updates, [], liars))
        aggregate_seconds = time.perf_counter() - t
        head = result.head
        fleet_samples = result.fleet_samples
        out["rounds"].append({
            "round": r, "accuracy": accuracy(head, X[val], labels[val]),
            "bytes_up_per_device": int(np.mean(up_bytes)), "bytes_down_per_device": update_bytes(down_arrays, down_config),
            "device_train_seconds_mean": round(float(np.mean(train_seconds)), 4),
            "device_train_seconds_max": round(float(np.max(train_seconds)), 4),
            "aggregate_seconds": round(aggregate_seconds, 4),
        })
        if not quiet:
            print(f"{n_devices} devices round {r}: accuracy {out['rounds'][-1]['accuracy']:.3f} "
                  f"(central {out['central_accuracy']:.3f})", flush=True)
    return out


def statistics_first(head: Head, X, labels, parts, sha: str, attack: str | None = None):
    """The statistics round (runtime/fleet_stats.py) as the deployment runs it: ``(head, fleet samples, record)``.
    A lying device 0 (``attack``) sends ``lie_statistics``."""
    updates, up_bytes, seconds = [], [], []
    for k, p in enumerate(parts):
        t = time.perf_counter()
        stats = class_statistics(X[p], list(labels[p]), head.classes)
        if attack and k == 0:
            stats = lie_statistics(attack, stats)
        seconds.append(time.perf_counter() - t)
        arrays, config = pack_statistics(stats, sha)
        up_bytes.append(update_bytes(arrays, config))
        updates.append(check_statistics(f"device-{k}", arrays, config, global_head=head, backbone_sha256=sha))
    t = time.perf_counter()
    result = statistics_round(head, updates)
    return result.head, result.fleet_samples, {
        "bytes_up_per_device": int(np.mean(up_bytes)), "bytes_up_max": int(np.max(up_bytes)),
        "device_train_seconds_mean": round(float(np.mean(seconds)), 4),
        "device_train_seconds_max": round(float(np.max(seconds)), 4),
        "aggregate_seconds": round(time.perf_counter() - t, 4), "outliers": result.outliers}, result.outliers


def lie_statistics(attack: str, stats: ClassStatistics) -> ClassStatistics:
    """Device 0's statistics in a robustness run: ``d3`` 9,000,000 samples claimed per class it holds, its
    sums and scatter factor times -50; ``huge-norm`` sums and factor times 1000; ``sign-flip`` sums negated;
    ``counts`` 9,000,000 per class; ``absent`` nothing."""
    held = np.array([stats.counts[c] > 0 for c in stats.classes])
    if attack == "absent":
        return ClassStatistics(stats.classes, {c: 0 for c in stats.classes}, np.zeros_like(stats.sums), stats.factor[:0])
    counts = {c: (9_000_000 if n else 0) for c, n in stats.counts.items()} if attack in ("d3", "counts", "sign-flip") \
        else dict(stats.counts)
    # a claimed count scales the sum, or the mean would shrink to nothing: the liar keeps its means' size
    sums = stats.sums * np.where(held, [counts[c] / max(stats.counts[c], 1) for c in stats.classes], 0)[:, None]
    factor = stats.factor
    if attack in ("d3", "huge-norm"):
        f = -50.0 if attack == "d3" else 1000.0
        sums, factor = sums * f, factor * abs(f)
    elif attack == "sign-flip":
        sums = -sums
    return ClassStatistics(stats.classes, counts, sums, factor)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, colour in zip(results["runs"], ("tab:blue", "tab:orange", "tab:green")):
        rounds = [r["round"] for r in run["rounds"]]
        ax.plot(rounds, [r["accuracy"] for r in run["rounds"]], marker="o", ms=3, color=colour,
                label=f"{run['devices']} devices, federated")
        ax.axhline(run["central_accuracy"], color=colour, ls="--", lw=1, label=f"{run['devices']} devices, central")
        for holders in results.get("holders", []):
            if holders["devices"] == run["devices"]:
                acc = holders["accuracy_per_round"]
                ax.plot(range(1, len(acc) + 1), acc, ls=":", color=colour,
                        label=f"{run['devices']} devices, per-class rule (--rows holders)")
    ax.set_xlabel("round")
    ax.set_ylabel(f"held-out accuracy ({results['runs'][0]['held_out']} images)")
    env = results["environment"]
    start = results["settings"].get("start", "bundle")
    ax.set_title(f"Fleet learning of a linear head from a {start} head, clipart8, 2-4 classes per device\n"
                 f"{env['cpu_model']}; {' '.join(env['isa_flags'][:8])}; {env['date']}", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def robustness(bundle: Bundle, X, labels, names, args, cpu) -> None:
    """One lying device (device 0) against the merge: accuracy per round, honest and for each attack."""
    devices = args.devices if args.devices != [8, 32] else [4]
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for n in devices:
            for seed in range(4):
                for start in ("zero", "half", "bundle"):
                    for attack in ("honest", *ATTACKS):
                        run = simulate(bundle, X, labels, names, n, args.rounds, proximal=args.proximal,
                                       momentum=args.momentum, start=start, quiet=True, seed=seed,
                                       attack=None if attack == "honest" else attack)
                        acc = [round(r["accuracy"], 4) for r in run["rounds"]]
                        runs.append({"devices": n, "seed": seed, "start": start, "attack": attack,
                                     "central_accuracy": run["central_accuracy"], "accuracy_per_round": acc})
                        print(f"{n} devices seed {seed} start {start:6s} {attack:9s} "
                              f"{' '.join(f'{a:.3f}' for a in acc)}", flush=True)
    results = {"study": "fleet_robustness", "method": "in-process simulation of the deployment's code (no Ray)",
               "settings": {"proximal": args.proximal, "momentum": args.momentum, "rows": "all", "rounds": args.rounds},
               "environment": {"cpu_model": cpu.model, "isa_flags": list(cpu.flags),
                               "date": datetime.date.today().isoformat()}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_robustness.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'fleet_robustness.json'}")


def three_rounds(bundle: Bundle, X, labels, names, args, cpu) -> None:
    """Issue 24's three rounds: accuracy per round for each split seed, device count and first round."""
    devices = args.devices if args.devices != [8, 32] else [4, 8]
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for n in devices:
            for seed in range(args.seeds):
                for first in args.first_rounds:
                    for attack in (None, *(args.attack_names or ())):
                        run = simulate(bundle, X, labels, names, n, args.rounds, proximal=args.proximal,
                                       momentum=args.momentum, start="zero", quiet=True, seed=seed,
                                       first_round=first, attack=attack)
                        acc = [round(r["accuracy"], 4) for r in run["rounds"]]
                        runs.append({"devices": n, "seed": seed, "first_round": first, "attack": attack or "honest",
                                     "central_accuracy": run["central_accuracy"], "accuracy_per_round": acc,
                                     "bytes_up_per_device": [r["bytes_up_per_device"] for r in run["rounds"]],
                                     "aggregate_seconds": [r["aggregate_seconds"] for r in run["rounds"]]})
                        print(f"{n} devices seed {seed} first {first:10s} {attack or 'honest':9s} central "
                              f"{run['central_accuracy']:.3f} " + " ".join(f"{a - run['central_accuracy']:+.3f}" for a in acc),
                              flush=True)
    results = {"study": "fleet_three_rounds", "method": "in-process simulation of the deployment's code (no Ray)",
               "settings": {"proximal": args.proximal, "momentum": args.momentum, "rounds": args.rounds, "start": "zero"},
               "environment": {"cpu_model": cpu.model, "isa_flags": list(cpu.flags),
                               "date": datetime.date.today().isoformat()}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_three_rounds.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'fleet_three_rounds.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--proximal", type=float, default=1.0)
    parser.add_argument("--momentum", type=float, default=0.8)
    parser.add_argument("--start", choices=("zero", "bundle"), default="zero",
                        help="the head the federation starts from: zeros (default: it must learn everything) or "
                             "the bundle's (the demo bundle's head already knows clipart8's classes)")
    parser.add_argument("--compare-holders", action="store_true",
                        help="also run the per-class rule (--rows holders) for every device count")
    parser.add_argument("--dp-clip", type=float, default=0.3,
                        help="clipping norm of the differential-privacy runs (device steps measured 0.2-0.6)")
    parser.add_argument("--dp-noise", type=float, nargs="*", default=[0.0, 0.1, 0.3, 1.0],
                        help="noise multipliers of the differential-privacy runs (none: skip them)")
    parser.add_argument("--attacks", action="store_true",
                        help="instead: one lying device of --devices (default 4) for each attack of ATTACKS, from "
                             "each start head and split seed 0-3; writes fleet_robustness.json")
    parser.add_argument("--three-rounds", action="store_true",
                        help="instead: --rounds (use 3) from a zero head with the statistics round first and without, "
                             "for --devices (default 4 8) and --seeds split seeds; writes fleet_three_rounds.json")
    parser.add_argument("--seeds", type=int, default=10, help="split seeds of --three-rounds")
    parser.add_argument("--first-rounds", nargs="+", choices=("statistics", "fedprox"), default=["statistics", "fedprox"],
                        help="with --three-rounds: the first rounds to compare")
    parser.add_argument("--attack-names", nargs="*", choices=ATTACKS, default=[],
                        help="with --three-rounds: also a lying device 0 per attack")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    bundle = Bundle.open(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        X, labels, names = features_of(bundle, args.data, Path(tmp) / "features.npz")
    cpu = cpu_features()
    if args.attacks:
        robustness(bundle, X, labels, names, args, cpu)
        return
    if args.three_rounds:
        three_rounds(bundle, X, labels, names, args, cpu)
        return
    results = {"study": "fleet_study", "method": "in-process simulation of the deployment's code (no Ray)",
               "settings": {"proximal": args.proximal, "momentum": args.momentum, "rows": "all", "C": 1.0,
                            "start": args.start},
               "environment": {"cpu_model": cpu.model, "isa_flags": list(cpu.flags),
                               "date": datetime.date.today().isoformat()},
               "runs": []}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # max_iter warnings of the local fits
        for n in args.devices:
            results["runs"].append(simulate(bundle, X, labels, names, n, args.rounds, proximal=args.proximal,
                                            momentum=args.momentum, start=args.start))
        # the literal per-class rule of the issue: each row averaged over the devices holding its class only
        results["holders"] = []
        for n in args.devices if args.compare_holders else ():
            run = simulate(bundle, X, labels, names, n, args.rounds, proximal=args.proximal, momentum=0.0,
                           rows="holders", start=args.start, quiet=True)
            results["holders"].append({"devices": n, "rows": "holders", "momentum": 0.0,
                                       "central_accuracy": run["central_accuracy"],
                                       "accuracy_per_round": [round(r["accuracy"], 4) for r in run["rounds"]]})
            print(f"holders rule {n} devices: accuracy per round "
                  f"{' '.join(f'{r:.3f}' for r in results['holders'][-1]['accuracy_per_round'])} "
                  f"(central {run['central_accuracy']:.3f})", flush=True)
        # the accuracy cost of central differential privacy (fixed clipping + Gaussian noise); no epsilon
        # is computed (Flower's accountant needs its `dp` extra, dp-accounting, which is not installed)
        results["dp"] = []
        for n in args.devices:
            for noise in args.dp_noise:
                run = simulate(bundle, X, labels, names, n, args.rounds, proximal=args.proximal, momentum=args.momentum,
                               start=args.start, dp_clip=args.dp_clip, dp_noise=noise, quiet=True)
                last = [r["accuracy"] for r in run["rounds"][-5:]]
                results["dp"].append({"devices": n, "dp_clip": args.dp_clip, "dp_noise": noise,
                                      "accuracy_last5_mean": round(float(np.mean(last)), 4),
                                      "central_accuracy": run["central_accuracy"],
                                      "accuracy_per_round": [round(r["accuracy"], 4) for r in run["rounds"]]})
                print(f"DP {n} devices clip {args.dp_clip} noise {noise}: last-5 mean accuracy "
                      f"{np.mean(last):.3f} (central {run['central_accuracy']:.3f})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_study.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "fleet_study.png")
    print(f"wrote {args.out / 'fleet_study.json'} and .png")


if __name__ == "__main__":
    main()
