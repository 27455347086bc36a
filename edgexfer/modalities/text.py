"""Texts on the host: a folder per class of ``.txt`` files, or a CSV/JSONL file of ``text,label``.

The same recipes and arguments as images, on a text backbone (``minilm_l6``):

* ``frozen``: the pretrained backbone is exported to ``backbone.onnx`` first and every text goes through the
  runtime's own engine and feature cache (the device's code path), once ever.
* ``partial``: the last N transformer layers (``--unfreeze N``, default 2 of 6) are fine-tuned in torch with a
  learning rate below the head's (``--backbone-lr``, default head lr / 10), :data:`PARTIAL_DEFAULTS` otherwise.
  The frozen prefix (embeddings and the first 6 - N layers) runs once per text (:class:`TextTail`); epochs run
  only the tail. LP-FT: the head starts from the linear probe on the pretrained features, and after the epochs
  the linear head is refitted (``fit_linear``) on the tuned features, as the image recipe does.

Tokenization is :mod:`edgexfer.runtime.text` with the backbone's ``tokenizer.json`` (copied into the run,
shipped in the bundle); texts longer than ``max_length`` tokens are truncated and counted. The bundle's
``golden.npz`` holds texts with their token ids and attention masks (the device re-tokenizes the texts and
must get the same ids); the exemplars are features of training texts.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.data import describe_skipped
from edgexfer.modalities import base
from edgexfer.modalities.base import EvaluationSet, ExportReader, HostModality, LabelledData, Tuner
from edgexfer.partial_recipe import PartialRecipe, partial_recipe
from edgexfer.run_record import log
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.head_training import HeadTrainer
from edgexfer.runtime.heads import Head
from edgexfer.runtime.text import TextTokenizer
from edgexfer.runtime.textdata import TextDataset, is_text_dataset, read_text_dataset

#: partial fine-tuning on text: the image recipe's learning rates, loss and weight decay, 4 epochs (a fixed
#: count; the validation split is only reported)
PARTIAL_DEFAULTS = replace(PartialRecipe(), epochs=4)


@dataclass
class TextSamples:
    dataset: TextDataset  #: the texts, their labels and sources
    tokenizer: TextTokenizer  #: the backbone's packaged tokenizer (copied into the run)


class TextModality(HostModality):
    name, layer_noun = "text", "layer"
    default_backbone = "minilm_l6"
    metrics_keys = ("selection", "recipe")
    bundle_files = ("tokenizer.json",)
    parity_extra = {"samples": "texts"}

    def describe_backbone(self, bb) -> str:
        return f"text, up to {bb.max_length} tokens, {bb.feature_dim} features, {bb.num_blocks} layers"

    def claims_data(self, path: Path) -> bool:
        return is_text_dataset(path)

    def check_config(self, cfg, bb) -> None:
        if cfg.views is not None:
            raise InputError("--views with text data", got=f"--views {cfg.views}",
                             expected="no views: augmented views are crops and flips of images", todo="leave --views out")
        if cfg.unfreeze == "all":
            raise InputError("--unfreeze all with a text backbone", got="all",
                             expected=f"a number of last layers 0..{bb.num_blocks}",
                             todo=f"use --unfreeze {bb.num_blocks} to fine-tune every transformer layer")

    def load(self, cfg, bb) -> LabelledData:
        tokenizer = TextTokenizer.from_file(bb.tokenizer_path(), bb.max_length)
        ds, truncated = load_text_data(cfg.data_dir, tokenizer, progress=cfg.progress)
        return LabelledData(
            classes=ds.classes, labels=np.array(ds.labels, dtype=np.int64), shas=ds.shas, skipped=list(ds.skipped),
            root=Path(ds.root), spec=tokenizer.spec,
            preprocess={"tokenizer": "tokenizer.json", "tokenizer_sha256": tokenizer.sha256,
                        "max_length": tokenizer.max_length},
            samples=TextSamples(ds, tokenizer), summary=f"skipped {len(ds.skipped)}, truncated {truncated}",
            header={"modality": self.name}, metrics_extra={"truncated": truncated, "max_length": tokenizer.max_length},
            run_extra={"truncated": truncated})

    def run_entry(self, data: LabelledData, i: int) -> dict[str, Any]:
        # the texts travel in the run: export checks the ONNX model on them and picks golden texts and
        # exemplars (a CSV row has no file of its own to point at)
        s = data.samples.dataset.samples[i]
        return {"source": s.source, "sha256": s.sha256, "label": int(s.label), "text": s.text}

    def start_run(self, data: LabelledData, out: Path) -> None:
        shutil.copy2(data.samples.tokenizer.path, out / "tokenizer.json")

    def export_pretrained(self, bb, weights, path: Path) -> None:
        from edgexfer.onnx_export import export_text_backbone

        export_text_backbone(text_model(bb, weights), path, bb.feature_dim)

    def sample_records(self, data: LabelledData) -> list[Any]:
        from edgexfer.runtime.cache import SampleRecord

        ds = data.samples.dataset
        return [SampleRecord(s.sha256, ds.classes[s.label], s.source) for s in ds.samples]

    def feature_args(self, data: LabelledData) -> dict[str, Any]:
        from edgexfer.runtime.features import text_batches

        ds, tokenizer = data.samples.dataset, data.samples.tokenizer
        return {"desc": "extracting text features", **text_batches(tokenizer, ds.texts)}

    def tuner(self, cfg, bb, data, train_idx, head_kind=None) -> TextTuner:
        return TextTuner(cfg, bb, data, head_kind)

    def export_reader(self, run, run_dir) -> TextReader:
        return TextReader(run, run_dir)

    def bundle_name(self, data_root: str) -> str:
        return Path(data_root).stem  # a CSV/JSONL data set is a file: its name without the suffix

    eval_batch_factor = 8

    def evaluation_set(self, data_dir) -> EvaluationSet:
        ds = read_text_dataset(data_dir)
        return EvaluationSet(str(ds.root), ds.classes, [(s.source, ds.classes[s.label], s.text) for s in ds.samples],
                             [{"path": src, "reason": why} for src, why in ds.skipped])

    def predict(self, predictor, items) -> list[Any]:
        return predictor.predict_texts([text for _, _, text in items], top_k=1, sources=[src for src, _, _ in items])

    def evaluation_extra(self, predictor, items) -> dict[str, Any]:
        return {"truncated": sum(predictor.tokenizer.truncated([text for _, _, text in items]))}

    def bench_samples(self, bundle, images):
        """The engine per sequence length, on the bundle's golden texts (:mod:`edgexfer.bench.text`)."""
        from edgexfer.bench.text import load_token_samples, sequence_lengths

        if images is not None:
            raise InputError("--images with a text bundle", got=str(images), expected="no --images",
                             todo="leave --images out: the samples are the bundle's golden texts")
        return load_token_samples(bundle, sequence_lengths(bundle))

    def validation_features(self, bundle, engine, data_dir) -> tuple[np.ndarray, np.ndarray]:
        from edgexfer.runtime.features import text_features

        data = read_text_dataset(data_dir)
        features, _ = text_features(engine, bundle.tokenizer(), data.texts)
        return features, np.array([data.classes[i] for i in data.labels])


