"""OpenVINO engines of the demo bundle, checked on real clip art against the fp32 reference."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("openvino")


def _figures(result):
    return result.report["validation"]["holdout"]


def test_fp32_reproduces_the_reference(converted, conversion_bundle):
    result = converted("openvino", "fp32")
    v = result.report["validation"]
    assert v["passed"] and v["golden"]["max_abs_diff"] <= 1e-4 and _figures(result)["max_abs_diff"] <= 1e-4
    assert _figures(result)["images"] >= 100 and _figures(result)["top1_agreement"] == 1.0
    manifest = json.loads((conversion_bundle / "manifest.json").read_text())
    entry = next(e for e in manifest["engines"] if (e["backend"], e["precision"]) == ("openvino", "fp32"))
    assert entry["files"] == ["engines/openvino/fp32/backbone.xml", "engines/openvino/fp32/backbone.bin"]
    assert all(f in manifest["files"] for f in entry["files"] + ["reports/convert-openvino-fp32.json"])
    assert entry["info"]["tools"]["openvino"]


def test_predict_with_the_openvino_engine_gives_the_reference_labels(converted, conversion_bundle, clipart8):
    from edgexfer.runtime.predictor import Predictor

    converted("openvino", "fp32")
    images = [sorted((clipart8 / c).iterdir())[0] for c in ("fruit", "music", "tools", "vehicles")]
    with Predictor.from_bundle(conversion_bundle, backend="openvino", precision="fp32") as ov, \
            Predictor.from_bundle(conversion_bundle) as ref:
        got, want = ov.predict(images), ref.predict(images)
    assert [g.label for g in got] == [w.label for w in want]
    assert np.allclose([g.probability for g in got], [w.probability for w in want], atol=1e-4)
    assert ov.details["openvino"] and got[0].backend == "openvino"


def test_fp16_keeps_direction_and_labels(converted):
    f = _figures(converted("openvino", "fp16"))
    assert f["mean_cosine"] >= 0.999 and f["top1_agreement"] >= 0.99


def test_int8_keeps_accuracy_with_nncf(converted):
    result = converted("openvino", "int8")
    f = _figures(result)
    assert f["mean_cosine"] >= 0.97
    assert f["accuracy_reference"] - f["accuracy"] <= 0.01
    assert 0 < f["top1_agreement"] <= 1  # reported
    info = result.report["info"]
    assert info["nncf"] and isinstance(result.report["kept_in_float"], list)
    assert info["search"][0]["method"] == "nncf.quantize"
