"""Images on the host: an ImageFolder tree in, EfficientNet-style backbones fed uint8 pixels.

Training hashes every file (the feature cache's key), drops duplicates and label conflicts, and decodes an
image only when its features are not cached (the device's decoder, :mod:`edgexfer.data`), a batch at a time
on worker threads, so memory is bounded by the batch. It runs partial fine-tuning with :class:`edgexfer.finetune.ViewCache` (the frozen prefix once per
stored view). Export checks ``backbone.onnx`` on the run's validation images and ships golden images.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edgexfer.data import (
    ImageFiles,
    check_workers,
    describe_skipped,
    hash_files,
    scan_image_folder,
    stream_pixels,
)
from edgexfer.modalities import base
from edgexfer.modalities.base import EvaluationSet, ExportReader, HostModality, LabelledData, Tuner
from edgexfer.partial_recipe import PartialRecipe, partial_recipe
from edgexfer.run_record import log
from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.head_training import HeadTrainer
from edgexfer.runtime.heads import Head
from edgexfer.runtime.preprocess import PreprocessSpec, load_image, resize_to_spec, stack

#: partial fine-tuning defaults on images: the measured recipe (benchmarks/finetune_study.py)
PARTIAL_DEFAULTS = PartialRecipe()


@dataclass
class ImageSamples:
    images: ImageFiles  #: the files, decoded when asked for
    paths: list[Path]

    def subset(self, keep: list[int]) -> ImageSamples:
        return ImageSamples(self.images.subset(keep), [self.paths[i] for i in keep])


class ImageModality(HostModality):
    name, layer_noun = "image", "block"
    default_backbone = "efficientnet_lite0"
    catch_all = True  # a folder that is no other modality's data set is read as an ImageFolder tree
    distributed_partial = True  # ImageTuner shards its view cache by rank under torchrun

    def describe_backbone(self, bb) -> str:
        return f"input {bb.input_size[0]}x{bb.input_size[1]}, {bb.feature_dim} features, {bb.num_blocks} blocks"

    def check_config(self, cfg, bb) -> None:
        if cfg.mode == "partial" and cfg.unfreeze == "all" and bb.builder_loads_weights:
            raise InputError(f"--unfreeze all with the brought backbone {bb.name}", got="all",
                             expected=f"a number of last top-level children 1..{bb.num_blocks}",
                             todo=f"use --unfreeze {bb.num_blocks} to fine-tune every child")

    def backbone_record(self, bb) -> dict[str, Any]:
        return {"mean": list(bb.mean), "std": list(bb.std)}

    def load(self, cfg, bb) -> LabelledData:
        spec = PreprocessSpec(size=bb.input_size, resize=cfg.resize)
        folder, images, labels, shas, paths, skipped = load_dataset(cfg.data_dir, spec, progress=cfg.progress,
                                                                    workers=check_workers(cfg.workers))
        return LabelledData(classes=folder.classes, labels=labels, shas=shas, skipped=skipped, root=folder.root,
                            spec=spec, preprocess=spec.to_dict(), samples=ImageSamples(images, paths),
                            summary=f"skipped {len(skipped)} file(s)")

    def run_entry(self, data: LabelledData, i: int) -> dict[str, Any]:
        return {"path": str(Path(data.samples.paths[i]).resolve()), "sha256": data.shas[i], "label": int(data.labels[i])}

    def export_pretrained(self, bb, weights, path: Path) -> None:
        if bb.exporter:  # a backbone that is an ONNX model already: wrapped, not traced
            from edgexfer.backbones import _resolve

            _resolve(bb.exporter)(bb, path)
            return
        from edgexfer.onnx_export import export_backbone

        export_backbone(pixel_backbone(bb, weights), bb.input_size, path)

    def sample_records(self, data: LabelledData) -> list[Any]:
        from edgexfer.runtime.cache import SampleRecord

        return [SampleRecord(sha, data.classes[int(lbl)], str(p))
                for sha, lbl, p in zip(data.shas, data.labels, data.samples.paths)]

    def features(self, backend, cache, backbone_sha256, data, *, workers, progress):
        return stream_features(backend, cache, backbone_sha256, data.spec, data.samples.images, data.shas,
                               workers=workers, progress=progress)

    def check_readable(self, data, *, workers, progress, only=None) -> dict[int, str]:
        files = data.samples.images
        indices = range(len(files)) if only is None else only
        failed: dict[int, str] = {}
        with tqdm(total=len(indices), desc="checking images", unit="img", disable=not progress, leave=False) as bar:
            for done, _, bad in stream_pixels(files, indices, data.spec, workers=workers,
                                              convert=lambda i: files.decode(i).size):
                failed.update(bad)
                bar.update(len(done) + len(bad))
        return failed

    def drop(self, data: LabelledData, failed: dict[int, str]) -> LabelledData:
        if not failed:
            return data
        keep = [i for i in range(len(data.shas)) if i not in failed]
        skipped = [(str(data.samples.paths[i]), reason) for i, reason in sorted(failed.items())]
        labels = data.labels[keep]
        _check_classes(labels, data.classes)
        return LabelledData(classes=data.classes, labels=labels, shas=[data.shas[i] for i in keep],
                            skipped=[*data.skipped, *skipped], root=data.root, spec=data.spec,
                            preprocess=data.preprocess, samples=data.samples.subset(keep),
                            summary=f"skipped {len(data.skipped) + len(skipped)} file(s)")

    def counters(self, data: LabelledData) -> dict[str, Any]:
        return {"images_decoded": data.samples.images.decoded}

    def tuner(self, cfg, bb, data, train_idx, head_kind=None) -> ImageTuner:
        return ImageTuner(cfg, bb, data, train_idx)

    def train_all_layers(self, cfg, bb, data, train_idx, val_idx):
        return _train_all_layers(cfg, bb, data.spec, data.classes, data.samples.images, data.labels, train_idx,
                                 val_idx)

    def export_reader(self, run, run_dir) -> ImageReader:
        return ImageReader(run, run_dir)

    eval_class_word = "folders named"

    def evaluation_set(self, data_dir) -> EvaluationSet:
        folder = scan_image_folder(data_dir)
        return EvaluationSet(str(folder.root), folder.classes,
                             [(str(p), folder.classes[lbl], p) for p, lbl in zip(folder.paths, folder.labels)])

    def predict(self, predictor, items) -> list[Any]:
        return predictor.predict([path for _, _, path in items], top_k=1)

    def bench_samples(self, bundle, images):
        from edgexfer.bench.samples import load_samples

        return load_samples(bundle, images)

    def validation_features(self, bundle, engine, data_dir) -> tuple[np.ndarray, np.ndarray]:
        folder = scan_image_folder(data_dir)
        spec = bundle.preprocess
        chunks = []
        for start in range(0, len(folder.paths), 32):
            chunk = folder.paths[start:start + 32]
            chunks.append(engine.run(stack([load_image(p, spec) for p in chunk])))
        return np.concatenate(chunks), np.array([folder.classes[i] for i in folder.labels])


def pixel_backbone(bb, weights: Path | None):
    """The packaged (or ``weights``) backbone behind the uint8-pixel front end that backbone.onnx has."""
    from edgexfer.backbones import build_backbone
    from edgexfer.pixel_model import PixelBackbone

    return PixelBackbone(build_backbone(bb, weights=weights), bb.mean, bb.std)


def _write_tuned(model, bb, out: Path) -> None:
    """backbone.safetensors and backbone.onnx of a fine-tuned PixelBackbone (on the CPU)."""
    from edgexfer.onnx_export import export_backbone

    base.save_state(model.backbone, out / "backbone.safetensors")
    export_backbone(model, bb.input_size, out / "backbone.onnx")


class ImageTuner(Tuner):
    """Partial fine-tuning of the last MBConv blocks on stored views (:class:`edgexfer.finetune.ViewCache`)."""

    def __init__(self, cfg, bb, data: LabelledData, train_idx: np.ndarray):
        from edgexfer.distributed import current
        from edgexfer.finetune import resolve_device

        self.cfg, self.bb, self.data, self.train_idx = cfg, bb, data, train_idx
        self.recipe = partial_recipe(cfg, PARTIAL_DEFAULTS)
        self.report = self.recipe.to_dict()
        self.world = current()  # under torchrun: this process's rank and device (edgexfer.distributed.join)
        self.device = self.world.device if self.world.sharded else resolve_device(cfg.device)
        self.views: Any = None
        self.seconds = 0.0

    def prepare(self) -> None:
        from edgexfer.finetune import ViewCache

        cfg, images, recipe = self.cfg, self.data.samples.images, self.recipe
        shard = f", each of {self.world.size} processes the 1/{self.world.size} it holds" if self.world.sharded else ""
        log(f"frozen prefix: {len(images)} clean views + {recipe.views} augmented views of each of "
            f"{len(self.train_idx)} training images (once{shard}; epochs then run only the last {recipe.unfreeze} "
            "block(s))", cfg.progress)
        self.views = ViewCache.build(images, self.data.spec, self.bb, recipe, weights=cfg.weights, device=self.device,
                                     seed=cfg.seed, progress=cfg.progress, augment_idx=self.train_idx,
                                     world=self.world)
        self.seconds = self.views.seconds

    def fit(self, idx, *, eval_idx=None, budget_s=None, progress=False, head_kind="linear"):
        fit = self.views.fit(idx, self.data.labels, self.data.classes, self.recipe, seed=self.cfg.seed,
                             budget_s=budget_s, eval_idx=eval_idx, progress=progress, head_kind=head_kind,
                             device=self.device)
        return None if fit.stopped else fit

    def export(self, fit, out: Path) -> Head:
        _write_tuned(fit.pixel_backbone(), self.bb, out)
        return fit.to_head()

    def keep_last_epoch(self, history) -> None:
        history[-1]["best_epoch"] = history[-1]["epoch"]  # the epoch whose weights are kept: the last


class ImageReader(ExportReader):
    """Export's view of an image run: validation and training images decoded as the device decodes them."""

    def __init__(self, run: dict[str, Any], run_dir: Path):
        pp = run["preprocess"]
        self.run, self.run_dir = run, run_dir
        self.spec = PreprocessSpec(size=tuple(pp["size"]), resize=pp["resize"], fill=tuple(pp["fill"]))
        missing = [v["path"] for v in run["val"] if not Path(v["path"]).is_file()]
        if missing:
            raise InputError("validation images of the run are gone", got=f"{len(missing)} missing, e.g. {missing[0]}",
                             expected="the training data where it was", todo="restore the data directory or train again")
        from edgexfer.backbones import run_config

        if run_config(run).reference:  # an onnx: backbone: no torch module, the original model is the reference
            self.reference, self.reference_title = "onnxruntime fp32 (the original model)", "the original ONNX model"

    def read(self, entries) -> np.ndarray:
        return stack([load_image(e["path"], self.spec) for e in entries])

    def usable(self, entry) -> bool:
        return Path(entry["path"]).is_file()

    @contextmanager
    def torch_runner(self) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        from edgexfer.backbones import _resolve, run_config

        cfg = run_config(self.run)
        if cfg.reference:  # no torch module (an onnx: backbone): the original model is the reference
            yield _resolve(cfg.reference)(cfg)
            return
        import torch

        from edgexfer.pixel_model import PixelBackbone

        bb = self.run["backbone"]
        model = PixelBackbone(base.run_backbone(self.run, self.run_dir), tuple(bb["mean"]), tuple(bb["std"])).eval()

        def run(batch: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return model(torch.from_numpy(batch)).numpy()

        yield run

    @contextmanager
    def onnx_runner(self, path: Path) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        from edgexfer.runtime.backends.registry import open_reference

        with open_reference(path) as backend:
            yield backend.run

    def golden(self, entries) -> dict[str, np.ndarray]:
        return {"images": self.read(entries)}

    def manifest_input(self):
        from edgexfer.runtime.manifest import InputSpec

        bb = self.run["backbone"]
        return InputSpec(size=tuple(self.spec.size), resize=self.spec.resize, fill=tuple(self.spec.fill),
                         mean=tuple(bb["mean"]), std=tuple(bb["std"]))


def load_dataset(data_dir: Path, spec: PreprocessSpec, *, progress: bool = True, workers: int = 1):
    """Scan and hash an ImageFolder tree as ``train`` does: unreadable files and duplicates are skipped.

    Returns ``(folder, images, labels, shas, paths, skipped)``: the images as :class:`ImageFiles` (decoded
    when asked for; a file that is no image fails then), int64 labels, their sha256, paths and the
    skipped ``(path, reason)`` pairs. Raises :class:`DataError` for an empty class.
    """
    folder = scan_image_folder(data_dir)
    log(f"data: {len(folder.paths)} images in {len(folder.classes)} classes under {folder.root}", progress)
    hashed = hash_files(folder.paths, workers=workers, progress=progress)
    skipped = [(str(p), r) for p, r in folder.ignored] + [(str(p), r) for p, r in hashed.skipped]
    keep = [i for i, sha in enumerate(hashed.sha256) if sha is not None]
    keep, duplicates = _drop_duplicates(keep, hashed.sha256, folder)
    skipped += duplicates
    if skipped:
        log(describe_skipped([(Path(p), r) for p, r in skipped]), progress)
    labels = np.array([folder.labels[i] for i in keep], dtype=np.int64)
    _check_classes(labels, folder.classes)
    paths = [folder.paths[i] for i in keep]
    shas = [hashed.sha256[i] for i in keep]
    return folder, ImageFiles(paths, spec.fill), labels, shas, paths, skipped


def _check_classes(labels: np.ndarray, classes) -> None:
    empty = [c for k, c in enumerate(classes) if not np.any(labels == k)]
    if empty:
        raise DataError("no readable image left in class folder(s)", got=", ".join(empty),
                        expected="at least one decodable image per class", todo="fix or remove those folders")


def stream_features(backend, cache, backbone_sha256: str, spec: PreprocessSpec, files: ImageFiles, shas, *,
                    workers: int = 1, batch_size: int = 16, progress: bool = True):
    """Features of ``files`` (float32 ``[N_ok, D]``, in order), an ExtractionReport and ``{index: reason}`` of
    the files that could not be decoded.

    Cached samples are found by content hash before anything is decoded; the others are decoded and resized
    on ``workers`` threads a batch at a time, run through ``backend`` and committed per batch (an
    interrupted run keeps what it extracted).
    """
    from edgexfer.runtime.features import ExtractionReport

    key = spec.key()
    missing = set(cache.missing(backbone_sha256, key, shas))
    first: dict[str, int] = {}
    for i, sha in enumerate(shas):
        if sha in missing:
            first.setdefault(sha, i)
    todo = sorted(first.values())
    failed: dict[int, str] = {}
    images_before, seconds_before = backend.stats.images, backend.stats.seconds
    with tqdm(total=len(todo), desc="extracting features", unit="img", disable=not progress or not todo,
              leave=False) as bar:
        for done, pixels, bad in stream_pixels(files, todo, spec, batch_size=batch_size, workers=workers):
            if done:
                cache.put_features(backbone_sha256, key, dict(zip((shas[i] for i in done), backend.run(stack(pixels)))))
            failed.update(bad)
            bar.update(len(done) + len(bad))
    bad_shas = {shas[i] for i in failed}
    failed = {i: failed.get(first[sha], "") for i, sha in enumerate(shas) if sha in bad_shas}
    wanted = [sha for sha in shas if sha not in bad_shas]
    matrix = None
    for start in range(0, len(wanted), 1024):  # fill one matrix: no dict of every feature at once
        part = wanted[start:start + 1024]
        found = cache.get_features(backbone_sha256, key, part)
        rows = np.stack([found[sha] for sha in part])
        if matrix is None:
            matrix = np.empty((len(wanted), rows.shape[1]), np.float32)
        matrix[start:start + len(part)] = rows
    report = ExtractionReport(requested=len(shas), from_cache=len(shas) - len(todo),
                              extracted=backend.stats.images - images_before,
                              seconds=backend.stats.seconds - seconds_before)
    return (matrix if matrix is not None else np.zeros((0, 0), np.float32)), report, failed


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


def _train_all_layers(cfg, bb, spec, classes, images, labels, train_idx, val_idx):
    """--unfreeze all: every layer trains, so there is no frozen prefix to cache (the slow path).

    long: one training loop (model surgery, LP-FT start, epochs with early stopping,
    export) whose steps share a dozen locals; split up, it would read as a chain of tuples.
    """
    import torch
    from torch import nn

    from edgexfer.finetune import resolve_device
    from edgexfer.pixel_model import TorchHead
    from edgexfer.runtime.augment import Augmenter

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = pixel_backbone(bb, cfg.weights)
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

    num_classes = len(classes)
    head = TorchHead(cfg.head, bb.feature_dim, num_classes).to(device)
    model.to(device)

    def features_of(idx: np.ndarray) -> torch.Tensor:
        """Features of images ``idx``, decoded 32 at a time (memory bounded by the batch)."""
        model.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(idx), 32):
                chunk = stack([resize_to_spec(images[i], spec) for i in idx[s:s + 32]])
                out.append(forward_features(torch.from_numpy(chunk)))
        return torch.cat(out)

    if cfg.head == "linear":
        # Linear probe first, then fine-tune (LP-FT): a head fitted on the pretrained features keeps the
        # first fine-tuning steps from wrecking the backbone with random-head gradients.
        log("fitting the linear probe that starts fine-tuning", cfg.progress)
        probe = HeadTrainer("linear", C=cfg.C).fit(features_of(train_idx).cpu().numpy(), labels[train_idx], list(classes))
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
    log(f"fine-tuning the last {n_unfreeze} of {len(blocks)} blocks, head lr {cfg.lr:g}, backbone lr {backbone_lr:g}, "
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
            val_logits = head(features_of(val_idx))
            val_loss = float(nn.functional.cross_entropy(val_logits, y_val))
            val_acc = float((val_logits.argmax(1) == y_val).float().mean())
        history.append({"epoch": epoch, "train_loss": round(total_loss / len(train_idx), 5),
                        "train_accuracy": round(correct / len(train_idx), 5),
                        "val_loss": round(val_loss, 5), "val_accuracy": round(val_acc, 5)})
        log(f"epoch {epoch}: train loss {total_loss / len(train_idx):.3f}, val accuracy {val_acc:.3f}", cfg.progress)
        if val_acc > best[0]:
            best = (val_acc, {k: v.clone() for k, v in net.state_dict().items()},
                    {k: v.clone() for k, v in head.state_dict().items()}, epoch)
            since_best = 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                log(f"early stop: no better validation accuracy for {cfg.patience} epochs", cfg.progress)
                break
    net.load_state_dict(best[1])
    head.load_state_dict(best[2])
    history[-1]["best_epoch"] = best[3]
    model.cpu().eval()  # export from a CPU copy: backbone.onnx does not depend on the training device
    head.cpu().eval()
    device_used = device
    device = "cpu"
    _write_tuned(model, bb, cfg.out)
    head_np = Head(kind=cfg.head, classes=tuple(classes), tensors=head.numpy_tensors())
    head_np.validate()
    with torch.no_grad():
        val_logits = head_np.logits(features_of(val_idx).numpy())
    extraction = {"backbone_images_run": 0, "features_from_cache": 0, "device": device_used}
    return head_np, history, extraction, val_logits
