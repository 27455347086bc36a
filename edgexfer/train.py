"""``edgexfer train``: fine-tune a classifier on an ImageFolder tree.

Two recipes:

* ``frozen`` (default) — the pretrained backbone is a fixed feature extractor. It is exported to ONNX
  first and run through the runtime's own engine and feature cache, so each image goes through the
  backbone once, ever; the head is then trained in numpy on cached features (the device retrains the
  same way).
* ``partial`` — the last N blocks (and the 1x1 head convolution after them) are fine-tuned with
  :mod:`edgexfer.finetune`: the frozen prefix runs once per stored view (clean + seeded augmented views
  of each training image), epochs run only the tail; LP-FT from the converged linear probe, a tail
  learning rate below the head's, a cosine schedule, a fixed epoch count (the validation split is only
  reported, never used to pick an epoch) and a final head refit by ``fit_linear``. The defaults are
  ``PartialRecipe()``, measured by ``benchmarks/finetune_study.py``. ``--unfreeze all`` keeps the slow
  path (every image through the whole network every epoch, early stopping on validation accuracy).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgexfer import __version__
from edgexfer.backbones import BackboneConfig, get_config
from edgexfer.data import decode_all, describe_skipped, scan_image_folder, stratified_split
from edgexfer.finetune import PartialRecipe
from edgexfer.metrics import classification_report
from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.fsutil import file_sha256, write_atomic
from edgexfer.runtime.head_training import HeadTrainer
from edgexfer.runtime.heads import Head
from edgexfer.runtime.names import HEAD_KINDS, TRAIN_MODES
from edgexfer.runtime.preprocess import PreprocessSpec, resize_to_spec, stack

RUN_SCHEMA = "edgexfer.run/1"
#: the backbone `train` uses when none is given, by the data's modality
DEFAULT_BACKBONES = {"image": "efficientnet_lite0", "text": "minilm_l6"}
_RECIPE = PartialRecipe()  # the measured partial defaults (edgexfer.finetune imports torch only when training)


def default_cache_path() -> Path:
    """Host feature cache: ``$EDGEXFER_CACHE`` or ``~/.cache/edgexfer/features.sqlite``."""
    env = os.environ.get("EDGEXFER_CACHE")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "edgexfer" / "features.sqlite"


@dataclass
class TrainConfig:
    data_dir: Path
    out: Path
    #: None: chosen by the data (efficientnet_lite0 for images, minilm_l6 for texts: edgexfer.train.DEFAULT_BACKBONES)
    backbone: str | None = None
    mode: str = "frozen"  #: "frozen", "partial" or "auto" (cross-validated choice, see edgexfer.selection)
    head: str = "linear"
    epochs: int | None = None  #: default: 200 for a frozen mlp head; partial: PartialRecipe().epochs (15 for 'all')
    seed: int = 0
    val_fraction: float = 0.2
    unfreeze: str = str(_RECIPE.unfreeze)  #: number of last blocks, or "all" (partial mode)
    lr: float = _RECIPE.head_lr  #: head learning rate (mlp head, partial mode)
    backbone_lr: float | None = None  #: default: PartialRecipe's (lr / 30 for --unfreeze all)
    batch_size: int = 32
    patience: int = 4  #: --unfreeze all only: early stopping on validation accuracy
    views: int | None = None  #: partial: augmented views stored per training image (default PartialRecipe().views)
    device: str = "auto"  #: where partial training runs: auto (cuda if available), cpu or cuda
    C: float = 1.0  #: inverse L2 strength of the linear head (scikit-learn's meaning)
    resize: str = "letterbox"
    cache: Path | None = None
    weights: Path | None = None  #: own checkpoint of the same architecture instead of the packaged one
    folds: int = 5  #: auto mode: folds of the cross-validation
    budget: float = 1200.0  #: auto mode: seconds for cross-validating the partial candidate (0: frozen heads only)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    val_accuracy: float
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]]


def _log(msg: str, progress: bool = True) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _validate(cfg: TrainConfig, bb: BackboneConfig) -> None:
    if cfg.mode not in TRAIN_MODES:
        raise InputError("unknown --mode", got=repr(cfg.mode), expected=", ".join(TRAIN_MODES))
    if cfg.head not in HEAD_KINDS:
        raise InputError("unknown --head", got=repr(cfg.head), expected=", ".join(HEAD_KINDS))
    if cfg.mode == "partial" and cfg.head == "prototype":
        raise InputError("--head prototype has nothing to fine-tune", got="--mode partial --head prototype",
                         expected="--head linear or mlp with --mode partial", todo="use --mode frozen for prototype heads")
    if not 0.05 <= cfg.val_fraction <= 0.5:
        raise InputError("--val-fraction out of range", got=cfg.val_fraction, expected="0.05 to 0.5")
    if cfg.mode == "partial" and cfg.unfreeze != "all":
        try:
            n = int(cfg.unfreeze)
        except ValueError:
            n = -1
        if not 0 <= n <= bb.num_blocks:
            raise InputError("--unfreeze", got=repr(cfg.unfreeze), expected=f"0..{bb.num_blocks} or 'all'")
    if cfg.mode == "auto" and (isinstance(cfg.folds, bool) or not isinstance(cfg.folds, int) or cfg.folds < 2):
        raise InputError("--folds", got=repr(cfg.folds), expected="an integer >= 2", todo="use e.g. --folds 5")
    if cfg.mode == "auto" and (isinstance(cfg.budget, bool) or not isinstance(cfg.budget, (int, float))
                               or not cfg.budget >= 0):
        raise InputError("--budget", got=repr(cfg.budget), expected="seconds >= 0 (0: frozen heads only)",
                         todo="use e.g. --budget 1200")
    if cfg.mode == "auto" and cfg.budget > 0 and cfg.unfreeze == "all":
        raise InputError("--mode auto with --unfreeze all", got="--unfreeze all", expected="a number of last blocks",
                         todo="leave --unfreeze at its default, or use --mode partial --unfreeze all")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise InputError("--epochs", got=cfg.epochs, expected="at least 1")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise InputError("unknown --device", got=repr(cfg.device), expected="auto, cpu or cuda")
    if cfg.mode == "partial" or (cfg.mode == "auto" and cfg.budget > 0):
        from edgexfer.finetune import resolve_device

        resolve_device(cfg.device)  # --device cuda without CUDA fails here, before any image is decoded
    if cfg.views is not None and cfg.views < 0:
        raise InputError("--views", got=cfg.views, expected="0 or more")


def data_modality(data_dir: Path) -> str:
    """"text" for a folder of .txt class folders or a .csv/.jsonl file, else "image" (an ImageFolder tree)."""
    from edgexfer.runtime.textdata import is_text_dataset

    return "text" if is_text_dataset(data_dir) else "image"


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training job and write the run directory; see the module docstring.

    Text data (:func:`data_modality`) trains a text backbone with the same recipes (:mod:`edgexfer.train_text`).
    """
    modality = data_modality(Path(cfg.data_dir))
    cfg.backbone = cfg.backbone or DEFAULT_BACKBONES[modality]
    bb = get_config(cfg.backbone)
    if bb.modality != modality:
        raise InputError(f"backbone {bb.name} reads {bb.modality}s", got=f"{modality} data in {cfg.data_dir}",
                         expected=f"a {modality} backbone", todo=f"pass --backbone {DEFAULT_BACKBONES[modality]} "
                                                                  "or leave --backbone out")
    _validate(cfg, bb)
    if modality == "text":
        from edgexfer.train_text import train_text

        return train_text(cfg, bb)
    started = time.time()
    spec = PreprocessSpec(size=bb.input_size, resize=cfg.resize)
    folder, images, labels, shas, paths, skipped = load_dataset(cfg.data_dir, spec, progress=cfg.progress)
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
    _log(f"split: {len(train_idx)} train / {len(val_idx)} validation images (seed {cfg.seed})", cfg.progress)

    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "plots").mkdir(exist_ok=True)
    if cfg.mode == "frozen":
        head, history, extraction, val_logits = _train_frozen(cfg, bb, spec, folder.classes, images, shas, paths,
                                                              labels, train_idx, val_idx)
    elif cfg.mode == "auto":
        head, history, extraction, val_logits = _train_auto(cfg, bb, spec, folder.classes, images, shas, paths,
                                                            labels, train_idx, val_idx)
    else:
        head, history, extraction, val_logits = _train_partial(cfg, bb, spec, folder.classes, images, labels,
                                                               train_idx, val_idx)
    head.save(cfg.out / "head.safetensors")
    if "device" in extraction:
        _log(f"partial training ran on {extraction['device']}", cfg.progress)

    val_pred = val_logits.argmax(axis=1)
    report = classification_report(labels[val_idx], val_pred, folder.classes)
    metrics = {
        "schema": "edgexfer.metrics/1",
        "mode": cfg.mode,
        "head": head.kind,
        "backbone": cfg.backbone,
        "val_accuracy": report["accuracy"],
        "val_count": int(len(val_idx)),
        "train_count": int(len(train_idx)),
        "history": history,
        "validation": report,
        "device": extraction.get("device", "cpu"),
        "backbone_images_run": extraction["backbone_images_run"],
        "features_from_cache": extraction.get("features_from_cache", 0),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
        "seconds": round(time.time() - started, 2),
    }
    if "selection" in extraction:
        metrics["selection"] = extraction["selection"]
    write_atomic(cfg.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    run = {
        "schema": RUN_SCHEMA,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "progress"},
        "backbone": {"arch": bb.name, "weights_sha256": bb.weight_sha256 if cfg.weights is None else file_sha256(cfg.weights),
                     "fine_tuned": bool(extraction.get("fine_tuned", cfg.mode == "partial")), "onnx_sha256": file_sha256(cfg.out / "backbone.onnx"),
                     "mean": list(bb.mean), "std": list(bb.std), "feature_dim": bb.feature_dim},
        "preprocess": spec.to_dict(),
        "classes": list(folder.classes),
        "data_root": str(folder.root.resolve()),
        "train": [{"path": str(Path(paths[i]).resolve()), "sha256": shas[i], "label": int(labels[i])} for i in train_idx],
        "val": [{"path": str(Path(paths[i]).resolve()), "sha256": shas[i], "label": int(labels[i])} for i in val_idx],
        "val_accuracy": report["accuracy"],
        "tools": _tool_versions(),
    }
    write_atomic(cfg.out / "run.json", (json.dumps(run, indent=2) + "\n").encode())
    _plots(cfg, history, report, metrics.get("selection"))
    _log(f"validation accuracy {report['accuracy']:.3f} ({cfg.mode}/{head.kind}, {len(val_idx)} images); "
         f"skipped {len(skipped)} file(s); run written to {cfg.out}", cfg.progress)
    return TrainResult(cfg.out, report["accuracy"], metrics, skipped)


