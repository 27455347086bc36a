"""``edgexfer train``: fine-tune a classifier on labelled data, whatever the backbone reads.

The data's modality (:func:`edgexfer.modalities.modality_of_data`: an ImageFolder tree, a folder of ``.txt``
class folders, a CSV/JSONL file) picks the host modality that reads it; this module drives the recipes the
same way for every modality and writes the run directory (``run.json``, ``metrics.json``, ``head.safetensors``,
``backbone.onnx``, ``plots/``). Three recipes:

* ``frozen`` (default) — the pretrained backbone is a fixed feature extractor. It is exported to ONNX
  first and run through the runtime's own engine and feature cache, so each sample goes through the
  backbone once, ever; the head is then trained in numpy on cached features (the device retrains the
  same way).
* ``partial`` — the last N blocks (MBConv blocks and the 1x1 head convolution after them; transformer
  layers) are fine-tuned: the frozen prefix runs once per sample (per stored view for images), epochs run
  only the tail; LP-FT from the converged linear probe, a tail learning rate below the head's, a cosine
  schedule, a fixed epoch count (the validation split is only reported, never used to pick an epoch) and a
  final head refit by ``fit_linear``. The defaults are the modality's ``PARTIAL_DEFAULTS``
  (:class:`edgexfer.partial_recipe.PartialRecipe`, measured by ``benchmarks/finetune_study.py`` on images).
  ``--unfreeze all`` (images) keeps the slow path (every image through the whole network every epoch,
  early stopping on validation accuracy). Under ``torchrun`` (images) several processes share the work
  (:mod:`edgexfer.distributed`): each runs the frozen prefix on its shard, DistributedDataParallel all-reduces the
  gradients, and only rank 0 logs and writes the run directory.
* ``auto`` — seeded stratified k-fold cross-validation of the frozen heads and, within ``--budget``
  seconds, of the partial candidate (:mod:`edgexfer.selection`); the frozen linear head unless another
  beats it credibly.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.backbones import BackboneConfig, backbone_config, backbone_record
from edgexfer.data import check_workers, stratified_split
from edgexfer.metrics import classification_report
from edgexfer.modalities import host_modality, modality_of_data
from edgexfer.modalities.base import HostModality, LabelledData
from edgexfer.partial_recipe import PartialRecipe
from edgexfer.run_record import default_cache_path, log, tool_versions, torch_threads, write_plots
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import file_sha256, write_atomic
from edgexfer.runtime.head_training import HeadTrainer
from edgexfer.runtime.names import HEAD_KINDS, TRAIN_MODES

RUN_SCHEMA = "edgexfer.run/1"
_RECIPE = PartialRecipe()  # the measured partial defaults (edgexfer.finetune imports torch only when training)

__all__ = ["RUN_SCHEMA", "TrainConfig", "TrainResult", "default_cache_path", "train"]


@dataclass
class TrainConfig:
    data_dir: Path
    out: Path
    #: None: chosen by the data (its host modality's default_backbone: efficientnet_lite0, minilm_l6)
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
    #: a brought backbone's (``py:``) preprocessing: (height, width), per-channel mean and std of [0, 1] RGB
    input_size: tuple[int, int] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    output: str | None = None  #: an ``onnx:`` backbone's features output, when it has several
    folds: int = 5  #: auto mode: folds of the cross-validation
    budget: float = 1200.0  #: auto mode: seconds for cross-validating the partial candidate (0: frozen heads only)
    workers: int | None = None  #: threads that read and decode samples (default: the cores, at most 4)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    val_accuracy: float
    metrics: dict[str, Any]
    skipped: list[tuple[str, str]]
    noun: str = "sample"  #: one sample of the run's modality, for messages ("image", "text")
    written: bool = True  #: False on the torchrun processes other than rank 0 (which write nothing)



def _validate(cfg: TrainConfig, bb: BackboneConfig) -> None:
    """Refuse options that no modality accepts, before any sample is read."""
    if cfg.mode not in TRAIN_MODES:
        raise InputError("unknown --mode", got=repr(cfg.mode), expected=", ".join(TRAIN_MODES))
    if cfg.head not in HEAD_KINDS:
        raise InputError("unknown --head", got=repr(cfg.head), expected=", ".join(HEAD_KINDS))
    if cfg.mode == "partial" and cfg.head == "prototype":
        raise InputError("--head prototype has nothing to fine-tune", got="--mode partial --head prototype",
                         expected="--head linear or mlp with --mode partial", todo="use --mode frozen for prototype heads")
    if not 0.05 <= cfg.val_fraction <= 0.5:
        raise InputError("--val-fraction out of range", got=cfg.val_fraction, expected="0.05 to 0.5")
    if bb.num_blocks == 0 and (cfg.mode == "partial" or (cfg.mode == "auto" and cfg.budget > 0)):
        raise InputError(f"backbone {bb.name} has no blocks that partial fine-tuning can cut", got=f"--mode {cfg.mode}",
                         expected="a model whose forward runs its top-level children in sequence (what --unfreeze "
                         "counts)", todo="use --mode frozen (or --mode auto --budget 0), or write the model as a "
                         "sequence of blocks")
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

        resolve_device(cfg.device)  # --device cuda without CUDA fails here, before any sample is read
    if cfg.views is not None and cfg.views < 0:
        raise InputError("--views", got=cfg.views, expected="0 or more")



def train(cfg: TrainConfig) -> TrainResult:
    """Run one training job and write the run directory; see the module docstring.

    Under torchrun every process calls this; rank 0 writes the run and returns its result, the others return
    a result with ``written`` False."""
    from edgexfer import distributed

    modality = modality_of_data(Path(cfg.data_dir))
    cfg.backbone = cfg.backbone or modality.default_backbone
    bb = backbone_config(cfg.backbone, weights=cfg.weights, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std,
                         output=cfg.output)
    if bb.modality != modality.name:
        raise InputError(f"backbone {bb.name} reads {host_modality(bb.modality).plural}",
                         got=f"{modality.noun} data in {cfg.data_dir}", expected=f"a {modality.noun} backbone",
                         todo=f"pass --backbone {modality.default_backbone} or leave --backbone out")
    _validate(cfg, bb)
    modality.check_config(cfg, bb)
    world = _join(cfg, modality)
    try:
        result = _train(replace(cfg, progress=cfg.progress and world.is_main), bb, modality, world)
    except BaseException:
        distributed.leave(clean=False)  # no barrier: torchrun stops the other processes when this one fails
        raise
    distributed.leave()
    return result


def _join(cfg: TrainConfig, modality: HostModality):
    """This process's place under torchrun (one process without it); refuses what only one process runs."""
    from edgexfer import distributed

    size = distributed.launched()
    if size == 1:
        return distributed.current()
    if cfg.mode != "partial" or cfg.unfreeze == "all" or not modality.distributed_partial:
        raise InputError("torchrun runs only partial fine-tuning of the last blocks of an image backbone",
                         got=f"{size} processes, --mode {cfg.mode} --unfreeze {cfg.unfreeze}, {modality.noun} data",
                         expected="--mode partial --unfreeze N on images",
                         todo="run this training as one process (without torchrun)")
    from edgexfer.finetune import resolve_device

    return distributed.join(resolve_device(cfg.device))


