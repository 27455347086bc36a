"""Backends side by side, and against PyTorch eager: ``edgexfer bench`` on a bundle, written to benchmarks/results.

Equivalent to ``edgexfer bench BUNDLE_DIR --out benchmarks/results/bench`` with the settings below; kept as a
script so the figures in benchmarks/README.md are reproduced with one command.

Usage: python benchmarks/backends.py BUNDLE_DIR [--min-duration 3] [--min-queries 32] [--batch 1,2,4,8]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgexfer.bench import run_bench

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--min-duration", type=float, default=3.0)
    ap.add_argument("--min-queries", type=int, default=32)
    ap.add_argument("--batch", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench"))
    ap.add_argument("--compare", default=None, help="an earlier bench.json")
    args = ap.parse_args()
    report = run_bench(args.bundle, backends="all", precisions="all", batches=args.batch,
                       min_duration_s=args.min_duration, min_queries=args.min_queries, threads=args.threads,
                       out_dir=args.out, compare=args.compare)
    print(json.dumps(report["summary"], indent=2))
    print(f"written {args.out}/bench.md", file=sys.stderr)


if __name__ == "__main__":
    main()
