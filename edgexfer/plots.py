"""PNG plots of training curves and confusion matrices (matplotlib, headless)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgexfer.runtime.optional import require


def _pyplot():
    matplotlib = require("matplotlib", "plotting")
    matplotlib.use("Agg")  # no display on devices and CI
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss and accuracy per epoch (train and validation)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    if all("val_loss" in h for h in history):
        ax_loss.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if all("train_accuracy" in h for h in history):
        ax_acc.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train")
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_ylim(0, 1)
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str) -> Path:
    plt = _pyplot()
    import numpy as np

    cm = np.asarray(matrix)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 1.0 + 0.6 * n))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if peak and cm[i, j] > peak / 2 else "black", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_selection(candidates: Sequence[dict[str, Any]], chosen: str, path: Path, title: str) -> Path:
    """Cross-validated accuracy per candidate (mean and std over folds) beside its time per fold."""
    plt = _pyplot()
    rows = [c for c in candidates if c.get("mean") is not None]
    names = [c["name"] + ("" if c["eligible"] else " (incomplete)") for c in rows]
    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * len(rows)), sharey=True,
                                          gridspec_kw={"width_ratios": [3, 1]})
    colours = ["tab:orange" if c["name"] == chosen else ("tab:blue" if c["eligible"] else "lightgray") for c in rows]
    ys = range(len(rows))
    ax_acc.barh(ys, [c["mean"] for c in rows], xerr=[c["std"] for c in rows], color=colours, capsize=3)
    low = min(c["mean"] - c["std"] for c in rows)
    ax_acc.set_xlim(max(0.0, low - 0.05), 1.0)
    ax_acc.set_yticks(list(ys), names)
    ax_acc.invert_yaxis()
    ax_acc.set_xlabel("cross-validated accuracy (mean ± std over folds)")
    for y, c in zip(ys, rows):
        ax_acc.text(0.995, y, f"{c['mean']:.3f} ± {c['std']:.3f}", va="center", ha="right", fontsize=8)
    ax_acc.grid(axis="x", alpha=0.3)
    ax_time.barh(ys, [c["seconds_per_fold"] or 0 for c in rows], color=colours)
    ax_time.set_xscale("log")
    ax_time.set_xlabel("seconds per fold")
    ax_time.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title} — chosen: {chosen}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
