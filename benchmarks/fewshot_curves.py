"""Few-shot field learning on clipart8: accuracy vs shots per new class, for each device head policy.

A bundle knows 4 of the 8 classes; the device learns the other 4 from 1, 3, 5, 10 or all of its images.
Per class split (several old/new partitions of the 8 classes) and draw (seeded), half of each class's
images are test images; the bundle's head is fitted as ``edgexfer.train.train`` fits it (linear,
C=1, on the old classes' training images after its 20% validation split) and its exemplars are 20
training images per old class in float16, as ``edgexfer.export`` writes them. The shots are drawn
from the other half of each new class. Scored: mean per-class accuracy over all 8 classes on the test
images, and the old classes among themselves (the best-scoring old class), as tests/host/test_field_learning.py
scores them.

Policies (all on the same features):
* ``previous``: the device before this study: 25% of every class with >= 3 samples held out, classes
  without local samples frozen at the bundle's rows, balanced logistic head.
* ``sklearn``: the peer, ``LogisticRegression(class_weight="balanced")`` on exemplars + every shot.
* ``ncm``: cosine nearest class mean (``fit_prototype``).
* ``slda``: ``fit_slda`` (shrinkage 0.95).
* ``fewshot``: the few-shot policy of ``Device.retrain`` (runtime/fewshot.py), with the device's split
  (classes with < MIN_SPLIT_SAMPLES samples not split).
* ``fewshot, no imprinting``: the same without :func:`imprint_rows` (``imprint=0``; the default before).
* ``frozen``: the previous policy's head with the device's new split.
* ``auto (default)``: what ``Device.retrain`` does by default: fewshot while the new classes have a
  median of < FEWSHOT_MAX_SAMPLES training samples, frozen from then on.
* ``fewshot+augK``: the same with K augmented views of each training shot (``device learn --augment K``).
* ``fewshot, no split``: every sample trains even with >= 10 per class (what the holdout costs).

Features: ``benchmarks/fewshot_features.py`` (real backbone through the runtime engine; one frozen
backbone serves every split). Usage: python benchmarks/fewshot_curves.py [--splits 5] [--draws 3]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHOTS = (1, 3, 5, 10, 0)  #: 0 = every image of the learn half


def _splits(n: int) -> list[tuple[int, ...]]:
    """``n`` old-class sets of 4 out of 8: the first and last four, then seeded draws (no repeats)."""
    out = [(0, 1, 2, 3), (4, 5, 6, 7)]
    rng = np.random.default_rng(2026)
    while len(out) < n:
        pick = tuple(sorted(int(i) for i in rng.choice(8, 4, replace=False)))
        if pick not in out:
            out.append(pick)
    return out[:n]


def balanced_accuracy(logits: np.ndarray, y: np.ndarray, classes: range) -> float:
    pred = logits.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in classes]))


def run_one(data: dict[str, np.ndarray], old: tuple[int, ...], seed: int, views: int) -> dict[str, dict]:
    from sklearn.linear_model import LogisticRegression

    from edgexfer.data import stratified_split
    from edgexfer.runtime.fewshot import choose_policy, fit_fewshot, fit_slda
    from edgexfer.runtime.head_training import fit_linear, fit_prototype
    from edgexfer.runtime.holdout import LocalSplit, holdout_split

    X, V, Y = data["X"].astype(np.float32), data["V"].astype(np.float32), data["y"]
    new = [c for c in range(8) if c not in old]
    order = list(old) + new
    pos = {c: i for i, c in enumerate(order)}
    cls = [str(data["classes"][c]) for c in order]
    rng = np.random.default_rng(seed)
    pool, test = {}, {}
    for c in range(8):
        idx = np.flatnonzero(Y == c)
        idx = idx[rng.permutation(len(idx))]
        pool[c], test[c] = idx[: len(idx) // 2], idx[len(idx) // 2:]
    host = np.concatenate([pool[c] for c in old])
    host_y = np.array([pos[Y[i]] for i in host])
    tr, _ = stratified_split(host_y, 0.2, 0)
    bundle = fit_linear(X[host[tr]], host_y[tr], cls[:4])
    ex_rng = np.random.default_rng(0)
    ex = []
    for c in range(4):
        items = host[tr][host_y[tr] == c]
        ex += list(np.sort(items[ex_rng.permutation(len(items))[:20]]))
    X_ex = X[ex].astype(np.float16).astype(np.float32)
    y_ex = np.array([pos[Y[i]] for i in ex])
    t_idx = np.concatenate([test[c] for c in order])
    Xt, yt = X[t_idx], np.array([pos[Y[i]] for i in t_idx])
    old_mask = yt < 4
    out: dict[str, dict] = {"bundle": {"old_among_old": balanced_accuracy(bundle.logits(Xt[old_mask]),
                                                                          yt[old_mask], range(4))}}

    def score(name: str, shots: int, logits: np.ndarray) -> None:
        out.setdefault(name, {})[shots] = {
            "all": balanced_accuracy(logits, yt, range(8)),
            "old_among_old": balanced_accuracy(logits[old_mask][:, :4], yt[old_mask], range(4))}

    for shots in SHOTS:
        local = np.concatenate([pool[c][:shots] if shots else pool[c] for c in new])
        y_loc = np.array([pos[Y[i]] for i in local])
        X_loc = X[local].astype(np.float16).astype(np.float32)
        names = [cls[c] for c in y_loc]
        X_all, y_all = np.concatenate([X_ex, X_loc]), np.concatenate([y_ex, y_loc])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peer = LogisticRegression(class_weight="balanced", max_iter=5000).fit(X_all, y_all)
        score("sklearn", shots, peer.decision_function(Xt))
        score("ncm", shots, fit_prototype(X_all, y_all, cls).logits(Xt))
        score("slda", shots, fit_slda(X_all, y_all, cls).logits(Xt))
        # the previous device policy: its split (classes >= 3 samples), frozen old rows
        train_prev, _ = holdout_split(names, cls, 0.25, 0, min_split=3)
        Xp = np.concatenate([X_ex, X_loc[train_prev]])
        yp = np.concatenate([y_ex, y_loc[train_prev]])
        prev = fit_linear(Xp, yp, cls, tol=1e-5, matmul_dtype="float32", warm_start=bundle, frozen_classes=cls[:4])
        score("previous", shots, prev.logits(Xt))
        # the new default, with the device's split
        split = LocalSplit.of([str(i) for i in local], X_loc, names, cls[:4])
        device_only, keep = cls[4:], cls[:4]
        Xd = np.concatenate([X_ex, X_loc[split.train]])
        yd = np.concatenate([y_ex, split.targets[split.train]])
        few = fit_fewshot(Xd, yd, cls, device_only=device_only, keep=keep, warm_start=bundle)
        score("fewshot", shots, few.logits(Xt))
        score("fewshot, no imprinting", shots, fit_fewshot(Xd, yd, cls, device_only=device_only, keep=keep,
                                                           warm_start=bundle, imprint=0.0).logits(Xt))
        frozen = fit_linear(Xd, yd, cls, tol=1e-5, matmul_dtype="float32", warm_start=bundle, frozen_classes=keep)
        score("frozen", shots, frozen.logits(Xt))
        train_names = [names[i] for i in split.train]
        chosen = choose_policy("auto", [train_names.count(c) for c in device_only])
        score("auto (default)", shots, (few if chosen == "fewshot" else frozen).logits(Xt))
        score("fewshot, no split", shots,
              fit_fewshot(X_all, y_all, cls, device_only=device_only, keep=keep, warm_start=bundle).logits(Xt))
        for k in sorted({views} - {0}):
            # views of the training shots only: a held-out sample's views never train
            Va = V[local[split.train]][:, :k].reshape(-1, V.shape[-1]).astype(np.float16).astype(np.float32)
            ya = np.repeat(split.targets[split.train], k)
            head = fit_fewshot(np.concatenate([Xd, Va]), np.concatenate([yd, ya]), cls, device_only=device_only,
                               keep=keep, warm_start=bundle)
            score(f"fewshot+aug{k}", shots, head.logits(Xt))
    return out


def _summary(runs: list[dict[str, dict]]) -> dict[str, dict]:
    policies = [p for p in runs[0] if p != "bundle"]
    out: dict[str, dict] = {}
    for p in policies:
        out[p] = {}
        for shots in SHOTS:
            allv = np.array([r[p][shots]["all"] for r in runs])
            oldv = np.array([r[p][shots]["old_among_old"] for r in runs])
            diff = allv - np.array([r["sklearn"][shots]["all"] for r in runs])
            out[p]["all" if shots == 0 else str(shots)] = {
                "accuracy_mean": round(float(allv.mean()), 4), "accuracy_std": round(float(allv.std()), 4),
                "accuracy_min": round(float(allv.min()), 4), "accuracy_max": round(float(allv.max()), 4),
                "minus_sklearn_mean": round(float(diff.mean()), 4), "minus_sklearn_std": round(float(diff.std()), 4),
                "old_among_old_mean": round(float(oldv.mean()), 4), "old_among_old_std": round(float(oldv.std()), 4)}
    bundle_old = np.array([r["bundle"]["old_among_old"] for r in runs])
    out["bundle_before_learning"] = {"old_among_old_mean": round(float(bundle_old.mean()), 4),
                                     "old_among_old_std": round(float(bundle_old.std()), 4)}
    return out


def _plot(summary: dict[str, dict], path: Path, title: str) -> None:
    from edgexfer.plots import _pyplot

    plt = _pyplot()
    keys = ["1", "3", "5", "10", "all"]
    fig, (ax, ax_old) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p, rows in summary.items():
        if p == "bundle_before_learning":
            continue
        m = np.array([rows[k]["accuracy_mean"] for k in keys])
        s = np.array([rows[k]["accuracy_std"] for k in keys])
        style = {"linewidth": 3} if p == "auto (default)" else {}
        ax.errorbar(range(len(keys)), m, yerr=s, marker="o", capsize=3, label=p, **style)
        ax_old.plot(range(len(keys)), [rows[k]["old_among_old_mean"] for k in keys], marker="o", label=p)
    ax_old.axhline(summary["bundle_before_learning"]["old_among_old_mean"], color="k", linestyle="--",
                   label="bundle before learning")
    for a, label in ((ax, "accuracy over all 8 classes"), (ax_old, "old classes among themselves")):
        a.set_xticks(range(len(keys)), keys)
        a.set_xlabel("images per new class")
        a.set_ylabel(label)
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", default=str(REPO / "build" / "fewshot" / "features.npz"))
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fewshot_curves.json"))
    args = ap.parse_args()
    from threadpoolctl import threadpool_limits

    from edgexfer.runtime.cpu import cpu_features

    path = Path(args.features)
    if not path.is_file():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "fewshot_features.py"),
                        "--views", str(args.views), "--work", str(path.parent)], check=True)
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    started = time.perf_counter()
    runs = []
    splits = _splits(args.splits)
    with threadpool_limits(limits=1, user_api="blas"):
        for old in splits:
            for draw in range(args.draws):
                runs.append(run_one(data, old, draw, min(args.views, data["V"].shape[1])))
                print(f"split {old} draw {draw}: 5 shots fewshot {runs[-1]['fewshot'][5]['all']:.3f} "
                      f"sklearn {runs[-1]['sklearn'][5]['all']:.3f}", file=sys.stderr, flush=True)
    summary = _summary(runs)
    cpu = cpu_features()
    result = {
        "date": datetime.date.today().isoformat(), "cpu_model": cpu.model, "isa_flags": list(cpu.flags),
        "python": platform.python_version(), "data": "clipart8 (545 unique images, 8 classes)",
        "classes": [str(c) for c in data["classes"]],
        "old_class_sets": [[str(data["classes"][c]) for c in old] for old in splits], "draws_per_split": args.draws,
        "runs": len(runs), "views": int(min(args.views, data["V"].shape[1])),
        "metric": "mean per-class accuracy on the test half of every class; spread = std over runs",
        "seconds": round(time.perf_counter() - started, 1), "policies": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(summary, out.with_suffix(".png"),
          f"clipart8, bundle on 4 classes, device learns 4; {len(splits)} class splits x {args.draws} draws; "
          f"{cpu.describe()}; {result['date']}")
    for p, rows in summary.items():
        if p == "bundle_before_learning":
            print(f"{p:22s} old among old {rows['old_among_old_mean']:.3f}")
            continue
        print(f"{p:22s}", "  ".join(f"{k}: {rows[k]['accuracy_mean']:.3f}±{rows[k]['accuracy_std']:.3f} "
                                    f"({rows[k]['minus_sklearn_mean']:+.3f})" for k in rows),
              f" old {rows['5']['old_among_old_mean']:.3f}")


if __name__ == "__main__":
    main()
