"""Seconds per round of a real federation on loopback, and what they are made of (issue 24, "Three rounds").

A SuperLink (``edgexfer fleet serve --insecure``) and N SuperNodes (``edgexfer device federate``) on
this machine, each device 2-4 clipart8 classes (the split of tests/fleet/federation_support.py), the
statistics round then FedProx rounds from the bundle's head zeroed. Per round: the ServerApp's seconds
(from sending the round's messages to the merged head), the devices' own work (``train_seconds`` the
ClientApp reports), and the rest: Flower's transport, the SuperNode's 3-s poll, a ``flwr-clientapp``
process started per device per round. The cost of that process start is measured apart: a fresh Python
importing what it imports (``flwr.clientapp`` and edgexfer's ClientApp), N at once.

Usage: python benchmarks/fleet_round_time.py BUNDLE_DIR CLIPART8_DIR [--devices 4 8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "fleet"))  # the tests' non-IID split and deployment helpers

IMPORT = "import flwr.clientapp, flwr.app; from edgexfer.runtime.fleet_client import app; app"


def process_start_seconds(n: int) -> float:
    """Wall seconds for n fresh Pythons importing what a ClientApp process imports, started at once."""
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", IMPORT]) for _ in range(n)]
    for p in procs:
        p.wait()
    return round(time.perf_counter() - started, 2)


def zero_head_bundle(bundle: Path, out: Path) -> Path:
    """The bundle with its head zeroed (chance accuracy) and the manifest's checksum of it updated."""
    import numpy as np

    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.fsutil import file_sha256
    from edgexfer.runtime.heads import Head

    shutil.copytree(bundle, out)
    head = Bundle.open(out).head()
    Head("linear", head.classes, {k: np.zeros_like(v) for k, v in head.tensors.items()}).save(out / "head.safetensors")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["head.safetensors"] = {"sha256": file_sha256(out / "head.safetensors"),
                                             "bytes": (out / "head.safetensors").stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def federation(bundle: Path, start: Path, clipart8: Path, root: Path, n: int, rounds: int) -> dict:
    """The devices install ``bundle``; the federation starts from ``start`` (its head zeroed, same backbone)."""
    from federation_support import Deployment, make_fleet

    fleet = make_fleet(bundle, clipart8, root / "fleet", n)
    deployment = Deployment(root)
    try:
        deployment.serve("--bundle", str(start), "--out", str(root / "out"), "--rounds", str(rounds),
                         "--min-devices", str(n), "--val", str(fleet.val_dir), "--round-timeout", "120",
                         "--wait-timeout", "180", "--insecure")
        for state in fleet.states:
            deployment.join(state, "--insecure")
        code, out = deployment.result(timeout=rounds * 120 + 300)
    finally:
        deployment.close()
    if code != 0:
        raise SystemExit(deployment.server_log.read_text()[-3000:])
    report = json.loads((Path(json.loads(out)["out"]) / "reports" / "fleet.json").read_text())
    rows = []
    for r in report["rounds"]:
        train = [d["metrics"].get("train_seconds", 0.0) for d in r["devices"].values()]
        rows.append({"round": r["round"], "kind": r.get("kind"), "seconds": r["seconds"],
                     "device_seconds_max": round(max(train), 3), "device_seconds_mean": round(sum(train) / len(train), 3),
                     "overhead_seconds": round(r["seconds"] - max(train), 2), "val_accuracy": r["val_accuracy"],
                     "bytes_up_max": max(d["received"]["bytes"] for d in r["devices"].values())})
    return {"devices": n, "rounds": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--devices", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from edgexfer.runtime.cpu import cpu_features

    cpu = cpu_features()
    results = {"study": "fleet_round_time", "environment": {
        "cpu_model": cpu.model, "isa_flags": list(cpu.flags), "cores": os.cpu_count(),
        "date": datetime.date.today().isoformat(), "load_average_start": os.getloadavg()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        start = zero_head_bundle(args.bundle.resolve(), Path(tmp) / "zero-head")
        for n in args.devices:
            run = federation(args.bundle.resolve(), start, args.data.resolve(), Path(tmp) / f"n{n}", n, args.rounds)
            run["clientapp_process_start_seconds"] = process_start_seconds(n)
            run["load_average_end"] = os.getloadavg()
            results["runs"].append(run)
            for r in run["rounds"]:
                print(f"{n} devices round {r['round']} ({r['kind']}): {r['seconds']:.2f} s, devices' own work "
                      f"{r['device_seconds_max']:.2f} s max, the rest {r['overhead_seconds']:.2f} s; "
                      f"val {r['val_accuracy']:.3f}", flush=True)
            print(f"{n} fresh ClientApp processes (Python + flwr + edgexfer imports) at once: "
                  f"{run['clientapp_process_start_seconds']:.2f} s; load {run['load_average_end']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fleet_round_time.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'fleet_round_time.json'}")


if __name__ == "__main__":
    main()
