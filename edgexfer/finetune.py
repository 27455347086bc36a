"""Fast partial fine-tuning: the frozen prefix runs once per stored view, epochs run only the tail.

With the last N blocks unfrozen, everything before them (stem + ``blocks[:-N]``) is a fixed,
deterministic function. :class:`ViewCache` therefore decodes each image once, draws ``views`` seeded
augmented copies of it (plus the clean inference view), runs the frozen prefix once per copy under
``no_grad`` and keeps the activations at the input of the first unfrozen block (float16 for the
augmented views, float32 for the clean one, so clean features equal the full model's). A training
epoch then samples one stored view per image and runs only the tail (unfrozen blocks, head conv,
pooling, classifier) forward and backward: on EfficientNet-Lite0 that is a 7x7 or 14x14 map.

The cache covers all images and is reused for every training subset (cross-validation folds, model
selection): ``ViewCache.build(...)`` once, then ``cache.fit(train_idx, labels, classes, recipe)`` per
subset, which returns a :class:`PartialFit` (logits and features for any index on its clean view, a
numpy :class:`~edgexfer.runtime.heads.Head`, the fine-tuned :class:`~edgexfer.pixel_model.PixelBackbone`
for export, history and seconds).

The default :class:`PartialRecipe` is the one measured best in ``benchmarks/finetune_study.py``
(results and the CPU it ran on: ``benchmarks/README.md`` section 7): on clipart8, stratified 5-fold CV,
0.7561 / 0.7542 (two training seeds) against 0.7449 for the frozen linear probe on the same folds, i.e.
about +1 point, not a significant margin. What made partial fine-tuning stop losing to the probe: the
head refit by ``fit_linear`` at the end (an AdamW-trained head at lr 1e-3 drifts off the converged probe),
LP-FT, a tail learning rate of 1e-4 (3e-4 hurt) and BatchNorm statistics of the tail adapted to the data.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from tqdm import tqdm

from edgexfer.backbone_cut import Tail, prefix_runner
from edgexfer.distributed import World, owners, sync_batchnorm
from edgexfer.partial_recipe import PartialRecipe
from edgexfer.runtime.errors import InputError

__all__ = ["PartialRecipe", "ViewCache", "PartialFit", "resolve_device"]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when PyTorch sees a CUDA device, else ``cpu``; ``cuda`` without CUDA is an error."""
    import torch

    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
        raise InputError("--device", got=repr(device), expected="auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda but PyTorch sees no CUDA device", got=f"torch {torch.__version__}, "
                         f"cuda build {torch.version.cuda or 'none'}", expected="a CUDA GPU and a CUDA build of torch",
                         todo="use --device cpu or --device auto")
    return str(device)


