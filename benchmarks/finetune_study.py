"""Partial fine-tuning recipes against the frozen linear probe, by seeded stratified 5-fold cross-validation.

Usage: python benchmarks/finetune_study.py [DATA_DIR] [--stage screen|final] [--recipes a,b] [--out DIR]

All images of the data set (after train's duplicate rule) are split into 5 stratified folds (seeded);
every recipe and the baseline (frozen features + ``fit_linear``, C=1, balanced) are scored on the same
test folds. Nothing is selected on a test fold: each recipe trains a fixed number of epochs. The frozen
prefix runs once per image and view (``edgexfer.finetune.ViewCache``) for all folds and recipes; its
seconds are reported apart from the per-fold fit seconds.

``--stage screen`` runs every recipe on the first folds (``--screen-folds``); ``--stage final`` runs the
named recipes (``--recipes``) on all 5 folds for each ``--seeds`` (the training seed; folds stay fixed).
Results accumulate in results/finetune_study.json (one entry per stage/recipe/seed, rewritten after
every fit, so an interrupted run keeps what it measured) and results/finetune_study.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: candidate recipes: name -> overrides of the study's base (PartialRecipe() with 6 epochs, no refit, eval BN);
#: "u2 blr1e-4 refit bn-train 10ep" is today's PartialRecipe() default
RECIPES: dict[str, dict] = {
    "u0 head on views": {"unfreeze": 0, "epochs": 6},
    "u1 blr1e-4": {"unfreeze": 1, "backbone_lr": 1e-4, "epochs": 6},
    "u0 head hlr1e-4": {"unfreeze": 0, "epochs": 6, "head_lr": 1e-4},
    "u0 head clean only": {"unfreeze": 0, "epochs": 6, "views": 0},
    "u0 head no-smooth no-drop": {"unfreeze": 0, "epochs": 6, "label_smoothing": 0.0, "dropout": 0.0},
    "u0 head clean0.5": {"unfreeze": 0, "epochs": 6, "clean_prob": 0.5},
    "u2 blr1e-4": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6},
    "u2 blr3e-4": {"unfreeze": 2, "backbone_lr": 3e-4, "epochs": 6},
    "u2 blr1e-4 ema": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "ema": 0.9},
    "u2 blr1e-4 noLP": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "lp_init": False},
    "u2 blr1e-4 bn-train": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "train_bn": True},
    "u3 blr1e-4": {"unfreeze": 3, "backbone_lr": 1e-4, "epochs": 6},
    # refit: the final head is fit_linear on the tuned tail's clean training features
    "u1 blr1e-4 refit": {"unfreeze": 1, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True},
    "u2 blr1e-4 refit": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True},
    "u2 blr3e-4 refit": {"unfreeze": 2, "backbone_lr": 3e-4, "epochs": 6, "refit_head": True},
    "u2 blr3e-4 ema refit": {"unfreeze": 2, "backbone_lr": 3e-4, "epochs": 6, "ema": 0.9, "refit_head": True},
    "u2 hlr1e-4 blr1e-4": {"unfreeze": 2, "head_lr": 1e-4, "backbone_lr": 1e-4, "epochs": 6},
    "u2 blr1e-4 clean only": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "views": 0},
    "u3 blr3e-4 refit": {"unfreeze": 3, "backbone_lr": 3e-4, "epochs": 6, "refit_head": True},
    # low head learning rate: the LP head is already converged; lr 1e-3 makes it drift (u0 clean only: -5 points)
    "u1 hlr1e-4 blr1e-4": {"unfreeze": 1, "head_lr": 1e-4, "backbone_lr": 1e-4, "epochs": 6},
    "u2 hlr1e-4 blr3e-4": {"unfreeze": 2, "head_lr": 1e-4, "backbone_lr": 3e-4, "epochs": 6},
    "u3 hlr1e-4 blr1e-4": {"unfreeze": 3, "head_lr": 1e-4, "backbone_lr": 1e-4, "epochs": 6},
    "u2 hlr3e-5 blr1e-4": {"unfreeze": 2, "head_lr": 3e-5, "backbone_lr": 1e-4, "epochs": 6},
    # around the refit recipe
    "u3 blr1e-4 refit": {"unfreeze": 3, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True},
    "u2 blr1e-4 ema refit": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "ema": 0.9, "refit_head": True},
    "u2 blr1e-4 refit 10ep": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 10, "refit_head": True},
    "u2 blr1e-4 refit noLP": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True, "lp_init": False},
    "u2 blr1e-4 refit clean only": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True, "views": 0},
    "u2 blr1e-4 refit V3": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True, "views": 3},
    "u2 blr1e-4 refit bn-train": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True, "train_bn": True},
    "u2 blr5e-5 refit": {"unfreeze": 2, "backbone_lr": 5e-5, "epochs": 6, "refit_head": True},
    "u2 blr1e-4 refit+views": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True, "refit_views": True},
    "u3 blr1e-4 refit bn-train": {"unfreeze": 3, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True, "train_bn": True},
    "u2 blr1e-4 refit bn-train 10ep": {"unfreeze": 2, "backbone_lr": 1e-4, "epochs": 10, "refit_head": True,
                                       "train_bn": True},
    "u2 blr3e-5 refit bn-train": {"unfreeze": 2, "backbone_lr": 3e-5, "epochs": 6, "refit_head": True, "train_bn": True},
    "u1 blr1e-4 refit bn-train": {"unfreeze": 1, "backbone_lr": 1e-4, "epochs": 6, "refit_head": True, "train_bn": True},
    "u0 refit+views": {"unfreeze": 0, "epochs": 1, "refit_head": True, "refit_views": True},
}


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """k disjoint test folds: each class shuffled by its own seeded generator and dealt round-robin."""
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        np.random.default_rng([seed, int(c)]).shuffle(idx)
        for j, i in enumerate(idx):
            folds[(j + offset) % k].append(int(i))
        offset += len(idx)
    return [np.sort(np.array(f, dtype=np.int64)) for f in folds]


def cpu_info() -> dict:
    from edgexfer.runtime.cpu import cpu_features

    cpu = cpu_features()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"model": model or platform.processor(), "describe": cpu.describe(), "cores": os.cpu_count(),
            "flags": [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16") if cpu.has(f)]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "datasets" / "clipart8"))
    ap.add_argument("--stage", choices=["screen", "final"], default="screen")
    ap.add_argument("--recipes", default=None, help="comma-separated names (default: all of RECIPES)")
    ap.add_argument("--screen-folds", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="training seeds for --stage final, e.g. 0,1")
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--views", type=int, default=6, help="augmented views stored per image")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache-file", default=None, help="reuse (or write) the view cache here (torch.save file)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--merge", nargs="*", default=None,
                    help="only merge the runs of these finetune_study.json files (parallel workers) into --out and plot")
    args = ap.parse_args()
    if args.merge is not None:
        return merge(args.merge, Path(args.out))

    import torch

    from edgexfer.backbones import get_config
    from edgexfer.finetune import PartialRecipe, ViewCache
    from edgexfer.modalities.image import load_dataset
    from edgexfer.runtime.head_training import fit_linear
    from edgexfer.runtime.preprocess import PreprocessSpec

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "finetune_study.json"
    results = json.loads(result_path.read_text()) if result_path.is_file() else {"runs": []}
    names = args.recipes.split(",") if args.recipes else list(RECIPES)
    seeds = [int(s) for s in args.seeds.split(",")] if args.stage == "final" else [0]

    bb = get_config("efficientnet_lite0")
    spec = PreprocessSpec(size=bb.input_size)
    folder, images, labels, _, _, skipped = load_dataset(Path(args.data), spec, progress=False)
    classes = list(folder.classes)
    folds = stratified_folds(labels, 5, args.fold_seed)
    use_folds = list(range(args.screen_folds)) if args.stage == "screen" else list(range(5))
    # the study's base: what PartialRecipe() was when the screen began; every recipe states its epochs and
    # each name says which of refit / bn-train it turns on (results record the full recipe of every run)
    base = replace(PartialRecipe(), views=args.views, epochs=6, train_bn=False, refit_head=False)
    deepest = max(RECIPES[n].get("unfreeze", base.unfreeze) for n in names)
    started = time.perf_counter()
    if args.cache_file and Path(args.cache_file).is_file():
        cache = ViewCache.load(args.cache_file, bb, spec)
        if cache.unfreeze < deepest or cache.augmented.shape[1] < args.views:
            raise SystemExit(f"{args.cache_file}: cut for {cache.unfreeze} blocks, {cache.augmented.shape[1]} views")
    else:
        cache = ViewCache.build(images, spec, bb, replace(base, unfreeze=max(deepest, 1)), seed=0, progress=True)
        if args.cache_file:
            cache.save(args.cache_file)
    caches = {cache.unfreeze: cache}
    print(f"view cache: {len(images)} images x ({args.views} + 1) views in {cache.seconds:.0f} s", flush=True)

    results.update({
        "data": str(Path(args.data).resolve()), "images": len(images), "files_skipped": len(skipped),
        "classes": classes, "folds": 5, "fold_seed": args.fold_seed, "fold_sizes": [len(f) for f in folds],
        "cpu": cpu_info(), "torch_threads": args.threads, "date_utc": time.strftime("%Y-%m-%d", time.gmtime()),
        "augment": base.to_dict()["augment"], "views_stored": args.views,
    })
    results.setdefault("prefix_seconds", {})[f"{args.stage}:unfreeze{cache.unfreeze}:V{args.views}"] = round(cache.seconds, 1)

    def save() -> None:
        result_path.write_text(json.dumps(results, indent=2) + "\n")

    def record(entry: dict) -> None:
        results["runs"] = [r for r in results["runs"] if (r["stage"], r["recipe"], r["seed"]) !=
                           (entry["stage"], entry["recipe"], entry["seed"])] + [entry]
        save()

    # baseline: frozen features (the cache's clean views through the pretrained tail), fit_linear C=1 balanced
    feats = cache.clean_features()
    accs, secs = [], []
    for f in use_folds:
        test = folds[f]
        train = np.setdiff1d(np.arange(len(images)), test)
        t = time.perf_counter()
        head = fit_linear(feats[train], labels[train], classes, C=1.0)
        secs.append(round(time.perf_counter() - t, 2))
        accs.append(round(float((head.logits(feats[test]).argmax(1) == labels[test]).mean()), 4))
    record({"stage": args.stage, "recipe": "frozen linear (fit_linear C=1 balanced)", "seed": 0, "folds": use_folds,
            "fold_accuracy": accs, "mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs)), 4),
            "fold_seconds": secs, "seconds_per_run": round(float(np.mean(secs)), 2), "recipe_params": None})
    print(f"frozen linear: {np.mean(accs):.4f} +- {np.std(accs):.4f} {accs}", flush=True)

    for name in names:
        recipe = replace(base, **RECIPES[name])
        u = recipe.unfreeze
        if u not in caches:
            caches[u] = cache.deeper(u)
        for seed in seeds:
            accs, secs, epochs_hist = [], [], []
            for f in use_folds:
                test = folds[f]
                train = np.setdiff1d(np.arange(len(images)), test)
                fit = caches[u].fit(train, labels, classes, recipe, seed=seed)
                accs.append(round(float((fit.logits(test).argmax(1) == labels[test]).mean()), 4))
                secs.append(round(fit.seconds, 1))
                epochs_hist.append(fit.history)
                print(f"  {name} seed {seed} fold {f}: {accs[-1]:.4f} in {secs[-1]:.0f} s", flush=True)
            record({"stage": args.stage, "recipe": name, "seed": seed, "folds": use_folds, "fold_accuracy": accs,
                    "mean": round(float(np.mean(accs)), 4), "std": round(float(np.std(accs)), 4), "fold_seconds": secs,
                    "seconds_per_run": round(float(np.mean(secs)), 1), "recipe_params": recipe.to_dict(),
                    "history": epochs_hist})
            print(f"{name} seed {seed}: {np.mean(accs):.4f} +- {np.std(accs):.4f}", flush=True)
    results["wall_seconds_" + args.stage] = round(time.perf_counter() - started, 1)
    save()
    plot(results, out / "finetune_study.png")


def merge(files: list[str], out: Path) -> None:
    """Fold the runs of worker result files (same data, folds and CPU) into out/finetune_study.json."""
    target = out / "finetune_study.json"
    results = json.loads(target.read_text()) if target.is_file() else {"runs": []}
    for name in files:
        other = json.loads(Path(name).read_text())
        if results.get("fold_sizes") and other["fold_sizes"] != results["fold_sizes"]:
            raise SystemExit(f"{name}: other folds")
        for key, value in other.items():
            if key == "prefix_seconds":
                results.setdefault(key, {}).update(value)
            elif key != "runs" and not key.startswith("wall_seconds"):
                results.setdefault(key, value)
        for run in other["runs"]:
            ident = (run["stage"], run["recipe"], run["seed"])
            results["runs"] = [r for r in results["runs"] if (r["stage"], r["recipe"], r["seed"]) != ident] + [run]
    target.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "finetune_study.png")
    print(table(results))


def table(results: dict) -> str:
    """Markdown table of the runs: final stage first, then screening, best mean first."""
    rows = ["| stage | recipe | seed | folds | accuracy per fold | mean ± std | s per fit |", "|---|---|---|---|---|---|---|"]
    for r in sorted(results["runs"], key=lambda r: (r["stage"] != "final", r["stage"], -r["mean"])):
        rows.append(f"| {r['stage']} | {r['recipe']} | {r['seed']} | {len(r['folds'])} | "
                    f"{' '.join(f'{a:.3f}' for a in r['fold_accuracy'])} | {r['mean']:.4f} ± {r['std']:.4f} | "
                    f"{r['seconds_per_run']:g} |")
    return "\n".join(rows)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results["runs"], key=lambda r: (r["stage"] != "final", r["stage"], -r["mean"]))
    if not runs:
        return
    labels = [f"{r['stage']}: {r['recipe']} s{r['seed']} ({len(r['folds'])}f)" for r in runs]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(runs) + 1.8), sharey=True)
    y = np.arange(len(runs))
    ax.barh(y, [r["mean"] for r in runs], xerr=[r["std"] for r in runs], color=[
        "tab:gray" if r["recipe"].startswith("frozen") else "tab:blue" for r in runs])
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    lo = min(r["mean"] - r["std"] for r in runs)
    ax.set_xlim(max(0.0, lo - 0.03), min(1.0, max(r["mean"] + r["std"] for r in runs) + 0.02))
    ax.set_xlabel("test-fold accuracy (mean ± std over folds)")
    ax2.barh(y, [r["seconds_per_run"] for r in runs], color="tab:orange")
    ax2.set_xlabel("seconds per fit (prefix cache excluded)")
    cpu = results.get("cpu", {})
    fig.suptitle(f"clipart8 partial fine-tuning vs frozen linear, stratified 5-fold CV — {cpu.get('model', '?')} "
                 f"({', '.join(cpu.get('flags', []))}), {results.get('torch_threads')} threads, {results.get('date_utc')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
