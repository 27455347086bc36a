"""Cross-check ``edgexfer bench`` against OpenVINO's own ``benchmark_app`` on the same IR, per precision.

For each precision (default fp32, bf16, int8; bf16 only on a CPU with avx512_bf16/amx_bf16) both tools
measure the bundle's ``engines/openvino/<precision>/backbone.xml`` at batch 1, one request in flight:

* edgexfer: ``edgexfer bench --backend openvino --precision P --scenario single-stream --layer engine``,
  i.e. LoadGen SingleStream on ``EngineRunner.run``; the figure is LoadGen's p50.
* benchmark_app: ``-m IR -d CPU -hint latency -infer_precision {f32|bf16} -api sync -b 1 -nireq 1
  -load_config CFG -t S``; the figure is its "Median" latency. CFG is ``{"CPU": {"INFERENCE_NUM_THREADS":
  N}}`` with the thread count edgexfer's engine really used (read back from its compiled model), so both
  run with the same threads (benchmark_app refuses ``-nthreads`` together with a hint; a config file is
  its way to set threads under ``-hint latency``). The script checks that benchmark_app's compiled model
  reports the same threads, streams, hint and inference precision as edgexfer's.

The tools alternate within each round (ABBA order across rounds) and the precisions rotate, so load
changes on a shared machine hit all alike; each result is the median over rounds, and the median of
the per-round ratios (a pair of runs is close in time); both must be within the tolerance. Results go to
``benchmarks/results/openvino_crosscheck.json`` (fp32) and ``openvino_crosscheck_<precision>.json``, each
naming the CPU model, its ISA flags and the date. The exit code is 1 when the fp32 medians differ by more
than ``--tolerance`` (default 10 %).

Usage: python benchmarks/openvino_crosscheck.py BUNDLE_DIR [--precision fp32,bf16,int8] [--seconds 5]
       [--rounds 5] [--threads N] [--out-dir benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgexfer.bench import capture_environment, cpu_line, run_bench
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError, MissingDependencyError
from edgexfer.runtime.precision import PrecisionError, check_precision

REPO = Path(__file__).resolve().parents[1]
_FIELDS = {"median_ms": r"Median:\s+([\d.]+) ms", "average_ms": r"Average:\s+([\d.]+) ms",
           "min_ms": r"Min:\s+([\d.]+) ms", "max_ms": r"Max:\s+([\d.]+) ms", "count": r"Count:\s+(\d+) iterations",
           "first_inference_ms": r"First inference took ([\d.]+) ms", "throughput_fps": r"Throughput:\s+([\d.]+) FPS"}
#: compiled-model properties benchmark_app prints (step 8) that must match edgexfer's engine
_PROPERTIES = ("INFERENCE_NUM_THREADS", "NUM_STREAMS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT")
#: benchmark_app's -infer_precision for each edgexfer precision (int8: its float parts, as edgexfer pins them)
INFER_PRECISION = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "f32"}


def benchmark_app_exe() -> str:
    """benchmark_app next to this Python (the openvino wheel installs it), else on PATH."""
    beside = Path(sys.executable).parent / "benchmark_app"
    found = str(beside) if beside.is_file() else shutil.which("benchmark_app")
    if not found:
        raise MissingDependencyError("benchmark_app not found", got="no benchmark_app beside python or on PATH",
                                     expected="the openvino package's benchmark_app", todo="pip install 'edgexfer[openvino]'")
    return found


def _ov_type(text: str) -> str:
    """``<Type: 'float32'>`` -> ``f32`` (the spelling edgexfer's execution records use)."""
    m = re.search(r"'(\w+)'", text)
    name = m.group(1) if m else text.strip()
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(name, name)


def benchmark_app_command(model: Path, precision: str, config: Path, seconds: float) -> list[str]:
    return [benchmark_app_exe(), "-m", str(model), "-d", "CPU", "-hint", "latency",
            "-infer_precision", INFER_PRECISION[precision], "-api", "sync", "-b", "1", "-nireq", "1",
            "-load_config", str(config), "-t", str(int(max(1, round(seconds))))]


def run_benchmark_app(model: Path, precision: str, threads: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "threads.json"
        config.write_text(json.dumps({"CPU": {"INFERENCE_NUM_THREADS": str(int(threads))}}))
        cmd = benchmark_app_command(model, precision, config, seconds)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise InputError("benchmark_app failed", got=(done.stderr or done.stdout).strip().splitlines()[-1][:200],
                         expected="exit code 0", todo="run the command by hand: " + " ".join(cmd))
    out: dict[str, Any] = {"command": " ".join(cmd), "load_config": {"CPU": {"INFERENCE_NUM_THREADS": int(threads)}}}
    for key, pattern in _FIELDS.items():
        m = re.search(pattern, done.stdout)
        out[key] = float(m.group(1)) if m else None
    if out["median_ms"] is None:
        raise InputError("benchmark_app output has no median latency", got=done.stdout[-300:],
                         expected="a 'Median: ... ms' line", todo="check the openvino version")
    props = {}
    for name in _PROPERTIES:
        m = re.search(rf"^\[ INFO \]\s+{name}:\s+(.+)$", done.stdout, re.MULTILINE)
        props[name] = m.group(1).strip() if m else None
    out["compiled"] = {"inference_num_threads": int(props["INFERENCE_NUM_THREADS"] or 0) or None,
                       "num_streams": int(props["NUM_STREAMS"] or 0) or None,
                       "inference_precision": _ov_type(props["INFERENCE_PRECISION_HINT"] or ""),
                       "performance_hint": props["PERFORMANCE_HINT"]}
    return out


def run_edgexfer(bundle: Bundle, precision: str, seconds: float, threads: int | None, tmp: Path) -> dict[str, Any]:
    """``edgexfer bench`` SingleStream, engine layer, this precision only; its p50 and what the engine ran with."""
    report = run_bench(bundle.root, backends="openvino", precisions=precision, scenarios="single-stream",
                       layers="engine", min_duration_s=seconds, min_queries=16, threads=threads, out_dir=tmp,
                       progress=False, torch_reference=False, plots=False)
    row, engine = report["results"][0], report["engines"][0]
    details = engine["details"]
    return {"p50_ms": row["p50_ms"], "queries": row["count"], "sut_timed_p50_ms": row["sut_timed"]["p50_ms"],
            "execution": engine["execution"],
            "compiled": {"inference_num_threads": details.get("inference_num_threads"),
                         "num_streams": details.get("num_streams"),
                         "inference_precision": details.get("inference_precision"),
                         "performance_hint": details.get("performance_hint")}}


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def crosscheck(bundle: Bundle, precisions: list[str], seconds: float, rounds: int, threads: int | None,
               tolerance: float) -> dict[str, dict[str, Any]]:
    """Alternate the two tools round after round; per precision, every round and the medians."""
    per: dict[str, list[dict[str, Any]]] = {p: [] for p in precisions}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for k in range(len(precisions)):
                precision = precisions[(r + k) % len(precisions)]
                model = bundle.engine_file("openvino", precision)
                order = ("edgexfer", "benchmark_app") if r % 2 == 0 else ("benchmark_app", "edgexfer")
                row: dict[str, Any] = {"round": r, "order": list(order), "load_average_1_5_15": _load(),
                                       "started_utc": datetime.now(timezone.utc).strftime("%H:%M:%S")}
                ours = None
                if order[0] == "benchmark_app":
                    # benchmark_app first: the thread count edgexfer's engine uses comes from an earlier round
                    known = [x["edgexfer"]["compiled"]["inference_num_threads"] for x in per[precision]]
                    n = threads or (known[-1] if known else _engine_threads(bundle, precision))
                    theirs = run_benchmark_app(model, precision, n, seconds)
                    ours = run_edgexfer(bundle, precision, seconds, threads, Path(tmp) / f"{precision}-{r}")
                else:
                    ours = run_edgexfer(bundle, precision, seconds, threads, Path(tmp) / f"{precision}-{r}")
                    n = threads or ours["compiled"]["inference_num_threads"]
                    theirs = run_benchmark_app(model, precision, n, seconds)
                row.update({"edgexfer_p50_ms": ours["p50_ms"], "benchmark_app_median_ms": theirs["median_ms"],
                            "ratio": ours["p50_ms"] / theirs["median_ms"], "edgexfer": ours,
                            "benchmark_app": theirs})
                per[precision].append(row)
                print(f"round {r} {precision}: edgexfer p50 {ours['p50_ms']:.2f} ms ({ours['queries']} queries), "
                      f"benchmark_app median {theirs['median_ms']:.2f} ms ({theirs['count']:.0f} iterations), "
                      f"ratio {row['ratio']:.3f}, threads {ours['compiled']['inference_num_threads']}/"
                      f"{theirs['compiled']['inference_num_threads']}, load {row['load_average_1_5_15']}",
                      file=sys.stderr, flush=True)
    out = {}
    for precision, rows in per.items():
        ours_p50 = statistics.median(x["edgexfer_p50_ms"] for x in rows)
        theirs_p50 = statistics.median(x["benchmark_app_median_ms"] for x in rows)
        same = [x["edgexfer"]["compiled"] == x["benchmark_app"]["compiled"] for x in rows]
        paired = statistics.median(x["ratio"] for x in rows)
        out[precision] = {
            "precision": precision, "model": str(bundle.engine_file("openvino", precision).relative_to(bundle.root)),
            "inference_precision": rows[0]["edgexfer"]["execution"]["inference_precision"],
            "edgexfer_p50_ms": ours_p50, "benchmark_app_p50_ms": theirs_p50, "ratio": ours_p50 / theirs_p50,
            # each round's two runs are minutes closer in time than the medians over all rounds: on a shared
            # machine the median of the per-round ratios is the steadier estimate of a systematic difference
            "median_round_ratio": paired,
            "within_tolerance": abs(ours_p50 / theirs_p50 - 1) <= tolerance and abs(paired - 1) <= tolerance,
            "per_round_ratios": [round(x["ratio"], 4) for x in rows],
            "same_compiled_settings_every_round": all(same),
            "rounds": rows,
        }
    return out


def _engine_threads(bundle: Bundle, precision: str) -> int:
    """The threads edgexfer's OpenVINO engine uses by default (its compiled model says)."""
    from edgexfer.runtime.backends.registry import open_backend

    with open_backend("openvino", bundle.engine_file("openvino", precision), precision=precision) as runner:
        return int(runner.details["inference_num_threads"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--precision", default="fp32,bf16,int8", help="comma-separated (default fp32,bf16,int8)")
    ap.add_argument("--seconds", type=float, default=5.0, help="per run of each tool")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both (default: what edgexfer's engine uses, passed to benchmark_app)")
    ap.add_argument("--tolerance", type=float, default=0.10, help="largest accepted |edgexfer/benchmark_app - 1|")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    bundle = Bundle.open(args.bundle)
    precisions, skipped = [], {}
    for p in [x.strip() for x in args.precision.split(",") if x.strip()]:
        try:
            check_precision(p, "openvino")
        except PrecisionError as exc:
            skipped[p] = exc.one_line()
            print(f"skipped {p}: {exc.one_line()}", file=sys.stderr)
            continue
        bundle.engine_file("openvino", p)  # a missing engine is an error before any measurement
        precisions.append(p)
    environment = capture_environment(args.threads).to_dict()
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    results = crosscheck(bundle, precisions, args.seconds, args.rounds, args.threads, args.tolerance)
    header = {
        "schema": "edgexfer.openvino-crosscheck/2",
        "measured_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"), "date": started.strftime("%Y-%m-%d"),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu": cpu_line(environment), "cpu_model": environment["cpu"]["model"],
        "isa_flags": environment["cpu"]["flags"], "isa_signature": environment["cpu"]["signature"],
        "bundle": bundle.manifest.name, "arch": bundle.manifest.backbone.arch, "batch": 1,
        "edgexfer_figure": "edgexfer bench SingleStream p50 (LoadGen), layer engine, one precision per run",
        "benchmark_app_figure": "benchmark_app Median latency",
        "settings": {"seconds_per_run": args.seconds, "rounds": args.rounds, "threads": args.threads,
                     "tolerance": args.tolerance, "order": "tools alternate ABBA across rounds; precisions rotate"},
        "environment": environment, "skipped": skipped,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for precision, result in results.items():
        name = "openvino_crosscheck.json" if precision == "fp32" else f"openvino_crosscheck_{precision}.json"
        (out_dir / name).write_text(json.dumps({**header, **result}, indent=2) + "\n")
        print(f"{precision}: edgexfer p50 {result['edgexfer_p50_ms']:.2f} ms vs benchmark_app "
              f"{result['benchmark_app_p50_ms']:.2f} ms: ratio {result['ratio']:.3f}, median of round ratios "
              f"{result['median_round_ratio']:.3f} "
              f"({'within' if result['within_tolerance'] else 'OUTSIDE'} {args.tolerance:.0%}); "
              f"per round {result['per_round_ratios']}", file=sys.stderr)
    print(f"{header['cpu']}, {header['measured_utc']}", file=sys.stderr)
    fp32 = results.get("fp32")
    return 1 if fp32 is not None and not fp32["within_tolerance"] else 0


if __name__ == "__main__":
    sys.exit(main())
