"""CPU features, execution precision and the one comparator: what decides how an engine computes and is judged.

These run everywhere (no engine needed), so the device venv checks them too. The CPUs are described by
``/proc/cpuinfo`` texts, so every case holds on any machine.
"""
from __future__ import annotations

import numpy as np
import pytest

from edgexfer.runtime.backends.openvino import openvino_config
from edgexfer.runtime.compare import Output, Tolerance, compare, meets, tolerance_for
from edgexfer.runtime.cpu import _onednn_hidden, parse_cpuinfo
from edgexfer.runtime.errors import ValidationError
from edgexfer.runtime.precision import PrecisionError, check_precision, require_bf16

AVX2_ONLY = "model name\t: Intel(R) Core(TM) i7-8700\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n"
ZEN4 = "model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16\n"
SAPPHIRE = ("model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 fma avx512f avx512bw avx512_vnni "
            "avx512_bf16 avx512_fp16 amx_tile amx_bf16 amx_int8\n")
ORIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp\n"


def test_cpu_features_come_from_isa_flags_not_names():
    avx2, zen4, spr = (parse_cpuinfo(t, "x86_64") for t in (AVX2_ONLY, ZEN4, SAPPHIRE))
    assert (avx2.bf16, avx2.int8_dot) == (False, False)
    assert (zen4.bf16, zen4.int8_dot) == (True, True)
    assert spr.bf16 and spr.has("amx_int8") and spr.signature.endswith("amx_tile+amx_bf16+amx_int8")
    assert avx2.signature == "x86_64:sse4_2+avx+avx2+fma+f16c"
    # two CPUs with one name but other flags are told apart; the name is kept for people only
    renamed = parse_cpuinfo(ZEN4.replace("AMD EPYC", "Intel(R) Core(TM) i7-8700"), "x86_64")
    assert renamed.signature == zen4.signature and renamed.model != zen4.model
    orin = parse_cpuinfo(ORIN, "aarch64")
    assert orin.flags == ("asimd", "fphp", "asimdhp", "asimddp") and orin.int8_dot and not orin.bf16


def test_hidden_flags_and_onednn_isa_limit_act_as_an_older_cpu():
    zen4 = parse_cpuinfo(ZEN4, "x86_64", hidden=("avx512_bf16",))
    assert not zen4.bf16 and zen4.int8_dot
    as_avx2 = parse_cpuinfo(ZEN4, "x86_64", hidden=_onednn_hidden("avx2"))
    assert as_avx2.signature == parse_cpuinfo(AVX2_ONLY, "x86_64").signature
    assert _onednn_hidden("") == () and _onednn_hidden("ALL") == ()


def test_bf16_needs_bf16_arithmetic_and_says_which_flags_in_one_line():
    require_bf16(parse_cpuinfo(ZEN4, "x86_64"))
    with pytest.raises(PrecisionError) as err:
        require_bf16(parse_cpuinfo(AVX2_ONLY, "x86_64"))
    text = str(err.value)
    assert "\n" not in text and text.startswith("bf16 execution | got CPU 'Intel(R) Core(TM) i7-8700'")
    assert "expected a CPU with avx512_bf16 or amx_bf16 | use fp32, fp16 or int8" in text
    with pytest.raises(PrecisionError, match="bf16 on onnxruntime | got onnxruntime has no bf16 engines"):
        check_precision("bf16", "onnxruntime")
    with pytest.raises(PrecisionError, match="expected fp32 or fp16 or bf16 or int8"):
        check_precision("fp8")


@pytest.mark.parametrize("precision,hint", [("fp32", "f32"), ("fp16", "f32"), ("int8", "f32"), ("bf16", "bf16")])
def test_every_openvino_cpu_compile_states_its_precision(precision, hint):
    # fp16 and int8 float parts stay f32 on CPUs whose OpenVINO default is bf16
    assert openvino_config(precision, "CPU", parse_cpuinfo(SAPPHIRE, "x86_64")) == {"INFERENCE_PRECISION_HINT": hint}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_openvino_on_arm64_computes_in_f32_not_its_f16_default(precision):
    # OpenVINO's CPU plugin computes in f16 by default on arm64 CPUs with fp16 arithmetic (a Jetson Orin's):
    # every CPU compile asks for f32 (make check-arm64 sees it honoured under emulation: docs/jetson.md)
    orin = parse_cpuinfo(ORIN, "aarch64")
    assert orin.has("asimdhp") and not orin.bf16
    assert openvino_config(precision, "CPU", orin) == {"INFERENCE_PRECISION_HINT": "f32"}
    with pytest.raises(PrecisionError, match="bf16 execution"):
        openvino_config("bf16", "CPU", orin)


