"""The linear head fit on many features: time and peak memory against N (issue 28, "float32 head fitting").

Fits ``HeadTrainer("linear")`` (what ``edgexfer train`` and its warm reruns call) on synthetic float32
features shaped like a backbone's (1280-d pooled ReLU outputs: non-negative, far from zero-mean, low-rank
class structure with overlapping classes), N = 8,000 and 20,000 by default, 10 classes. Each size runs in
a child process of its own, so peak RSS (VmHWM) is that fit's alone; ``fit peak`` is the RSS high-water mark
of the fit above the RSS before it (the features themselves, N x D float32, are counted in ``RSS before``).
``--device`` fits with the device's parameters instead (``matmul_dtype="float32"``, ``tol=1e-5``, as
``device retrain`` does).

Usage: python benchmarks/head_fit_scaling.py [--sizes 8000,20000] [--dim 1280] [--classes 10] [--repeats 1]
       [--threads N] [--device] [--out benchmarks/results/head_fit_scaling.json]
Prints one line per size, with the CPU, load average and date; writes the figures as JSON when --out is given.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def features(n: int, dim: int, classes: int, seed: int = 0):
    """Backbone-like features with labels, float32: a low-rank class structure (48 latent dimensions mixed into
    ``dim``, classes overlapping) plus independent noise, shifted off zero and rectified like pooled ReLU outputs."""
    import numpy as np

    rng = np.random.default_rng(0)  # the class structure: the same for every seed
    latent = 48
    mix = rng.normal(0.0, latent ** -0.5, size=(latent, dim)).astype(np.float32)
    base = rng.normal(0.3, 0.3, size=dim).astype(np.float32)
    centres = 0.5 * rng.standard_normal((classes, latent)).astype(np.float32)
    rng = np.random.default_rng([seed, 1])  # the samples
    y = rng.integers(0, classes, size=n)
    X = np.empty((n, dim), np.float32)
    for start in range(0, n, 2048):  # in blocks: the draws stay small next to X
        stop = min(n, start + 2048)
        z = centres[y[start:stop]] + rng.standard_normal((stop - start, latent), dtype=np.float32)
        block = base + z @ mix + 0.3 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        np.maximum(block, 0.0, out=X[start:stop])
    return X, y


def _vm(key: str) -> int:
    """A line of /proc/self/status in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(n: int, dim: int, classes: int, repeats: int, device: bool) -> dict:
    """One size in this process: generate, reset the RSS high-water mark, fit, report."""
    import numpy as np
    from threadpoolctl import threadpool_info

    from edgexfer.runtime.head_training import HeadTrainer

    X, y = features(n, dim, classes)
    names = [f"class_{i}" for i in range(classes)]
    params = {"C": 1.0}
    if device:
        params.update(tol=1e-5, matmul_dtype="float32")
    trainer = HeadTrainer("linear", **params)
    before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    seconds = []
    head = None
    for _ in range(repeats):
        started = time.perf_counter()
        head = trainer.fit(X, y, names)
        seconds.append(time.perf_counter() - started)
    peak = _vm("VmHWM")
    accuracy = float(np.mean(head.logits(X).argmax(axis=1) == y))
    X_test, y_test = features(2000, dim, classes, seed=1)
    test_accuracy = float(np.mean(head.logits(X_test).argmax(axis=1) == y_test))
    blas = [f"{i['internal_api']} {i['version']}" for i in threadpool_info() if i["user_api"] == "blas"]
    try:  # the thread pool of the blocked fit; before it, fit_linear ran on one BLAS thread
        from edgexfer.runtime.linear_objective import fit_threads
        threads = fit_threads()
    except ImportError:
        threads = 1
    return {"n": n, "dim": dim, "classes": classes, "seconds": min(seconds), "all_seconds": seconds,
            "rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20, "fit_peak_mb": (peak - before) / 2**20,
            "features_mb": X.nbytes / 2**20, "train_accuracy": accuracy, "test_accuracy": test_accuracy, "blas": blas,
            "threads": threads}


def machine() -> dict:
    from edgexfer.runtime.cpu import cpu_features

    cpu = cpu_features()
    return {"cpu_model": cpu.model, "isa_flags": list(cpu.flags), "cores": len(os.sched_getaffinity(0)),
            "load_average": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8000,20000")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the fits (default: all cores)")
    ap.add_argument("--device", action="store_true", help="the device's fit parameters (float32 products, tol 1e-5)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.dim, args.classes, args.repeats, args.device)))
        return
    env = machine()
    print(f"# {env['cpu_model']} ({env['cores']} cores; {', '.join(env['isa_flags'])}); load {env['load_average']}; "
          f"{env['date']}; commit {env['commit']}")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--child", str(n), "--dim", str(args.dim), "--classes", str(args.classes),
               "--repeats", str(args.repeats)] + (["--device"] if args.device else [])
        env_child = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                        env=env_child).stdout.splitlines()[-1])
        rows.append(row)
        print(f"N={n:>6} D={row['dim']} C={row['classes']}: fit {row['seconds']:6.2f} s, peak RSS {row['peak_rss_mb']:6.0f} MB "
              f"(fit adds {row['fit_peak_mb']:5.0f} MB; features {row['features_mb']:.0f} MB), "
              f"accuracy train {row['train_accuracy']:.3f} / test {row['test_accuracy']:.3f}, {row['threads']} thread(s), {', '.join(row['blas'])}", flush=True)
    env["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"# load after {env['load_average_after']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "device_parameters": args.device, "rows": rows},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
