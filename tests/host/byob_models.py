"""Two small architectures in plain torch that the bring-your-own-backbone tests hand to the kit as
``py:tests/host/byob_models.py:FACTORY`` (seeded random initialisation: the kit calls the factory under seed 0).

``resnet``: a stem and three BasicBlocks in an ``nn.Sequential`` (its top-level children run in sequence, so
``--unfreeze N`` can fine-tune the last N of them); it returns a ``[N, 64, 8, 8]`` map the kit pools.
``vit``: patch embedding, a class token, learned positions, ``nn.TransformerEncoder`` (LayerNorm, attention,
GELU) and a final LayerNorm; it returns the class token ``[N, 64]``. The others are broken on purpose.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()),
        BasicBlock(32, 32, 1), BasicBlock(32, 48, 2), BasicBlock(48, 64, 2))


class TinyViT(nn.Module):
    def __init__(self, size: int = 64, patch: int = 8, dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.norm(self.encoder(tokens))[:, 0]


def vit() -> nn.Module:
    return TinyViT()


class _Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)  # [N, C, H*W]: not poolable


class _Nan(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) / 0.0 * 0.0


def raises() -> nn.Module:
    raise RuntimeError("no such model")


def returns_none():
    return None


def tokens() -> nn.Module:
    return _Tokens()


def nan_features() -> nn.Module:
    return _Nan()