# long: the one sequence of a training job (read, split, train by mode, report, write run.json); the writing
# steps read most of the locals of the training steps.
def _train(cfg: TrainConfig, bb: BackboneConfig, modality: HostModality, world) -> TrainResult:
    started = time.time()
    workers = check_workers(cfg.workers)
    data = modality.load(cfg, bb)
    if world.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "plots").mkdir(exist_ok=True)
        modality.start_run(data, cfg.out)
    # Samples are read while their features are extracted (or checked first, when no feature is cached):
    # one that cannot be read leaves the data set before the split, as if it had never been there.
    if cfg.mode in ("frozen", "auto"):
        feats, extraction, data = _frozen_features(cfg, bb, modality, data, workers)
    else:
        data = _drop_failed(cfg, modality, data, _check_readable(cfg, modality, data, workers, world))
    labels = data.labels
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
    log(f"split: {len(train_idx)} train / {len(val_idx)} validation {modality.plural} (seed {cfg.seed})", cfg.progress)
    if cfg.mode == "frozen":
        head, history, val_logits = _fit_frozen_head(cfg.head, _head_params(cfg), feats, data, train_idx, val_idx)
    elif cfg.mode == "auto":
        head, history, extraction, val_logits = _train_auto(cfg, bb, modality, data, train_idx, val_idx, feats,
                                                            extraction)
    elif cfg.unfreeze == "all":
        head, history, extraction, val_logits = modality.train_all_layers(cfg, bb, data, train_idx, val_idx)
    else:
        head, history, extraction, val_logits = _train_partial(cfg, bb, modality, data, train_idx, val_idx, world)
    if not world.is_main:
        accuracy = float((val_logits.argmax(axis=1) == labels[val_idx]).mean())
        return TrainResult(cfg.out, accuracy, {}, list(data.skipped), modality.noun, written=False)
    head.save(cfg.out / "head.safetensors")
    if "device" in extraction:
        on = f" ({world.size} processes, {world.backend})" if world.sharded else ""
        log(f"partial training ran on {extraction['device']}{on}", cfg.progress)

    report = classification_report(labels[val_idx], val_logits.argmax(axis=1), data.classes)
    metrics = {
        "schema": "edgexfer.metrics/1", **data.header, "mode": cfg.mode, "head": head.kind, "backbone": cfg.backbone,
        "val_accuracy": report["accuracy"], "val_count": int(len(val_idx)), "train_count": int(len(train_idx)),
        "history": history, "validation": report, "device": extraction.get("device", "cpu"), "processes": world.size,
        "backbone_images_run": extraction["backbone_images_run"],  # samples through the backbone (name kept)
        "features_from_cache": extraction.get("features_from_cache", 0), **modality.counters(data),
        **data.metrics_extra, **{k: extraction[k] for k in ("prefix_seconds", "fit_seconds") if k in extraction},
        "skipped": [{"path": p, "reason": r} for p, r in data.skipped],
        "seconds": round(time.time() - started, 2),
    }
    metrics.update({key: extraction[key] for key in modality.metrics_keys if key in extraction})
    write_atomic(cfg.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())
    weights_sha = bb.weight_sha256 if cfg.weights is None else file_sha256(cfg.weights)
    run = {
        "schema": RUN_SCHEMA, **data.header,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "progress"},
        "backbone": {"arch": bb.name, "weights_sha256": weights_sha,
                     "fine_tuned": bool(extraction.get("fine_tuned", cfg.mode == "partial")),
                     "onnx_sha256": file_sha256(cfg.out / "backbone.onnx"), **modality.backbone_record(bb),
                     "feature_dim": bb.feature_dim, **backbone_record(bb)},
        "preprocess": data.preprocess,
        "classes": list(data.classes),
        "data_root": str(Path(data.root).resolve()),
        "train": [modality.run_entry(data, i) for i in train_idx],
        "val": [modality.run_entry(data, i) for i in val_idx],
        "val_accuracy": report["accuracy"], **data.run_extra,
        "tools": tool_versions(),
    }
    write_atomic(cfg.out / "run.json", (json.dumps(run, indent=2) + "\n").encode())
    write_plots(cfg, history, report, metrics.get("selection"))
    log(f"validation accuracy {report['accuracy']:.3f} ({cfg.mode}/{head.kind}, {len(val_idx)} {modality.plural}); "
        f"{data.summary}; run written to {cfg.out}", cfg.progress)
    return TrainResult(cfg.out, report["accuracy"], metrics, list(data.skipped), modality.noun)