def test_openvino_gpu_computes_fp16_in_f16_and_refuses_bf16():
    assert openvino_config("fp16", "GPU") == {"INFERENCE_PRECISION_HINT": "f16"}
    assert openvino_config("fp32", "GPU.0") == {"INFERENCE_PRECISION_HINT": "f32"}
    with pytest.raises(PrecisionError, match="device GPU"):
        openvino_config("bf16", "GPU")


def _features(n=16, d=64, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_fp32_tolerance_accepts_rounding_and_refuses_a_real_difference():
    ref = _features()
    tol = tolerance_for("fp32")
    assert compare([Output("features", ref, ref + 2e-6)], tol).passed
    result = compare([Output("features", ref, ref + 1e-3)], tol, "golden")
    assert not result.passed and result.outputs["features"]["allclose_violations"] == ref.size
    assert result.failures == [f"- features (golden, 16 images): max |diff| = 1.00e-03, {ref.size} elements outside "
                               "atol 1e-04 + rtol 1e-04·|ref|"]


def test_every_failing_output_gets_one_line_and_one_typed_error():
    ref = _features()
    logits = ref[:, :8]
    flipped = logits.copy()
    flipped[:, [0, 1]] = flipped[:, [1, 0]] + 5  # top-1 changes on every row
    result = compare([Output("features", ref, -ref), Output("logits", logits, flipped, classes=True),
                      Output("ok", ref, ref)], tolerance_for("fp16"), "held-out")
    assert len(result.failures) == 2 and result.outputs["ok"]["mean_cosine"] == pytest.approx(1.0)
    assert result.failures[0].startswith("- features (held-out, 16 images): mean cosine = -1.0000 (min 0.9990)")
    assert "top-1 agreement = 0.000 (min 0.990)" in result.failures[1]
    with pytest.raises(ValidationError) as err:
        result.raise_if_failed("engine does not match", todo="convert again")
    assert err.value.failures == result.failures and "\n" not in str(err.value)


def test_accuracy_drop_nan_and_shape_are_judged():
    logits = np.eye(10, dtype=np.float32) * 5
    labels = np.arange(10)
    worse = logits.copy()
    worse[0] = worse[1]  # one image of ten now wrong: 10 points
    tol = tolerance_for("int8")
    result = compare([Output("logits", logits, worse, classes=True, labels=labels)], tol)
    assert result.outputs["logits"]["accuracy_drop"] == pytest.approx(0.1) and "drop 10.0 points" in result.failures[0]
    assert tolerance_for("int8", 0.2).max_accuracy_drop == 0.2 and tolerance_for("fp16", 0.2).max_accuracy_drop is None
    assert compare([Output("logits", logits, worse, classes=True, labels=labels)], Tolerance(max_accuracy_drop=0.2)).passed
    nan = logits.copy()
    nan[3, 3] = np.nan
    assert "NaN or inf" in compare([Output("logits", logits, nan)], tol).failures[0]
    assert "shape (10, 9)" in compare([Output("logits", logits, logits[:, :9])], tol).failures[0]


def test_search_margin_tightens_cosine_and_allows_one_image_of_accuracy():
    fig = {"images": 50, "max_abs_diff": 0.1, "mean_cosine": 0.975, "top1_agreement": 0.95,
           "accuracy_reference": 0.8, "accuracy": 0.78, "accuracy_drop": 0.02}
    tol = Tolerance(min_cosine=0.97, max_accuracy_drop=0.01)
    assert not meets(fig, tol)  # 2 points > 1
    assert meets(fig, tol, margin=0.001) and not meets(fig, tol, margin=0.01)  # one image of 50 is 2 points
    # the check after a search: one image of slack without tightening the cosine; held-out validation decides
    assert meets(fig, tol, one_sample=True) and not meets({**fig, "accuracy": 0.76, "accuracy_drop": 0.04}, tol,
                                                           one_sample=True)