class ViewCache:
    """Prefix activations of every image: one clean view (float32) and ``views`` augmented ones (float16).

    Build with :meth:`build`; train with :meth:`fit`. ``clean`` is ``[N, C, H, W]``, ``augmented``
    ``[N, V, C, H, W]`` (V = 0 for images outside ``augment_idx``: they are scored, never trained on).
    Under torchrun (``world`` of several processes) a process holds only the rows of the images whose
    ``owner`` is its rank (:func:`edgexfer.distributed.owners`), in image order; ``local`` maps an image to its row.
    """

    def __init__(self, *, net, bb, spec, cut: int, clean, augmented, has_views: np.ndarray, device: str,
                 recipe: PartialRecipe, seed: int, seconds: float, weights=None, owner=None, world: World | None = None):
        self.net, self.bb, self.spec, self.cut = net, bb, spec, cut
        self.clean, self.augmented, self.has_views = clean, augmented, has_views
        self.device, self.recipe, self.seed, self.seconds, self.weights = device, recipe, seed, seconds, weights
        self.world = world or World(device=device)
        self.owner = np.zeros(len(has_views), dtype=np.int64) if owner is None else np.asarray(owner, dtype=np.int64)
        self.held = np.flatnonzero(self.owner == self.world.rank)
        self.local = np.full(len(has_views), -1, dtype=np.int64)
        self.local[self.held] = np.arange(len(self.held))

    @property
    def unfreeze(self) -> int:
        return len(self.net._blocks) - self.cut

    def __len__(self) -> int:
        return int(len(self.has_views))

    def _rows(self, idx):
        """This process's rows of images ``idx`` (all held here), as a torch index."""
        import torch

        rows = self.local[np.asarray(idx, dtype=np.int64)]
        if (rows < 0).any():
            raise InputError("view cache rows held by another process", got=f"{int((rows < 0).sum())} image(s)",
                             expected=f"images of rank {self.world.rank}", todo="index only images this rank holds")
        return torch.from_numpy(rows)

    def through(self, module, idx, *, view: int | None = None, device: str = "cpu", to_all: bool = True):
        """``module`` (no gradient) on the clean view (``view`` None) or stored view ``view`` of images ``idx``,
        in ``idx``'s order: each process runs the images it holds, rows are gathered on every process
        (``to_all``) or on rank 0 (None elsewhere)."""
        import torch

        idx = np.asarray(idx, dtype=np.int64)
        owner = self.owner[idx]
        rows = self._rows(idx[owner == self.world.rank])
        out = []
        with torch.no_grad():
            for s in range(0, len(rows), 64):
                chunk = rows[s:s + 64]
                x = self.clean[chunk] if view is None else self.augmented[chunk, view].to(torch.float32)
                out.append(module(x.to(device)))
        local = torch.cat(out) if out else torch.zeros((0, self.bb.feature_dim), device=device)
        return self.world.gather_rows(local, owner, to_all=to_all)

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def build(cls, images: Sequence, spec, bb, recipe: PartialRecipe | None = None, *, weights=None,
              device: str = "cpu", seed: int = 0, progress: bool = True, augment_idx=None,
              batch_size: int = 32, engine: str = "auto", world: World | None = None) -> ViewCache:
        """Run the frozen prefix once per view of every decoded RGB image in ``images``.

        ``bb`` is the :class:`~edgexfer.backbones.BackboneConfig`; ``weights`` an own checkpoint of it.
        Augmented views of image i come from a generator seeded with ``(seed, i)``, so an image's views
        do not depend on which other images are in the set. Only images in ``augment_idx`` (default:
        all) get augmented views. ``engine``: what runs the prefix; ``auto`` is ONNX Runtime on the CPU
        (about 4x faster than eager PyTorch there; activations agree to ~1e-5 relative) and PyTorch on CUDA.
        ``world``: under torchrun, this process runs (and keeps) only the images its rank holds.
        """
        import torch

        from edgexfer.backbones import build_backbone
        from edgexfer.runtime.augment import Augmenter
        from edgexfer.runtime.preprocess import resize_to_spec

        recipe = (recipe or PartialRecipe()).check(bb.num_blocks)
        device = resolve_device(device)
        started = time.perf_counter()
        net = build_backbone(bb, weights=weights).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        cut = len(net._blocks) - int(recipe.unfreeze)
        n = len(images)
        want = np.zeros(n, dtype=bool)
        want[np.arange(n) if augment_idx is None else np.asarray(augment_idx, dtype=np.int64)] = True
        views = int(recipe.views)
        augment = Augmenter(spec, **recipe.augment)
        prefix = prefix_runner(net, bb, cut, device, engine)
        world = world or World(device=device)
        owner = owners(n, np.flatnonzero(want), world.size)
        held = owner == world.rank
        local = np.cumsum(held) - 1  # row of a held image
        # (image, view) jobs of the images held here: view 0 is clean, 1..V augmented
        jobs = [(i, 0) for i in range(n) if held[i]] + [(i, v) for i in range(n) if want[i] and held[i]
                                                         for v in range(1, views + 1)]
        clean = augmented = None
        rngs: dict[int, np.random.Generator] = {}
        with torch.no_grad():
            bar = tqdm(range(0, len(jobs), batch_size), desc=f"frozen prefix ({views} views + clean)", unit="batch",
                       disable=not progress, leave=False)
            for s in bar:
                chunk = jobs[s:s + batch_size]
                pixels = []
                for i, v in chunk:
                    if v == 0:
                        pixels.append(resize_to_spec(images[i], spec))
                    else:
                        rng = rngs.setdefault(i, np.random.default_rng([seed, i]))
                        pixels.append(augment(images[i], rng))
                out = prefix(np.stack(pixels))
                if clean is None:
                    shape = tuple(out.shape[1:])
                    clean = torch.zeros((int(held.sum()), *shape), dtype=torch.float32)
                    augmented = torch.zeros((int(held.sum()), views, *shape), dtype=torch.float16)
                for (i, v), act in zip(chunk, out):
                    if v == 0:
                        clean[local[i]] = act
                    else:
                        augmented[local[i], v - 1] = act.to(torch.float16)
                    if v == views:
                        rngs.pop(i, None)
        net = net.cpu()
        return cls(net=net, bb=bb, spec=spec, cut=cut, clean=clean, augmented=augmented, has_views=want,
                   device=device, recipe=recipe, seed=seed, seconds=time.perf_counter() - started, weights=weights,
                   owner=owner, world=world)

    def deeper(self, unfreeze: int, progress: bool = False, batch_size: int = 64) -> ViewCache:
        """The same views cut later (fewer unfrozen blocks): runs the blocks in between once per view."""
        import torch

        new_cut = len(self.net._blocks) - int(unfreeze)
        if new_cut < self.cut:
            raise InputError("ViewCache.deeper", got=f"unfreeze {unfreeze}", expected=f"at most {self.unfreeze}",
                             todo="build a new cache with more unfrozen blocks")
        if new_cut == self.cut:
            return self
        started = time.perf_counter()
        blocks = list(self.net._blocks)[self.cut:new_cut]

        def run(x: torch.Tensor) -> torch.Tensor:
            for block in blocks:
                x = block(x)
            return x

        with torch.no_grad():
            clean = torch.cat([run(self.clean[s:s + batch_size]) for s in range(0, len(self.clean), batch_size)])
            n, v = self.augmented.shape[:2]
            flat = self.augmented.reshape(n * v, *self.augmented.shape[2:])
            rows = np.flatnonzero(np.repeat(self.has_views[self.held], v)) if v else np.zeros(0, dtype=np.int64)
            out = None
            for s in tqdm(range(0, len(rows), batch_size), desc="deeper cut", disable=not progress, leave=False):
                idx = torch.from_numpy(rows[s:s + batch_size])
                y = run(flat[idx].to(torch.float32)).to(torch.float16)
                if out is None:
                    out = torch.zeros((n * v, *y.shape[1:]), dtype=torch.float16)
                out[idx] = y
            if out is None:
                out = torch.zeros((n, 0, *clean.shape[1:]), dtype=torch.float16)
            augmented = out.reshape(n, v, *clean.shape[1:])
        return ViewCache(net=self.net, bb=self.bb, spec=self.spec, cut=new_cut, clean=clean, augmented=augmented,
                         has_views=self.has_views, device=self.device, recipe=replace(self.recipe, unfreeze=int(unfreeze)),
                         seed=self.seed, seconds=self.seconds + time.perf_counter() - started, weights=self.weights,
                         owner=self.owner, world=self.world)

    def save(self, path) -> None:
        """Write the activations and what they depend on (torch.save; reload with :meth:`load`)."""
        import torch

        if self.world.sharded:
            raise InputError("ViewCache.save of one process's shard", got=f"rank {self.world.rank} of {self.world.size}",
                             expected="a cache built by one process", todo="build and save the cache without torchrun")

        torch.save({"clean": self.clean, "augmented": self.augmented, "has_views": torch.from_numpy(self.has_views),
                    "cut": self.cut, "backbone": self.bb.name, "spec": self.spec.to_dict(), "seed": self.seed,
                    "recipe": self.recipe.to_dict(), "seconds": self.seconds}, str(path))

    @classmethod
    def load(cls, path, bb, spec, *, weights=None, device: str = "cpu") -> ViewCache:
        """A cache written by :meth:`save` for the same backbone and preprocessing (checked)."""
        import torch

        from edgexfer.backbones import build_backbone

        data = torch.load(str(path), weights_only=True)
        if data["backbone"] != bb.name or data["spec"] != spec.to_dict():
            raise InputError("view cache file was made for another backbone or preprocessing", got=str(path),
                             expected=f"{bb.name}, {spec.to_dict()}", todo="build a new ViewCache")
        net = build_backbone(bb, weights=weights).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        recipe = data["recipe"]
        recipe["augment"] = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["augment"].items()}
        return cls(net=net, bb=bb, spec=spec, cut=int(data["cut"]), clean=data["clean"], augmented=data["augmented"],
                   has_views=data["has_views"].numpy(), device=resolve_device(device), recipe=PartialRecipe(**recipe),
                   seed=int(data["seed"]), seconds=float(data["seconds"]), weights=weights)

    # ------------------------------------------------------------------------------------------- fit
    def clean_features(self, idx=None) -> np.ndarray:
        """Pretrained (not fine-tuned) pooled features of the clean views: the frozen model's features."""

        tail = Tail(self.net, self.cut).module.eval()
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=np.int64)
        return self.through(tail, idx).numpy()

    # long: one training loop (LP-FT start, optimizer, EMA, epochs, head refit) whose
    # steps share the fit's state; split up, a dozen locals would travel between the pieces.
    def fit(self, train_idx, labels, classes: Sequence[str], recipe: PartialRecipe | None = None, *, seed: int = 0,
            budget_s: float | None = None, eval_idx=None, progress: bool = False, head_kind: str = "linear",
            device: str | None = None) -> PartialFit:
        """Fine-tune a fresh copy of the tail (and a head) on ``train_idx``; returns a :class:`PartialFit`.

        ``labels`` covers all cached images (only ``train_idx`` rows are read for training). The recipe's
        ``unfreeze`` must match this cache's cut (use :meth:`deeper` for fewer blocks); its views and
        augmentation are the cache's. ``budget_s`` stops between steps once the fit has run that long.
        ``eval_idx`` only adds per-epoch accuracy on those images to the history; nothing is selected on it.

        Under torchrun (a sharded cache) every process draws the same order and views, so the global batches
        are one process's; each steps over the members it holds (its loss: that share of the batch's weighted
        mean), the tail and head are wrapped in DistributedDataParallel, the tail's BatchNorm uses the whole
        batch's statistics, and head fits see every process's features (gathered on rank 0, then broadcast).
        """
        import torch
        from torch import nn

        from edgexfer.pixel_model import TorchHead

        recipe = (recipe or self.recipe).check(self.bb.num_blocks)
        if int(recipe.unfreeze) != self.unfreeze:
            raise InputError("recipe.unfreeze does not match the view cache", got=recipe.unfreeze,
                             expected=self.unfreeze, todo="use cache.deeper(unfreeze) or build a new cache")
        device = resolve_device(device or self.device)
        world = self.world
        started = time.perf_counter()
        train_idx = np.asarray(train_idx, dtype=np.int64)
        labels = np.asarray(labels, dtype=np.int64)
        if not self.has_views[train_idx].all() and self.augmented.shape[1] > 0:
            raise InputError("training images without augmented views", got=int((~self.has_views[train_idx]).sum()),
                             expected="0", todo="build the cache with augment_idx covering train_idx")
        torch.manual_seed(seed)
        rng = np.random.default_rng([seed, 7919])
        classes = list(classes)
        k = len(classes)
        y_train = labels[train_idx]

        tail = Tail(copy.deepcopy(self.net).cpu(), self.cut).module
        if world.sharded:
            sync_batchnorm(tail)  # before the parameter lists below: it replaces the BatchNorm modules
        tail = tail.to(device)
        trainable = [p for p in tail.parameters()] if self.unfreeze > 0 else []
        for p in tail.parameters():
            p.requires_grad_(bool(trainable))
        head = TorchHead(head_kind, self.bb.feature_dim, k, dropout=recipe.dropout).to(device)

        def features(idx: np.ndarray, module=None, to_all: bool = True):
            module = module or tail
            module.eval()
            return self.through(module, idx, device=device, to_all=to_all)

        if recipe.lp_init and head_kind == "linear":
            _set_probe(head, features(train_idx, to_all=False), y_train, classes, recipe.C, world)
        tail_step, head_step = _data_parallel(tail, head, world, device, bool(trainable))

        epochs = int(recipe.epochs)
        bs = int(recipe.batch_size)
        steps_per_epoch = int(np.ceil(len(train_idx) / bs))
        groups = [{"params": list(head.parameters()), "lr": recipe.head_lr, "base_lr": recipe.head_lr}]
        if trainable:
            groups.append({"params": trainable, "lr": recipe.lr_of_backbone(), "base_lr": recipe.lr_of_backbone()})
        optimizer = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
        total_steps = epochs * steps_per_epoch
        warm_steps = int(recipe.warmup_epochs) * steps_per_epoch

        def lr_factor(step: int) -> float:  # cosine to zero over all epochs
            return 0.5 * (1 + np.cos(np.pi * min(step, total_steps) / total_steps))

        if recipe.class_weight == "balanced":
            counts = np.bincount(y_train, minlength=k).astype(np.float32)
            class_weight = (len(y_train) / (np.count_nonzero(counts) * np.maximum(counts, 1))).astype(np.float32)
            weight = torch.from_numpy(class_weight).to(device)
        else:
            class_weight, weight = None, None
        loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing)
        share_loss = nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing, reduction="sum")
        params = [p for p in [*tail.parameters(), *head.parameters()]]
        averaged = [p.detach().clone() for p in params] if recipe.ema > 0 else None
        views = min(int(recipe.views), int(self.augmented.shape[1]))  # the first V stored views
        history: list[dict[str, Any]] = []
        y_eval = None if eval_idx is None else labels[np.asarray(eval_idx, dtype=np.int64)]
        step = 0
        stopped = None
        bar = tqdm(total=total_steps, desc=f"fine-tuning {self.unfreeze} block(s)", unit="step", disable=not progress,
                   leave=False)
        for epoch in range(1, epochs + 1):
            torch.set_grad_enabled(True)  # a caller may have switched autograd off globally
            tail.train(recipe.train_bn and epoch > recipe.warmup_epochs)
            head.train()
            order = rng.permutation(len(train_idx))
            pick = rng.integers(0, views, size=len(train_idx)) if views else np.zeros(len(train_idx), dtype=np.int64)
            use_clean = (rng.random(len(train_idx)) < recipe.clean_prob) if views else np.ones(len(train_idx), bool)
            total_loss, correct = 0.0, 0
            for s in range(steps_per_epoch):
                rows = order[s * bs:(s + 1) * bs]  # the global batch
                share = rows[self.owner[train_idx[rows]] == world.rank] if world.sharded else rows
                idx = train_idx[share]
                x = self.augmented[self._rows(idx), torch.from_numpy(pick[share])].to(torch.float32) if views \
                    else self.clean[self._rows(idx)]
                if views and use_clean[share].any():
                    mask = torch.from_numpy(use_clean[share])
                    x[mask] = self.clean[self._rows(idx[use_clean[share]])]
                x = x.to(device)
                y = torch.from_numpy(labels[idx]).to(device)
                head_only = step < warm_steps or not trainable
                factor = lr_factor(step)
                for g in optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                if len(optimizer.param_groups) > 1:
                    optimizer.param_groups[1]["lr"] = 0.0 if head_only else optimizer.param_groups[1]["lr"]
                if head_only:
                    with torch.no_grad():
                        f = tail_step(x)
                else:
                    f = tail_step(x)
                logits = head_step(f)
                if world.sharded:  # this share of the global batch's weighted mean; DDP averages over processes
                    y_batch = labels[train_idx[rows]]
                    denom = float(class_weight[y_batch].sum()) if class_weight is not None else float(len(rows))
                    part = share_loss(logits, y) / denom
                    loss = part * world.size
                else:
                    part = loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if averaged is not None:
                    with torch.no_grad():
                        for a, p in zip(averaged, params):
                            a.mul_(recipe.ema).add_(p.detach(), alpha=1 - recipe.ema)
                total_loss += float(part.detach()) * len(rows)
                correct += int((logits.argmax(1) == y).sum())
                bar.update(1)
                if budget_s is not None and world.any(time.perf_counter() - started > budget_s):
                    stopped = f"time budget {budget_s:g} s reached in epoch {epoch}, step {s + 1}"
                    break
            total_loss, correct = world.sum([total_loss, correct])
            done = s + 1 if stopped else steps_per_epoch
            seen = min(len(train_idx), done * bs)
            entry = {"epoch": epoch, "train_loss": round(total_loss / seen, 5), "train_accuracy": round(correct / seen, 5),
                     "seconds": round(time.perf_counter() - started, 2)}
            if y_eval is not None:
                with _weights_swapped(params, averaged), torch.no_grad():
                    f = features(np.asarray(eval_idx, dtype=np.int64), to_all=False)
                    if f is not None:  # rank 0 reports
                        z = head.eval()(f)
                        entry["val_loss"] = round(float(nn.functional.cross_entropy(z, torch.from_numpy(y_eval).to(device))), 5)
                        entry["val_accuracy"] = round(float((z.argmax(1).cpu().numpy() == y_eval).mean()), 5)
            history.append(entry)
            if stopped:
                break
        bar.close()
        if averaged is not None:
            with torch.no_grad():
                for a, p in zip(averaged, params):
                    p.copy_(a)
        tail.eval()
        head.eval()
        if recipe.refit_head and head_kind == "linear":
            X, Y = features(train_idx, to_all=False), y_train
            aug = [self.through(tail, train_idx, view=v, device=device, to_all=False)
                   for v in range(views)] if recipe.refit_views else []
            if aug and X is not None:  # X is None on ranks other than 0
                X = torch.cat([X, *aug])
                Y = np.concatenate([y_train] * (views + 1))
            _set_probe(head, X, Y, classes, recipe.C, world)
        return PartialFit(cache=self, tail=tail.cpu(), head=head.cpu(), classes=classes, recipe=recipe, history=history,
                          seconds=time.perf_counter() - started, device=device, stopped=stopped, head_kind=head_kind)


