"""`edgexfer train`: accuracy against scikit-learn, the feature cache, head kinds, bad input."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from host_support import subset as _subset

from edgexfer.cli import main
from edgexfer.train import TrainConfig, train

pytest.importorskip("torch")


def test_frozen_linear_on_clipart8_beats_floor_and_matches_sklearn(clipart8, tmp_path):
    """Acceptance: >= 0.62 on the seeded 80/20 split, within 1 point of LogisticRegression on the same features."""
    from sklearn.linear_model import LogisticRegression

    from edgexfer.runtime.cache import FeatureCache

    result = train(TrainConfig(data_dir=clipart8, out=tmp_path / "run", cache=tmp_path / "f.sqlite", progress=False))
    assert result.val_accuracy >= 0.62
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    backbone_sha = run["backbone"]["onnx_sha256"]
    from edgexfer.runtime.preprocess import PreprocessSpec

    key = PreprocessSpec.from_dict(run["preprocess"]).key()
    with FeatureCache(tmp_path / "f.sqlite", per_class_capacity=None) as cache:
        def xy(part):
            shas = [s["sha256"] for s in run[part]]
            found = cache.get_features(backbone_sha, key, shas)
            return np.stack([found[s] for s in shas]), np.array([s["label"] for s in run[part]])

        x_train, y_train = xy("train")
        x_val, y_val = xy("val")
    # scikit-learn's default tol=1e-4 stops lbfgs ~2 points short of the optimum on these features;
    # a converged peer is the fair comparison (the objective is strictly convex: one optimum).
    peer = LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, tol=1e-7).fit(x_train, y_train)
    peer_acc = float((peer.predict(x_val) == y_val).mean())
    assert abs(result.val_accuracy - peer_acc) <= 0.01, (result.val_accuracy, peer_acc)
    # duplicates in clipart8 are one sample; copies filed under two classes are dropped
    assert any("filed under classes" in s["reason"] for s in result.metrics["skipped"])


def test_second_run_on_the_same_data_runs_the_backbone_zero_times(demo_data, tmp_path):
    subset = _subset(demo_data, tmp_path / "data", classes=3, per_class=6)
    first = train(TrainConfig(data_dir=subset, out=tmp_path / "a", cache=tmp_path / "f.sqlite", progress=False))
    second = train(TrainConfig(data_dir=subset, out=tmp_path / "b", cache=tmp_path / "f.sqlite", progress=False))
    assert first.metrics["backbone_images_run"] == 18
    assert second.metrics["backbone_images_run"] == 0
    assert second.metrics["features_from_cache"] == 18
    assert second.val_accuracy == first.val_accuracy
    # cached samples are found by their content hash before decoding: a warm run decodes nothing
    assert first.metrics["images_decoded"] == 18 and second.metrics["images_decoded"] == 0


@pytest.mark.parametrize("head, floor", [("mlp", 0.55), ("prototype", 0.55)])
def test_other_head_kinds_train_from_the_cache(demo_run, tmp_path, demo_data, head, floor):
    cache = demo_run.run_dir.parent / "features.sqlite"
    result = train(TrainConfig(data_dir=demo_data, out=tmp_path / head, head=head, cache=cache, progress=False))
    assert result.metrics["backbone_images_run"] == 0
    assert result.val_accuracy >= floor
    assert (tmp_path / head / "plots" / "confusion.png").stat().st_size > 1000


def test_metrics_and_plots_of_a_run(demo_run):
    metrics = json.loads((demo_run.run_dir / "metrics.json").read_text())
    assert metrics["val_accuracy"] == demo_run.val_accuracy >= 0.5
    val = metrics["validation"]
    assert len(val["confusion_matrix"]) == 8 and sum(map(sum, val["confusion_matrix"])) == metrics["val_count"]
    assert set(val["per_class"]["fruit"]) == {"precision", "recall", "f1", "support"}
    png = (demo_run.run_dir / "plots" / "confusion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_partial_fine_tuning_trains_and_exports_its_own_backbone(demo_data, tmp_path):
    """Tiny smoke run (the real comparison is benchmarks/finetune_study.py): 2 epochs, last block."""
    from edgexfer.export import export

    subset = _subset(demo_data, tmp_path / "data", classes=3, per_class=8)
    result = train(TrainConfig(data_dir=subset, out=tmp_path / "run", mode="partial", unfreeze="1", epochs=2,
                               batch_size=8, progress=False))
    history = result.metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["best_epoch"] in (1, 2)
    assert (tmp_path / "run" / "plots" / "curves.png").is_file()
    from safetensors.numpy import load_file

    from edgexfer.backbones import build_backbone

    tuned = load_file(str(tmp_path / "run" / "backbone.safetensors"))
    pretrained = {k: v.numpy() for k, v in build_backbone("efficientnet_lite0").state_dict().items()}
    # frozen blocks keep weights and BatchNorm statistics (eval mode); the unfrozen last block moves
    for key in ("_conv_stem.weight", "_blocks.14._bn1.running_mean", "_blocks.14._bn1.running_var",
                "_blocks.14._project_conv.weight"):
        np.testing.assert_array_equal(tuned[key], pretrained[key])
    assert not np.allclose(tuned["_blocks.15._project_conv.weight"], pretrained["_blocks.15._project_conv.weight"])
    from edgexfer.finetune import PartialRecipe

    # the unfrozen blocks' BatchNorm statistics move only when the recipe trains them (the default does)
    same_stats = np.array_equal(tuned["_blocks.15._bn1.running_mean"], pretrained["_blocks.15._bn1.running_mean"])
    assert same_stats == (not PartialRecipe().train_bn)
    assert result.metrics["device"] in ("cpu", "cuda")
    exported = export(tmp_path / "run", tmp_path / "bundle", progress=False)
    assert exported.parity["max_abs_diff"] <= 1e-4 and exported.parity["top1_agreement"] == 1.0


# --- bad input ------------------------------------------------------------------------------------------

def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_corrupt_and_non_image_files_are_skipped_and_reported(demo_data, tmp_path):
    data = _subset(demo_data, tmp_path / "data", classes=3, per_class=6)
    good = next((data / "beverages").iterdir()).read_bytes()
    (data / "beverages" / "broken.jpg").write_bytes(good[: len(good) // 3])
    (data / "fruit" / "notes.jpg").write_text("not an image\n")
    code, out, err = _run("train", data, "--out", tmp_path / "run", "--cache", tmp_path / "f.sqlite", "--json")
    assert code == 0, err
    metrics = json.loads(out)
    skipped = {Path(s["path"]).name: s["reason"] for s in metrics["skipped"]}
    assert set(skipped) == {"broken.jpg", "notes.jpg"}
    assert "broken.jpg" in err and "notes.jpg" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["empty class", "missing dir", "single class", "unknown backbone"])
def test_unusable_data_or_options_give_one_line_errors(demo_data, tmp_path, case):
    data = _subset(demo_data, tmp_path / "data", classes=2, per_class=3)
    args = []
    if case == "empty class":
        (data / "zebras").mkdir()
        expect = "zebras"
    elif case == "missing dir":
        data = tmp_path / "nowhere"
        expect = "nowhere"
    elif case == "single class":
        shutil.rmtree(data / "desserts")
        expect = "at least 2 classes"
    else:
        args = ["--backbone", "resnet9000"]
        expect = "efficientnet_lite0"
    code, out, err = _run("train", data, "--out", tmp_path / "run", "--cache", tmp_path / "f.sqlite", *args)
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0] and " | " in lines[0]
    assert "Traceback" not in err


def test_truncated_weights_leave_the_previous_run_intact(demo_data, tmp_path):
    data = _subset(demo_data, tmp_path / "data", classes=2, per_class=4)
    run = tmp_path / "run"
    assert _run("train", data, "--out", run, "--cache", tmp_path / "f.sqlite", "--quiet")[0] == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    from edgexfer.backbones import get_config

    blob = get_config("efficientnet_lite0").weight_path().read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(blob[: len(blob) // 2])
    code, _, err = _run("train", data, "--out", run, "--cache", tmp_path / "f.sqlite", "--weights", cut, "--quiet")
    assert code == 1 and "cannot read backbone weight file" in err and "Traceback" not in err
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run.iterdir() if p.is_file()}
    assert after == before


def test_unfreeze_all_trains_every_layer_with_a_smaller_learning_rate(demo_data, tmp_path):
    from safetensors.numpy import load_file

    from edgexfer.backbones import build_backbone

    subset = _subset(demo_data, tmp_path / "data", classes=2, per_class=6)
    train(TrainConfig(data_dir=subset, out=tmp_path / "run", mode="partial", unfreeze="all", epochs=1,
                      batch_size=8, progress=False))
    tuned = load_file(str(tmp_path / "run" / "backbone.safetensors"))
    pretrained = {k: v.numpy() for k, v in build_backbone("efficientnet_lite0").state_dict().items()}
    # the stem moved (it is frozen in every other mode), and so did the last block
    assert not np.allclose(tuned["_conv_stem.weight"], pretrained["_conv_stem.weight"])
    assert not np.allclose(tuned["_blocks.15._project_conv.weight"], pretrained["_blocks.15._project_conv.weight"])
