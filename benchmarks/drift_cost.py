"""What one drift test costs: ``mmd_test`` (500 relabellings, a window of 30) against the reference's size.

``device serve`` and ``device watch`` run the test every 50 inputs in the database thread, beside the
engine, so its CPU time is taken from serving. Reference sizes: 160 rows (the demo bundle's exemplars: 20 of
8 classes) and 512 (:data:`MAX_REFERENCE`, the most a bundle of many classes uses); random unit features
of 1,280 dimensions (the test's cost does not depend on the values). Median of ``--repeats`` calls after one
unmeasured call.

Usage:
    python benchmarks/drift_cost.py [--repeats 7]
Writes benchmarks/results/drift_cost.json (CPU model, ISA flags, load average, date).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from edgexfer.runtime.cpu import cpu_features
from edgexfer.runtime.drift import DEFAULT_PERMUTATIONS, DEFAULT_WINDOW, MAX_REFERENCE, mmd_test

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "drift_cost.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for reference in (160, MAX_REFERENCE):
        ref = rng.normal(size=(reference, 1280)).astype(np.float32)
        window = rng.normal(size=(DEFAULT_WINDOW, 1280)).astype(np.float32)
        mmd_test(ref, window)
        times = []
        for seed in range(args.repeats):
            started = time.perf_counter()
            mmd_test(ref, window, seed=seed)
            times.append(time.perf_counter() - started)
        rows.append({"reference_rows": reference, "window": DEFAULT_WINDOW, "permutations": DEFAULT_PERMUTATIONS,
                     "median_ms": round(statistics.median(times) * 1000, 2),
                     "min_ms": round(min(times) * 1000, 2), "max_ms": round(max(times) * 1000, 2)})
        print(f"reference {reference:4d} + window {DEFAULT_WINDOW}: median {rows[-1]['median_ms']:.1f} ms "
              f"(min {rows[-1]['min_ms']:.1f}, max {rows[-1]['max_ms']:.1f})", flush=True)
    cpu = cpu_features()
    result = {"date": datetime.date.today().isoformat(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "cpu_description": cpu.describe(), "cpu_count": os.cpu_count(),
              "load_average_1m": round(os.getloadavg()[0], 2), "numpy": np.__version__, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
