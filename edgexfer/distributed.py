"""Several training processes under ``torchrun``: who holds which sample, and the few collectives training needs.

``torchrun --nproc_per_node K ... edgexfer train --mode partial`` starts K copies of the command; each finds
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` in its environment. :func:`join` turns them into a :class:`World`
(and the default process group: gloo on CPUs, NCCL with ``--device cuda``, where each process takes the GPU
``LOCAL_RANK``). Without those variables, or with ``WORLD_SIZE=1``, the world is one process and nothing here
communicates: a single-process run is the run it always was.

How partial fine-tuning uses it (:mod:`edgexfer.finetune`): every process reads the same data set and makes the
same split, but runs the frozen prefix only on the samples it *holds* (:func:`owners`: round-robin over the
training samples, then over the rest). Every process draws the same epoch order and view picks from the same
seed, so the global batches are the single process's; each steps over the members of a batch it holds, its loss
is that share of the global batch's weighted mean, DistributedDataParallel all-reduces the gradients, and the
BatchNorm layers of the tail normalise with the whole batch's statistics (:class:`GlobalBatchNorm2d`). Features
that a head fit or a report needs come together with :meth:`World.gather_rows`. Torch is imported lazily.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgexfer.runtime.errors import InputError

__all__ = ["World", "join", "current", "leave", "launched", "owners", "GlobalBatchNorm2d", "sync_batchnorm"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: str = "cpu"  #: where this process trains: cpu, or cuda:LOCAL_RANK under torchrun
    backend: str | None = None  #: gloo or nccl; None for one process

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes the run directory."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def gather_rows(self, values, owner: np.ndarray, *, to_all: bool = True):
        """The rows of every process in global order: ``values`` are this process's rows of a list of samples
        whose holders are ``owner`` (one rank per sample, the same array on every process), in that list's order.
        Returns the ``[len(owner), ...]`` tensor on every process (``to_all``) or on rank 0 only (None elsewhere)."""
        if not self.sharded:
            return values
        import torch
        import torch.distributed as dist

        counts = np.bincount(owner, minlength=self.size)
        width = int(counts.max())
        device = self._comm_device()
        mine = torch.zeros((width, *values.shape[1:]), dtype=values.dtype, device=device)
        mine[:len(values)] = values.to(device)
        chunks = [torch.empty_like(mine) for _ in range(self.size)] if to_all or self.is_main else None
        if to_all:
            dist.all_gather(chunks, mine)
        else:
            dist.gather(mine, chunks, dst=0)
        if chunks is None:
            return None
        out = torch.empty((len(owner), *values.shape[1:]), dtype=values.dtype, device=values.device)
        for r, chunk in enumerate(chunks):
            out[torch.from_numpy(np.flatnonzero(owner == r)).to(values.device)] = chunk[:counts[r]].to(values.device)
        return out

    def broadcast_(self, tensors) -> None:
        """Overwrite ``tensors`` with rank 0's (in place)."""
        if not self.sharded:
            return
        import torch.distributed as dist

        for t in tensors:
            buf = t.detach().to(self._comm_device())
            dist.broadcast(buf, src=0)
            t.data.copy_(buf.to(t.device))

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes (float64)."""
        if not self.sharded:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.cpu().tolist()

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (picklable, small), in rank order, on every process."""
        if not self.sharded:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        """True on every process when it is True on one (a decision all must take together)."""
        return bool(self.sum([float(flag)])[0] > 0)

    def _comm_device(self) -> str:
        return self.device if self.backend == "nccl" else "cpu"


_CURRENT = World()
_JOINED = False


