"""Does `train --mode auto` pick well? Nested cross-validation on clipart8.

Outer loop: seeded stratified 5-fold CV over all images. For every outer fold, each candidate is trained
on the outer training part and scored on the outer test fold; `auto` runs its own inner k-fold CV on the
outer training part only (exactly what `edgexfer train --mode auto` does with its training split), trains
its pick on the whole outer training part and is scored on the same outer test fold. So `auto`'s figure
is an honest estimate of what the mode delivers, comparable with each fixed candidate's.

Usage: python benchmarks/auto_selection.py [DATA_DIR] [--folds 5] [--seed 0] [--partial] [--budget S]
Writes results/auto_selection.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def frozen_features(data: Path, cache: Path):
    """Features of every (deduplicated) image through the real frozen path, read back from the cache."""
    from edgexfer.runtime.cache import FeatureCache
    from edgexfer.runtime.preprocess import PreprocessSpec
    from edgexfer.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        train(TrainConfig(data_dir=data, out=Path(tmp) / "run", cache=cache, progress=False))
        run = json.loads((Path(tmp) / "run" / "run.json").read_text())
    samples = sorted(run["train"] + run["val"], key=lambda s: s["path"])
    key = PreprocessSpec.from_dict(run["preprocess"]).key()
    with FeatureCache(cache, per_class_capacity=None) as fc:
        found = fc.get_features(run["backbone"]["onnx_sha256"], key, [s["sha256"] for s in samples])
    X = np.stack([found[s["sha256"]] for s in samples]).astype(np.float32)
    y = np.array([s["label"] for s in samples], dtype=np.int64)
    return X, y, run["classes"], [s["path"] for s in samples]


def main() -> None:
    from edgexfer.runtime.cpu import cpu_features
    from edgexfer.selection import choose, frozen_candidates, score_frozen, stratified_folds

    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "datasets" / "clipart8"))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of the outer and inner splits")
    ap.add_argument("--cache", default=str(REPO / "build" / "bench-features.sqlite"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "auto_selection.json"))
    args = ap.parse_args()

    X, y, classes, _ = frozen_features(Path(args.data), Path(args.cache))
    candidates = frozen_candidates(C=1.0)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        outer = stratified_folds(y, args.folds, seed)
        per_candidate = score_frozen(candidates, X, y, classes, outer, progress=False)
        auto_acc, auto_pick, auto_seconds = [], [], []
        for train_idx, test_idx in outer:
            started = time.perf_counter()
            inner = stratified_folds(y[train_idx], args.folds, seed)
            chosen = choose(score_frozen(candidates, X[train_idx], y[train_idx], classes, inner, progress=False))
            from edgexfer.runtime.head_training import HeadTrainer
            head = HeadTrainer(chosen.candidate.head, **chosen.candidate.params).fit(X[train_idx], y[train_idx], classes)
            auto_acc.append(float(np.mean(head.logits(X[test_idx]).argmax(1) == y[test_idx])))
            auto_pick.append(chosen.candidate.name)
            auto_seconds.append(time.perf_counter() - started)
        runs.append({"seed": seed, "candidates": [s.to_dict() for s in per_candidate],
                     "auto": {"fold_accuracy": auto_acc, "picks": auto_pick, "seconds_per_fold": auto_seconds}})
        print(f"seed {seed}", file=sys.stderr)

    def summary(name, accs):
        return {"name": name, "mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs, ddof=1)), 4),
                "folds": len(accs)}

    table = [summary(c.name, sum((r["candidates"][i]["fold_accuracy"] for r in runs), []))
             for i, c in enumerate(candidates)]
    auto = summary("auto", sum((r["auto"]["fold_accuracy"] for r in runs), []))
    best = max(table, key=lambda r: r["mean"])
    result = {
        "question": "nested CV: does --mode auto reach the best fixed candidate (acceptance: >= best - 0.5 points)?",
        "data": str(args.data), "images": int(len(y)), "folds": args.folds, "seeds": args.seeds,
        "cpu": {"model": cpu_features().model, "isa_flags": list(cpu_features().flags)},
        "date": time.strftime("%Y-%m-%d"),
        "table": table, "auto": auto, "best_single": best["name"],
        "auto_minus_best_points": round(100 * (auto["mean"] - best["mean"]), 2),
        "auto_minus_frozen_linear_points": round(100 * (auto["mean"] - table[0]["mean"]), 2),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for r in table + [auto]:
        print(f"{r['name']:<26} {r['mean']:.4f} ± {r['std']:.4f}  ({r['folds']} folds)")
    print(f"auto - best single ({best['name']}): {result['auto_minus_best_points']:+.2f} points")


if __name__ == "__main__":
    main()
