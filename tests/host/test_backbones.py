"""Backbone registry and the real ImageNet weights."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from edgexfer.backbones import get_config, list_backbones
from edgexfer.runtime.errors import InputError

# a local marker: `from conftest import …` is ambiguous once several test folders have a conftest.py
requires_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                    reason="needs torch (the host install: edgexfer[train])")


def test_registry_lists_the_three_lite_variants_minilm_and_the_speech_embedding():
    assert list_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "minilm_l6",
                                "speech_embedding"]


def test_unknown_backbone_names_the_choices():
    with pytest.raises(InputError) as err:
        get_config("resnet50")
    msg = str(err.value)
    assert "'resnet50'" in msg and "efficientnet_lite0" in msg and msg.count(" | ") >= 2


def _imagenet_input(image: np.ndarray, cfg):
    import torch
    from PIL import Image

    img = Image.fromarray(image).convert("RGB").resize(cfg.input_size[::-1], Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


@requires_torch
@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_every_backbone_loads_real_weights_and_knows_imagenet(name):
    """Contract for every registered backbone: strict weight load, pooled features, ImageNet top-1."""
    import torch
    from skimage import data

    from edgexfer.backbones import build_backbone

    cfg = get_config(name)
    model = build_backbone(name).eval()
    assert model.num_blocks == cfg.num_blocks
    with torch.no_grad():
        cat = _imagenet_input(data.chelsea(), cfg)
        feats = model.forward_features(cat)
        assert feats.shape == (1, cfg.feature_dim)
        assert int(model(cat).argmax()) in range(281, 286)  # tabby/tiger/Persian/Siamese/Egyptian cat
        assert int(model(_imagenet_input(data.coffee(), cfg)).argmax()) == 967  # espresso


@requires_torch
def test_truncated_weight_file_is_one_line_error(tmp_path):
    from edgexfer.backbones import build_backbone

    src = get_config("efficientnet_lite0").weight_path().read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(InputError) as err:
        build_backbone("efficientnet_lite0", weights=bad)
    assert "cannot read backbone weight file" in str(err.value) and "\n" not in str(err.value)


@requires_torch
def test_weights_of_another_architecture_are_refused(tmp_path):
    import torch

    from edgexfer.backbones import build_backbone

    other = tmp_path / "lite1.pth"
    torch.save(build_backbone("efficientnet_lite1").state_dict(), other)
    with pytest.raises(InputError) as err:
        build_backbone("efficientnet_lite0", weights=other)
    assert "do not fit backbone 'efficientnet_lite0'" in str(err.value)
