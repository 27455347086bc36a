"""Frozen feature extractor vs partial fine-tuning on clipart8 (same seeded 80/20 split).

Usage: python benchmarks/partial_vs_frozen.py [DATA_DIR] [--unfreeze N] [--epochs E] [--out DIR]
Writes results/partial_vs_frozen.json and prints a table. Slow on 2 CPU cores (minutes).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgexfer.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "datasets" / "clipart8"))
    ap.add_argument("--unfreeze", default="3")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="head learning rate (backbone: lr/10)")
    ap.add_argument("--patience", type=int, default=4)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "partial_vs_frozen_runs" / f"u{args.unfreeze}-lr{args.lr:g}"
    rows = []
    for name, cfg in [
        ("frozen/linear", TrainConfig(data_dir=Path(args.data), out=work / "frozen", seed=args.seed,
                                      cache=work / "features.sqlite")),
        (f"partial/linear unfreeze {args.unfreeze} lr {args.lr:g}", TrainConfig(
            data_dir=Path(args.data), out=work / "partial", mode="partial", unfreeze=args.unfreeze,
            epochs=args.epochs, seed=args.seed, lr=args.lr, patience=args.patience)),
    ]:
        start = time.time()
        result = train(cfg)
        rows.append({"recipe": name, "val_accuracy": round(result.val_accuracy, 4),
                     "val_count": result.metrics["val_count"], "seconds": round(time.time() - start, 1),
                     "best_epoch": (result.metrics["history"][-1].get("best_epoch") if result.metrics["history"] else None)})
    (out / f"partial_vs_frozen-u{args.unfreeze}-lr{args.lr:g}.json").write_text(json.dumps({"data": args.data, "seed": args.seed, "rows": rows}, indent=2))
    print(f"{'recipe':<32} {'val acc':>8} {'images':>7} {'seconds':>8}")
    for r in rows:
        print(f"{r['recipe']:<32} {r['val_accuracy']:>8.3f} {r['val_count']:>7} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