def _set_probe(head, X, y, classes, C: float, world: World) -> None:
    """Make the head's last linear layer the converged linear probe (``fit_linear``) of features ``X``: fitted
    where ``X`` is (rank 0 under torchrun; None elsewhere), then the same on every process."""
    import torch

    from edgexfer.runtime.head_training import fit_linear

    layer = head.net[-1]
    if X is not None:
        probe = fit_linear(X.cpu().numpy(), y, classes, C=C)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(np.array(probe.tensors["W"])))
            layer.bias.copy_(torch.from_numpy(np.array(probe.tensors["b"])))
    world.broadcast_([layer.weight, layer.bias])


def _data_parallel(tail, head, world: World, device: str, train_tail: bool):
    """The modules a training step calls: under torchrun, DistributedDataParallel wrappers of the tail (when it
    trains) and of the head, which all-reduce the gradients; the modules themselves otherwise."""
    if not world.sharded:
        return tail, head
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if str(device).startswith("cuda") else None
    return (DistributedDataParallel(tail, device_ids=ids) if train_tail else tail), \
        DistributedDataParallel(head, device_ids=ids)


class _weights_swapped:
    """Context: evaluate with the averaged weights, then put the live ones back."""

    def __init__(self, params, averaged):
        self.params, self.averaged, self.saved = params, averaged, None

    def __enter__(self):
        import torch

        if self.averaged is not None:
            with torch.no_grad():
                self.saved = [p.detach().clone() for p in self.params]
                for p, a in zip(self.params, self.averaged):
                    p.copy_(a)
        return self

    def __exit__(self, *exc):
        import torch

        if self.saved is not None:
            with torch.no_grad():
                for p, s in zip(self.params, self.saved):
                    p.copy_(s)
        return False


