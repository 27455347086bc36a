"""edgexfer.finetune: the view cache equals the full model, fits are seeded, --device works (cpu, cuda)."""
from __future__ import annotations

import json
import time
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from host_support import subset as _subset

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def small(demo_data):
    """3 demo classes x 6 images, decoded as train does, with a 2-view cache cut for --unfreeze 2."""
    from edgexfer.backbones import get_config
    from edgexfer.finetune import PartialRecipe, ViewCache
    from edgexfer.modalities.image import load_dataset
    from edgexfer.runtime.preprocess import PreprocessSpec

    bb = get_config("efficientnet_lite0")
    spec = PreprocessSpec(size=bb.input_size)
    folder, images, labels, *_ = load_dataset(demo_data, spec, progress=False)
    keep = np.concatenate([np.flatnonzero(labels == c)[:6] for c in range(3)])
    images = [images[i] for i in keep]
    labels = labels[keep]
    recipe = PartialRecipe(unfreeze=2, views=2, epochs=2, batch_size=8)
    cache = ViewCache.build(images, spec, bb, recipe, seed=0, progress=False)
    train = np.concatenate([np.flatnonzero(labels == c)[:4] for c in range(3)])
    test = np.setdiff1d(np.arange(len(labels)), train)
    return {"bb": bb, "spec": spec, "images": images, "labels": labels, "classes": list(folder.classes[:3]),
            "recipe": recipe, "cache": cache, "train": train, "test": test}


def _pixels(small, idx):
    from edgexfer.runtime.preprocess import resize_to_spec, stack

    return stack([resize_to_spec(small["images"][i], small["spec"]) for i in idx])


def test_view_cache_clean_features_equal_the_full_torch_model_and_the_onnx_export(small, tmp_path):
    import torch

    from edgexfer.modalities.image import pixel_backbone
    from edgexfer.onnx_export import export_backbone
    from edgexfer.runtime.backends.registry import open_backend

    cache = small["cache"]
    assert cache.clean.dtype == torch.float32 and cache.augmented.dtype == torch.float16
    assert tuple(cache.augmented.shape[:2]) == (len(small["images"]), 2)
    model = pixel_backbone(small["bb"], None).eval()
    pixels = _pixels(small, range(len(small["images"])))
    with torch.no_grad():
        full = model(torch.from_numpy(pixels)).numpy()
    cached = cache.clean_features()
    np.testing.assert_allclose(cached, full, atol=2e-4 * np.abs(full).max())
    export_backbone(model, small["bb"].input_size, tmp_path / "backbone.onnx")
    with open_backend("onnxruntime", tmp_path / "backbone.onnx") as backend:
        onnx_feats = backend.run(pixels)
    np.testing.assert_allclose(cached, onnx_feats, atol=2e-4 * np.abs(full).max())
    # a later cut of the same views (fewer unfrozen blocks) still gives the same clean features
    np.testing.assert_allclose(cache.deeper(1).clean_features(), cached, atol=1e-5 * np.abs(full).max())


def test_fit_is_deterministic_for_a_seed_and_its_backbone_reproduces_its_features(small):
    import torch

    cache, recipe = small["cache"], small["recipe"]
    args = (small["train"], small["labels"], small["classes"], recipe)
    a = cache.fit(*args, seed=3, eval_idx=small["test"])
    b = cache.fit(*args, seed=3)
    np.testing.assert_array_equal(a.logits(small["test"]), b.logits(small["test"]))
    assert [h["epoch"] for h in a.history] == [1, 2] and "val_accuracy" in a.history[-1] and a.seconds > 0
    # the fine-tuned tail moved; the cached pretrained copy did not
    pre = cache.net._blocks[15]._project_conv.weight
    assert not torch.allclose(a.tail.blocks[-1]._project_conv.weight, pre)
    # the exported whole backbone (CPU, eval) computes what the fit scored
    model = a.pixel_backbone()
    assert not model.training and next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        full = model(torch.from_numpy(_pixels(small, small["test"]))).numpy()
    np.testing.assert_allclose(full, a.features(small["test"]), atol=2e-4 * np.abs(full).max())
    head = a.to_head()
    assert head.kind == "linear" and head.classes == tuple(small["classes"])


def test_fit_stops_at_its_time_budget_and_rejects_a_mismatched_recipe(small):
    from edgexfer.runtime.errors import InputError

    cache, recipe = small["cache"], small["recipe"]
    fit = cache.fit(small["train"], small["labels"], small["classes"], replace(recipe, epochs=50), budget_s=0.0)
    assert len(fit.history) == 1 and "time budget" in fit.stopped
    with pytest.raises(InputError, match="unfreeze"):
        cache.fit(small["train"], small["labels"], small["classes"], replace(recipe, unfreeze=3))


def test_default_partial_recipe_trains_deterministically_on_cpu(demo_data, tmp_path):
    from edgexfer.train import TrainConfig, train

    subset = _subset(demo_data, tmp_path / "data", classes=3, per_class=6)
    runs = [train(TrainConfig(data_dir=subset, out=tmp_path / name, mode="partial", epochs=2, views=2, device="cpu",
                              progress=False)) for name in ("a", "b")]
    assert runs[0].metrics["device"] == "cpu"
    no_time = [[{k: v for k, v in h.items() if k != "seconds"} for h in r.metrics["history"]] for r in runs]
    assert no_time[0] == no_time[1] and [h["epoch"] for h in no_time[0]] == [1, 2]
    assert runs[0].val_accuracy == runs[1].val_accuracy
    heads = [(tmp_path / name / "head.safetensors").read_bytes() for name in ("a", "b")]
    assert heads[0] == heads[1]


def test_device_cuda_without_cuda_is_a_one_line_error(demo_data, tmp_path):
    import torch

    from edgexfer.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = _subset(demo_data, tmp_path / "data", classes=2, per_class=3)
    result = CliRunner().invoke(main, ["train", str(data), "--out", str(tmp_path / "run"), "--mode", "partial",
                                       "--device", "cuda"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "--device" in lines[0] and " | " in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.gpu
def test_partial_training_on_cuda_matches_cpu_and_reports_time_per_epoch(demo_data, tmp_path):
    """Same short partial run on cuda and on cpu: similar accuracy, the device recorded, per-epoch time shown."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to PyTorch")
    import onnx

    from edgexfer.train import TrainConfig, train

    subset = _subset(demo_data, tmp_path / "data", classes=4, per_class=8)
    out, per_epoch = {}, {}
    for device in ("cpu", "cuda"):
        started = time.perf_counter()
        out[device] = train(TrainConfig(data_dir=subset, out=tmp_path / device, mode="partial", epochs=3, views=2,
                                        device=device, progress=False))
        metrics = json.loads((tmp_path / device / "metrics.json").read_text())
        assert metrics["device"] == device
        history = metrics["history"]
        per_epoch[device] = (history[-1]["seconds"] / len(history), time.perf_counter() - started)
    print(f"seconds per epoch (whole run): cpu {per_epoch['cpu']}, cuda {per_epoch['cuda']}")
    assert abs(out["cpu"].val_accuracy - out["cuda"].val_accuracy) <= 0.15
    # export ran from a CPU copy in eval mode: the same graph whichever device trained
    ops = [[n.op_type for n in onnx.load(str(tmp_path / d / "backbone.onnx")).graph.node] for d in ("cpu", "cuda")]
    assert ops[0] == ops[1]
