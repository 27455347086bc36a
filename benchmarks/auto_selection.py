"""Does `train --mode auto` pick well? Nested cross-validation on clipart8.

Outer loop: seeded stratified 5-fold CV over all images. For every outer fold, each candidate is trained
on the outer training part and scored on the outer test fold; `auto` runs its own inner k-fold CV on the
outer training part only (exactly what `edgexfer train --mode auto` does with its training split), trains
its pick on the whole outer training part and is scored on the same outer test fold. So `auto`'s figure
is an honest estimate of what the mode delivers, comparable with each fixed candidate's.

Usage: python benchmarks/auto_selection.py [DATA_DIR] [--folds 5] [--inner-folds 5] [--seeds 0,1] [--partial]
Writes results/auto_selection.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load(data: Path, cache: Path):
    """Decoded images, labels and frozen features of every (deduplicated) image, as `train` sees them."""
    import tempfile

    from edgexfer.backbones import get_config
    from edgexfer.modalities import host_modality
    from edgexfer.train import TrainConfig, _frozen_features

    bb = get_config("efficientnet_lite0")
    modality = host_modality(bb.modality)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(data_dir=data, out=Path(tmp), cache=cache, progress=False)
        data_set = modality.load(cfg, bb)
        feats, _ = _frozen_features(cfg, bb, modality, data_set)
    images, spec = data_set.samples.images, data_set.spec
    return bb, spec, images, data_set.labels, list(data_set.classes), feats.astype(np.float32)


def main() -> None:
    from edgexfer.runtime.cpu import cpu_features
    from edgexfer.runtime.head_training import HeadTrainer
    from edgexfer.selection import (
        Candidate,
        CandidateScore,
        choose,
        frozen_candidates,
        score_frozen,
        stratified_folds,
    )

    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "datasets" / "clipart8"))
    ap.add_argument("--folds", type=int, default=5, help="outer folds")
    ap.add_argument("--inner-folds", type=int, default=5, help="auto's own folds (train --folds)")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds of the outer and inner splits")
    ap.add_argument("--partial", action="store_true", help="add the default partial recipe as a candidate (slow)")
    ap.add_argument("--cache", default=str(REPO / "build" / "bench-features.sqlite"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "auto_selection.json"))
    args = ap.parse_args()

    bb, spec, images, y, classes, X = load(Path(args.data), Path(args.cache))
    candidates = frozen_candidates(C=1.0)
    views = recipe = None
    if args.partial:
        import torch

        from edgexfer.finetune import PartialRecipe, ViewCache

        torch.set_num_threads(2)
        recipe = PartialRecipe()
        views = ViewCache.build(images, spec, bb, recipe, seed=0, progress=True)
        print(f"view cache: {views.seconds:.0f} s", file=sys.stderr)
    partial_name = f"partial last {recipe.unfreeze} blocks" if recipe else None
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        outer = stratified_folds(y, args.folds, seed)
        per_candidate = score_frozen(candidates, X, y, classes, outer, progress=False)
        partial_outer = CandidateScore(Candidate(partial_name, "partial", "linear")) if recipe else None
        auto_acc, auto_pick, auto_seconds = [], [], []
        for f, (train_idx, test_idx) in enumerate(outer):
            started = time.perf_counter()
            inner = stratified_folds(y[train_idx], args.inner_folds, seed)
            inner_scores = score_frozen(candidates, X[train_idx], y[train_idx], classes, inner, progress=False)
            outer_fit = None
            if recipe:
                t0 = time.perf_counter()
                outer_fit = views.fit(train_idx, y, classes, recipe, seed=seed)
                partial_outer.fold_seconds.append(time.perf_counter() - t0)
                partial_outer.fold_accuracy.append(float(np.mean(outer_fit.logits(test_idx).argmax(1) == y[test_idx])))
                inner_partial = CandidateScore(Candidate(partial_name, "partial", "linear"))
                for tr, te in inner:
                    t0 = time.perf_counter()
                    fit = views.fit(train_idx[tr], y, classes, recipe, seed=seed)
                    inner_partial.fold_seconds.append(time.perf_counter() - t0)
                    inner_partial.fold_accuracy.append(float(np.mean(fit.logits(train_idx[te]).argmax(1) == y[train_idx[te]])))
                inner_scores.append(inner_partial)
            chosen = choose(inner_scores)
            if chosen.candidate.mode == "partial":  # the same fit auto would make: same recipe, seed, data
                acc = partial_outer.fold_accuracy[-1]
            else:
                head = HeadTrainer(chosen.candidate.head, **chosen.candidate.params).fit(X[train_idx], y[train_idx], classes)
                acc = float(np.mean(head.logits(X[test_idx]).argmax(1) == y[test_idx]))
            auto_acc.append(acc)
            auto_pick.append(chosen.candidate.name)
            auto_seconds.append(time.perf_counter() - started)
            print(f"seed {seed} fold {f}: auto picked {chosen.candidate.name} -> {acc:.4f}"
                  + (f"; partial {partial_outer.fold_accuracy[-1]:.4f}" if recipe else "")
                  + f"; frozen linear {per_candidate[0].fold_accuracy[f]:.4f}", file=sys.stderr, flush=True)
        all_scores = per_candidate + ([partial_outer] if recipe else [])
        runs.append({"seed": seed, "candidates": [s.to_dict() for s in all_scores],
                     "auto": {"fold_accuracy": auto_acc, "picks": auto_pick, "seconds_per_fold": auto_seconds}})

    def summary(name, accs):
        return {"name": name, "mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs, ddof=1)), 4),
                "folds": len(accs)}

    names = [c["name"] for c in runs[0]["candidates"]]
    table = [summary(n, sum((r["candidates"][i]["fold_accuracy"] for r in runs), [])) for i, n in enumerate(names)]
    auto = summary("auto", sum((r["auto"]["fold_accuracy"] for r in runs), []))
    best = max(table, key=lambda r: r["mean"])
    result = {
        "question": "nested CV: does --mode auto reach the best fixed candidate (acceptance: >= best - 0.5 points)?",
        "data": str(args.data), "images": int(len(y)), "folds": args.folds, "inner_folds": args.inner_folds,
        "seeds": args.seeds, "partial_recipe": recipe.to_dict() if recipe else None,
        "cpu": {"model": cpu_features().model, "isa_flags": list(cpu_features().flags)},
        "date": time.strftime("%Y-%m-%d"),
        "table": table, "auto": auto, "best_single": best["name"],
        "auto_minus_best_points": round(100 * (auto["mean"] - best["mean"]), 2),
        "auto_minus_frozen_linear_points": round(100 * (auto["mean"] - table[0]["mean"]), 2),
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, Path(args.out).with_suffix(".png"))
    for r in table + [auto]:
        print(f"{r['name']:<26} {r['mean']:.4f} ± {r['std']:.4f}  ({r['folds']} folds)")
    print(f"auto - best single ({best['name']}): {result['auto_minus_best_points']:+.2f} points")


def plot(result: dict, path: Path) -> None:
    """Outer-fold accuracy of every fixed candidate and of auto (mean ± std), one bar each."""
    from edgexfer.plots import _pyplot

    plt = _pyplot()
    rows = result["table"] + [result["auto"]]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(rows)))
    colours = ["tab:orange" if r["name"] == "auto" else ("tab:green" if r["name"].startswith("partial")
                                                         else "tab:blue") for r in rows]
    ax.barh(range(len(rows)), [r["mean"] for r in rows], xerr=[r["std"] for r in rows], color=colours, capsize=3)
    ax.set_yticks(range(len(rows)), [r["name"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(max(0.0, min(r["mean"] - r["std"] for r in rows) - 0.05), 1.0)
    for i, r in enumerate(rows):
        ax.text(0.995, i, f"{r['mean']:.3f} ± {r['std']:.3f}", va="center", ha="right", fontsize=8)
    ax.set_xlabel(f"accuracy on the outer test folds ({result['folds']}-fold, seeds {result['seeds']})")
    ax.set_title(f"clipart8: fixed candidates vs --mode auto (inner {result['inner_folds']}-fold); "
                 f"{result['cpu']['model']}, {result['date']}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":  # redraw from a result file
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[2]).with_suffix(".png"))
        sys.exit(0)
    main()
