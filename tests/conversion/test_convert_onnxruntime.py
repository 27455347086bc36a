"""ONNX Runtime engines of the demo bundle: optimised fp32, fp16, and int8 QDQ with the sensitivity search."""
from __future__ import annotations

import pytest


def _figures(result):
    return result.report["validation"]["holdout"]


def test_fp32_offline_optimised_model_reproduces_the_reference(converted, conversion_bundle):
    result = converted("onnxruntime", "fp32")
    assert _figures(result)["max_abs_diff"] <= 1e-4 and result.report["validation"]["golden"]["max_abs_diff"] <= 1e-4
    assert (conversion_bundle / "engines/onnxruntime/fp32/backbone.onnx").is_file()


def test_fp16_keeps_direction_and_labels(converted):
    f = _figures(converted("onnxruntime", "fp16"))
    assert f["mean_cosine"] >= 0.999 and f["top1_agreement"] >= 0.99


def test_int8_asymmetric_qdq_keeps_accuracy(converted, conversion_bundle):
    onnx = pytest.importorskip("onnx")
    result = converted("onnxruntime", "int8")
    f = _figures(result)
    assert f["mean_cosine"] >= 0.97 and f["accuracy_reference"] - f["accuracy"] <= 0.01
    info = result.report["info"]["quantization"]
    assert info["recipe"] == "asymmetric" and info["per_channel"]
    # the layers kept in float are named, and really are float in the model
    model = onnx.load(str(conversion_bundle / "engines/onnxruntime/int8/backbone.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    names = {n.name for n in model.graph.node}
    assert set(result.report["kept_in_float"]) <= names
    assert result.report["speed"]["batch1_ms"] > 0 and result.report["speed"]["reference_batch1_ms"] > 0