def load_dataset(data_dir: Path, spec: PreprocessSpec, *, progress: bool = True):
    """Scan and decode an ImageFolder tree as ``train`` does: unreadable files and duplicates are skipped.

    Returns ``(folder, images, labels, shas, paths, skipped)``: decoded RGB images, int64 labels, their
    sha256, paths and the skipped ``(path, reason)`` pairs. Raises :class:`DataError` for an empty class.
    """
    folder = scan_image_folder(data_dir)
    _log(f"data: {len(folder.paths)} images in {len(folder.classes)} classes under {folder.root}", progress)
    decoded = decode_all(list(folder.paths), spec.fill, progress=progress)
    skipped = [(str(p), r) for p, r in folder.ignored] + [(str(p), r) for p, r in decoded.skipped]
    keep = [i for i, img in enumerate(decoded.images) if img is not None]
    keep, duplicates = _drop_duplicates(keep, decoded.sha256, folder)
    skipped += duplicates
    if skipped:
        _log(describe_skipped([(Path(p), r) for p, r in skipped]), progress)
    labels = np.array([folder.labels[i] for i in keep], dtype=np.int64)
    empty = [c for k, c in enumerate(folder.classes) if not np.any(labels == k)]
    if empty:
        raise DataError("no readable image left in class folder(s)", got=", ".join(empty),
                        expected="at least one decodable image per class", todo="fix or remove those folders")
    images = [decoded.images[i] for i in keep]
    shas = [decoded.sha256[i] for i in keep]
    paths = [folder.paths[i] for i in keep]
    return folder, images, labels, shas, paths, skipped