def _head_params(cfg: TrainConfig) -> dict[str, Any]:
    if cfg.head == "linear":
        return {"C": cfg.C}
    if cfg.head == "mlp":
        return {"epochs": cfg.epochs or 200, "lr": cfg.lr, "seed": cfg.seed}
    return {}


def _frozen_features(cfg: TrainConfig, bb: BackboneConfig, modality: HostModality, data: LabelledData, workers: int):
    """Export the pretrained backbone; the features of every readable sample (through the feature cache),
    the extraction facts, and the data without the samples that could not be read."""
    from edgexfer.runtime.backends.registry import open_reference
    from edgexfer.runtime.cache import FeatureCache

    onnx_path = cfg.out / "backbone.onnx"
    log(f"exporting the pretrained {modality.noun} backbone to ONNX (features run through ONNX Runtime)", cfg.progress)
    modality.export_pretrained(bb, cfg.weights, onnx_path)
    backbone_sha = file_sha256(onnx_path)
    cache_path = cfg.cache or default_cache_path()
    with FeatureCache(cache_path, keep_images=False, per_class_capacity=None) as cache, \
            open_reference(onnx_path) as backend:
        cache.add_samples(modality.sample_records(data))
        feats, rep, failed = modality.features(backend, cache, backbone_sha, data, workers=workers,
                                               progress=cfg.progress)
    log(f"features: {rep.extracted} extracted by the backbone, {rep.from_cache} from the cache ({cache_path})",
        cfg.progress)
    data = _drop_failed(cfg, modality, data, failed)
    if not np.isfinite(feats).all():
        raise InputError(f"backbone {bb.name} gives NaN or infinite features",
                         got=f"{int((~np.isfinite(feats)).sum())} non-finite values in {len(feats)} feature vectors",
                         expected="finite features", todo="check the weights and the preprocessing (--mean, --std)")
    return feats, {"backbone_images_run": rep.extracted, "features_from_cache": rep.from_cache}, data


def _check_readable(cfg: TrainConfig, modality: HostModality, data: LabelledData, workers: int, world):
    """The samples that fail to read; under torchrun each process reads its share and all learn every failure
    (they must drop the same samples to make the same split)."""
    if not world.sharded:
        return modality.check_readable(data, workers=workers, progress=cfg.progress)
    mine = range(world.rank, len(data.labels), world.size)
    failed: dict[int, str] = {}
    for part in world.gather_objects(modality.check_readable(data, workers=workers, progress=cfg.progress, only=mine)):
        failed.update(part)
    return dict(sorted(failed.items()))


