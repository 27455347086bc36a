"""OpenVINO engines of the demo bundle, checked on real clip art against the fp32 reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgexfer.runtime.cpu import cpu_features

pytest.importorskip("openvino")

needs_bf16 = pytest.mark.skipif(not cpu_features().bf16, reason="this CPU has no avx512_bf16/amx_bf16, so bf16 is "
                                "refused here (test_bf16_is_refused_in_one_line_without_bf16_arithmetic)")


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
    # not required by the tolerance, but a user would notice labels changing on many images
    assert f["top1_agreement"] >= 0.9
    info = result.report["info"]
    # quantized for every x86-64 CPU by default: 7-bit weights, so CPUs without VNNI do not saturate
    assert info["int8_target"] == "any" and info["options"]["overflow_fix"] == "enable"
    assert info["nncf"] and isinstance(result.report["kept_in_float"], list)
    assert info["search"][0]["method"] == "nncf.quantize"


def test_every_openvino_engine_computes_in_the_precision_it_is_named_for(converted, conversion_bundle):
    """On AVX512-BF16/AMX CPUs OpenVINO computes in bf16 unless told otherwise; fp16/int8 float parts stay f32."""
    from edgexfer.runtime.backends.registry import open_backend
    from edgexfer.runtime.bundle import Bundle

    for precision in ("fp32", "fp16", "int8"):
        result = converted("openvino", precision)
        assert result.report["execution"]["inference_precision"] == "f32", precision
        assert result.report["execution"]["isa"] == cpu_features().signature
    bundle = Bundle.open(conversion_bundle)
    for entry in bundle.manifest.engines:
        if entry.backend == "openvino" and entry.precision in ("fp32", "fp16", "int8"):
            # the manifest says which ISA the engine was validated on
            assert entry.info["execution"]["isa"] == cpu_features().signature
            with open_backend("openvino", bundle.engine_file("openvino", entry.precision),
                              precision=entry.precision) as engine:
                assert engine.execution["inference_precision"] == "f32"
                assert str(engine.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")


@needs_bf16
def test_bf16_converts_validates_and_evaluates(converted, conversion_bundle, clipart8):
    from edgexfer.evaluate import evaluate

    result = converted("openvino", "bf16")
    f = _figures(result)
    assert result.report["execution"]["inference_precision"] == "bf16"
    assert f["images"] >= 100 and f["mean_cosine"] >= 0.995
    assert f["accuracy_reference"] - f["accuracy"] <= 0.01
    # really computed in bf16, not silently in f32: features are not within fp32 rounding of the reference
    assert f["max_abs_diff"] > 1e-3
    bf16 = evaluate(conversion_bundle, clipart8, backend="openvino", precision="bf16", progress=False)
    fp32 = evaluate(conversion_bundle, clipart8, backend="onnxruntime", precision="fp32", progress=False)
    assert bf16["engine"]["execution"]["inference_precision"] == "bf16"
    assert abs(bf16["accuracy"] - fp32["accuracy"]) <= 0.01


def _cli(*args, hide=""):
    env = {**os.environ, "EDGEXFER_HIDE_CPU_FLAGS": hide}
    return subprocess.run([sys.executable, "-c", "from edgexfer.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_bf16_is_refused_in_one_line_without_bf16_arithmetic(conversion_bundle):
    before = (conversion_bundle / "manifest.json").read_bytes()
    # as on an AVX2-only CPU: edgexfer sees no bf16 flag
    run = _cli("convert", str(conversion_bundle), "--to", "openvino", "--precision", "bf16", "--quiet",
               hide="avx512_bf16,amx_bf16")
    assert run.returncode == 1
    line = run.stderr.strip()
    assert "\n" not in line and line.startswith("error: bf16 execution | got CPU")
    assert "expected a CPU with avx512_bf16 or amx_bf16 | use fp32, fp16 or int8" in line
    # bf16 is an OpenVINO precision: other backends say so, on any CPU
    run = _cli("convert", str(conversion_bundle), "--to", "onnxruntime", "--precision", "bf16", "--quiet")
    assert run.returncode == 1 and "bf16 on onnxruntime | got onnxruntime has no bf16 engines" in run.stderr
    assert (conversion_bundle / "manifest.json").read_bytes() == before