def load_text_data(data_dir: Path, tokenizer: TextTokenizer, *, progress: bool = True) -> tuple[TextDataset, int]:
    """Read a text data set as ``train`` does; returns it and how many of its texts will be truncated."""
    ds = read_text_dataset(data_dir)
    log(f"data: {len(ds.samples)} texts in {len(ds.classes)} classes from {ds.root} ({ds.form})", progress)
    if ds.skipped:
        log(describe_skipped([(Path(p), r) for p, r in ds.skipped]), progress)
    truncated = sum(tokenizer.truncated(ds.texts))
    if truncated:
        log(f"{truncated} text(s) longer than {tokenizer.max_length} tokens: truncated", progress)
    return ds, truncated


def text_model(bb, weights: Path | None):
    """The packaged (or ``weights``) text backbone in eval mode."""
    from edgexfer.backbones import build_backbone

    return build_backbone(bb, weights=weights).eval()


def _write_tuned(model, bb, out: Path) -> None:
    from edgexfer.onnx_export import export_text_backbone

    model.eval()
    base.save_state(model, out / "backbone.safetensors")
    export_text_backbone(model, out / "backbone.onnx", bb.feature_dim)


class TextFit:
    """One fine-tuning of a :class:`TextTail`: the refitted linear head, the history and what it took."""

    def __init__(self, tail: TextTail, head: Head, history: list[dict[str, Any]], seconds: float):
        self.tail, self.head, self.history, self.seconds = tail, head, history, seconds

    def logits(self, idx) -> np.ndarray:
        return self.head.logits(self.tail.all_features(idx))