def _drop_failed(cfg: TrainConfig, modality: HostModality, data: LabelledData, failed: dict[int, str]) -> LabelledData:
    if not failed:
        return data
    from edgexfer.data import describe_skipped

    kept = modality.drop(data, failed)
    log(describe_skipped([(Path(p), r) for p, r in kept.skipped[len(data.skipped):]]), cfg.progress)
    return kept


def _fit_frozen_head(kind, params, feats, data: LabelledData, train_idx, val_idx):
    trainer = HeadTrainer(kind, **params)
    head = trainer.fit(feats[train_idx], data.labels[train_idx], list(data.classes))
    history = list(getattr(trainer, "history", []) or [])
    return head, history, head.logits(feats[val_idx])


def _train_partial(cfg, bb, modality: HostModality, data: LabelledData, train_idx, val_idx, world):
    """Partial fine-tuning: the frozen prefix once (per sample or stored view), epochs on the tail only.
    Under torchrun every process trains; only rank 0 exports (the others return no head)."""
    import torch

    tuner = modality.tuner(cfg, bb, data, train_idx, head_kind=cfg.head)
    recipe = tuner.recipe
    with torch_threads(torch):
        tuner.prepare()
        log(f"fine-tuning the last {recipe.unfreeze} of {bb.num_blocks} {modality.layer_noun}s on {tuner.device}: "
            f"head lr {recipe.head_lr:g}, backbone lr {recipe.lr_of_backbone():g}, {recipe.epochs} epochs (fixed; "
            "no selection on validation)", cfg.progress)
        fit = tuner.fit(train_idx, eval_idx=val_idx, progress=cfg.progress, head_kind=cfg.head)
        tuner.keep_last_epoch(fit.history)
        head = tuner.export(fit, cfg.out) if world.is_main else None
        val_logits = fit.logits(val_idx)  # every process takes part (each holds a shard of the validation views)
    extraction = {"backbone_images_run": 0, "features_from_cache": 0, "device": tuner.device, "fine_tuned": True,
                  "prefix_seconds": round(tuner.seconds, 2), "fit_seconds": round(fit.seconds, 2),
                  "recipe": tuner.report}
    return head, fit.history, extraction, val_logits


def _train_auto(cfg, bb, modality: HostModality, data: LabelledData, train_idx, val_idx, feats, extraction):
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

    labels = data.labels
    y = labels[train_idx]
    folds = stratified_folds(y, cfg.folds, cfg.seed)
    log(f"model selection: {len(folds)}-fold cross-validation on {len(train_idx)} training {modality.plural}",
        cfg.progress)
    scores = score_frozen(frozen_candidates(cfg.C, cfg.seed), feats[train_idx], y, data.classes, folds, cfg.progress)
    tuner: Any = None
    if cfg.budget > 0:
        import torch

        tuner = modality.tuner(cfg, bb, data, train_idx)
        candidate = Candidate(f"partial last {tuner.recipe.unfreeze} {modality.layer_noun}s", "partial", "linear",
                              tuner.report)
        log(f"partial candidate: {len(folds)} fine-tuning runs within --budget {cfg.budget:g} s", cfg.progress)
        with torch_threads(torch):
            tuner.prepare()

            def run_fold(tr, te, left):
                fit = tuner.fit(train_idx[tr], budget_s=left)
                return None if fit is None else fit.logits(train_idx[te])

            scores.append(score_budgeted(candidate, run_fold, y, folds, cfg.budget, setup_seconds=tuner.seconds))
    chosen = choose(scores)
    for s in scores:
        line = f"{s.mean:.3f} ± {s.std:.3f}  ({sum(s.fold_seconds):.1f} s)" if s.complete else s.note
        log(f"  {s.candidate.name:<28} {line}" + ("   <- chosen" if s is chosen else ""), cfg.progress)
    extraction["selection"] = selection_report(scores, chosen, len(folds), cfg.seed, len(train_idx))
    if chosen.candidate.mode == "partial":
        import torch

        log("training the chosen partial recipe on the whole training split", cfg.progress)
        with torch_threads(torch):
            fit = tuner.fit(train_idx, eval_idx=val_idx, progress=cfg.progress)
            head, val_logits = tuner.export(fit, cfg.out), fit.logits(val_idx)
        extraction.update(fine_tuned=True, device=tuner.device, recipe=tuner.report)
        return head, fit.history, extraction, val_logits
    head, history, val_logits = _fit_frozen_head(chosen.candidate.head, chosen.candidate.params, feats, data,
                                                 train_idx, val_idx)
    return head, history, extraction, val_logits
