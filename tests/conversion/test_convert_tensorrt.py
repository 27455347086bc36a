"""TensorRT: symmetric QDQ for explicit int8, the device build kit, the static lint, the engine store key."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgexfer.converters.to_tensorrt import engine_store_key
from edgexfer.runtime.backends.tensorrt import TensorRtSpec

KEY_PARTS = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7", "precision": "int8",
             "backbone_sha256": "a" * 64}


@pytest.mark.parametrize("part,other", [("tensorrt_version", "8.6.2"), ("gpu_name", "Xavier"),
                                        ("compute_capability", "7.2"), ("precision", "fp16"),
                                        ("backbone_sha256", "b" * 64)])
def test_engine_store_key_changes_when_any_part_changes(part, other):
    assert engine_store_key(**KEY_PARTS) == engine_store_key(**KEY_PARTS)
    assert engine_store_key(**{**KEY_PARTS, part: other}) != engine_store_key(**KEY_PARTS)


def test_int8_symmetric_qdq_for_tensorrt_keeps_accuracy(converted, conversion_bundle):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    result = converted("tensorrt", "int8")
    f = result.report["validation"]["holdout"]
    assert f["mean_cosine"] >= 0.97 and f["accuracy_reference"] - f["accuracy"] <= 0.01
    model = onnx.load(str(conversion_bundle / "engines/tensorrt/int8/backbone.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)  # TensorRT: symmetric int8
    assert not any(v.dtype == np.int32 for v in inits.values())  # float bias: TensorRT has no int32 DQ
    assert result.report["info"]["quantization"]["recipe"] == "symmetric"


def test_device_build_kit_without_tensorrt(converted, conversion_bundle):
    from edgexfer.runtime.optional import is_installed

    if is_installed("tensorrt"):
        pytest.skip("TensorRT is installed here: the engine itself is built instead")
    result = converted("tensorrt", "int8")
    assert not result.registered
    kit = conversion_bundle / "engines/tensorrt/int8"
    script = (kit / "build_engine.sh").read_text()
    assert "--onnx=backbone.qdq.onnx" in script and "--int8" in script and "--saveEngine=backbone.plan" in script
    assert "--minShapes=image:1x224x224x3" in script and "--maxShapes=image:32x224x224x3" in script
    assert "--timingCacheFile=timing.cache" in script
    lint = json.loads((kit / "trt_lint.json").read_text())
    assert lint["errors"] == 0 and lint["table_source"]["commit"]
    manifest = json.loads((conversion_bundle / "manifest.json").read_text())
    assert "engines/tensorrt/int8/build_engine.sh" in manifest["files"]
    assert not any(e["backend"] == "tensorrt" for e in manifest["engines"])  # nothing runnable to register
    # the exported graph transposes the uint8 input before casting it: flagged, and rewritten for TensorRT
    flagged = result.report["info"]["source_lint_errors"]
    assert any(p["node"] == "/Transpose" and p["check"] == "dtype" for p in flagged)
    assert result.report["info"]["rewrites"][0]["rewrite"] == "cast_before_transpose"


def test_fp16_build_kit_passes_fp16_flag(converted, conversion_bundle):
    converted("tensorrt", "fp16")
    script = (conversion_bundle / "engines/tensorrt/fp16/build_engine.sh").read_text()
    assert "--fp16" in script and "--onnx=backbone.onnx" in script
    assert "--noTF32" in script  # float layers are not silently rounded to TF32 on Ampere/Orin


def _tiny_model(onnx, helper, *, op="Unique", opset=17):
    from onnx import TensorProto

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
             helper.make_node(op, ["r"], ["y"], name="planted_node"),
             helper.make_node("Reshape", ["r", "w64"], ["z"], name="reshape")]
    w64 = helper.make_tensor("w64", TensorProto.INT64, [2], [-1, 2])  # shape tensors are INT64 in ONNX
    w = helper.make_tensor("double_w", TensorProto.DOUBLE, [1], [0.5])
    graph = helper.make_graph(nodes, "tiny", [x], [y], initializer=[w64, w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_lint_names_a_planted_unsupported_op():
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from edgexfer.converters.trt_lint import lint_model

    report = lint_model(_tiny_model(onnx, helper))
    errors = [p for p in report["problems"] if p["severity"] == "error"]
    assert [(p["node"], p["op_type"], p["check"]) for p in errors] == [("planted_node", "Unique", "op_type")]
    by_check = {p["check"]: p for p in report["problems"]}
    assert by_check["dynamic_dim"]["node"] in ("x", "y")
    dtype = {p["node"] for p in report["problems"] if p["check"] == "dtype"}
    assert dtype == {"w64", "double_w"}
    assert "ok_relu" not in {p["node"] for p in report["problems"]}


def test_lint_flags_a_too_new_opset_and_an_older_target():
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from edgexfer.converters.trt_lint import lint_model

    report = lint_model(_tiny_model(onnx, helper, op="Relu", opset=21))
    assert any(p["check"] == "opset" and "21" in p["message"] for p in report["problems"])
    old = lint_model(_tiny_model(onnx, helper, op="LayerNormalization"), target="8.5")
    assert any(p["node"] == "planted_node" and p["severity"] == "error" for p in old["problems"])


@pytest.mark.gpu
def test_tensorrt_engine_on_a_gpu(conversion_bundle, clipart8):
    from edgexfer.converters import convert
    from edgexfer.runtime.engine_store import cuda_device
    from edgexfer.runtime.optional import is_installed

    if not is_installed("tensorrt") or cuda_device() is None:
        pytest.skip("needs TensorRT and a CUDA GPU (the lint, build script and QDQ model are tested above)")
    from edgexfer.runtime.predictor import Predictor

    result = convert(conversion_bundle, "tensorrt", "fp16", calib=clipart8, calib_size=64, val_size=160, progress=False)
    assert result.registered and result.report["validation"]["holdout"]["mean_cosine"] >= 0.999
    with Predictor.from_bundle(conversion_bundle, backend="tensorrt", precision="fp16") as predictor:
        assert predictor.details["engine_key"]


def test_lint_refuses_asymmetric_quantization_for_tensorrt():
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from edgexfer.converters.trt_lint import lint_model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
             helper.make_tensor("zp", TensorProto.UINT8, [], [128])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="asym_q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="asym_dq")]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    errors = {p["node"] for p in lint_model(model)["problems"] if p["check"] == "quantization"}
    assert errors == {"asym_q", "asym_dq"}


def test_device_build_from_the_kit_needs_the_kit_and_tensorrt_and_auto_falls_to_another_engine(
        converted, conversion_bundle, demo_bundle, tmp_path):
    """What `edgexfer device install` does with a kit bundle on a device without TensorRT or a GPU."""
    from edgexfer.converters.to_tensorrt import build_device_engine
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.device import Device
    from edgexfer.runtime.errors import BundleError, MissingDependencyError
    from edgexfer.runtime.optional import is_installed

    if is_installed("tensorrt"):
        pytest.skip("TensorRT is installed here: the gpu tests build the plan")
    converted("tensorrt", "int8")
    bundle = Bundle.open(conversion_bundle, verify=True)
    assert TensorRtSpec.kit(bundle, "int8") == conversion_bundle / "engines/tensorrt/int8/backbone.qdq.onnx"
    plain = Bundle.open(demo_bundle.bundle)  # exported, never converted for TensorRT
    assert TensorRtSpec.kit(plain, "fp16") is None
    with pytest.raises(BundleError, match="no TensorRT kit.*--to tensorrt --precision fp16"):
        build_device_engine(plain, "fp16", tmp_path)
    with pytest.raises(MissingDependencyError, match=r"edgexfer\[tensorrt\]"):
        build_device_engine(bundle, "int8", tmp_path)
    assert list(tmp_path.iterdir()) == []
    # auto on a device without TensorRT: the kit is skipped, an engine that runs here is used
    with Device(tmp_path / "state") as dev:
        report = dev.install(conversion_bundle)
    assert report["engine"]["backend"] in ("openvino", "onnxruntime") and report["golden"]["top1_agreement"] == 1.0
