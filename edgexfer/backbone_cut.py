"""A backbone cut before block ``cut``: the frozen prefix as a fast function of pixels, the trainable tail.

:mod:`edgexfer.finetune` runs the prefix once per stored view (:func:`prefix_runner`) and trains the
:class:`Tail` on those activations. The backbone says where it cuts (``cut_prefix``, ``cut_tail``,
``load_tail``): EfficientNet-Lite's tail is its blocks from ``cut`` on, the head convolution and pooling;
a brought ``py:`` module's is its last top-level children and pooling
(:class:`edgexfer.backbones.py_module.ForeignBackbone`).
"""
from __future__ import annotations

from edgexfer.runtime.errors import InputError

__all__ = ["Tail", "prefix_runner", "has_module"]


class Tail:
    """The trainable end of the backbone (``net.cut_tail(cut)``: it shares the net's modules)."""

    def __init__(self, net, cut: int):
        self.module = net.cut_tail(cut)


def prefix_runner(net, bb, cut: int, device: str, engine: str):
    """A function uint8 NHWC pixels -> float32 CPU tensor of the activations at the input of block ``cut``."""
    import torch
    from torch import nn

    if engine not in ("auto", "torch", "onnxruntime"):
        raise InputError("prefix engine", got=repr(engine), expected="auto, torch or onnxruntime")

    class Prefix(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            std = torch.tensor(bb.std, dtype=torch.float32)
            self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
            self.register_buffer("shift", (-torch.tensor(bb.mean, dtype=torch.float32) / std).view(1, 3, 1, 1))
            self.body = net.cut_prefix(cut)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.body(image.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift)

    module = Prefix().eval()
    use_ort = engine == "onnxruntime" or (engine == "auto" and device == "cpu" and has_module("onnxruntime"))
    if not use_ort:
        module = module.to(device)
        return lambda pixels: module(torch.from_numpy(pixels).to(device)).cpu()
    import io
    import warnings

    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros((2, *bb.input_size, 3), dtype=torch.uint8),), buffer, dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["act"],
                          dynamic_axes={"image": {0: "batch"}, "act": {0: "batch"}}, do_constant_folding=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return lambda pixels: torch.from_numpy(session.run(None, {"image": pixels})[0])


def has_module(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