def _drop_duplicates(keep: list[int], shas: list[str | None], folder) -> tuple[list[int], list[tuple[str, str]]]:
    """Files with identical bytes are one sample: keep the first copy; a copy filed under two classes is a
    label conflict and every copy is dropped (it would leak across the split and teach both labels)."""
    by_sha: dict[str, list[int]] = {}
    for i in keep:
        by_sha.setdefault(shas[i], []).append(i)
    kept, dropped = [], []
    for i in keep:
        group = by_sha[shas[i]]
        names = sorted({folder.classes[folder.labels[j]] for j in group})
        if len(names) > 1:
            dropped.append((str(folder.paths[i]), f"same image content filed under classes {', '.join(names)}"))
        elif group[0] != i:
            dropped.append((str(folder.paths[i]), f"duplicate of {folder.paths[group[0]]}"))
        else:
            kept.append(i)
    return kept, dropped


def _plots(cfg: TrainConfig, history: list[dict[str, Any]], report: dict[str, Any],
           selection: dict[str, Any] | None = None) -> None:
    from edgexfer.plots import plot_confusion_matrix, plot_selection, plot_training_curves

    if selection:
        plot_selection(selection["candidates"], selection["chosen"], cfg.out / "plots" / "selection.png",
                       f"{cfg.backbone}, {selection['folds']}-fold cross-validation")
    if history:
        plot_training_curves(history, cfg.out / "plots" / "curves.png", f"{cfg.backbone} {cfg.mode}/{cfg.head}")
    plot_confusion_matrix(report["confusion_matrix"], report["classes"], cfg.out / "plots" / "confusion.png",
                          f"validation, accuracy {report['accuracy']:.3f}")


