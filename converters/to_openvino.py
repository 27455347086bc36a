"""OpenVINO IR from ``backbone.onnx``: fp32, fp16 (compressed weights), bf16 and int8 (NNCF).

bf16 keeps the fp32 IR and computes in bf16 (``INFERENCE_PRECISION_HINT``), on CPUs with
avx512_bf16 or amx_bf16 only. Every compile here, the search's included, uses the config of
:func:`edgexfer.runtime.backends.openvino.openvino_config`, as ``device install`` and ``predict`` do.

int8 is accuracy-aware. First NNCF's post-training quantization with the options that suit this
backbone (symmetric ``performance`` preset, full bias correction, and the overflow fix unless every
target CPU has an int8 dot product: without VNNI, u8*s8 products saturate int16 accumulators; the
target is ``int8_target``, never the converting CPU by accident). If the result misses the
tolerance on the labelled calibration images, NNCF's accuracy-controlled quantization runs with the
same options and reverts the most harmful layers to float until the accuracy drop holds.

A text bundle's backbone (a transformer) is quantized with NNCF's transformer model type (its
patterns keep LayerNorm, Softmax and the GELU arithmetic in float and quantize the matrix products),
calibrated on labelled texts tokenized by the bundle's tokenizer; when post-training quantization
misses the tolerance, accuracy control runs directly (the ignored-scope search ranks convolutions).
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.converters.calibration import CalibrationSplit, single_feeds
from edgexfer.converters.engine_build import EngineBuild
from edgexfer.converters.validate import feature_figures, reference_features, run_batched
from edgexfer.runtime.backends.openvino import openvino_config
from edgexfer.runtime.backends.registry import open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import Tolerance, meets
from edgexfer.runtime.cpu import cpu_features
from edgexfer.runtime.errors import ValidationError
from edgexfer.runtime.optional import require
from edgexfer.runtime.text import TokenBatch

#: cosine margin the search aims for on calibration images, so held-out images still meet the tolerance
SEARCH_COSINE_MARGIN = 0.01
#: most layers the ignored-scope search tries to keep in float before accuracy control takes over
MAX_IGNORED = 4
#: labelled images NNCF's accuracy control validates on (each ranking step runs them)
AC_VALIDATION_IMAGES = 150


def convert_openvino(bundle: Bundle, out_dir: Path, precision: str, split: CalibrationSplit | None,
                     tolerance: Tolerance, workdir: Path | None = None, *, progress: bool = True,
                     int8_target: str = "any") -> EngineBuild:
    ov = require("openvino", "converting to OpenVINO")
    xml = out_dir / "backbone.xml"
    model = ov.convert_model(str(bundle.backbone_path))
    info: dict[str, Any] = {"openvino": ov.get_version()}
    if precision in ("fp32", "fp16", "bf16"):
        ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")
        info["weights"] = {"fp16": "float16 (decompressed on load; CPUs compute in float32)",
                           "bf16": "float32 (the CPU computes in bfloat16)"}.get(precision, "float32")
    else:
        quantized, qinfo = _quantize(ov, model, bundle, split, tolerance, progress, int8_target)
        info.update(qinfo)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return EngineBuild(files=[xml, xml.with_suffix(".bin")],
                       open_runner=lambda: open_backend("openvino", xml, precision=precision),
                       info=info, validated_with="edgexfer.runtime.backends.openvino on CPU")


def overflow_fix_needed(int8_target: str) -> bool:
    """Whether int8 weights must be 7-bit: some target CPU lacks an int8 dot product (x86 without VNNI)."""
    if int8_target == "native":
        cpu = cpu_features()
        return cpu.is_x86 and not cpu.int8_dot
    return True  # "any": every x86-64 CPU, AVX2-only ones included


# long: the int8 search in its order (plain NNCF, then layers kept in float, then accuracy control), sharing
# one dataset, one evaluator and the record of every try; docs/converters.md describes the same steps
def _quantize(ov, model, bundle: Bundle, split: CalibrationSplit, tolerance: Tolerance, progress: bool,
              int8_target: str):
    nncf = require("nncf", "int8 quantization for OpenVINO")
    from nncf.quantization.advanced_parameters import (
        AdvancedAccuracyRestorerParameters,
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    calib = split.calibration
    text = isinstance(calib.pixels, TokenBatch)
    cpu = cpu_features()
    # Without VNNI, int8 convolutions multiply u8 by s8 in pairs that saturate int16; 7-bit weights avoid
    # it. The engine runs on the devices, so their CPUs decide, not this one.
    overflow = OverflowFix.ENABLE if overflow_fix_needed(int8_target) else OverflowFix.FIRST_LAYER
    options = {"preset": nncf.QuantizationPreset.PERFORMANCE, "fast_bias_correction": True,
               "subset_size": len(calib)}
    shown = {"preset": "performance", "fast_bias_correction": True, "overflow_fix": overflow.value}
    if text:
        # NNCF's transformer patterns; its preset for them (mixed: asymmetric activations, which suit the
        # GELU's and the attention's one-sided ranges) replaces the symmetric one of convolutional backbones
        options.update(model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.MIXED)
        shown.update(model_type="transformer", preset="mixed")
    advanced = AdvancedQuantizationParameters(overflow_fix=overflow)
    # one sample per item: image pixels [1, H, W, 3], or a text's {input_ids, attention_mask} [1, L]
    samples = (single_feeds(calib.pixels, model.input(0).get_any_name()) if text
               else [calib.pixels[i:i + 1] for i in range(len(calib))])
    dataset = nncf.Dataset(samples)
    info: dict[str, Any] = {"nncf": nncf.__version__, "cpu": cpu.to_dict(), "int8_target": int8_target,
                            "calibration_images": len(calib), "options": shown}
    core = ov.Core()
    head = bundle.head()

    def features_of(compiled) -> Callable[[Any], np.ndarray]:
        def run(batch):
            return np.array(compiled(batch.feed() if isinstance(batch, TokenBatch) else batch)[0], dtype=np.float32)

        return run

    def evaluate(candidate) -> dict[str, Any]:
        # the search judges the engine as devices will run it: float parts in f32, whatever this CPU's default
        compiled = core.compile_model(candidate, "CPU", openvino_config("int8"))
        new = run_batched(features_of(compiled), calib.pixels)
        return feature_figures(reference_features(bundle, calib.pixels), new, head, calib.labels)

    def quantize(ignored: list[str]):
        scope = nncf.IgnoredScope(names=[_ov_name(n) for n in ignored], validate=False) if ignored else None
        return nncf.quantize(model, dataset, advanced_parameters=advanced, ignored_scope=scope, **options)

    _say(progress, f"NNCF post-training quantization on {len(calib)} calibration images")
    quantized = quantize([])
    figures = evaluate(quantized)
    info["search"] = [{"method": "nncf.quantize", "ignored_scope": [], **_short(figures)}]
    ignored: list[str] = []
    if not text and not meets(figures, tolerance, SEARCH_COSINE_MARGIN):
        # Rank layers by their own quantization error (engine-neutral: int8 Q/DQ evaluated in float),
        # then keep the worst in float through NNCF's ignored scope while that improves the result.
        _say(progress, f"mean cosine {figures['mean_cosine']:.4f}, accuracy drop "
                       f"{100 * figures['accuracy_drop']:.1f} points on calibration images: ranking layers")
        damage = rank_layers(bundle, calib)
        info["damage_alone"] = damage
        for node in list(damage)[:MAX_IGNORED]:
            trial = ignored + [node]
            candidate = quantize(trial)
            fig = evaluate(candidate)
            info["search"].append({"method": "nncf.quantize", "ignored_scope": trial, **_short(fig)})
            if _score(fig) > _score(figures):
                ignored, quantized, figures = trial, candidate, fig
                _say(progress, f"  keep {node} in float: mean cosine {fig['mean_cosine']:.4f}, "
                               f"accuracy drop {100 * fig['accuracy_drop']:.1f} points")
            if meets(figures, tolerance, SEARCH_COSINE_MARGIN):
                break
    if not meets(figures, tolerance, SEARCH_COSINE_MARGIN):
        _say(progress, "NNCF accuracy-controlled quantization (reverts the most harmful layers to float)")
        count = min(len(calib), AC_VALIDATION_IMAGES)
        validation = nncf.Dataset([(samples[i], int(calib.labels[i])) for i in range(count)], lambda item: item[0])

        def accuracy(compiled, items) -> tuple[float, None]:
            hits = [int(np.argmax(head.logits(np.array(compiled(px)[0], dtype=np.float32))[0]) == label)
                    for px, label in items]
            return float(np.mean(hits)), None

        scope = nncf.IgnoredScope(names=[_ov_name(n) for n in ignored], validate=False) if ignored else None
        quantized = nncf.quantize_with_accuracy_control(
            model, dataset, validation, accuracy, max_drop=float(tolerance.max_accuracy_drop or 0.01),
            drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, ignored_scope=scope,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                max_num_iterations=10, ranking_subset_size=min(count, 50)),
            **options)
        figures = evaluate(quantized)
        info["search"].append({"method": "nncf.quantize_with_accuracy_control", "ignored_scope": ignored,
                               **_short(figures)})
        if not meets(figures, tolerance):
            raise ValidationError("OpenVINO int8 quantization cannot meet the tolerance on the calibration images",
                                  [f"- features (calibration, {len(calib)} images): mean cosine = "
                                   f"{figures['mean_cosine']:.4f}, accuracy drop {100 * figures['accuracy_drop']:.1f} points"],
                                  todo="nothing was written; try more --calib images or a larger --max-drop")
    info["kept_in_float"] = kept_in_float(quantized)
    info["quantized_layers"] = _count_layers(quantized) - len(info["kept_in_float"])
    return quantized, info


def rank_layers(bundle: Bundle, calib) -> dict[str, float]:
    """Candidate layers (ONNX node names) by damage when quantized alone, worst first.

    Engine-neutral: symmetric int8 Q/DQ evaluated in float by ONNX Runtime, so it measures quantization
    error, not a kernel's overflow (the overflow fix handles that); see edgexfer.converters.qdq.
    """
    import tempfile

    from edgexfer.converters.qdq import SYMMETRIC, Quantizer
    from edgexfer.converters.qdq import rank_layers as rank_qdq

    with tempfile.TemporaryDirectory(prefix="edgexfer-rank-") as work:
        quantize = Quantizer(bundle.backbone_path, Path(work), SYMMETRIC, calib.pixels)
        plain = Path(work) / "plain.onnx"
        quantize([], plain)
        return rank_qdq(quantize, plain, bundle, calib)[1]


def _ov_name(onnx_node: str) -> str:
    # OpenVINO names a convolution after its ONNX node, and the bias it splits off gets its own op
    return onnx_node + "/WithoutBiases"


def _score(fig: dict[str, Any]) -> float:
    return fig["mean_cosine"] + fig["top1_agreement"] - max(0.0, fig["accuracy_drop"])


def kept_in_float(model) -> list[str]:
    """Convolutions and matrix products whose activation input has no FakeQuantize before it."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        source = op.input_value(0).get_node()
        if source.get_type_name() != "FakeQuantize":
            out.append(op.get_friendly_name().removesuffix("/WithoutBiases"))
    return out


def _count_layers(model) -> int:
    return sum(op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul") for op in model.get_ordered_ops())


def _short(fig: dict[str, Any]) -> dict[str, Any]:
    keys = ("mean_cosine", "top1_agreement", "accuracy_reference", "accuracy", "accuracy_drop")
    return {k: round(fig[k], 4) for k in keys if k in fig}


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)