class PartialFit:
    """A fine-tuned tail + head over a :class:`ViewCache`; scores any cached image on its clean view."""

    def __init__(self, *, cache: ViewCache, tail, head, classes, recipe, history, seconds, device, stopped, head_kind):
        self.cache, self.tail, self.torch_head, self.classes = cache, tail, head, list(classes)
        self.recipe, self.history, self.seconds, self.device = recipe, history, seconds, device
        self.stopped, self.head_kind = stopped, head_kind

    def features(self, idx) -> np.ndarray:
        """Fine-tuned pooled features of the cached images ``idx`` (clean views; under torchrun each process runs
        the images it holds and every process gets all rows)."""
        return self.cache.through(self.tail, idx).numpy()

    def logits(self, idx) -> np.ndarray:
        """float32 ``[len(idx), classes]`` logits of the cached images ``idx`` (clean views)."""
        return self.to_head().logits(self.features(idx))

    def to_head(self):
        """The head as the runtime's numpy :class:`~edgexfer.runtime.heads.Head`."""
        from edgexfer.runtime.heads import Head

        head = Head(kind=self.head_kind, classes=tuple(self.classes), tensors=self.torch_head.numpy_tensors())
        head.validate()
        return head

    def pixel_backbone(self):
        """The whole fine-tuned backbone as a CPU :class:`~edgexfer.pixel_model.PixelBackbone` in eval mode
        (uint8 NHWC in, pooled features out): export this."""
        from edgexfer.pixel_model import PixelBackbone

        net = copy.deepcopy(self.cache.net).cpu()
        cut = self.cache.cut
        net.load_tail(self.tail, cut)
        bb = self.cache.bb
        return PixelBackbone(net, bb.mean, bb.std).eval()

    def export(self, out_dir) -> dict[str, Any]:
        """Write ``backbone.onnx``, ``backbone.safetensors`` (state dict) and ``head.safetensors`` into ``out_dir``."""
        from pathlib import Path

        from safetensors.torch import save_file

        from edgexfer.onnx_export import export_backbone

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.pixel_backbone()
        save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(out / "backbone.safetensors"))
        export_backbone(model, self.cache.bb.input_size, out / "backbone.onnx")
        self.to_head().save(out / "head.safetensors")
        return {"backbone_onnx": str(out / "backbone.onnx"), "head": str(out / "head.safetensors")}