def launched() -> int:
    """How many processes torchrun started (``WORLD_SIZE``; 1 without torchrun)."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise InputError("WORLD_SIZE in the environment", got=repr(raw), expected="a positive integer (torchrun sets it)",
                         todo="start with torchrun, or unset WORLD_SIZE")
    return size


def join(device: str) -> World:
    """This process's :class:`World`; under torchrun (``WORLD_SIZE`` > 1) it also joins the process group.

    ``device`` is ``--device`` resolved (cpu, cuda): cuda uses GPU ``LOCAL_RANK`` and NCCL, cpu uses gloo.
    """
    global _CURRENT, _JOINED
    size = launched()
    if size == 1:
        _CURRENT = World(device=device)
        return _CURRENT
    import torch
    import torch.distributed as dist

    try:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise InputError("torchrun environment", got=f"WORLD_SIZE={size}, RANK={os.environ.get('RANK')!r}",
                         expected="RANK and LOCAL_RANK integers", todo="start the command with torchrun") from None
    if not dist.is_available():
        raise InputError("several processes need torch.distributed", got=f"torch {torch.__version__} without it",
                         expected="a torch build with distributed support", todo="run one process (without torchrun)")
    if str(device).startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise InputError("more processes than GPUs on this node", got=f"LOCAL_RANK {local_rank}",
                             expected=f"below {torch.cuda.device_count()} GPU(s)",
                             todo="torchrun --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        _JOINED = True
    _CURRENT = World(rank=rank, size=size, local_rank=local_rank, device=device, backend=backend)
    return _CURRENT


def current() -> World:
    """The world :func:`join` made in this process (one process when nothing joined)."""
    return _CURRENT


def leave(clean: bool = True) -> None:
    """Leave the process group this module joined: after a barrier when ``clean`` (every process finished),
    at once after a failure (the others may wait in a collective; torchrun stops them)."""
    global _CURRENT, _JOINED
    if _JOINED:
        import torch.distributed as dist

        if dist.is_initialized():
            if clean:
                dist.barrier()
            dist.destroy_process_group()
        _JOINED = False
    _CURRENT = World()


def owners(n: int, train_idx: np.ndarray | None, size: int) -> np.ndarray:
    """The rank that holds each of ``n`` samples: round-robin over ``train_idx`` (each has several stored views),
    then over the rest (one view each), so every rank holds about as many of either."""
    owner = np.zeros(n, dtype=np.int64)
    if size <= 1:
        return owner
    heavy = np.zeros(n, dtype=bool)
    if train_idx is not None:
        heavy[np.asarray(train_idx, dtype=np.int64)] = True
    for group in (np.flatnonzero(heavy), np.flatnonzero(~heavy)):
        owner[group] = np.arange(len(group)) % size
    return owner


def _all_gather_with_grad(t):
    """``[world size, *t.shape]``: every process's ``t`` (one all-reduce of a table where each fills its row). The
    gradient comes back the same way: each process's row gets the sum of every process's gradient of it."""
    import torch
    import torch.distributed as dist

    class AllGather(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x):
            ctx.rank = dist.get_rank()
            table = x.new_zeros((dist.get_world_size(), *x.shape))
            table[ctx.rank] = x
            dist.all_reduce(table)
            return table

        @staticmethod
        def backward(ctx: Any, grad):
            grad = grad.contiguous().clone()
            dist.all_reduce(grad)
            return grad[ctx.rank]

    return AllGather.apply(t)


@functools.cache
def _global_batchnorm_class():
    from torch import nn

    class GlobalBatchNorm(nn.BatchNorm2d):
        """BatchNorm2d whose training statistics are those of the whole global batch (all processes' shares,
        empty shares included), as one process would compute them; in eval mode a plain BatchNorm2d. One
        all-reduce forward and one backward per layer."""

        def forward(self, x):
            if not self.training:
                return super().forward(x)
            import torch

            c = x.shape[1]
            n = x.numel() // c
            if n:  # this share's count, mean and (biased) variance, combined below as Chan et al.'s parallel variance
                share = torch.cat([x.new_tensor([float(n)]), x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)])
            else:  # an empty share (its process holds none of this batch) still takes part, in autograd too
                zeros = x.sum(dim=(0, 2, 3))
                share = torch.cat([x.new_zeros(1), zeros, zeros])
            table = _all_gather_with_grad(share)
            counts, means, variances = table[:, :1], table[:, 1:c + 1], table[:, c + 1:]
            total = counts.sum()
            mean = (counts * means).sum(dim=0) / total
            var = (counts * (variances + (means - mean) ** 2)).sum(dim=0) / total
            centred = x - mean[None, :, None, None]
            if self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked += 1
                    factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                    unbiased = var * (total / (total - 1).clamp(min=1))
                    self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                    self.running_var.mul_(1 - factor).add_(unbiased.detach(), alpha=factor)
            scale = torch.rsqrt(var + self.eps)
            if self.affine:
                scale = scale * self.weight
            y = centred * scale[None, :, None, None]
            return y + self.bias[None, :, None, None] if self.affine else y

    return GlobalBatchNorm


def GlobalBatchNorm2d(*args, **kwargs):  # noqa: N802 - a class made on first use (torch is imported lazily)
    """A :class:`torch.nn.BatchNorm2d` that normalises with the statistics of all processes' shares of a batch."""
    return _global_batchnorm_class()(*args, **kwargs)


def sync_batchnorm(module):
    """Replace every BatchNorm2d inside ``module`` by a :func:`GlobalBatchNorm2d` with the same state (same keys:
    a state dict of the result loads into the original architecture). Returns ``module``."""
    from torch import nn

    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                                    track_running_stats=child.track_running_stats).to(
                                        next(iter(child.state_dict().values())).device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child)
    return module
