"""Label budgets after a camera shift: which samples should a person label? (issue 27, ``device suggest``)

Data: the 336 clipart8 images the demo bundle never trained on, through the camera-like degradation of
tests/shift_support.py (tilt, blur, dim light, lower contrast, colour cast, sensor noise, low JPEG quality),
their features from the bundle's ONNX Runtime fp32 engine (cached under build/label-budget/). In each of
``--draws`` draws the degraded images are split (seeded, stratified) into a pool of candidates (60 %) and a
test set (40 %); a budget of B labels per class (B x 8 labels in all, chosen without knowing the labels) is
spent by each method of :func:`edgexfer.runtime.suggest.rank`:

* ``suggested``: uncertainty (1 - margin) and coverage (k-center greedy from the bundle's exemplars and the
  picks so far), ``device suggest``'s default;
* ``margin``: uncertainty only; ``coverage``: k-center greedy only; ``random``: the baseline.

The picked samples get their true labels and the head is retrained with the ``adapt`` policy's fit
(:func:`edgexfer.runtime.retrain.fit_adapt`: exemplars plus the picks, pulled towards the bundle's head), as
``device retrain --policy adapt`` would. Reported: accuracy on the draw's degraded test set (and on the clean
copies of the same test images), mean and standard deviation over the draws, and the mean paired difference
of each method against random.

Usage: python benchmarks/label_budget.py [BUNDLE] [CLIPART8] [--draws 10] [--budgets 2 5 10]
Writes benchmarks/results/label_budget.{json,md,png}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from shift_support import camera_shift, held_out  # noqa: E402

from edgexfer.runtime.bundle import Bundle  # noqa: E402
from edgexfer.runtime.cpu import cpu_features  # noqa: E402
from edgexfer.runtime.predictor import Predictor  # noqa: E402
from edgexfer.runtime.retrain import fit_adapt  # noqa: E402
from edgexfer.runtime.suggest import METHODS, rank  # noqa: E402


def features(bundle_dir: Path, clipart8: Path, cache: Path) -> dict[str, np.ndarray]:
    """Clean and degraded features of the held-out images, with their classes (cached)."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            return dict(data)
    files = held_out(clipart8)
    rng = np.random.default_rng(0)
    clean = [p.read_bytes() for p in files]
    shifted = [camera_shift(b, rng) for b in clean]
    with Predictor.from_bundle(bundle_dir, backend="onnxruntime") as predictor:
        out = {}
        for name, items in (("clean", clean), ("shifted", shifted)):
            feats = []
            predictor.observer = lambda f, p, labels, feats=feats: feats.append(f)
            predictor.predict(items)
            out[name] = np.concatenate(feats)
    out["labels"] = np.array([p.parent.name for p in files])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def run(args: argparse.Namespace) -> dict:
    bundle = Bundle.open(args.bundle)
    head = bundle.head()
    classes = list(head.classes)
    X_ex, y_ex = bundle.exemplars()
    data = features(args.bundle, args.clipart8, REPO / "build" / "label-budget" / "features.npz")
    y = np.array([classes.index(c) for c in data["labels"]])

    def accuracy(h, X, idx) -> float:
        return float(np.mean(h.probabilities(X[idx]).argmax(axis=1) == y[idx]))

    rows = []
    for draw in range(args.draws):
        rng = np.random.default_rng(1000 + draw)
        pool, test = [], []
        for c in range(len(classes)):
            members = rng.permutation(np.where(y == c)[0])
            cut = int(round(0.6 * len(members)))
            pool += list(members[:cut])
            test += list(members[cut:])
        pool, test = np.array(sorted(pool)), np.array(sorted(test))
        base = {"clean": accuracy(head, data["clean"], test), "shifted": accuracy(head, data["shifted"], test)}
        probs = head.probabilities(data["shifted"][pool])
        for budget in args.budgets:
            for method in METHODS:
                picks = pool[rank(data["shifted"][pool], probs, budget * len(classes), labelled=X_ex, method=method,
                                  seed=draw)]
                labelled = sorted({classes[i] for i in y[picks]})
                frozen = [c for c in classes if c not in labelled]
                new = fit_adapt(X_ex, y_ex, data["shifted"][picks], y[picks], classes, head, frozen=frozen)
                rows.append({"draw": draw, "budget": budget, "method": method, "labels": int(len(picks)),
                             "classes_labelled": len(labelled),
                             "shifted": accuracy(new, data["shifted"], test), "clean": accuracy(new, data["clean"], test),
                             "before": base})
        print(f"draw {draw}: " + ", ".join(f"{r['method']}@{r['budget']} {r['shifted']:.3f}" for r in rows
                                           if r["draw"] == draw), flush=True)
    summary = {}
    for budget in args.budgets:
        for method in METHODS:
            mine = [r for r in rows if r["budget"] == budget and r["method"] == method]
            rand = {r["draw"]: r for r in rows if r["budget"] == budget and r["method"] == "random"}
            diff = [r["shifted"] - rand[r["draw"]]["shifted"] for r in mine]
            summary[f"{method}@{budget}"] = {
                "shifted_mean": round(float(np.mean([r["shifted"] for r in mine])), 4),
                "shifted_std": round(float(np.std([r["shifted"] for r in mine])), 4),
                "clean_mean": round(float(np.mean([r["clean"] for r in mine])), 4),
                "vs_random_mean": round(float(np.mean(diff)), 4),
                "vs_random_wins": int(sum(d > 0 for d in diff)), "vs_random_losses": int(sum(d < 0 for d in diff)),
                "classes_labelled_mean": round(float(np.mean([r["classes_labelled"] for r in mine])), 2)}
    cpu = cpu_features()
    return {"study": "label_budget", "date": datetime.date.today().isoformat(),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu.describe(),
            "load_average_1m": round(os.getloadavg()[0], 2), "bundle": bundle.manifest.name, "draws": args.draws,
            "budgets_per_class": args.budgets, "before": {
                "shifted": round(float(np.mean([r["before"]["shifted"] for r in rows])), 4),
                "clean": round(float(np.mean([r["before"]["clean"] for r in rows])), 4)},
            "summary": summary, "rows": rows}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "label_budget.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Label budgets after a camera shift ({result['utc']})", "",
             f"CPU: {result['cpu']}; load average {result['load_average_1m']}. Bundle {result['bundle']}, "
             f"{result['draws']} draws; before any label: degraded {result['before']['shifted']:.3f}, clean "
             f"{result['before']['clean']:.3f}. `benchmarks/label_budget.py`", "",
             "| labels per class | method | degraded accuracy (mean ± sd) | clean | vs random (mean paired) | wins/losses vs random | classes labelled |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for key, s in result["summary"].items():
        method, budget = key.split("@")
        lines.append(f"| {budget} | {method} | {s['shifted_mean']:.3f} ± {s['shifted_std']:.3f} | {s['clean_mean']:.3f} | "
                     f"{s['vs_random_mean']:+.3f} | {s['vs_random_wins']}/{s['vs_random_losses']} | "
                     f"{s['classes_labelled_mean']} |")
    (out / "label_budget.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = result["budgets_per_class"]
    for method in METHODS:
        means = [result["summary"][f"{method}@{b}"]["shifted_mean"] for b in budgets]
        sds = [result["summary"][f"{method}@{b}"]["shifted_std"] for b in budgets]
        ax.errorbar(budgets, means, yerr=sds, marker="o", capsize=3, label=method)
    ax.axhline(result["before"]["shifted"], color="grey", linestyle=":", label="before labelling")
    ax.set_xlabel("labels per class (chosen without knowing the labels)")
    ax.set_ylabel("accuracy on degraded test images")
    ax.set_title(f"clipart8, camera-degraded; {result['draws']} draws")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "label_budget.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", type=Path, default=REPO / "build" / "test-bundle")
    parser.add_argument("clipart8", nargs="?", type=Path, default=REPO.parent / "shared" / "datasets" / "clipart8")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    result = run(args)
    write(result, args.out)
    print(open(args.out / "label_budget.md").read())


if __name__ == "__main__":
    main()