def _tool_versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"edgexfer": __version__, "python": platform.python_version()}
    for pkg in ("torch", "onnx", "onnxruntime", "onnxslim", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _pixel_backbone(bb: BackboneConfig, weights: Path | None):
    from edgexfer.backbones import build_backbone
    from edgexfer.pixel_model import PixelBackbone

    return PixelBackbone(build_backbone(bb.name, weights=weights), bb.mean, bb.std)


def _head_params(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.head == "linear":
        return {"C": cfg.C}
    if cfg.head == "mlp":
        return {"epochs": cfg.epochs or 200, "lr": cfg.lr, "seed": cfg.seed}
    return {}


def _frozen_features(cfg, bb, spec, classes, images, shas, paths, labels):
    """Export the pretrained backbone and return the features of every image (through the feature cache)."""
    from edgexfer.onnx_export import export_backbone
    from edgexfer.runtime.backends.registry import open_backend
    from edgexfer.runtime.cache import FeatureCache, SampleRecord
    from edgexfer.runtime.features import cached_features

    onnx_path = cfg.out / "backbone.onnx"
    _log("exporting the pretrained backbone to ONNX (features run through ONNX Runtime)", cfg.progress)
    export_backbone(_pixel_backbone(bb, cfg.weights), bb.input_size, onnx_path)
    backbone_sha = file_sha256(onnx_path)
    cache_path = cfg.cache or default_cache_path()
    with FeatureCache(cache_path, keep_images=False, per_class_capacity=None) as cache, \
            open_backend("onnxruntime", onnx_path) as backend:
        cache.add_samples([SampleRecord(sha, classes[int(lbl)], str(p)) for sha, lbl, p in zip(shas, labels, paths)])
        feats, rep = cached_features(backend, cache, backbone_sha, spec, shas,
                                     lambda i: resize_to_spec(images[i], spec), progress=cfg.progress)
    _log(f"features: {rep.extracted} extracted by the backbone, {rep.from_cache} from the cache ({cache_path})",
         cfg.progress)
    return feats, {"backbone_images_run": rep.extracted, "features_from_cache": rep.from_cache}


def _fit_frozen_head(kind, params, feats, labels, classes, train_idx, val_idx):
    trainer = HeadTrainer(kind, **params)
    head = trainer.fit(feats[train_idx], labels[train_idx], list(classes))
    history = list(getattr(trainer, "history", []) or [])
    return head, history, head.logits(feats[val_idx])


def _train_frozen(cfg, bb, spec, classes, images, shas, paths, labels, train_idx, val_idx):
    feats, extraction = _frozen_features(cfg, bb, spec, classes, images, shas, paths, labels)
    head, history, val_logits = _fit_frozen_head(cfg.head, _head_params(cfg), feats, labels, classes, train_idx,
                                                 val_idx)
    return head, history, extraction, val_logits


def _train_auto(cfg, bb, spec, classes, images, shas, paths, labels, train_idx, val_idx):
    """Cross-validate the candidates on the training split, then train the winner on all of it."""
    from edgexfer.selection import (
        Candidate,
        choose,
        frozen_candidates,
        score_budgeted,
        score_frozen,
        selection_report,
        stratified_folds,
    )

    feats, extraction = _frozen_features(cfg, bb, spec, classes, images, shas, paths, labels)
    y = labels[train_idx]
    folds = stratified_folds(y, cfg.folds, cfg.seed)
    _log(f"model selection: {len(folds)}-fold cross-validation on {len(train_idx)} training images", cfg.progress)
    scores = score_frozen(frozen_candidates(cfg.C, cfg.seed), feats[train_idx], y, classes, folds, cfg.progress)
    views = fit_partial = None
    if cfg.budget > 0:
        import torch

        from edgexfer.finetune import ViewCache, resolve_device

        recipe = partial_recipe(cfg)
        device = resolve_device(cfg.device)
        candidate = Candidate(f"partial last {recipe.unfreeze} blocks", "partial", "linear", recipe.to_dict())
        _log(f"partial candidate: {len(folds)} fine-tuning runs within --budget {cfg.budget:g} s", cfg.progress)
        with _torch_threads(torch):
            views = ViewCache.build(images, spec, bb, recipe, weights=cfg.weights, device=device, seed=cfg.seed,
                                    progress=cfg.progress, augment_idx=train_idx)

            def run_fold(tr, te, left):
                fit = views.fit(train_idx[tr], labels, classes, recipe, seed=cfg.seed, budget_s=left, device=device)
                return None if fit.stopped else fit.logits(train_idx[te])

            scores.append(score_budgeted(candidate, run_fold, y, folds, cfg.budget, setup_seconds=views.seconds))
            fit_partial = (recipe, device)
    chosen = choose(scores)
    for s in scores:
        line = f"{s.mean:.3f} ± {s.std:.3f}  ({sum(s.fold_seconds):.1f} s)" if s.complete else s.note
        _log(f"  {s.candidate.name:<28} {line}" + ("   <- chosen" if s is chosen else ""), cfg.progress)
    extraction["selection"] = selection_report(scores, chosen, len(folds), cfg.seed, len(train_idx))
    if chosen.candidate.mode == "partial":
        import torch

        recipe, device = fit_partial
        _log("training the chosen partial recipe on the whole training split", cfg.progress)
        with _torch_threads(torch):
            fit = views.fit(train_idx, labels, classes, recipe, seed=cfg.seed, eval_idx=val_idx, progress=cfg.progress,
                            device=device)
            head, val_logits = _export_partial(fit, cfg, bb), fit.logits(val_idx)
        extraction.update(fine_tuned=True, device=device, recipe=recipe.to_dict())
        return head, fit.history, extraction, val_logits
    head, history, val_logits = _fit_frozen_head(chosen.candidate.head, chosen.candidate.params, feats, labels,
                                                 classes, train_idx, val_idx)
    return head, history, extraction, val_logits


def _export_partial(fit, cfg: TrainConfig, bb: BackboneConfig) -> Head:
    """Write the fine-tuned backbone (ONNX and state dict) into the run; returns the numpy head."""
    from safetensors.torch import save_file

    from edgexfer.onnx_export import export_backbone

    model = fit.pixel_backbone()
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(cfg.out / "backbone.safetensors"))
    export_backbone(model, bb.input_size, cfg.out / "backbone.onnx")
    return fit.to_head()


def partial_recipe(cfg: TrainConfig) -> PartialRecipe:
    """The PartialRecipe a TrainConfig asks for: the measured defaults with the CLI's overrides."""
    from dataclasses import replace

    changes: dict[str, Any] = {"unfreeze": int(cfg.unfreeze), "head_lr": cfg.lr, "batch_size": cfg.batch_size,
                               "C": cfg.C}
    if cfg.backbone_lr is not None:
        changes["backbone_lr"] = cfg.backbone_lr
    if cfg.epochs is not None:
        changes["epochs"] = cfg.epochs
    if cfg.views is not None:
        changes["views"] = cfg.views
    return replace(_RECIPE, **changes)


def _train_partial(cfg, bb, spec, classes, images, labels, train_idx, val_idx):
    """Partial fine-tuning with edgexfer.finetune: frozen prefix once per stored view, epochs on the tail only."""
    if cfg.unfreeze == "all":
        return _train_partial_full(cfg, bb, spec, classes, images, labels, train_idx, val_idx)
    import torch

    from edgexfer.finetune import ViewCache, resolve_device

    device = resolve_device(cfg.device)
    recipe = partial_recipe(cfg)
    _log(f"frozen prefix: {len(images)} clean views + {recipe.views} augmented views of each of {len(train_idx)} "
         f"training images (once; epochs then run only the last {recipe.unfreeze} block(s))", cfg.progress)
    with _torch_threads(torch):
        cache = ViewCache.build(images, spec, bb, recipe, weights=cfg.weights, device=device, seed=cfg.seed,
                                progress=cfg.progress, augment_idx=train_idx)
        _log(f"fine-tuning the last {recipe.unfreeze} of {bb.num_blocks} blocks on {device}: head lr {recipe.head_lr:g}, "
             f"backbone lr {recipe.lr_of_backbone():g}, {recipe.epochs} epochs (fixed; no selection on validation)",
             cfg.progress)
        fit = cache.fit(train_idx, labels, classes, recipe, seed=cfg.seed, eval_idx=val_idx, progress=cfg.progress,
                        head_kind=cfg.head, device=device)
        history = fit.history
        history[-1]["best_epoch"] = history[-1]["epoch"]  # the epoch whose weights are kept: the last
        head = _export_partial(fit, cfg, bb)
        val_logits = fit.logits(val_idx)
    extraction = {"backbone_images_run": 0, "features_from_cache": 0, "device": device,
                  "prefix_seconds": round(cache.seconds, 2), "fit_seconds": round(fit.seconds, 2),
                  "recipe": recipe.to_dict()}
    return head, history, extraction, val_logits


class _torch_threads:
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


def _train_partial_full(cfg, bb, spec, classes, images, labels, train_idx, val_idx):
    """--unfreeze all: every layer trains, so there is no frozen prefix to cache (the slow path)."""
    import torch
    from torch import nn

    from edgexfer.finetune import resolve_device
    from edgexfer.onnx_export import export_backbone
    from edgexfer.pixel_model import TorchHead
    from edgexfer.runtime.augment import Augmenter

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = _pixel_backbone(bb, cfg.weights)
    net = model.backbone
    blocks = list(net._blocks)
    n_unfreeze = len(blocks) if cfg.unfreeze == "all" else int(cfg.unfreeze)
    first_trainable = len(blocks) - n_unfreeze
    for p in net.parameters():
        p.requires_grad_(False)
    trainable: list[nn.Module] = blocks[first_trainable:]
    if n_unfreeze > 0:
        trainable += [net._conv_head, net._bn1]  # the 1x1 head conv sits after the last block
    if cfg.unfreeze == "all":
        trainable += [net._conv_stem, net._bn0]
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    frozen_modules = [m for m in [net._conv_stem, net._bn0, *blocks, net._conv_head, net._bn1] if m not in trainable]

    def set_train_mode() -> None:
        model.train()
        for m in frozen_modules:  # frozen BatchNorm keeps its ImageNet statistics
            m.eval()

    def forward_features(x_uint8: torch.Tensor) -> torch.Tensor:
        x = x_uint8.to(device).permute(0, 3, 1, 2).to(torch.float32) * model.scale + model.shift
        # The frozen prefix needs no gradient: running it under no_grad saves memory and time.
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.unfreeze == "all"):
            x = net.act(net._bn0(net._conv_stem(x)))
            for block in blocks[:first_trainable]:
                x = block(x)
        for block in blocks[first_trainable:]:
            x = block(x)
        x = net.act(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3))

    val_pixels = torch.from_numpy(stack([resize_to_spec(images[i], spec) for i in val_idx]))
    train_pixels = stack([resize_to_spec(images[i], spec) for i in train_idx])
    num_classes = len(classes)
    head = TorchHead(cfg.head, bb.feature_dim, num_classes).to(device)
    model.to(device)

    def features_of(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        model.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(pixels), 32):
                chunk = pixels[s:s + 32]
                out.append(forward_features(torch.as_tensor(chunk)))
        return torch.cat(out)

    if cfg.head == "linear":
        # Linear probe first, then fine-tune (LP-FT): a head fitted on the pretrained features keeps the
        # first fine-tuning steps from wrecking the backbone with random-head gradients.
        _log("fitting the linear probe that starts fine-tuning", cfg.progress)
        probe = HeadTrainer("linear", C=cfg.C).fit(features_of(train_pixels).cpu().numpy(), labels[train_idx], list(classes))
        linear = head.net[1]
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.array(probe.tensors["W"])).to(device))
            linear.bias.copy_(torch.from_numpy(np.array(probe.tensors["b"])).to(device))

    epochs = cfg.epochs or 15
    steps_per_epoch = int(np.ceil(len(train_idx) / cfg.batch_size))
    backbone_lr = cfg.backbone_lr or (cfg.lr / 30 if cfg.unfreeze == "all" else cfg.lr / 10)
    groups = [{"params": list(head.parameters()), "lr": cfg.lr}]
    backbone_params = [p for m in trainable for p in m.parameters()]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": backbone_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, epochs * steps_per_epoch) / (epochs * steps_per_epoch))))
    counts = np.bincount(labels[train_idx], minlength=num_classes).astype(np.float32)
    class_weights = torch.from_numpy((len(train_idx) / (num_classes * np.maximum(counts, 1))).astype(np.float32)).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=0.1)
    augment = Augmenter(spec, **PartialRecipe().augment)
    y_val = torch.from_numpy(labels[val_idx]).to(device)
    history: list[dict[str, Any]] = []
    best = (-1.0, None, None, 0)
    since_best = 0
    _log(f"fine-tuning the last {n_unfreeze} of {len(blocks)} blocks, head lr {cfg.lr:g}, backbone lr {backbone_lr:g}, "
         f"up to {epochs} epochs", cfg.progress)
    for epoch in range(1, epochs + 1):
        torch.set_grad_enabled(True)  # a caller may have switched autograd off globally
        set_train_mode()
        head.train()
        order = rng.permutation(train_idx)
        total_loss, correct = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not cfg.progress,
                   leave=False)
        for step in bar:
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x = torch.from_numpy(stack([augment(images[i], rng) for i in idx]))
            y = torch.from_numpy(labels[idx]).to(device)
            logits = head(forward_features(x))
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
        head.eval()
        with torch.no_grad():
            val_logits = head(features_of(val_pixels))
            val_loss = float(nn.functional.cross_entropy(val_logits, y_val))
            val_acc = float((val_logits.argmax(1) == y_val).float().mean())
        history.append({"epoch": epoch, "train_loss": round(total_loss / len(train_idx), 5),
                        "train_accuracy": round(correct / len(train_idx), 5),
                        "val_loss": round(val_loss, 5), "val_accuracy": round(val_acc, 5)})
        _log(f"epoch {epoch}: train loss {total_loss / len(train_idx):.3f}, val accuracy {val_acc:.3f}", cfg.progress)
        if val_acc > best[0]:
            best = (val_acc, {k: v.clone() for k, v in net.state_dict().items()},
                    {k: v.clone() for k, v in head.state_dict().items()}, epoch)
            since_best = 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                _log(f"early stop: no better validation accuracy for {cfg.patience} epochs", cfg.progress)
                break
    net.load_state_dict(best[1])
    head.load_state_dict(best[2])
    history[-1]["best_epoch"] = best[3]
    model.cpu().eval()  # export from a CPU copy: backbone.onnx does not depend on the training device
    head.cpu().eval()
    device_used = device
    device = "cpu"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(cfg.out / "backbone.safetensors"))
    export_backbone(model, bb.input_size, cfg.out / "backbone.onnx")
    head_np = Head(kind=cfg.head, classes=tuple(classes), tensors=head.numpy_tensors())
    head_np.validate()
    with torch.no_grad():
        val_logits = head_np.logits(features_of(val_pixels).numpy())
    extraction = {"backbone_images_run": 0, "features_from_cache": 0, "device": device_used}
    return head_np, history, extraction, val_logits
