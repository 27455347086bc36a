"""The partial fine-tuning recipe, one for every modality: which last blocks train, how, and for how long.

:class:`PartialRecipe`'s defaults are the image study's winner (``benchmarks/finetune_study.py``); a host
modality (:mod:`edgexfer.modalities`) may start from other defaults (text: fewer epochs), and
:func:`partial_recipe` lays the command line's choices over them. No torch here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgexfer.runtime.errors import InputError


@dataclass(frozen=True)
class PartialRecipe:
    """Everything that defines one partial fine-tuning run (defaults: the study's winner)."""

    #: number of last blocks to fine-tune: MBConv blocks (the 1x1 head convolution after them trains too when
    #: N > 0) or transformer layers
    unfreeze: int = 2
    #: head learning rate (AdamW)
    head_lr: float = 1e-3
    #: learning rate of the unfrozen blocks; None means head_lr / 10
    backbone_lr: float | None = None
    #: epochs over the training part (a fixed count chosen by the study: no selection on held-out data)
    epochs: int = 10
    #: first epochs train the head alone (the tail is held still)
    warmup_epochs: int = 0
    batch_size: int = 32
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    #: dropout before the linear head
    dropout: float = 0.2
    #: "balanced" weights the loss by n / (classes * count), as the linear probe does; None: unweighted
    class_weight: str | None = "balanced"
    #: LP-FT: start the head from the converged linear probe (fit_linear on the clean training features)
    lp_init: bool = True
    #: C of that linear probe (scikit-learn's meaning)
    C: float = 1.0
    #: after fine-tuning, refit the linear head with fit_linear (same C, balanced) on the tuned tail's clean
    #: training features: the final head is the converged probe of the new features, not a drifted SGD head
    refit_head: bool = True
    #: that refit also sees the tuned features of the stored augmented views, each a sample of its own (same C:
    #: with V + 1 rows per image the L2 penalty weighs (V + 1) times less against the data term)
    refit_views: bool = False
    #: BatchNorm of the unfrozen blocks in train mode: their statistics adapt to the new images (the frozen
    #: prefix keeps ImageNet's); False keeps ImageNet statistics everywhere
    train_bn: bool = True
    #: exponential moving average of the tail and head weights per step (0 turns it off); the average is
    #: what the fit returns
    ema: float = 0.0
    #: stored augmented views per image (plus the clean one); an epoch draws one of them per image
    views: int = 6
    #: probability that an epoch uses an image's clean view instead of an augmented one
    clean_prob: float = 0.0
    #: Augmenter options of the stored views (runtime/augment.py)
    augment: dict[str, Any] = field(default_factory=lambda: {
        "scale": (0.8, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "zoom_out": (0.75, 1.0),
        "brightness": 0.0, "contrast": 0.0, "saturation": 0.0})

    def lr_of_backbone(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else self.head_lr / 10

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["augment"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.augment.items()}
        return out

    def check(self, num_blocks: int) -> PartialRecipe:
        if not 0 <= int(self.unfreeze) <= num_blocks:
            raise InputError("unfreeze", got=repr(self.unfreeze), expected=f"0..{num_blocks}",
                             todo="use the slow full path (--unfreeze all) to train every layer")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(name, got=getattr(self, name), expected="at least 1")
        if int(self.views) < 0:
            raise InputError("views", got=self.views, expected="0 or more augmented views per image")
        if not 0 <= self.ema < 1:
            raise InputError("ema", got=self.ema, expected="0 (off) or a decay in (0, 1)", todo="e.g. 0.9")
        if self.head_lr <= 0 or self.lr_of_backbone() < 0:
            raise InputError("learning rates", got=f"head {self.head_lr}, backbone {self.lr_of_backbone()}",
                             expected="head > 0, backbone >= 0")
        return self


def partial_recipe(cfg: Any, defaults: PartialRecipe) -> PartialRecipe:
    """The recipe a ``TrainConfig`` asks for: ``defaults`` with the command line's overrides."""
    changes: dict[str, Any] = {"unfreeze": int(cfg.unfreeze), "head_lr": cfg.lr, "batch_size": cfg.batch_size,
                               "C": cfg.C}
    if cfg.backbone_lr is not None:
        changes["backbone_lr"] = cfg.backbone_lr
    if cfg.epochs is not None:
        changes["epochs"] = cfg.epochs
    if cfg.views is not None:
        changes["views"] = cfg.views
    return replace(defaults, **changes)
