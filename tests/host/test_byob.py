"""Bring your own backbone (issue 25): ``--backbone py:FILE:FACTORY`` through the whole kit.

Two architectures written in plain torch in ``byob_models.py`` (a small ResNet of BasicBlocks, a small ViT),
seeded random initialisation, 64x64 inputs, the 240-image demo set: frozen training by ``edgexfer train``,
export parity, every OpenVINO and ONNX Runtime precision validated or refused with its reason, a device
install predicting what the host predicts, and an independent linear probe (the test's own decoding,
letterbox, normalisation and pooling in torch + scikit-learn) matching the kit's frozen accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

MODELS = Path(__file__).with_name("byob_models.py")
SIZE = (64, 64)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PREP = ["--input-size", "64,64", "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]


def _cli(*args: str) -> str:
    from click.testing import CliRunner

    from edgexfer.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="module", params=["resnet", "vit"])
def byob(request, tmp_path_factory, demo_data):
    """``edgexfer train --backbone py:byob_models.py:<arch>`` (frozen, linear head) and ``edgexfer export``."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp(f"byob-{request.param}")
    run, bundle = root / "run", root / "bundle"
    _cli("train", str(demo_data), "--out", str(run), "--backbone", f"py:{MODELS}:{request.param}", *PREP,
         "--cache", str(root / "cache.sqlite"), "--quiet")
    _cli("export", str(run), "--out", str(bundle), "--quiet")
    return {"arch": request.param, "run": run, "bundle": bundle, "data": demo_data,
            "run_json": json.loads((run / "run.json").read_text())}


def test_frozen_training_and_export_record_the_brought_backbone(byob):
    from edgexfer.backbones.foreign import PySource
    from edgexfer.backbones.py_module import call_factory, state_sha256
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.compare import tolerance_for

    run = byob["run_json"]
    assert run["backbone"]["arch"] == f"py:byob_models.py:{byob['arch']}"
    assert run["backbone"]["feature_dim"] == 64 and run["preprocess"]["size"] == list(SIZE)
    manifest = Bundle.open(byob["bundle"]).manifest
    assert manifest.backbone.arch == run["backbone"]["arch"]
    assert (manifest.backbone.input.mean, manifest.backbone.input.std) == (MEAN, STD)
    # no checkpoint: the identity is the seed-0 initial state of the factory's module
    assert manifest.backbone.weights_sha256 == state_sha256(call_factory(PySource(str(MODELS), byob["arch"])))
    parity = json.loads((byob["bundle"] / "reports" / "export.json").read_text())
    assert parity["count"] == 48 and parity["max_abs_diff"] <= tolerance_for("fp32").atol
    assert parity["top1_agreement"] == 1.0 and parity["mean_cosine"] > 0.99999