class TextTuner(Tuner):
    """Partial fine-tuning of the last transformer layers (on the CPU), every fit from the pretrained tail."""

    def __init__(self, cfg, bb, data: LabelledData, head_kind: str | None):
        if head_kind is not None and head_kind != "linear":
            raise InputError("--mode partial on text", got=f"--head {head_kind}", expected="--head linear",
                             todo="use --mode frozen for mlp or prototype heads on text")
        recipe = partial_recipe(cfg, PARTIAL_DEFAULTS)
        if not 0 < recipe.unfreeze <= bb.num_blocks:
            raise InputError("--unfreeze", got=repr(cfg.unfreeze), expected=f"1..{bb.num_blocks} transformer layers")
        self.cfg, self.bb, self.data, self.recipe, self.device = cfg, bb, data, recipe, "cpu"
        self.report = {"unfreeze": recipe.unfreeze, "head_lr": recipe.head_lr, "backbone_lr": recipe.lr_of_backbone(),
                       "epochs": recipe.epochs, "batch_size": recipe.batch_size, "C": recipe.C}
        self.tail: Any = None
        self.pretrained: dict[str, Any] = {}
        self.seconds = 0.0

    def prepare(self) -> None:
        ds, tokenizer = self.data.samples.dataset, self.data.samples.tokenizer
        self.tail = TextTail(text_model(self.bb, self.cfg.weights), self.recipe.unfreeze, tokenizer, ds.texts,
                             progress=self.cfg.progress)
        self.pretrained = self.tail.snapshot()
        self.seconds = self.tail.seconds

    def fit(self, idx, *, eval_idx=None, budget_s=None, progress=False, head_kind="linear"):
        started = time.perf_counter()
        self.tail.restore(self.pretrained)
        head, history = self.tail.fit(idx, self.data.labels, self.data.classes, self.recipe, seed=self.cfg.seed,
                                      eval_idx=eval_idx, budget_s=budget_s, progress=progress)
        return None if head is None else TextFit(self.tail, head, history, time.perf_counter() - started)

    def export(self, fit: TextFit, out: Path) -> Head:
        _write_tuned(self.tail.model, self.bb, out)
        return fit.head


class TextReader(ExportReader):
    """Export's view of a text run: the texts the run recorded, tokenized by the run's tokenizer.json."""

    def __init__(self, run: dict[str, Any], run_dir: Path):
        pp = run["preprocess"]
        self.run, self.run_dir = run, run_dir
        self.tokenizer = TextTokenizer.from_file(run_dir / pp["tokenizer"], pp["max_length"],
                                                 sha256=pp["tokenizer_sha256"])

    batch_size = 32

    def read(self, entries) -> list[str]:
        return [e["text"] for e in entries]

    @contextmanager
    def torch_runner(self) -> Iterator[Callable[[list[str]], np.ndarray]]:
        import torch

        model = base.run_backbone(self.run, self.run_dir).eval()

        def run(texts: list[str]) -> np.ndarray:
            tokens = self.tokenizer.encode(texts)
            with torch.no_grad():
                out = model(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask)).numpy()
            return out.astype(np.float32)

        yield run

    @contextmanager
    def onnx_runner(self, path: Path) -> Iterator[Callable[[list[str]], np.ndarray]]:
        from edgexfer.runtime.backends.registry import open_reference
        from edgexfer.runtime.features import text_features

        with open_reference(path) as backend:
            yield lambda texts: text_features(backend, self.tokenizer, texts)[0]

    def golden(self, entries) -> dict[str, np.ndarray]:
        golden_texts = self.read(entries)
        tokens = self.tokenizer.encode(golden_texts)
        return {"texts": np.array(golden_texts), "input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}

    def manifest_input(self):
        from edgexfer.runtime.manifest import TextInputSpec

        return TextInputSpec("tokenizer.json", self.tokenizer.sha256, self.tokenizer.max_length)


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
        log(f"frozen prefix: {len(texts)} texts through the embeddings and {self.cut} layer(s) in "
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

    def fit(self, train_idx, labels: np.ndarray, classes, recipe: PartialRecipe, *, seed: int, eval_idx=None,
            budget_s: float | None = None, progress: bool = True) -> tuple[Head | None, list[dict[str, Any]]]:
        """Fine-tune the tail (LP-FT) and refit the linear head on the tuned features; None when over budget.

        The tail's weights are left tuned (callers restore a :meth:`snapshot` between folds).
        """
        import torch
        from torch import nn

        head_lr, backbone_lr, epochs = recipe.head_lr, recipe.lr_of_backbone(), int(recipe.epochs)
        batch_size, C = int(recipe.batch_size), recipe.C
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
                                       {"params": params, "lr": backbone_lr}], weight_decay=recipe.weight_decay)
        steps = epochs * int(np.ceil(len(train_idx) / batch_size))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
        counts = np.bincount(labels[train_idx], minlength=len(classes)).astype(np.float32)
        weights = torch.from_numpy((len(train_idx) / (len(classes) * np.maximum(counts, 1))).astype(np.float32))
        loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=recipe.label_smoothing)
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
            log(f"epoch {epoch}/{epochs}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "epoch"), progress)
        # the final head: the converged linear probe of the tuned features, not the drifted SGD head
        final = HeadTrainer("linear", C=C).fit(self.all_features(train_idx), labels[train_idx], list(classes))
        return final, history


def _mask_bias(mask):
    import torch

    from edgexfer.backbones.minilm import MASK_VALUE

    return (1.0 - mask[:, None, None, :].to(torch.float32)) * MASK_VALUE

