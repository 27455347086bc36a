"""What the device engine store saves: loading an engine from ``state/engines/<key>/`` vs building it again.

Runs ``edgexfer device install`` on a fresh state (the engine is built), then again (reused), and times,
interleaved in one run, opening the engine the way ``predict`` does: from the cache entry vs compiling
the IR without a cache. Each open is a new OpenVINO Core, as in a new process. TensorRT takes the same
path with a plan whose build takes minutes on a Jetson; it is not measurable here (no GPU).
Usage: python benchmarks/engine_store.py BUNDLE_WITH_OPENVINO_ENGINE [--repeats 15] [--precision fp32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from edgexfer.runtime.backends.registry import open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cpu import cpu_features
from edgexfer.runtime.device import Device

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "engine_store.json"))
    args = ap.parse_args()
    model = Bundle.open(args.bundle).engine_file("openvino", args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        installs = []
        for _ in range(2):
            with Device(state, backend="openvino", precision=args.precision) as dev:
                installs.append(dev.install(args.bundle))
        entry = state / "engines" / installs[0]["engine"]["key"]
        cached, compiled = [], []
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            for times, options in ((cached, {"cache_dir": entry}), (compiled, {})):
                start = time.perf_counter()
                with open_backend("openvino", model, precision=args.precision, **options):
                    pass
                times.append(time.perf_counter() - start)
    result = {
        "bundle": str(args.bundle), "precision": args.precision, "repeats": args.repeats,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_features().to_dict(),  # the figures hold for this kind of CPU only
        "install_first": {k: installs[0][k] for k in ("engine", "steps", "seconds")},
        "install_second": {k: installs[1][k] for k in ("engine", "steps", "seconds")},
        "open_from_cache_median_s": round(statistics.median(cached), 4),
        "open_compiling_median_s": round(statistics.median(compiled), 4),
        "speedup": round(statistics.median(compiled) / statistics.median(cached), 2),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"install: engine built in {installs[0]['engine']['seconds']:.2f} s, reused in "
          f"{installs[1]['engine']['seconds']:.3f} s; open from cache {result['open_from_cache_median_s'] * 1e3:.0f} ms "
          f"vs compiling {result['open_compiling_median_s'] * 1e3:.0f} ms (median of {args.repeats}, "
          f"{result['speedup']}x)")


if __name__ == "__main__":
    main()
