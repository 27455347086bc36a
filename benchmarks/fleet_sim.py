"""Fleet learning of a linear head at 1,000 devices on Flower's simulation engine (Ray): rounds, bytes, time, memory.

The federation is Flower's ``run_simulation`` on its Ray backend with the deployment's apps
(:mod:`edgexfer.fleet.simulation`): the ServerApp's ``run_federation`` (devices sampled per round,
replies checked, robust merge, held-out accuracy per round) and the device's ClientApp, whose virtual
nodes read their samples from a pool instead of a device's feature cache.

Data. clipart8 has 576 images; 1,000 devices of 2-50 samples need ~15,000. So: 20 images per class
are **held out** and never reach a device: their features
(the image as inference sees it) measure accuracy. The other images give the **pool**: each image's own
features and ``--views - 1`` augmented views (the device's views of ``device learn --augment``: crops of
70-100 %, near-square, flips, no colour jitter: :data:`edgexfer.runtime.augment.AUGMENT_SETTINGS`) through the bundle's frozen backbone, computed once and
cached under build/fleet-sim/. Devices are non-IID: 1-4 classes each, sizes log-uniform in 2-50
(:func:`~edgexfer.fleet.simulation.non_iid_partitions`); pool samples repeat across devices (a view is
on ~4 devices at 1,000). Central: ``fit_linear`` on the union of all devices' samples (repeats
included). The federation starts from a zero head (it learns every class).

Usage: python benchmarks/fleet_sim.py BUNDLE CLIPART8 [--devices 1000] [--fraction 0.1] [--rounds 30]
       python benchmarks/fleet_sim.py BUNDLE CLIPART8 --quick   (100 devices, 5 rounds: ~1 min)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HELD_OUT_PER_CLASS = 20


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pool_and_val(bundle, data: Path, views: int, cache_dir: Path, seed: int = 0):
    """(pool features, pool labels, val features, val labels): cached in ``cache_dir`` per bundle, views, seed."""
    from edgexfer.runtime.augment import AUGMENT_SETTINGS, AUGMENT_TAG, Augmenter

    cache = cache_dir / f"pool-{bundle.manifest.backbone.sha256[:12]}-v{views}-{AUGMENT_TAG}-s{seed}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as d:
            return d["pool_x"], d["pool_y"].astype(str), d["val_x"], d["val_y"].astype(str)
    from edgexfer.runtime.backends.registry import open_reference
    from edgexfer.runtime.imagefolder import scan_image_folder
    from edgexfer.runtime.preprocess import decode_image, resize_to_spec, stack

    folder = scan_image_folder(data)
    spec = bundle.preprocess
    rng = np.random.default_rng(seed)
    val, rest = [], []
    # the backbone is frozen (ImageNet weights) and the federation starts from a zero head, so the demo
    # bundle's own training images need not be kept out of the held-out set
    for ci in range(len(folder.classes)):
        idx = [i for i, label in enumerate(folder.labels) if label == ci]
        held = set(rng.choice(idx, size=HELD_OUT_PER_CLASS, replace=False).tolist())
        val += sorted(held)
        rest += [i for i in idx if i not in held]
    # the device's own views (device learn --augment): crops of 70-100 % of the image, near-square, flips, no
    # colour jitter. With the host's default jitter (and 60 % crops) central on the pool fell to 0.65 on the
    # held-out originals against 0.76 on the originals alone: the views must stay close to real images.
    augment = Augmenter(spec, **AUGMENT_SETTINGS)
    started = time.perf_counter()
    with open_reference(bundle.backbone_path) as engine:
        def features(images):
            return np.concatenate([engine.run(stack(images[s:s + 32])) for s in range(0, len(images), 32)])

        val_x = features([resize_to_spec(decode_image(folder.paths[i], fill=spec.fill), spec) for i in val])
        pool_x, pool_y = [], []
        for n, i in enumerate(rest):
            img = decode_image(folder.paths[i], fill=spec.fill)
            batch = [resize_to_spec(img, spec)] + [augment(img, rng) for _ in range(views - 1)]
            pool_x.append(engine.run(stack(batch)))
            pool_y += [folder.classes[folder.labels[i]]] * views
            if n % 50 == 0:
                print(f"pool: {n}/{len(rest)} images ({time.perf_counter() - started:.0f} s)", flush=True)
    pool_x = np.concatenate(pool_x).astype(np.float32)
    val_y = np.array([folder.classes[folder.labels[i]] for i in val])
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, pool_x=pool_x, pool_y=np.array(pool_y), val_x=val_x.astype(np.float32), val_y=val_y)
    print(f"pool: {len(pool_y)} views of {len(rest)} images, {len(val)} held out, "
          f"{time.perf_counter() - started:.0f} s -> {cache}", flush=True)
    return pool_x, np.array(pool_y), val_x.astype(np.float32), val_y


def environment() -> dict:
    import flwr
    import ray

    from edgexfer.runtime.cpu import cpu_features

    cpu = cpu_features()
    return {"cpu_model": cpu.model, "isa_flags": list(cpu.flags), "cpus": os.cpu_count(),
            "python": platform.python_version(), "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "?",
            "ray": ray.__version__, "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "load_average_start": load_average()}


def central_accuracy(pool_x, pool_y, parts, val_x, val_y, classes) -> tuple[float, float]:
    from edgexfer.fleet.server_app import validation_accuracy
    from edgexfer.runtime.head_training import fit_linear

    union = np.concatenate(parts)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        head = fit_linear(pool_x[union], np.array([classes.index(c) for c in pool_y[union]]), classes)
    return validation_accuracy(head, val_x, val_y), time.perf_counter() - started


def summarize(record: dict, central: float, n_devices: int) -> dict:
    """Per round: accuracy, devices asked/merged/empty, seconds, bytes up and down per device asked."""
    rounds = []
    for r in record["rounds"]:
        up = [d["received"]["bytes"] for d in r["devices"].values()]
        rounds.append({"round": r["round"], "accuracy": round(r["val_accuracy"], 4), "asked": r["asked"],
                       "merged": len(r["accepted"]), "empty": len(r["empty"]), "rejected": len(r["rejected"]),
                       "silent": len(r["silent"]), "seconds": r["seconds"],
                       "bytes_up_per_device": int(np.mean(up)) if up else 0,
                       "train_seconds_mean": round(float(np.mean([d["metrics"].get("train_seconds", 0)
                                                                  for d in r["devices"].values()] or [0])), 4)})
    within = next((r["round"] for r in rounds if r["accuracy"] >= central - 0.02), None)
    best = max(rounds, key=lambda r: r["accuracy"])
    asked = [r["asked"] for r in rounds]
    return {"rounds": rounds, "rounds_to_within_2_points": within, "best_round": best["round"],
            "best_accuracy": best["accuracy"], "last_accuracy": rounds[-1]["accuracy"],
            "round_seconds_mean": round(float(np.mean([r["seconds"] for r in rounds])), 3),
            "round_seconds_after_first_mean": round(float(np.mean([r["seconds"] for r in rounds[1:]] or [0])), 3),
            "devices_asked_per_round": int(np.mean(asked)),
            "devices_asked_at_least_once": len({d for r in record["rounds"] for d in r["devices"]}
                                               | {d for r in record["rounds"] for d in r["empty"]}),
            "share_of_fleet_per_round": round(float(np.mean(asked)) / n_devices, 3)}


def markdown(res: dict) -> str:
    env, s, m = res["environment"], res["summary"], res["memory"]
    lines = [f"# Fleet learning on Flower's simulation engine: {res['devices']} virtual devices", "",
             f"{env['cpu_model']} ({env['cpus']} CPUs; {' '.join(env['isa_flags'])}), Python {env['python']}, "
             f"flwr {env['flwr']}, Ray {env['ray']}; {env['date_utc']} UTC; load average {env['load_average_start']} "
             f"at the start, {res['load_average_end']} at the end (machine shared).", "",
             f"Data: {res['data']}", "",
             f"Devices: {res['devices']}, {res['partition']['samples_total']} samples "
             f"(sizes {res['partition']['size_min']}-{res['partition']['size_max']}, median "
             f"{res['partition']['size_median']}; classes per device 1-4, {res['partition']['one_class_devices']} "
             f"with one class), {res['settings']['fraction-train']:.0%} asked per round "
             f"({s['devices_asked_per_round']}), {s['devices_asked_at_least_once']} asked at least once.", "",
             f"**Central** (fit_linear on all devices' samples): {res['central_accuracy']:.4f}. "
             f"**Rounds to within 2 points**: {s['rounds_to_within_2_points']}; best {s['best_accuracy']:.4f} "
             f"(round {s['best_round']}), last {s['last_accuracy']:.4f}.", "",
             f"**Time**: {res['seconds']:.0f} s in all: {res['ray_start_seconds']:.0f} s before round 1 (Ray, the "
             f"virtual nodes), round 1 {s['rounds'][0]['seconds']:.1f} s (it starts the actors), then "
             f"{s['round_seconds_after_first_mean']:.2f} s per round.", "",
             f"**Bytes per device asked**: down {res['bytes_down_per_device']} (the global head and its config), "
             f"up {s['rounds'][-1]['bytes_up_per_device']} (mean of the last round's replies).", "",
             f"**Memory** (peak PSS of the driver and every process it started, sampled every {m['interval_s']} s): "
             f"{m['total_pss_mb']:.0f} MB in all; driver RSS {m['driver_rss_mb']:.0f} MB.", "",
             "**CPU seconds** (all processes of a kind, from /proc): "
             + ", ".join(f"{k} {v:.0f}" for k, v in m["cpu_seconds"].items()) + "; local training (sum of the "
             f"devices' train_seconds): {res['train_seconds_total']:.0f}.", "",
             f"**Record**: {res['record_json_bytes'] / 1e6:.1f} MB of JSON (reports/fleet.json: an entry per device "
             "asked per round).", "",
             "| process | most at once | peak PSS of one (MB) | peak RSS of one (MB) |", "|---|---|---|---|"]
    for kind, v in m["by_process"].items():
        lines.append(f"| {kind} | {v['processes']} | {v['peak_pss_mb']} | {v['peak_rss_mb']} |")
    lines += ["", "| round | accuracy | asked | merged | empty (one class) | seconds | bytes up per device |",
              "|---|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        lines.append(f"| {r['round']} | {r['accuracy']:.4f} | {r['asked']} | {r['merged']} | {r['empty']} | "
                     f"{r['seconds']:.2f} | {r['bytes_up_per_device']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.1, help="share of the devices asked per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--views", type=int, default=10, help="pool samples per training image (1 = the image only)")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="100 devices, 5 rounds (a check: ~1 min)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--name", default=None, help="results file stem (default fleet_sim_DEVICES)")
    parser.add_argument("--markdown", type=Path, default=None, help="only rewrite the .md of this results .json")
    args = parser.parse_args()
    if args.markdown:
        args.markdown.with_suffix(".md").write_text(markdown(json.loads(args.markdown.read_text())))
        return
    if args.quick:
        args.devices, args.rounds, args.fraction = 100, 5, 0.2

    from edgexfer.fleet.result_bundle import write_result_bundle
    from edgexfer.fleet.server_app import FleetSettings, validation_accuracy
    from edgexfer.fleet.simulation import backend_config, non_iid_partitions, simulate, write_pool
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.federated import update_bytes
    from edgexfer.runtime.heads import Head

    env = environment()
    source = Bundle.open(args.bundle)
    pool_x, pool_y, val_x, val_y = pool_and_val(source, args.data, args.views, REPO / "build" / "fleet-sim", args.seed)
    classes = tuple(source.head().classes)
    parts = non_iid_partitions(pool_y, args.devices, seed=args.seed)
    sizes = np.array([len(p) for p in parts])
    central, central_seconds = central_accuracy(pool_x, pool_y, parts, val_x, val_y, classes)
    print(f"central accuracy {central:.4f} ({central_seconds:.1f} s); {args.devices} devices, {sizes.sum()} samples",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="fleet-sim-") as tmp:
        tmp = Path(tmp)
        zero = source.head()
        zero = Head(zero.kind, zero.classes, {k: np.zeros_like(v) for k, v in zero.tensors.items()})
        start = write_result_bundle(source, zero, tmp / "start", {"rounds": []})
        np.savez(tmp / "val.npz", features=val_x, labels=val_y)
        write_pool(tmp / "pool.npz", pool_x, pool_y, parts, source.manifest.backbone.sha256)
        settings = FleetSettings(bundle=str(start.root), out=str(tmp / "result"), rounds=args.rounds, min_devices=2,
                                 round_timeout=600.0, wait_timeout=60.0, val_features=str(tmp / "val.npz"),
                                 fraction=args.fraction, sample_seed=args.seed, min_available=args.devices)
        backend = backend_config(cpus_per_client=args.cpus_per_client)
        record = simulate(settings, tmp / "pool.npz", args.devices, backend=backend)
    # what the ServerApp sends a device (server_app._round_message): the head's tensors and the round config
    down_config = {"kind": zero.kind, "classes": json.dumps(list(zero.classes)),
                   "backbone_sha256": source.manifest.backbone.sha256, "round": args.rounds, "C": settings.C,
                   "proximal": settings.proximal, "max_iter": settings.max_iter, "rows": settings.rows,
                   "fleet_samples": int(sizes.sum())}
    summary = summarize(record, central, args.devices)
    ray_start = record["seconds"] - sum(r["seconds"] for r in record["rounds"])
    res = {"study": "fleet_sim", "engine": "flwr.simulation.run_simulation, Ray backend",
           "data": (f"clipart8 through {source.manifest.backbone.arch} (frozen): {len(val_y)} original images held out "
                    f"(never on a device) for accuracy; a pool of {len(pool_y)} samples = each of the other "
                    f"{len(pool_y) // args.views} images and {args.views - 1} augmented views of it (the device's views: "
                    "crops of 70-100 %, flips, no colour jitter); devices draw from the pool, so samples repeat across devices; "
                    "start head: zeros"),
           "devices": args.devices, "settings": settings.to_run_config() | {"bundle": "zero head of " + source.manifest.name},
           "backend_config": backend, "environment": env, "load_average_end": load_average(),
           "partition": {"samples_total": int(sizes.sum()), "size_min": int(sizes.min()), "size_max": int(sizes.max()),
                         "size_median": float(np.median(sizes)),
                         "one_class_devices": int(sum(len(set(pool_y[p])) == 1 for p in parts))},
           "central_accuracy": round(central, 4), "central_fit_seconds": round(central_seconds, 2),
           "start_accuracy": round(validation_accuracy(zero, val_x, val_y), 4),
           "bytes_down_per_device": update_bytes(zero.tensors, {k: str(v) for k, v in down_config.items()}),
           "seconds": record["seconds"], "ray_start_seconds": round(ray_start, 1), "memory": record["memory"],
           # the federation's record as reports/fleet.json keeps it: an entry per device asked per round
           "train_seconds_total": round(sum(d["metrics"].get("train_seconds", 0) for r in record["rounds"]
                                            for d in r["devices"].values()), 1),
           "record_json_bytes": len(json.dumps({k: v for k, v in record.items() if k not in ("seconds", "memory")})),
           "summary": summary, "argv": sys.argv[1:]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"fleet_sim_{args.devices}" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
    main()
