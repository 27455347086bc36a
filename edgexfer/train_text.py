"""``edgexfer train`` on text data: a folder per class of ``.txt`` files, or a CSV/JSONL file of ``text,label``.

The same recipes and arguments as images (:mod:`edgexfer.train`), on a text backbone (``minilm_l6``):

* ``frozen`` (default): the pretrained backbone is exported to ``backbone.onnx`` first and every text goes
  through the runtime's own engine and feature cache (:func:`edgexfer.runtime.features.cached_features`,
  the device's code path), once ever; the head is trained in numpy on the cached features.
* ``partial``: the last N transformer layers (``--unfreeze N``, default 2 of 6) are fine-tuned in torch with
  a learning rate below the head's (``--backbone-lr``, default head lr / 10). The frozen prefix (embeddings
  and the first 6 - N layers) runs once per text; epochs run only the tail. LP-FT: the head starts from the
  linear probe on the pretrained features, and after the epochs the linear head is refitted (``fit_linear``)
  on the tuned features, as the image recipe does.
* ``auto``: seeded stratified k-fold cross-validation of the frozen heads and, within ``--budget``
  seconds, of the partial candidate (:mod:`edgexfer.selection`); the frozen linear head unless another
  beats it credibly.

Tokenization is :mod:`edgexfer.runtime.text` with the backbone's ``tokenizer.json`` (copied into the run,
shipped in the bundle); texts longer than ``max_length`` tokens are truncated and counted.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.backbones import BackboneConfig
from edgexfer.data import describe_skipped, stratified_split
from edgexfer.metrics import classification_report
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import file_sha256, write_atomic
from edgexfer.runtime.head_training import HeadTrainer
from edgexfer.runtime.heads import Head
from edgexfer.runtime.text import TextTokenizer
from edgexfer.runtime.textdata import TextDataset, read_text_dataset

#: epochs of partial fine-tuning on text (a fixed count; the validation split is only reported)
TEXT_EPOCHS = 4
#: label smoothing and weight decay of partial fine-tuning (the image recipe's)
LABEL_SMOOTHING = 0.1
WEIGHT_DECAY = 1e-4


def _log(msg: str, progress: bool = True) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def load_text_data(data_dir: Path, tokenizer: TextTokenizer, *, progress: bool = True) -> tuple[TextDataset, int]:
    """Read a text data set as ``train`` does; returns it and how many of its texts will be truncated."""
    ds = read_text_dataset(data_dir)
    _log(f"data: {len(ds.samples)} texts in {len(ds.classes)} classes from {ds.root} ({ds.form})", progress)
    if ds.skipped:
        _log(describe_skipped([(Path(p), r) for p, r in ds.skipped]), progress)
    truncated = sum(tokenizer.truncated(ds.texts))
    if truncated:
        _log(f"{truncated} text(s) longer than {tokenizer.max_length} tokens: truncated", progress)
    return ds, truncated


def train_text(cfg, bb: BackboneConfig):
    """Run one training job on text data and write the run directory; see the module docstring."""
    from edgexfer.train import TrainResult, _plots, _tool_versions

    if cfg.views is not None:
        raise InputError("--views with text data", got=f"--views {cfg.views}",
                         expected="no views: augmented views are crops and flips of images", todo="leave --views out")
    if cfg.unfreeze == "all":
        raise InputError("--unfreeze all with a text backbone", got="all", expected=f"a number of last layers 0..{bb.num_blocks}",
                         todo=f"use --unfreeze {bb.num_blocks} to fine-tune every transformer layer")
    started = time.time()
    tokenizer = TextTokenizer.from_file(bb.tokenizer_path(), bb.max_length)
    ds, truncated = load_text_data(cfg.data_dir, tokenizer, progress=cfg.progress)
    labels = np.array(ds.labels, dtype=np.int64)
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
    _log(f"split: {len(train_idx)} train / {len(val_idx)} validation texts (seed {cfg.seed})", cfg.progress)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "plots").mkdir(exist_ok=True)
    shutil.copy2(tokenizer.path, cfg.out / "tokenizer.json")

    if cfg.mode == "frozen":
        feats, extraction = frozen_text_features(cfg, bb, tokenizer, ds)
        head, history, val_logits = _fit_head(cfg.head, _head_params(cfg), feats, labels, ds.classes, train_idx, val_idx)
    elif cfg.mode == "auto":
        head, history, extraction, val_logits = _train_auto(cfg, bb, tokenizer, ds, labels, train_idx, val_idx)
    else:
        head, history, extraction, val_logits = _train_partial(cfg, bb, tokenizer, ds, labels, train_idx, val_idx)
    head.save(cfg.out / "head.safetensors")

    report = classification_report(labels[val_idx], val_logits.argmax(axis=1), ds.classes)
    metrics = {
        "schema": "edgexfer.metrics/1", "modality": "text", "mode": cfg.mode, "head": head.kind,
        "backbone": bb.name, "val_accuracy": report["accuracy"], "val_count": int(len(val_idx)),
        "train_count": int(len(train_idx)), "history": history, "validation": report,
        "device": extraction.get("device", "cpu"),
        "backbone_images_run": extraction["backbone_images_run"],  # samples through the backbone (name kept)
        "features_from_cache": extraction.get("features_from_cache", 0),
        "truncated": truncated, "max_length": tokenizer.max_length,
        "skipped": [{"path": p, "reason": r} for p, r in ds.skipped],
        "seconds": round(time.time() - started, 2),
    }
    for key in ("selection", "recipe"):
        if key in extraction:
            metrics[key] = extraction[key]
    write_atomic(cfg.out / "metrics.json", (json.dumps(metrics, indent=2) + "\n").encode())

    def entry(i: int) -> dict[str, Any]:
        s = ds.samples[i]
        return {"source": s.source, "sha256": s.sha256, "label": int(s.label), "text": s.text}

    run = {
        "schema": "edgexfer.run/1",
        "modality": "text",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "progress"},
        "backbone": {"arch": bb.name, "weights_sha256": bb.weight_sha256 if cfg.weights is None else file_sha256(cfg.weights),
                     "fine_tuned": bool(extraction.get("fine_tuned", False)),
                     "onnx_sha256": file_sha256(cfg.out / "backbone.onnx"), "feature_dim": bb.feature_dim},
        "preprocess": {"tokenizer": "tokenizer.json", "tokenizer_sha256": tokenizer.sha256,
                       "max_length": tokenizer.max_length},
        "classes": list(ds.classes),
        "data_root": str(Path(ds.root).resolve()),
        # the texts travel in the run: export checks the ONNX model on them and picks golden texts and
        # exemplars (a CSV row has no file of its own to point at)
        "train": [entry(i) for i in train_idx],
        "val": [entry(i) for i in val_idx],
        "val_accuracy": report["accuracy"],
        "truncated": truncated,
        "tools": _tool_versions(),
    }
    write_atomic(cfg.out / "run.json", (json.dumps(run, indent=2) + "\n").encode())
    _plots(cfg, history, report, metrics.get("selection"))
    _log(f"validation accuracy {report['accuracy']:.3f} ({cfg.mode}/{head.kind}, {len(val_idx)} texts); "
         f"skipped {len(ds.skipped)}, truncated {truncated}; run written to {cfg.out}", cfg.progress)
    return TrainResult(cfg.out, report["accuracy"], metrics, list(ds.skipped))


def _head_params(cfg) -> dict[str, Any]:
    if cfg.head == "linear":
        return {"C": cfg.C}
    if cfg.head == "mlp":
        return {"epochs": cfg.epochs or 200, "lr": cfg.lr, "seed": cfg.seed}
    return {}


def _fit_head(kind, params, feats, labels, classes, train_idx, val_idx):
    trainer = HeadTrainer(kind, **params)
    head = trainer.fit(feats[train_idx], labels[train_idx], list(classes))
    return head, list(getattr(trainer, "history", []) or []), head.logits(feats[val_idx])


def _text_model(bb: BackboneConfig, weights: Path | None):
    from edgexfer.backbones import build_backbone

    return build_backbone(bb.name, weights=weights).eval()


def frozen_text_features(cfg, bb: BackboneConfig, tokenizer: TextTokenizer, ds: TextDataset):
    """Export the pretrained text backbone and return the features of every text (through the feature cache)."""
    from edgexfer.onnx_export import export_text_backbone
    from edgexfer.runtime.backends.registry import open_backend
    from edgexfer.runtime.cache import FeatureCache, SampleRecord
    from edgexfer.runtime.features import cached_features, text_batches
    from edgexfer.train import default_cache_path

    onnx_path = cfg.out / "backbone.onnx"
    _log("exporting the pretrained text backbone to ONNX (features run through ONNX Runtime)", cfg.progress)
    export_text_backbone(_text_model(bb, cfg.weights), onnx_path, bb.feature_dim)
    backbone_sha = file_sha256(onnx_path)
    cache_path = cfg.cache or default_cache_path()
    with FeatureCache(cache_path, keep_images=False, per_class_capacity=None) as cache, \
            open_backend("onnxruntime", onnx_path) as backend:
        cache.add_samples([SampleRecord(s.sha256, ds.classes[s.label], s.source) for s in ds.samples])
        feats, rep = cached_features(backend, cache, backbone_sha, tokenizer.spec, ds.shas, progress=cfg.progress,
                                     desc="extracting text features", **text_batches(tokenizer, ds.texts))
    _log(f"features: {rep.extracted} extracted by the backbone, {rep.from_cache} from the cache ({cache_path})",
         cfg.progress)
    return feats, {"backbone_images_run": rep.extracted, "features_from_cache": rep.from_cache}


# ------------------------------------------------------------------------------------------ partial
class TextTail:
    """A MiniLM split at layer ``cut``: the prefix's token states are computed once per text, epochs run the tail.

    ``states[i]`` is text i's ``[L_i, hidden]`` states after the embeddings and the first ``cut`` layers
    (its padding dropped); a batch pads them again to its longest text.
    """

    def __init__(self, model, unfreeze: int, tokenizer: TextTokenizer, texts: list[str], *, progress: bool = True):
        import torch

        self.model = model.eval()
        layers = model.encoder.layer
        self.cut = len(layers) - unfreeze
        self.tail_layers = layers[self.cut:]
        started = time.perf_counter()
        self.states: list[Any] = [None] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.no_grad():
            for start in range(0, len(order), 32):
                chunk = order[start:start + 32]
                batch = tokenizer.encode([texts[i] for i in chunk])
                ids, mask = torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
                x = model.embeddings(ids)
                bias = _mask_bias(mask)
                for layer in layers[:self.cut]:
                    x = layer(x, bias)
                for j, i in enumerate(chunk):
                    self.states[i] = x[j, :int(mask[j].sum())].clone()
        self.seconds = time.perf_counter() - started
        _log(f"frozen prefix: {len(texts)} texts through the embeddings and {self.cut} layer(s) in "
             f"{self.seconds:.1f} s", progress)

    def features(self, idx) -> Any:
        """Pooled, L2-normalised features of texts ``idx`` through the tail (gradients flow when enabled)."""
        import torch
        import torch.nn.functional as F

        rows = [self.states[int(i)] for i in idx]
        length = max(r.shape[0] for r in rows)
        x = torch.zeros((len(rows), length, rows[0].shape[1]), dtype=rows[0].dtype)
        mask = torch.zeros((len(rows), length), dtype=torch.int64)
        for j, r in enumerate(rows):
            x[j, :r.shape[0]] = r
            mask[j, :r.shape[0]] = 1
        bias = _mask_bias(mask)
        for layer in self.tail_layers:
            x = layer(x, bias)
        w = mask.to(x.dtype)[:, :, None]
        return F.normalize((x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9), p=2.0, dim=1)

    def all_features(self, idx) -> np.ndarray:
        import torch

        idx = np.asarray(idx)
        order = idx[np.argsort([self.states[int(i)].shape[0] for i in idx], kind="stable")]
        out = {}
        with torch.no_grad():
            for start in range(0, len(order), 64):
                chunk = order[start:start + 64]
                for i, f in zip(chunk, self.features(chunk).numpy()):
                    out[int(i)] = f
        return np.stack([out[int(i)] for i in idx]).astype(np.float32)

    def snapshot(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.tail_layers.state_dict().items()}

    def restore(self, state: dict[str, Any]) -> None:
        self.tail_layers.load_state_dict(state)

    def fit(self, train_idx, labels: np.ndarray, classes, *, head_lr: float, backbone_lr: float, epochs: int,
            batch_size: int, C: float, seed: int, eval_idx=None, budget_s: float | None = None,
            progress: bool = True) -> tuple[Head | None, list[dict[str, Any]]]:
        """Fine-tune the tail (LP-FT) and refit the linear head on the tuned features; None when over budget.

        The tail's weights are left tuned (callers restore a :meth:`snapshot` between folds).
        """
        import torch
        from torch import nn

        started = time.perf_counter()
        train_idx = np.asarray(train_idx)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        y_all = torch.from_numpy(labels)
        probe = HeadTrainer("linear", C=C).fit(self.all_features(train_idx), labels[train_idx], list(classes))
        head = nn.Linear(self.model.feature_dim, len(classes))
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(np.array(probe.tensors["W"])))
            head.bias.copy_(torch.from_numpy(np.array(probe.tensors["b"])))
        params = [p for layer in self.tail_layers for p in layer.parameters()]
        optimizer = torch.optim.AdamW([{"params": list(head.parameters()), "lr": head_lr},
                                       {"params": params, "lr": backbone_lr}], weight_decay=WEIGHT_DECAY)
        steps = epochs * int(np.ceil(len(train_idx) / batch_size))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
        counts = np.bincount(labels[train_idx], minlength=len(classes)).astype(np.float32)
        weights = torch.from_numpy((len(train_idx) / (len(classes) * np.maximum(counts, 1))).astype(np.float32))
        loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=LABEL_SMOOTHING)
        history: list[dict[str, Any]] = []
        for epoch in range(1, epochs + 1):
            self.tail_layers.train()
            order = rng.permutation(train_idx)
            total = 0.0
            for start in range(0, len(order), batch_size):
                if budget_s is not None and time.perf_counter() - started > budget_s:
                    return None, history
                idx = order[start:start + batch_size]
                with torch.enable_grad():
                    loss = loss_fn(head(self.features(idx)), y_all[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
                scheduler.step()
                total += float(loss.detach()) * len(idx)
            self.tail_layers.eval()
            row: dict[str, Any] = {"epoch": epoch, "train_loss": round(total / len(train_idx), 5)}
            if eval_idx is not None and len(eval_idx):
                with torch.no_grad():
                    logits = head(torch.from_numpy(self.all_features(eval_idx)))
                row["val_accuracy"] = round(float((logits.argmax(1).numpy() == labels[eval_idx]).mean()), 5)
            history.append(row)
            _log(f"epoch {epoch}/{epochs}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"), progress)
        # the final head: the converged linear probe of the tuned features, not the drifted SGD head
        final = HeadTrainer("linear", C=C).fit(self.all_features(train_idx), labels[train_idx], list(classes))
        return final, history


def _mask_bias(mask):
    import torch

    from edgexfer.backbones.minilm import MASK_VALUE

    return (1.0 - mask[:, None, None, :].to(torch.float32)) * MASK_VALUE


def _partial_settings(cfg, bb: BackboneConfig) -> dict[str, Any]:
    unfreeze = int(cfg.unfreeze)
    if not 0 < unfreeze <= bb.num_blocks:
        raise InputError("--unfreeze", got=repr(cfg.unfreeze), expected=f"1..{bb.num_blocks} transformer layers")
    return {"unfreeze": unfreeze, "head_lr": cfg.lr, "backbone_lr": cfg.backbone_lr or cfg.lr / 10,
            "epochs": cfg.epochs or TEXT_EPOCHS, "batch_size": cfg.batch_size, "C": cfg.C}


def _export_tuned(model, cfg, bb: BackboneConfig) -> None:
    from safetensors.torch import save_file

    from edgexfer.onnx_export import export_text_backbone

    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(cfg.out / "backbone.safetensors"))
    export_text_backbone(model, cfg.out / "backbone.onnx", bb.feature_dim)


def _train_partial(cfg, bb, tokenizer, ds, labels, train_idx, val_idx):
    import torch

    from edgexfer.train import _torch_threads

    if cfg.head != "linear":
        raise InputError("--mode partial on text", got=f"--head {cfg.head}", expected="--head linear",
                         todo="use --mode frozen for mlp or prototype heads on text")
    settings = _partial_settings(cfg, bb)
    with _torch_threads(torch):
        model = _text_model(bb, cfg.weights)
        tail = TextTail(model, settings["unfreeze"], tokenizer, ds.texts, progress=cfg.progress)
        _log(f"fine-tuning the last {settings['unfreeze']} of {bb.num_blocks} layers: head lr {settings['head_lr']:g}, "
             f"backbone lr {settings['backbone_lr']:g}, {settings['epochs']} epochs (fixed)", cfg.progress)
        fit_started = time.perf_counter()
        head, history = tail.fit(train_idx, labels, ds.classes, head_lr=settings["head_lr"],
                                 backbone_lr=settings["backbone_lr"], epochs=settings["epochs"],
                                 batch_size=settings["batch_size"], C=settings["C"], seed=cfg.seed, eval_idx=val_idx,
                                 progress=cfg.progress)
        val_logits = head.logits(tail.all_features(val_idx))
        _export_tuned(model, cfg, bb)
    extraction = {"backbone_images_run": 0, "features_from_cache": 0, "device": "cpu", "fine_tuned": True,
                  "prefix_seconds": round(tail.seconds, 2), "fit_seconds": round(time.perf_counter() - fit_started, 2),
                  "recipe": settings}
    return head, history, extraction, val_logits


def _train_auto(cfg, bb, tokenizer, ds, labels, train_idx, val_idx):
    """Cross-validate the frozen heads (and, within the budget, the partial candidate) on the training split."""
    from edgexfer.selection import (
        Candidate,
        choose,
        frozen_candidates,
        score_budgeted,
        score_frozen,
        selection_report,
        stratified_folds,
    )

    feats, extraction = frozen_text_features(cfg, bb, tokenizer, ds)
    y = labels[train_idx]
    folds = stratified_folds(y, cfg.folds, cfg.seed)
    _log(f"model selection: {len(folds)}-fold cross-validation on {len(train_idx)} training texts", cfg.progress)
    scores = score_frozen(frozen_candidates(cfg.C, cfg.seed), feats[train_idx], y, ds.classes, folds, cfg.progress)
    tail = settings = None
    if cfg.budget > 0:
        import torch

        from edgexfer.train import _torch_threads

        settings = _partial_settings(cfg, bb)
        candidate = Candidate(f"partial last {settings['unfreeze']} layers", "partial", "linear", settings)
        with _torch_threads(torch):
            tail = TextTail(_text_model(bb, cfg.weights), settings["unfreeze"], tokenizer, ds.texts, progress=cfg.progress)
            pretrained = tail.snapshot()

            def run_fold(tr, te, left):
                tail.restore(pretrained)
                head, _ = tail.fit(train_idx[tr], labels, ds.classes, head_lr=settings["head_lr"],
                                   backbone_lr=settings["backbone_lr"], epochs=settings["epochs"],
                                   batch_size=settings["batch_size"], C=settings["C"], seed=cfg.seed, budget_s=left,
                                   progress=False)
                return None if head is None else head.logits(tail.all_features(train_idx[te]))

            scores.append(score_budgeted(candidate, run_fold, y, folds, cfg.budget, setup_seconds=tail.seconds))
    chosen = choose(scores)
    for s in scores:
        line = f"{s.mean:.3f} ± {s.std:.3f}  ({sum(s.fold_seconds):.1f} s)" if s.complete else s.note
        _log(f"  {s.candidate.name:<28} {line}" + ("   <- chosen" if s is chosen else ""), cfg.progress)
    extraction["selection"] = selection_report(scores, chosen, len(folds), cfg.seed, len(train_idx))
    if chosen.candidate.mode == "partial":
        import torch

        from edgexfer.train import _torch_threads

        _log("training the chosen partial recipe on the whole training split", cfg.progress)
        with _torch_threads(torch):
            tail.restore(pretrained)
            head, history = tail.fit(train_idx, labels, ds.classes, head_lr=settings["head_lr"],
                                     backbone_lr=settings["backbone_lr"], epochs=settings["epochs"],
                                     batch_size=settings["batch_size"], C=settings["C"], seed=cfg.seed,
                                     eval_idx=val_idx, progress=cfg.progress)
            val_logits = head.logits(tail.all_features(val_idx))
            _export_tuned(tail.model, cfg, bb)
        extraction.update(fine_tuned=True, recipe=settings)
        return head, history, extraction, val_logits
    head, history, val_logits = _fit_head(chosen.candidate.head, chosen.candidate.params, feats, labels, ds.classes,
                                          train_idx, val_idx)
    return head, history, extraction, val_logits
