"""The feature cache at scale: first inserts of one class (reservoir admission) and what opening a cache costs.

1. First inserts: ``add_samples`` of N new samples of one class into a fresh cache, for N = 2,000, 8,000
   and 32,000, in calls of 16 (what ``device learn`` commits per batch), of 500, and in one call (what
   ``edgexfer train`` does), without a capacity (the host's cache: every sample is kept); and in calls of
   500 with the device's default capacity of 500 (every arrival past 500 draws a slot, evicts or is
   dropped). The median of three fresh caches each, wall clock and CPU time. The cost per sample must not
   grow with N (issue 28: within 2x of 2k's at 32k; it was 48, 169 and 706 us when each arrival counted
   the class's members). What still grows a little is SQLite's work on indexes keyed by sha256: random
   inserts dirty more distinct pages per commit as an index grows, up to one page per insert.
2. Opening: a cache of about 95 MB (samples with 1,280-dim float16 features, as EfficientNet-Lite0 makes),
   opened after a clean close (no scan) and after an unclean one (``PRAGMA quick_check`` reads the file).

Run it with another checkout's interpreter (``/work/main/.venv/bin/python benchmarks/cache_scaling.py``)
for that code's figures: it uses only ``FeatureCache``'s public API.
Usage: python benchmarks/cache_scaling.py [--sizes 2000,8000,32000] [--chunks 16,500,all] [--open-mb 95] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import edgexfer.runtime.cache as cache_module
from edgexfer.runtime.cache import FeatureCache, SampleRecord

REPO = Path(__file__).resolve().parents[1]
BACKBONE = FeatureCache.content_sha256(b"benchmark backbone")
PRE = "letterbox/224x224/fill=255,255,255"
CHUNK = 500


def _records(start: int, stop: int, label: str = "cat") -> list[SampleRecord]:
    out = []
    for i in range(start, stop):
        data = f"sample-{i}".encode()
        out.append(SampleRecord(FeatureCache.content_sha256(data), label, f"bench/{i}.jpg", data))
    return out


def first_insert_cost(n: int, capacity: int | None, folder: Path, chunk: int | None = CHUNK,
                      repeats: int = 3) -> dict[str, float]:
    """Microseconds per sample to add ``n`` new samples of one class to a fresh cache, in calls of ``chunk``
    (None: one call): the median of ``repeats`` fresh caches, wall clock and this process's CPU time."""
    records = _records(0, n)
    step = chunk or n
    walls, cpus = [], []
    for repeat in range(repeats):
        path = folder / f"inserts-{n}-{capacity}-{repeat}.sqlite"
        with FeatureCache(path, per_class_capacity=capacity) as cache:
            wall, cpu = time.perf_counter(), time.process_time()
            for start in range(0, n, step):
                cache.add_samples(records[start:start + step])
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            kept = sum(cache.counts().values())
        for suffix in ("", "-wal", "-shm", "-session"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    return {"n": n, "capacity": capacity, "chunk": chunk, "us_per_sample": round(statistics.median(walls) / n * 1e6, 1),
            "cpu_us_per_sample": round(statistics.median(cpus) / n * 1e6, 1), "kept": kept, "repeats": repeats}


def build_cache(path: Path, megabytes: float, dim: int = 1280) -> int:
    """A cache of about ``megabytes``: samples with one float16 feature vector each; returns the sample count."""
    per_sample = 2 * dim + 2200  # the vector, the rows, the sha256 keys of three indexes and the free space, measured
    n = int(megabytes * 1e6 / per_sample)
    rng = np.random.default_rng(0)
    with FeatureCache(path, per_class_capacity=None) as cache:
        for start in range(0, n, CHUNK):
            records = _records(start, min(n, start + CHUNK), label=f"class{start // 5000}")
            cache.add_samples(records)
            vectors = rng.uniform(0, 6, (len(records), dim)).astype(np.float32)
            cache.put_features(BACKBONE, PRE, {r.sha256: v for r, v in zip(records, vectors)})
    return n


def open_cost(path: Path, repeats: int) -> dict[str, float]:
    """Median seconds to open and close the cache after a clean close, and after an unclean one."""
    session = Path(f"{path}-session")
    clean, unclean, checked = [], [], []
    for _ in range(repeats):  # interleaved: both see the same machine load and page cache
        for times, leave_unclean in ((clean, False), (unclean, True)):
            if leave_unclean:
                session.write_bytes(b"")  # what a killed process leaves: no clean-close record
            started = time.perf_counter()
            with FeatureCache(path) as cache:
                checked.append(cache.quick_checked if hasattr(cache, "quick_checked") else True)
            times.append(time.perf_counter() - started)
    return {"clean_close_s": round(statistics.median(clean), 4), "unclean_close_s": round(statistics.median(unclean), 4),
            "saved_s": round(statistics.median(unclean) - statistics.median(clean), 4), "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,8000,32000")
    ap.add_argument("--chunks", default="16,500,all", help="samples per add_samples call (all: one call)")
    ap.add_argument("--open-mb", type=float, default=95.0, help="size of the cache whose opening is timed (0: skip)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cache_scaling.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    chunks = [None if c == "all" else int(c) for c in args.chunks.split(",")]
    result: dict = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_avg": os.getloadavg(),
                    "code": str(Path(cache_module.__file__).parent), "first_inserts": []}
    try:
        from edgexfer.runtime.cpu import cpu_features
        result["cpu"] = cpu_features().to_dict()
    except ImportError:  # an older checkout
        pass
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for capacity, chunk in [(None, c) for c in chunks] + [(500, CHUNK)]:
            rows = []
            for n in sizes:
                row = first_insert_cost(n, capacity, folder, chunk)
                rows.append(row)
                result["first_inserts"].append(row)
                print(f"first inserts, capacity {capacity}, calls of {chunk or 'all'}: {n:>6} samples of one class, "
                      f"{row['us_per_sample']:7.1f} us/sample wall, {row['cpu_us_per_sample']:6.1f} CPU ({row['kept']} kept)",
                      flush=True)
            for row in rows[1:]:
                row["wall_vs_first"] = round(row["us_per_sample"] / rows[0]["us_per_sample"], 2)
                row["cpu_vs_first"] = round(row["cpu_us_per_sample"] / rows[0]["cpu_us_per_sample"], 2)
                print(f"  {row['n']} vs {sizes[0]}: {row['wall_vs_first']}x per sample wall, {row['cpu_vs_first']}x CPU")
        result["load_avg_after"] = os.getloadavg()
        if args.open_mb > 0:
            path = folder / "big.sqlite"
            samples = build_cache(path, args.open_mb)
            result["open"] = {"samples": samples, "megabytes": round(path.stat().st_size / 1e6, 1),
                              **open_cost(path, args.repeats)}
            o = result["open"]
            print(f"open {o['megabytes']} MB ({samples} samples): clean close {o['clean_close_s'] * 1e3:.1f} ms, unclean "
                  f"{o['unclean_close_s'] * 1e3:.1f} ms (quick_check); saved {o['saved_s'] * 1e3:.0f} ms per open")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
