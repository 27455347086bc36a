"""What every training run writes beside its model, whatever it reads: progress lines, plots, tool versions.

Shared by the trainer (:mod:`edgexfer.train`) and the host modalities (:mod:`edgexfer.modalities`); it
imports no torch (the thread guard is handed the torch module by its caller).
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from edgexfer import __version__


def log(msg: str, progress: bool = True) -> None:
    """One progress line on stderr (nothing when ``progress`` is off)."""
    if progress:
        print(msg, file=sys.stderr, flush=True)


def default_cache_path() -> Path:
    """Host feature cache: ``$EDGEXFER_CACHE`` or ``~/.cache/edgexfer/features.sqlite``."""
    env = os.environ.get("EDGEXFER_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "edgexfer" / "features.sqlite"


def tool_versions() -> dict[str, Any]:
    """Versions of edgexfer, Python and the packages that shaped the run's model (``run.json``'s ``tools``)."""
    import importlib.metadata as md

    out: dict[str, Any] = {"edgexfer": __version__, "python": platform.python_version()}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxslim", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def write_plots(cfg: Any, history: list[dict[str, Any]], report: dict[str, Any],
                selection: dict[str, Any] | None = None) -> None:
    """The run's ``plots/``: model selection (auto mode), training curves (when there is a history), confusion."""
    from edgexfer.plots import plot_confusion_matrix, plot_selection, plot_training_curves

    if selection:
        plot_selection(selection["candidates"], selection["chosen"], cfg.out / "plots" / "selection.png",
                       f"{cfg.backbone}, {selection['folds']}-fold cross-validation")
    if history:
        plot_training_curves(history, cfg.out / "plots" / "curves.png", f"{cfg.backbone} {cfg.mode}/{cfg.head}")
    plot_confusion_matrix(report["confusion_matrix"], report["classes"], cfg.out / "plots" / "confusion.png",
                          f"validation, accuracy {report['accuracy']:.3f}")


class torch_threads:
    """At most 2 intra-op threads unless the user set OMP_NUM_THREADS (small tensors gain nothing from more
    on a shared CPU); restored afterwards."""

    def __init__(self, torch):
        self.torch, self.saved = torch, None

    def __enter__(self):
        if "OMP_NUM_THREADS" not in os.environ:
            self.saved = self.torch.get_num_threads()
            self.torch.set_num_threads(min(2, self.saved))
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            self.torch.set_num_threads(self.saved)
        return False
