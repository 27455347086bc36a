"""Cross-check ``edgexfer bench`` against OpenVINO's own ``benchmark_app`` on the same IR.

Batch 1, CPU, latency hint (``benchmark_app`` then runs synchronous inference, one request, like our backend),
fp32 inference precision for an fp32 IR. The two tools are run alternately for ``--rounds`` rounds so that load
changes on a shared machine hit both; the report gives every round and the median of each tool's p50.
Our figure is the SingleStream ``engine`` layer p50 from LoadGen; benchmark_app's is its "Median" latency.

Usage: python benchmarks/openvino_crosscheck.py BUNDLE_DIR [--precision fp32] [--seconds 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgexfer.bench import run_bench
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError, MissingDependencyError

REPO = Path(__file__).resolve().parents[1]
_FIELDS = {"median_ms": r"Median:\s+([\d.]+) ms", "average_ms": r"Average:\s+([\d.]+) ms",
           "min_ms": r"Min:\s+([\d.]+) ms", "max_ms": r"Max:\s+([\d.]+) ms", "count": r"Count:\s+(\d+) iterations",
           "first_inference_ms": r"First inference took ([\d.]+) ms", "throughput_fps": r"Throughput:\s+([\d.]+) FPS"}


def benchmark_app_exe() -> str:
    """benchmark_app next to this Python (the openvino wheel installs it), else on PATH."""
    beside = Path(sys.executable).parent / "benchmark_app"
    found = str(beside) if beside.is_file() else shutil.which("benchmark_app")
    if not found:
        raise MissingDependencyError("benchmark_app not found", got="no benchmark_app beside python or on PATH",
                                     expected="the openvino package's benchmark_app", todo="pip install 'edgexfer[openvino]'")
    return found


def run_benchmark_app(model: Path, shape: list[int], seconds: float, precision: str) -> dict:
    cmd = [benchmark_app_exe(), "-m", str(model), "-d", "CPU", "-hint", "latency", "-shape",
           "[" + ",".join(str(d) for d in shape) + "]", "-t", str(int(max(1, round(seconds))))]
    if precision == "fp32":
        cmd += ["-infer_precision", "f32"]  # our backend pins fp32 engines to f32 as well
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise InputError("benchmark_app failed", got=(done.stderr or done.stdout).strip().splitlines()[-1][:200],
                         expected="exit code 0", todo="run the command by hand: " + " ".join(cmd))
    out = {"command": " ".join(cmd)}
    for key, pattern in _FIELDS.items():
        m = re.search(pattern, done.stdout)
        out[key] = float(m.group(1)) if m else None
    if out["median_ms"] is None:
        raise InputError("benchmark_app output has no median latency", got=done.stdout[-300:],
                         expected="a 'Median: ... ms' line", todo="check the openvino version")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "openvino_crosscheck.json"))
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    model = bundle.engine_file("openvino", args.precision)
    size = list(bundle.manifest.backbone.input.size)
    shape = [1, size[0], size[1], 3]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            ours = run_bench(bundle.root, backends="openvino", precisions=args.precision, scenarios="single-stream",
                             layers="engine", min_duration_s=args.seconds, min_queries=16,
                             out_dir=Path(tmp) / f"round{r}", progress=False, torch_reference=False, plots=False)
            row = ours["results"][0]
            theirs = run_benchmark_app(model, shape, args.seconds, args.precision)
            rounds.append({"round": r, "edgexfer_p50_ms": row["p50_ms"], "edgexfer_queries": row["count"],
                           "benchmark_app_median_ms": theirs["median_ms"], "benchmark_app_count": theirs["count"],
                           "benchmark_app": theirs})
            print(f"round {r}: edgexfer p50 {row['p50_ms']:.2f} ms ({row['count']} queries), benchmark_app median "
                  f"{theirs['median_ms']:.2f} ms ({theirs['count']:.0f} iterations)", file=sys.stderr)
    ours_p50 = statistics.median(r["edgexfer_p50_ms"] for r in rounds)
    theirs_p50 = statistics.median(r["benchmark_app_median_ms"] for r in rounds)
    result = {"model": str(model.relative_to(bundle.root)), "precision": args.precision, "batch": 1,
              "hint": "latency", "seconds_per_run": args.seconds, "rounds": rounds,
              "edgexfer_p50_ms": ours_p50, "benchmark_app_p50_ms": theirs_p50, "ratio": ours_p50 / theirs_p50,
              "per_round_ratios": [r["edgexfer_p50_ms"] / r["benchmark_app_median_ms"] for r in rounds]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"edgexfer p50 {ours_p50:.2f} ms vs benchmark_app p50 {theirs_p50:.2f} ms: ratio {result['ratio']:.3f}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
