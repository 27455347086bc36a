"""Peak memory and time of one ``device learn`` call against the number of files (issue 28: 2,000 files < 1 GB).

Generates N synthetic photos (smooth colour fields with noise, JPEG, ``--size`` pixels, each its own
content), installs the bundle in a fresh state, and runs one ``Device.learn`` call over all N paths in a
child process per N; the peak RSS is the child's (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` after it
exits, one child at a time through a small wrapper, so each figure is that call's alone).

Run it with another checkout's interpreter (``/work/main/.venv/bin/python benchmarks/learn_scaling.py ...``)
for that code's figures: the child passes a list of paths, which every version of ``Device.learn`` takes.
:func:`measure_learn` is what ``benchmarks/scaling.py`` calls for its ``learn`` row.
Usage: python benchmarks/learn_scaling.py BUNDLE [--files 250,500,1000,2000] [--size 1024x768] [--augment 0]
       [--capacity 500,none]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# The learn call, in its own process: prints its report and wall time.
LEARNER = textwrap.dedent("""
    import json, sys, time
    from edgexfer.runtime.device import Device
    state, listing, augment, capacity = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    paths = [line.rstrip("\\n") for line in open(listing)]
    with Device(state, per_class_capacity=None if capacity == "none" else int(capacity)) as dev:
        started = time.perf_counter()
        report = dev.learn(paths, "bench", augment=augment)
        seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "report": report.to_dict()}))
""")
# Runs one command and prints the peak RSS of its process tree's largest process (kB), after its output.
WRAPPER = textwrap.dedent("""
    import resource, subprocess, sys
    run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    sys.stderr.write(run.stderr)
    if run.returncode:
        sys.exit(run.returncode)
    print(run.stdout.strip())
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def write_photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` JPEGs of ``size`` (width, height): smooth random colour fields plus noise, as photos compress."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size
    noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
        pixels = np.clip(field + np.roll(noise, i * 7, axis=1), 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def measure_learn(bundle: str | Path, paths: list[Path], work: Path, augment: int = 0,
                  capacity: int | None = 500) -> dict:
    """One learn call of ``paths`` (one label) on a fresh state with ``bundle``: peak RSS (MB), seconds, the
    report. ``capacity`` is the per-class capacity (the device's default 500; None keeps every sample)."""
    from edgexfer.runtime.device import Device

    state = work / f"state-{len(paths)}-{capacity}"
    with Device(state) as dev:
        dev.install(bundle)
    listing = work / f"list-{len(paths)}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    run = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-c", LEARNER, str(state), str(listing),
                          str(augment), str(capacity).lower()], capture_output=True, text=True, env=env)
    if run.returncode:
        raise RuntimeError(f"learn of {len(paths)} files failed: {run.stderr[-2000:]}")
    out, peak_kb = run.stdout.strip().rsplit("\n", 1)
    result = json.loads(out)
    report = result["report"]
    return {"files": len(paths), "capacity": capacity, "peak_rss_mb": round(int(peak_kb) / 1024, 1), "seconds": round(result["seconds"], 2),
            "ms_per_file": round(result["seconds"] / len(paths) * 1e3, 2), "added": report["added"],
            "backbone_runs": report["backbone_runs"], "dropped": report.get("dropped"),
            "batches": report.get("batches")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--files", default="250,500,1000,2000")
    ap.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the generated photos")
    ap.add_argument("--augment", type=int, default=0)
    ap.add_argument("--capacity", default="500,none", help="per-class capacities to run (none: keep every sample)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "learn_scaling.json"))
    args = ap.parse_args()
    counts = [int(n) for n in args.files.split(",")]
    size = tuple(int(v) for v in args.size.split("x"))
    result: dict = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "bundle": str(args.bundle),
                    "size": list(size), "augment": args.augment, "python": sys.executable, "runs": []}
    try:
        from edgexfer.runtime.cpu import cpu_features
        result["cpu"] = cpu_features().to_dict()
    except ImportError:  # an older checkout
        pass
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        photos = write_photos(work / "photos", max(counts), size)
        megabytes = sum(p.stat().st_size for p in photos) / 1e6
        print(f"{len(photos)} photos of {size[0]}x{size[1]} written ({megabytes:.0f} MB) in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        result["photos_mb"] = round(megabytes, 1)
        for capacity in [None if c == "none" else int(c) for c in args.capacity.split(",")]:
            for n in counts:
                row = measure_learn(args.bundle, photos[:n], work, args.augment, capacity)
                row["load_avg"] = os.getloadavg()
                result["runs"].append(row)
                print(f"learn {n:>5} files, capacity {capacity}: peak RSS {row['peak_rss_mb']:7.1f} MB, "
                      f"{row['seconds']:7.1f} s ({row['ms_per_file']} ms/file), backbone ran {row['backbone_runs']}, "
                      f"load {row['load_avg'][0]:.1f}", flush=True)
                shutil.rmtree(work / f"state-{n}-{capacity}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
