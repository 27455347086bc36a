"""The torch side of ``py:`` backbones (:mod:`edgexfer.backbones.foreign`): import the factory, call it, load the
checkpoint, check the output, and wrap the module in the kit's backbone contract (:class:`ForeignBackbone`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgexfer.backbones.foreign import PySource
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import file_sha256

#: the seed the factory runs under, so a checkpoint-less backbone has one reproducible identity
INIT_SEED = 0


def _load_factory(source: PySource):
    try:
        if source.is_file:
            name = "edgexfer_byob_" + hashlib.sha1(source.target.encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, source.target)
                module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)  # type: ignore[union-attr]
                except BaseException:
                    sys.modules.pop(name, None)
                    raise
        else:
            module = importlib.import_module(source.target)
    except Exception as exc:  # the user's module may raise anything while importing
        raise InputError("cannot import the py: backbone's module", got=f"{source.target}: {type(exc).__name__}: "
                         f"{str(exc)[:160]}", expected="an importable module or .py file",
                         todo="fix the module (run python -c 'import ...' to see the error)") from None
    factory = getattr(module, source.factory, None)
    if not callable(factory):
        raise InputError("py: backbone factory not found", got=f"{source.factory} in {source.target}",
                         expected="a callable that returns an nn.Module", todo="check the name after the last ':'")
    return factory


def call_factory(source: PySource) -> nn.Module:
    """The factory's module, built under ``torch.manual_seed(INIT_SEED)`` (the caller's RNG is left as it was)."""
    factory = _load_factory(source)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        try:
            model = factory()
        except Exception as exc:  # the user's code
            raise InputError("the py: backbone factory raised", got=f"{source.factory}(): {type(exc).__name__}: "
                             f"{str(exc)[:160]}", expected="an nn.Module", todo="fix the factory") from None
    if not isinstance(model, nn.Module):
        raise InputError("the py: backbone factory returned no module", got=type(model).__name__,
                         expected="a torch nn.Module", todo=f"make {source.factory}() return the model")
    return model


def load_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load a state dict strictly, except for checkpoint keys the module has not (a classifier): reported."""
    from edgexfer.backbones import _read_state

    if not Path(path).is_file():
        raise InputError("backbone weight file not found", got=str(path), expected="an existing .pth or .safetensors",
                         todo="check --weights")
    state = _read_state(torch, Path(path))
    own = model.state_dict()
    unused = sorted(k for k in state if k not in own)
    missing = [k for k in own if k not in state]
    shapes = [f"{k}: {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or shapes:
        got = f"{len(missing)} key(s) missing (e.g. {missing[0]})" if missing else ""
        got += ("; " if got else "") + (f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else "")
        raise InputError("checkpoint does not fit the py: backbone (another architecture?)", got=got,
                         expected="a state dict of the factory's module (extra keys such as a classifier are ignored)",
                         todo="pass the checkpoint this architecture was trained to, or fix the factory")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return {"unused": unused[:20], "unused_count": len(unused), "missing": []}


def state_sha256(model: nn.Module) -> str:
    """Identity of a module's weights: each tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def pool(out: Any) -> torch.Tensor:
    """[N, D] as is; [N, C, H, W] (and [N, D, 1, 1]) averaged over H and W; anything else refused."""
    if isinstance(out, torch.Tensor) and out.dim() == 4:
        return out.mean(dim=(2, 3))
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return out
    got = f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
    raise InputError("py: backbone output is not poolable to [N, D]", got=got,
                     expected="one tensor [N, D], [N, D, 1, 1] or [N, C, H, W]",
                     todo="return the features (not a tuple or dict, not logits of another shape) from forward")


class ForeignBackbone(nn.Module):
    """A user's module in the kit's backbone contract: ``forward_features`` (normalised NCHW -> pooled [N, D]);
    ``_blocks``, ``cut_prefix``, ``cut_tail`` and ``load_tail`` for partial fine-tuning when the module's forward
    is its top-level children in sequence (checked by :func:`inspect_module`)."""

    def __init__(self, inner: nn.Module, sequential: bool):
        super().__init__()
        self.inner = inner
        # a plain list (not a registered submodule): the children are inner's, their state dict keys stay inner's
        self._blocks = list(inner.children()) if sequential else []

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.inner(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def cut_prefix(self, cut: int) -> nn.Module:
        return nn.Sequential(*self._blocks[:cut])

    def cut_tail(self, cut: int) -> nn.Module:
        return _SequentialTail(self._blocks[cut:])

    def load_tail(self, tail: nn.Module, cut: int) -> None:
        for j, block in enumerate(tail.blocks):
            self._blocks[cut + j].load_state_dict(block.state_dict())


class _SequentialTail(nn.Module):
    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return pool(x)


def _check_finite(feats: torch.Tensor, what: str) -> None:
    if not torch.isfinite(feats).all():
        bad = int((~torch.isfinite(feats)).sum())
        raise InputError(f"py: backbone gives NaN or infinite features ({what})", got=f"{bad} non-finite values",
                         expected="finite features", todo="check the weights and the --mean/--std the model expects")


def inspect_module(source: PySource, weights: Path | None, input_size: tuple[int, int]) -> dict[str, Any]:
    """Build the module once: its feature length, whether its children run in sequence (the blocks partial
    fine-tuning counts), its weight identity and the checkpoint report; refuses what the kit cannot use."""
    model = call_factory(source)
    report: dict[str, Any] = {}
    if weights is not None:
        report = load_weights(model, Path(weights))
        sha = file_sha256(Path(weights))
    else:
        sha = state_sha256(model)
    model.eval()
    x = torch.randn((2, 3, *input_size), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the user's forward
        raise InputError("the py: backbone fails on a normalised image batch",
                         got=f"[2, 3, {input_size[0]}, {input_size[1]}] -> {type(exc).__name__}: {str(exc)[:160]}",
                         expected="float32 NCHW RGB in", todo="check --input-size and the model's forward") from None
    feats = pool(out)
    _check_finite(feats, "on a random normalised batch")
    if feats.shape[0] != 2 or feats.shape[1] < 1:
        raise InputError("py: backbone output", got=f"shape {list(feats.shape)} for a batch of 2",
                         expected="[2, D] after pooling", todo="keep the batch axis first")
    children = list(model.children())
    sequential = False
    if len(children) > 1:
        try:
            with torch.no_grad():
                y = x
                for child in children:
                    y = child(y)
                sequential = torch.allclose(pool(y), feats, rtol=1e-4, atol=1e-5)
        except Exception:  # children that do not chain: the module is used whole (no partial fine-tuning)
            sequential = False
    return {"feature_dim": int(feats.shape[1]), "num_blocks": len(children) if sequential else 0,
            "weights_sha256": sha, "weights_report": report}


def build(cfg, weights: Path | None = None) -> ForeignBackbone:
    """Registry builder (``builder_loads_weights``): the factory's module with ``weights`` loaded, wrapped."""
    kw = cfg.builder_kwargs
    model = call_factory(PySource(kw["target"], kw["factory"]))
    if weights is not None:
        load_weights(model, Path(weights))
    return ForeignBackbone(model, sequential=cfg.num_blocks > 0)