def _own_pixels(path: Path) -> np.ndarray:
    """The test's own letterbox onto white (Pillow, bilinear, one pass), written from the documented geometry
    (scale to fit, sizes rounded half up, centred) instead of calling edgexfer.runtime.preprocess."""
    from PIL import Image

    with Image.open(path) as im:
        rgba = im.convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    (h, w), (src_w, src_h) = SIZE, rgb.size
    scale = min(w / src_w, h / src_h)
    new_w, new_h = max(1, int(src_w * scale + 0.5)), max(1, int(src_h * scale + 0.5))
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    canvas.paste(rgb.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None),
                 ((w - new_w) // 2, (h - new_h) // 2))
    return np.asarray(canvas)


def _own_features(arch: str, paths: list[str]) -> np.ndarray:
    """Features by the test alone: the factory's module (seed 0), mean/std applied here, maps averaged here."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("byob_models_probe", MODELS)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    torch.manual_seed(0)
    net = getattr(models, arch)().eval()
    x = torch.from_numpy(np.stack([_own_pixels(Path(p)) for p in paths])).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = net(x)
    return (out.mean(dim=(2, 3)) if out.dim() == 4 else out).numpy()


def test_an_independent_linear_probe_matches_the_frozen_accuracy(byob):
    """torch features + scikit-learn on the same images, split and C: within 3 points of edgexfer train."""
    from sklearn.linear_model import LogisticRegression

    from edgexfer.runtime.backends.registry import open_reference
    from edgexfer.runtime.preprocess import PreprocessSpec, load_image, stack

    run = byob["run_json"]
    train_paths, val_paths = [t["path"] for t in run["train"]], [v["path"] for v in run["val"]]
    x_train, x_val = _own_features(byob["arch"], train_paths), _own_features(byob["arch"], val_paths)
    probe = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    probe.fit(x_train, [t["label"] for t in run["train"]])
    accuracy = float(np.mean(probe.predict(x_val) == np.array([v["label"] for v in run["val"]])))
    assert abs(accuracy - run["val_accuracy"]) <= 0.03, (accuracy, run["val_accuracy"])
    # and feature by feature: the bundle's backbone.onnx on the kit's pixels against the test's own pipeline
    spec = PreprocessSpec(size=SIZE)
    with open_reference(byob["bundle"] / "backbone.onnx") as engine:
        kit = engine.run(stack([load_image(p, spec) for p in val_paths]))
    cosine = np.sum(kit * x_val, 1) / (np.linalg.norm(kit, axis=1) * np.linalg.norm(x_val, axis=1))
    assert cosine.min() >= 0.9999, cosine.min()


#: (backend, precision) -> what it needs; int8 and bf16 are judged on held-out labelled images
CONVERSIONS = [("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "bf16"), ("openvino", "int8"),
               ("onnxruntime", "fp32"), ("onnxruntime", "int8")]


@pytest.mark.slow
def test_every_engine_is_validated_or_refused_with_its_reason(byob, tmp_path):
    """OpenVINO fp32/fp16/bf16/int8 and ONNX Runtime fp32/int8 of a brought backbone (a ViT's LayerNorm,
    attention and GELU included): each engine is validated and recorded, or refused by the comparator in one
    line that names the failing figure, leaving the bundle unchanged."""
    pytest.importorskip("openvino")
    import shutil

    from edgexfer.converters import convert
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.errors import EdgexferError

    bundle = shutil.copytree(byob["bundle"], tmp_path / "bundle")
    outcome = {}
    for backend, precision in CONVERSIONS:
        calib = byob["data"] if precision in ("int8", "bf16") else None
        before = Bundle.open(bundle).manifest.engines
        try:
            result = convert(bundle, backend, precision, calib=calib, calib_size=32, val_size=24, progress=False)
        except EdgexferError as exc:
            text = str(exc)
            assert "\n" not in text and " | got " in text and "tolerance" in text, text
            assert Bundle.open(bundle).manifest.engines == before  # refused: nothing recorded
            outcome[(backend, precision)] = "refused: " + text.split(" | got ")[1][:120]
            continue
        golden = result.report["validation"]["golden"]
        assert result.registered and result.report["validation"]["passed"] and golden["top1_agreement"] == 1.0
        outcome[(backend, precision)] = f"validated: max |diff| {golden['max_abs_diff']:.1e}"
    print(byob["arch"], json.dumps({f"{b} {p}": o for (b, p), o in outcome.items()}, indent=1))
    # the float engines always hold: they compute what fp32 computes, rounded
    for key in [("openvino", "fp32"), ("openvino", "fp16"), ("onnxruntime", "fp32")]:
        assert outcome[key].startswith("validated"), (key, outcome[key])
    if byob["arch"] == "resnet":  # convolutions quantize well even with random weights
        assert all(o.startswith("validated") for o in outcome.values()), outcome


def test_a_device_install_predicts_what_the_host_predicts(byob, tmp_path):
    """The device (torch-free runtime) installs the bundle and labels the validation images as the host's
    PyTorch backbone + head do."""
    import torch

    from edgexfer.modalities.base import run_backbone
    from edgexfer.pixel_model import PixelBackbone
    from edgexfer.runtime.device import Device
    from edgexfer.runtime.heads import Head
    from edgexfer.runtime.preprocess import PreprocessSpec, load_image, stack

    run = byob["run_json"]
    paths = [v["path"] for v in run["val"]]
    model = PixelBackbone(run_backbone(run, byob["run"]), MEAN, STD).eval()
    with torch.no_grad():
        feats = model(torch.from_numpy(stack([load_image(p, PreprocessSpec(size=SIZE)) for p in paths]))).numpy()
    head = Head.load(byob["run"] / "head.safetensors")
    host = [run["classes"][i] for i in head.logits(feats).argmax(1)]
    with Device(tmp_path / "state") as dev:
        dev.install(byob["bundle"])
        device = [p.label for p in dev.predict(paths, top_k=1)]
    assert device == host


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("factory, options, message", [
    ("raises", PREP, "factory raised | got raises(): RuntimeError: no such model"),
    ("returns_none", PREP, "factory returned no module | got NoneType"),
    ("tokens", PREP, "output is not poolable to [N, D] | got a tensor of shape [2, 3, 4096]"),
    ("nan_features", PREP, "NaN or infinite features (on a random normalised batch) | got 6 non-finite values"),
    ("no_such_factory", PREP, "factory not found | got no_such_factory in"),
    ("resnet", PREP[:2], "needs its preprocessing | got no --mean, --std"),
    ("resnet", ["--input-size", "64", *PREP[2:]], "--input-size | got ('64',)"),
])
def test_a_bad_py_backbone_is_one_line_naming_what_to_change(tmp_path, demo_data, factory, options, message):
    from click.testing import CliRunner

    from edgexfer.cli import main

    result = CliRunner().invoke(main, ["train", str(demo_data), "--out", str(tmp_path / "run"), "--backbone",
                                       f"py:{MODELS}:{factory}", *options, "--quiet"])
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "run").exists()  # refused before any image was read


def test_a_checkpoint_loads_strictly_but_for_keys_the_features_never_use(tmp_path):
    """A checkpoint with a classifier the features do not use loads (the extra keys reported); one of another
    architecture is refused in one line; the identity is the checkpoint file's sha256."""
    import torch

    from edgexfer.backbones import backbone_config
    from edgexfer.backbones.foreign import PySource
    from edgexfer.backbones.py_module import call_factory
    from edgexfer.runtime.errors import InputError
    from edgexfer.runtime.fsutil import file_sha256

    state = {k: v + 0.01 for k, v in call_factory(PySource(str(MODELS), "resnet")).state_dict().items()}
    good = tmp_path / "resnet.pth"
    torch.save({**state, "fc.weight": torch.zeros(8, 64), "fc.bias": torch.zeros(8)}, good)
    cfg = backbone_config(f"py:{MODELS}:resnet", weights=good, input_size=SIZE, mean=MEAN, std=STD)
    assert cfg.weight_sha256 == file_sha256(good) and cfg.num_blocks == 4
    assert cfg.builder_kwargs["weights_report"] == {"unused": ["fc.bias", "fc.weight"], "unused_count": 2,
                                                    "missing": []}
    vit_ckpt = tmp_path / "vit.pth"
    torch.save(call_factory(PySource(str(MODELS), "vit")).state_dict(), vit_ckpt)
    with pytest.raises(InputError, match=r"checkpoint does not fit the py: backbone .* \| got \d+ key\(s\) missing"):
        backbone_config(f"py:{MODELS}:resnet", weights=vit_ckpt, input_size=SIZE, mean=MEAN, std=STD)
    with pytest.raises(InputError, match="preprocessing options: a packaged backbone carries"):
        backbone_config("efficientnet_lite0", input_size=SIZE, mean=MEAN, std=STD)


# ------------------------------------------------------------------------------------------ partial
def test_partial_fine_tuning_of_a_py_resnet_runs_and_exports_with_parity(tmp_path, demo_data):
    """--mode partial --unfreeze 2: the last two top-level children (BasicBlocks) train on the stored views of
    the frozen prefix; the tuned backbone exports and matches PyTorch."""
    from edgexfer.runtime.compare import tolerance_for

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    _cli("train", str(demo_data), "--out", str(run), "--backbone", f"py:{MODELS}:resnet", *PREP, "--mode", "partial",
         "--unfreeze", "2", "--epochs", "2", "--views", "1", "--device", "cpu", "--quiet")
    record = json.loads((run / "run.json").read_text())
    assert record["backbone"]["fine_tuned"] and record["backbone"]["py"]["num_blocks"] == 4
    _cli("export", str(run), "--out", str(bundle), "--quiet")
    parity = json.loads((bundle / "reports" / "export.json").read_text())
    assert parity["max_abs_diff"] <= tolerance_for("fp32").atol and parity["top1_agreement"] == 1.0
    # the bundle holds the tuned blocks: its accuracy is the tuned run's (the head fits only the tuned features)
    assert abs(parity["val_accuracy_onnx"] - record["val_accuracy"]) <= 0.03, (parity, record["val_accuracy"])
    with pytest.raises(AssertionError, match="no blocks that partial fine-tuning can cut"):
        _cli("train", str(demo_data), "--out", str(tmp_path / "vit"), "--backbone", f"py:{MODELS}:vit", *PREP,
             "--mode", "partial", "--quiet")


def test_backbones_shows_how_to_bring_your_own_and_the_documented_example_builds():
    """``edgexfer backbones`` explains py: backbones; docs/backbones.md's example file is a valid one."""
    from edgexfer.backbones import backbone_config

    output = _cli("backbones")
    assert "efficientnet_lite0" in output and "--backbone py:MODULE_OR_FILE:FACTORY" in output
    assert "--input-size H,W --mean R,G,B --std R,G,B" in output
    example = Path(__file__).resolve().parents[2] / "docs" / "examples" / "small_resnet.py"
    assert f"py:docs/examples/{example.name}:build" in (example.parents[1] / "backbones.md").read_text()
    cfg = backbone_config(f"py:{example}:build", input_size=(96, 96), mean=MEAN, std=STD)
    assert (cfg.feature_dim, cfg.num_blocks, cfg.name) == (128, 4, "py:small_resnet.py:build")


# ------------------------------------------------------------------------------------------ onnx:
@pytest.fixture(scope="module")
def resnet_onnx(tmp_path_factory) -> Path:
    """The test ResNet (seed 0) exported elsewhere-style: float32 NCHW 'pixel_values', a [N, 64, 8, 8] map out,
    opset 13 and a fixed batch of 1 (the kit converts the opset and makes the batch dynamic)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("byob_models_onnx", MODELS)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx-model") / "resnet.onnx"
    torch.onnx.export(models.resnet().eval(), (torch.zeros(1, 3, *SIZE),), str(path), dynamo=False, opset_version=13,
                      input_names=["pixel_values"], output_names=["map"])
    return path


def test_an_onnx_feature_extractor_is_wrapped_checked_and_runs_on_the_device(resnet_onnx, tmp_path, demo_data):
    """--backbone onnx:MODEL.onnx: the wrapped backbone.onnx (uint8 NHWC in) gives the original model's features
    (the test's own normalisation and pooling around ONNX Runtime) within the fp32 tolerance; the bundle names
    the file's sha256; a device installs it, predicts, learns a class and retrains its head."""
    import onnxruntime as ort

    from edgexfer.runtime.backends.registry import open_reference
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.compare import tolerance_for
    from edgexfer.runtime.device import Device
    from edgexfer.runtime.fsutil import file_sha256
    from edgexfer.runtime.preprocess import PreprocessSpec, load_image, stack

    run, bundle = tmp_path / "run", tmp_path / "bundle"
    _cli("train", str(demo_data), "--out", str(run), "--backbone", f"onnx:{resnet_onnx}", *PREP,
         "--cache", str(tmp_path / "cache.sqlite"), "--quiet")
    _cli("export", str(run), "--out", str(bundle), "--quiet")
    manifest = Bundle.open(bundle).manifest
    assert manifest.backbone.arch == "onnx:resnet.onnx" and manifest.backbone.weights_sha256 == file_sha256(resnet_onnx)
    record = json.loads((run / "run.json").read_text())
    paths = [v["path"] for v in record["val"]]
    pixels = stack([load_image(p, PreprocessSpec(size=SIZE)) for p in paths])
    x = (pixels.transpose(0, 3, 1, 2) / 255.0 - np.array(MEAN).reshape(1, 3, 1, 1)) / np.array(STD).reshape(1, 3, 1, 1)
    original = ort.InferenceSession(str(resnet_onnx), providers=["CPUExecutionProvider"])
    ref = np.concatenate([original.run(None, {"pixel_values": x[i:i + 1].astype(np.float32)})[0]
                          for i in range(len(x))]).mean(axis=(2, 3))
    with open_reference(bundle / "backbone.onnx") as engine:
        wrapped = engine.run(pixels)
    assert np.abs(wrapped - ref).max() <= tolerance_for("fp32").atol
    host = [record["classes"][i] for i in Bundle.open(bundle).head().logits(ref).argmax(1)]
    new = sorted((demo_data / "fruit").iterdir())[:6]
    with Device(tmp_path / "state") as dev:
        dev.install(bundle)
        assert [p.label for p in dev.predict(paths, top_k=1)] == host
        assert dev.learn(new, "apples", augment=0).added == 6
        report = dev.retrain()  # the holdout gate decides whether the new head is activated
        assert "apples" in report.classes and report.train_count > 0
    with pytest.raises(AssertionError, match=r"onnx: file is not a valid ONNX model \| got not.onnx"):
        (tmp_path / "not.onnx").write_text("no model here")
        _cli("train", str(demo_data), "--out", str(tmp_path / "bad"), "--backbone", f"onnx:{tmp_path / 'not.onnx'}",
             *PREP, "--quiet")
