"""Conversions of a text bundle (minilm_l6): OpenVINO fp32/fp16/bf16/int8, ONNX Runtime int8, the TensorRT kit.

Validated by the same comparator and tolerances as images (edgexfer.runtime.compare). The acceptance
check runs on fortunes7: a frozen minilm_l6 + linear head trained on a seeded 80/20 split, its int8
engines calibrated on training texts and judged on the 20 % held out.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from text_support import TEXT_DEMO, fortunes7

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning")]

#: calibration texts for int8 (NNCF's and ONNX Runtime's): enough for stable ranges, quick on 2 cores
CALIB_SIZE = 128
#: held-out training texts the conversion validates on (one text = 0.33 points of accuracy)
VAL_SIZE = 300


@pytest.fixture(scope="module")
def text_conversion_bundle(tmp_path_factory, text_bundle):
    """A private copy of the demo text bundle (4 topics) that these tests fill with engines."""
    pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("text-converted") / "bundle"
    shutil.copytree(text_bundle, root)
    return root


@pytest.fixture(scope="module")
def fortunes7_bundle(tmp_path_factory):
    """fortunes7 (950 texts, 7 topics): frozen minilm_l6 + linear head on a seeded 80/20 split, exported,
    with a JSONL file of its training texts to calibrate on (the held-out 20 % never calibrates)."""
    pytest.importorskip("torch")
    pytest.importorskip("openvino")
    from edgexfer.export import export
    from edgexfer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("fortunes7")
    # the features cache test_text_pipeline also fills (build/, kept across runs): ~35 s once, seconds after
    cache = Path(__file__).resolve().parents[2] / "build" / "text-test-cache.sqlite"
    cache.parent.mkdir(exist_ok=True)
    run = train(TrainConfig(data_dir=fortunes7(), out=root / "run", cache=cache, seed=0,
                            val_fraction=0.2, progress=False))
    bundle = export(run.run_dir, root / "bundle", progress=False).bundle
    run_json = json.loads((run.run_dir / "run.json").read_text())
    classes = run_json["classes"]
    calib = root / "train_texts.jsonl"
    calib.write_text("".join(json.dumps({"text": t["text"], "label": classes[t["label"]]}) + "\n"
                             for t in run_json["train"]))
    val_texts = [t["text"] for t in run_json["val"]]
    val_labels = np.array([t["label"] for t in run_json["val"]])
    return {"bundle": bundle, "calib": calib, "val_texts": val_texts, "val_labels": val_labels}


def _accuracy(bundle, backend: str, precision: str, texts: list[str], labels: np.ndarray) -> float:
    from edgexfer.runtime.backends.registry import open_backend
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.features import text_features

    b = Bundle.open(bundle)
    with open_backend(backend, b.engine_file(backend, precision), precision=precision) as engine:
        features, _ = text_features(engine, b.tokenizer(), texts)
    return float(np.mean(b.head().logits(features).argmax(1) == labels))


def test_openvino_fp32_and_fp16_of_a_text_bundle_meet_the_image_tolerances(text_conversion_bundle):
    from edgexfer.converters import convert
    from edgexfer.runtime.compare import tolerance_for

    fp32 = convert(text_conversion_bundle, "openvino", "fp32", progress=False)
    golden = fp32.report["validation"]["golden"]
    assert fp32.registered and golden["images"] == 8
    assert golden["max_abs_diff"] <= tolerance_for("fp32").atol and golden["top1_agreement"] == 1.0
    assert fp32.report["execution"]["inference_precision"] == "f32"  # asked by name, not the CPU's default
    fp16 = convert(text_conversion_bundle, "openvino", "fp16", progress=False)
    assert fp16.report["validation"]["golden"]["mean_cosine"] >= tolerance_for("fp16").min_cosine
    manifest = json.loads((text_conversion_bundle / "manifest.json").read_text())
    assert {(e["backend"], e["precision"]) for e in manifest["engines"]} >= {("openvino", "fp32"), ("openvino", "fp16")}


def test_openvino_text_engine_runs_any_batch_and_length_like_onnxruntime(text_conversion_bundle):
    """The OpenVINO fp32 engine of a text bundle: dynamic batch and sequence, a feed of both int64 arrays."""
    from edgexfer.converters import convert
    from edgexfer.runtime.backends.registry import open_backend
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.errors import InputError

    convert(text_conversion_bundle, "openvino", "fp32", progress=False)  # reused when already converted
    bundle = Bundle.open(text_conversion_bundle)
    texts = [str(t) for t in bundle.golden()["texts"]]
    tokens = bundle.tokenizer().encode([texts[0], " ".join(texts * 3)])  # 2 rows, one padded, >= 100 tokens
    assert tokens.input_ids.shape[1] >= 100
    with open_backend("openvino", bundle.engine_file("openvino", "fp32")) as ov, \
            open_backend("onnxruntime", bundle.backbone_path) as ort:
        assert ov.details["inference_precision"] == "f32"
        for rows in ([0], [1], [0, 1], [1, 0, 1]):
            batch = tokens.rows(rows)
            np.testing.assert_allclose(ov.run(batch), ort.run(batch), atol=1e-4)
        with pytest.raises(InputError, match="a feed of input_ids and attention_mask"):
            ov.run(tokens.input_ids)


def test_openvino_bf16_of_a_text_bundle_where_the_cpu_computes_bf16(text_conversion_bundle):
    from edgexfer.converters import convert
    from edgexfer.runtime.cpu import cpu_features
    from edgexfer.runtime.precision import PrecisionError

    calib = text_conversion_bundle.parent / "calib"
    if not calib.exists():
        shutil.copytree(TEXT_DEMO, calib)
    if not cpu_features().bf16:
        with pytest.raises(PrecisionError, match="bf16"):
            convert(text_conversion_bundle, "openvino", "bf16", calib=calib, progress=False)
        return
    result = convert(text_conversion_bundle, "openvino", "bf16", calib=calib, calib_size=16, progress=False)
    held = result.report["validation"]["holdout"]
    assert result.report["execution"]["inference_precision"] == "bf16"
    assert held["mean_cosine"] >= 0.995 and held["accuracy_reference"] - held["accuracy"] <= 0.01


def test_openvino_int8_loses_at_most_one_point_on_fortunes7_held_out(fortunes7_bundle):
    """Acceptance 2: NNCF int8 (transformer patterns) vs fp32 on the 20 % the head never saw."""
    from edgexfer.converters import convert

    f7 = fortunes7_bundle
    result = convert(f7["bundle"], "openvino", "int8", calib=f7["calib"], calib_size=CALIB_SIZE, val_size=VAL_SIZE,
                     progress=False)
    assert result.registered and result.report["info"]["options"]["model_type"] == "transformer"
    assert result.report["validation"]["holdout"]["mean_cosine"] >= 0.97
    fp32 = _accuracy(f7["bundle"], "onnxruntime", "fp32", f7["val_texts"], f7["val_labels"])
    int8 = _accuracy(f7["bundle"], "openvino", "int8", f7["val_texts"], f7["val_labels"])
    assert len(f7["val_texts"]) == 190 and fp32 > 0.7  # a head worth quantizing for
    assert fp32 - int8 <= 0.01, (fp32, int8)


def test_onnxruntime_int8_of_fortunes7_keeps_the_gelu_projections_in_float(fortunes7_bundle):
    from edgexfer.converters import convert

    f7 = fortunes7_bundle
    result = convert(f7["bundle"], "onnxruntime", "int8", calib=f7["calib"], calib_size=CALIB_SIZE, val_size=VAL_SIZE,
                     progress=False)
    kept = result.report["kept_in_float"]
    assert len([k for k in kept if k.endswith("output/dense/MatMul") and "attention" not in k]) == 6
    assert result.report["validation"]["holdout"]["mean_cosine"] >= 0.97
    fp32 = _accuracy(f7["bundle"], "onnxruntime", "fp32", f7["val_texts"], f7["val_labels"])
    int8 = _accuracy(f7["bundle"], "onnxruntime", "int8", f7["val_texts"], f7["val_labels"])
    assert fp32 - int8 <= 0.01, (fp32, int8)


def test_text_calibration_is_split_seeded_and_tokenized_by_the_bundle(text_bundle, tmp_path):
    from edgexfer.converters.calibration import load_calibration
    from edgexfer.runtime.bundle import Bundle

    bundle = Bundle.open(text_bundle)
    a = load_calibration(bundle, TEXT_DEMO, 20, seed=0)
    b = load_calibration(bundle, TEXT_DEMO, 20, seed=0)
    c = load_calibration(bundle, TEXT_DEMO, 20, seed=1)
    assert len(a.calibration) == 20 and len(a.holdout) == 40 and a.fingerprint == b.fingerprint != c.fingerprint
    assert set(a.calibration.paths).isdisjoint(a.holdout.paths)
    assert a.calibration.pixels.input_ids.dtype == np.int64 and (a.calibration.pixels.input_ids[:, 0] == 101).all()
    assert set(a.calibration.labels.tolist()) == set(range(4))  # every class calibrates


def test_tensorrt_kit_of_a_text_bundle_profiles_both_inputs(text_conversion_bundle):
    from edgexfer.converters import convert
    from edgexfer.runtime.optional import is_installed

    if is_installed("tensorrt"):
        pytest.skip("TensorRT is installed here: the engine itself is built instead")
    result = convert(text_conversion_bundle, "tensorrt", "fp16", progress=False)
    assert not result.registered  # nothing runnable here: never a pretended TensorRT result
    kit = text_conversion_bundle / "engines/tensorrt/fp16"
    script = (kit / "build_engine.sh").read_text()
    assert "--minShapes=input_ids:1x1,attention_mask:1x1" in script
    assert "--optShapes=input_ids:8x128,attention_mask:8x128" in script
    assert "--maxShapes=input_ids:32x256,attention_mask:32x256" in script and "--fp16" in script
    lint = json.loads((kit / "trt_lint.json").read_text())
    assert lint["errors"] == 0
    dims = [p for p in lint["problems"] if p["check"] == "dynamic_dim"]
    assert dims and all(p["severity"] == "info" for p in dims)  # the sequence axis has its profile
    assert result.report["info"]["profiles"]["input_ids"]["max"] == [32, 256]


def test_tensorrt_plan_key_follows_the_text_profile(text_bundle):
    import dataclasses

    from edgexfer.converters.to_tensorrt import engine_store_key
    from edgexfer.runtime.backends.tensorrt import tensorrt_profile_id
    from edgexfer.runtime.bundle import Bundle

    backbone = Bundle.open(text_bundle).manifest.backbone
    longer = dataclasses.replace(backbone, input=dataclasses.replace(backbone.input, max_length=512))
    parts = ("10.3.0", "Orin", "8.7", "fp16", backbone.sha256)
    assert engine_store_key(*parts, profile=tensorrt_profile_id(backbone)) != \
        engine_store_key(*parts, profile=tensorrt_profile_id(longer))
    # image bundles keep the key they had (plans already on devices stay valid)
    assert engine_store_key(*parts) == engine_store_key(*parts, profile="")


def test_lint_knows_the_transformer_ops(text_bundle):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from edgexfer.converters.trt_lint import lint_model

    model = onnx.load(str(text_bundle / "backbone.onnx"))
    assert lint_model(model, "10.1", precision="fp16")["errors"] == 0
    assert lint_model(model, "8.6", precision="fp16")["errors"] == 0
    old = lint_model(model, "8.5")  # JetPack 5.1: no LayerNormalization op
    assert old["errors"] == 13 and {p["op_type"] for p in old["problems"] if p["severity"] == "error"} == {"LayerNormalization"}
    int64 = [p for p in lint_model(model, "8.6")["problems"] if p["check"] == "dtype" and p["op_type"] == "graph input"]
    assert {p["node"] for p in int64} == {"input_ids", "attention_mask"} and int64[0]["severity"] == "warning"
    # without a profile for the sequence axis it is flagged
    assert any(p["severity"] == "warning" and p["check"] == "dynamic_dim" for p in lint_model(model)["problems"])

    # planted: a LayerNorm written out (pre-opset-17 export) and a float32-minimum mask bias
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", axes=[-1]),
             helper.make_node("Sub", ["x", "mean"], ["centred"], name="sub"),
             helper.make_node("Pow", ["centred", "two"], ["sq"], name="planted_pow"),
             helper.make_node("ReduceMean", ["sq"], ["var"], name="var", axes=[-1]),
             helper.make_node("Add", ["var", "mask_bias"], ["y"], name="add")]
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("mask_bias", TensorProto.FLOAT, [1], [float(np.finfo(np.float32).min)])]
    tiny = helper.make_model(helper.make_graph(nodes, "ln", [x], [y], initializer=inits),
                             opset_imports=[helper.make_opsetid("", 17)])
    found = {(p["check"], p["node"]) for p in lint_model(tiny, precision="fp16")["problems"]}
    assert {("fp16_layernorm", "planted_pow"), ("fp16_range", "mask_bias")} <= found
    assert not any(p["check"].startswith("fp16") for p in lint_model(tiny, precision="fp32")["problems"])


@pytest.mark.gpu
def test_tensorrt_text_engine_on_a_gpu(text_conversion_bundle):
    """Builds the plan with both profiles and runs it at several batch sizes and lengths (GPU only)."""
    from edgexfer.converters import convert
    from edgexfer.runtime.engine_store import cuda_device
    from edgexfer.runtime.optional import is_installed

    if not is_installed("tensorrt") or cuda_device() is None:
        pytest.skip("needs TensorRT and a CUDA GPU (the kit, its profiles, the key and the lint are tested above)")
    from edgexfer.runtime.backends.registry import open_backend
    from edgexfer.runtime.bundle import Bundle

    result = convert(text_conversion_bundle, "tensorrt", "fp32", progress=False)
    assert result.registered and result.report["validation"]["golden"]["max_abs_diff"] <= 1e-3
    bundle = Bundle.open(text_conversion_bundle)
    texts = ["A man is eating food.", "A man is eating a piece of bread. " * 20]
    tokens = bundle.tokenizer().encode(texts)
    with open_backend("tensorrt", bundle.engine_file("tensorrt", "fp32")) as trt, \
            open_backend("onnxruntime", bundle.backbone_path) as ort:
        for rows in ([0], [1], [0, 1]):
            batch = tokens.rows(rows)
            np.testing.assert_allclose(trt.run(batch), ort.run(batch), atol=1e-3)
