"""PyTorch modules that take raw uint8 NHWC pixels, as the exported ``backbone.onnx`` does.

Cast, scaling to [0, 1], mean/std normalisation and the NHWC -> NCHW transpose happen inside the
module, so the exported graph does them on the engine (the GPU on a Jetson) and the device feeds
the same uint8 arrays that :mod:`edgexfer.runtime.preprocess` produces on the host.
"""
from __future__ import annotations

import torch
from torch import nn


class PixelBackbone(nn.Module):
    """uint8 ``[N, H, W, 3]`` RGB -> float32 ``[N, feature_dim]`` pooled features."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        std_t = torch.tensor(std, dtype=torch.float32)
        mean_t = torch.tensor(mean, dtype=torch.float32)
        # (p / 255 - mean) / std folded into one multiply-add
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        x = x * self.scale + self.shift
        return self.backbone.forward_features(x)


class TorchHead(nn.Module):
    """Trainable twin of the runtime's numpy heads (``linear`` and ``mlp``)."""

    def __init__(self, kind: str, feature_dim: int, num_classes: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, num_classes))
        else:
            raise ValueError(kind)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def numpy_tensors(self) -> dict:
        """Weights named as :class:`edgexfer.runtime.heads.Head` expects them."""
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        arrays = [(m.weight.detach().cpu().numpy().astype("float32"), m.bias.detach().cpu().numpy().astype("float32"))
                  for m in linears]
        if self.kind == "linear":
            return {"W": arrays[0][0], "b": arrays[0][1]}
        return {"W1": arrays[0][0], "b1": arrays[0][1], "W2": arrays[1][0], "b2": arrays[1][1]}
