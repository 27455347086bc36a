"""Head retraining from the feature cache vs the naive loop that re-runs the backbone every epoch.

Same images, same epochs, same head, same optimiser: a linear head (multinomial logistic regression) trained
by mini-batch SGD in numpy with a fixed seed. The two loops differ only in where the features come from:

* cached: the device already holds the features in ``features.sqlite`` (``Device.learn`` stored them when the
  samples arrived); retraining reads them once and runs the epochs.
* naive: every epoch decodes, resizes and runs the backbone on every image again, then takes the same SGD
  steps (what a training loop without a feature cache does).

The two heads come out identical (checked), so the time ratio is the price of not caching. The one-time
extraction that filled the cache is reported too, with the ratio that includes it.
Also measures incremental learning: ``Device.learn`` + ``Device.retrain`` for k = 1, 10, 100 new samples on a
fresh temporary state.

Usage: python benchmarks/retrain_vs_naive.py BUNDLE_DIR [DATA_DIR] [--per-class 8] [--epochs 10]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgexfer.runtime.device import Device
from edgexfer.runtime.preprocess import load_image, stack

REPO = Path(__file__).resolve().parents[1]
SEED = 0


def pick_images(data: Path, per_class: int) -> list[tuple[bytes, str]]:
    """``per_class`` distinct files per class folder, seeded."""
    rng = np.random.default_rng(SEED)
    out: list[tuple[bytes, str]] = []
    seen: set[str] = set()
    for cls_dir in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(f for f in cls_dir.iterdir() if f.is_file())
        taken = 0
        for i in rng.permutation(len(files)):
            blob = files[i].read_bytes()
            digest = hashlib.sha256(blob).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            out.append((blob, cls_dir.name))
            taken += 1
            if taken == per_class:
                break
    return out


def sgd_epoch(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, order: np.ndarray,
              lr: float, l2: float, batch: int) -> None:
    """One epoch of softmax-regression SGD, in place."""
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        z = X[idx] @ W.T + b
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(idx)), y[idx]] -= 1.0
        W -= lr * (p.T @ X[idx] / len(idx) + l2 * W)
        b -= lr * p.mean(axis=0)


def train_head(features_for_epoch, y: np.ndarray, n_classes: int, dim: int, epochs: int,
               lr: float = 0.05, l2: float = 1e-4, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``features_for_epoch(e)`` gives the feature matrix of epoch ``e`` (cached: the same array every time)."""
    rng = np.random.default_rng(SEED)
    W = np.zeros((n_classes, dim), np.float32)
    b = np.zeros(n_classes, np.float32)
    for e in range(epochs):
        X = features_for_epoch(e)
        sgd_epoch(W, b, X, y, rng.permutation(len(y)), lr, l2, batch)
    return W, b


def retrain_vs_naive(bundle: str, samples: list[tuple[bytes, str]], epochs: int) -> dict:
    classes = sorted({lbl for _, lbl in samples})
    with tempfile.TemporaryDirectory() as tmp, Device(Path(tmp) / "state", backend="onnxruntime") as dev:
        dev.install(bundle)
        engine = dev.engine()
        spec = dev.bundle().preprocess
        start = time.perf_counter()
        for label in classes:
            dev.learn([blob for blob, lbl in samples if lbl == label], label)
        fill_cache_s = time.perf_counter() - start
        sha, key = dev.state.active().bundle, spec.key()

        # cached: read the features from the cache, then the epochs
        start = time.perf_counter()
        with dev.cache() as cache:
            _, X_cached, names = cache.labelled(sha, key)
        y_cached = np.array([classes.index(n) for n in names])
        W_c, b_c = train_head(lambda e: X_cached, y_cached, len(classes), X_cached.shape[1], epochs)
        cached_s = time.perf_counter() - start

        # naive: decode + resize + backbone on every image, every epoch (same sample order as the cache)
        with dev.cache() as cache:
            shas, _, names = cache.labelled(sha, key)
            blobs = [cache.image(s) for s in shas]
        y_naive = np.array([classes.index(n) for n in names])
        backbone_calls = 0

        def extract(epoch: int) -> np.ndarray:
            nonlocal backbone_calls
            feats = []
            for s in range(0, len(blobs), 16):
                feats.append(engine.run(stack([load_image(blob, spec) for blob in blobs[s:s + 16]])))
                backbone_calls += 1
            return np.concatenate(feats)

        start = time.perf_counter()
        W_n, b_n = train_head(extract, y_naive, len(classes), X_cached.shape[1], epochs)
        naive_s = time.perf_counter() - start
    same = bool(np.allclose(W_c, W_n, atol=1e-4) and np.allclose(b_c, b_n, atol=1e-4))
    return {
        "samples": len(samples), "classes": len(classes), "epochs": epochs, "head": "linear, SGD batch 16, seed 0",
        "cached_retrain_s": cached_s, "naive_s": naive_s, "ratio_naive_over_cached": naive_s / cached_s,
        "one_time_cache_fill_s": fill_cache_s,
        "ratio_naive_over_cached_plus_fill": naive_s / (cached_s + fill_cache_s),
        "backbone_batches_naive": backbone_calls, "heads_identical": same,
        "max_weight_diff": float(np.abs(W_c - W_n).max()),
    }


def incremental(bundle: str, pool: list[tuple[bytes, str]], ks: list[int]) -> list[dict]:
    """Time to learn k new samples (decode, backbone, store) and to retrain the head on them."""
    rows = []
    for k in ks:
        chosen = pool[:k]
        with tempfile.TemporaryDirectory() as tmp, Device(Path(tmp) / "state", backend="onnxruntime") as dev:
            dev.install(bundle)
            dev.engine()  # engine load is a setup cost, not a learning cost
            start = time.perf_counter()
            runs = 0
            for label in sorted({lbl for _, lbl in chosen}):
                runs += dev.learn([b for b, lbl in chosen if lbl == label], label).backbone_runs
            learn_s = time.perf_counter() - start
            start = time.perf_counter()
            report = dev.retrain()
            retrain_s = time.perf_counter() - start
        rows.append({"k": k, "learn_s": learn_s, "learn_ms_per_sample": learn_s / k * 1e3, "backbone_runs": runs,
                     "retrain_s": retrain_s, "total_s": learn_s + retrain_s, "accepted": report.accepted,
                     "train_count": report.train_count})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "datasets" / "clipart8"))
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--ks", default="1,10,100")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "retrain_vs_naive.json"))
    args = ap.parse_args()
    data = Path(args.data)
    samples = pick_images(data, args.per_class)
    print(f"retrain vs naive: {len(samples)} images, {args.epochs} epochs", file=sys.stderr)
    rvn = retrain_vs_naive(args.bundle, samples, args.epochs)
    print(json.dumps(rvn, indent=2), file=sys.stderr)
    ks = [int(k) for k in args.ks.split(",")]
    pool = pick_images(data, max(ks) // 8 + 2)
    pool = [pool[i] for i in np.random.default_rng(SEED).permutation(len(pool))]
    print(f"incremental learning for k = {ks}", file=sys.stderr)
    inc = incremental(args.bundle, pool, ks)
    for row in inc:
        print(f"  k={row['k']}: learn {row['learn_s']:.2f} s ({row['learn_ms_per_sample']:.0f} ms/sample), "
              f"retrain {row['retrain_s']:.3f} s", file=sys.stderr)
    result = {"retrain_vs_naive": rvn, "incremental": inc,
              "note": "one run per figure on the machine described in benchmarks/README.md"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
