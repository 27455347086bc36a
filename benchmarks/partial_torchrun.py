"""`edgexfer train --mode partial` as one process and under `torchrun --nproc_per_node K`: accuracy and cost.

Runs the same command (same data, split, seed and recipe) once per process count, each in a fresh interpreter,
and reads what each step cost from the run's ``metrics.json``: the frozen prefix (``prefix_seconds``: the
views of the images rank 0 holds), the fit (``fit_seconds``: LP-FT start, epochs, head refit) and the epochs
(``history[].seconds``), plus wall time, CPU time of all processes and the peak RSS of the largest one. The threads of a machine are
given as ``KxT`` (K processes of T threads, ``OMP_NUM_THREADS``); on a shared CPU compare 1x1 with 2x1 too, since
a 2-thread process loses more than two 1-thread ones when other jobs take cores.

    python benchmarks/partial_torchrun.py ../shared/datasets/clipart8 --runs 1x2 1x1 2x1 \\
        --out benchmarks/results/partial_torchrun.json -- --unfreeze 2 --views 6 --epochs 10

Everything after ``--`` goes to ``edgexfer train``. Results: docs/training.md ("Scaling the host side").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_facts() -> dict:
    from edgexfer.runtime.cpu import cpu_features

    cpu = cpu_features()
    return {"cpu_model": cpu.model, "cores": os.cpu_count(), "isa_flags": list(cpu.flags)}


#: runs the command given and prints, as its last stderr line, the peak RSS of its largest descendant (KiB) and
#: the CPU seconds (user + system) of all its descendants: the work done, whatever the load made of the wall time
_PEAK = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
         "print(u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(rc)")


def run_one(data: Path, processes: int, threads: int, train_args: list[str], work: Path) -> dict:
    out = work / f"run-{processes}x{threads}"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, "-m", "edgexfer", "train", str(data), "--out", str(out), "--mode", "partial", "--quiet",
           *train_args]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _PEAK, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    usage = proc.stderr.strip().splitlines()[-1].split()
    epochs = [h["seconds"] for h in m["history"]]
    per_epoch = [b - a for a, b in zip(epochs, epochs[1:])]
    return {"processes": processes, "threads_per_process": int(env["OMP_NUM_THREADS"]),
            "val_accuracy": m["val_accuracy"], "val_count": m["val_count"], "train_count": m["train_count"],
            "wall_seconds": round(wall, 1), "train_seconds": m["seconds"], "prefix_seconds": m.get("prefix_seconds"),
            "fit_seconds": m.get("fit_seconds"), "epoch_seconds": [round(s, 2) for s in per_epoch],
            "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
            "peak_rss_mb_largest_process": round(int(usage[0]) / 1024), "cpu_seconds": round(float(usage[1]), 1)}


def main() -> None:
    argv = sys.argv[1:]
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--runs", nargs="+", default=None, metavar="KxT",
                    help="K processes of T threads each (default: 1xC and 2x(C/2) for C cores)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        cores = os.cpu_count() or 1
        for run in args.runs or [f"1x{cores}", f"2x{max(1, cores // 2)}"]:
            k, t = (int(v) for v in run.split("x"))
            rows.append(run_one(args.data, k, t, train_args, Path(work)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), **cpu_facts(), "data": str(args.data), "train_args": train_args,
              "runs": rows}
    print("| processes x threads | val accuracy | wall s | CPU s | prefix s (rank 0) | fit s | s per epoch | peak RSS MB "
          "| load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        epoch = sum(r["epoch_seconds"]) / max(1, len(r["epoch_seconds"]))
        print(f"| {r['processes']}x{r['threads_per_process']} | {r['val_accuracy']:.4f} | {r['wall_seconds']} | "
              f"{r['cpu_seconds']} | "
              f"{r['prefix_seconds']} | {r['fit_seconds']} | {epoch:.1f} | {r['peak_rss_mb_largest_process']} | "
              f"{r['load_before']}-{r['load_after']} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
