"""Validation after every conversion: the new engine against the fp32 ONNX Runtime reference.

Both run on the bundle's golden images and on held-out labelled images (from ``--calib``, never used
to calibrate or tune the engine), streamed batch by batch; for a text bundle, its golden texts and
held-out labelled texts. Features and head logits are compared (max abs difference,
cosine similarity, top-1 agreement) and the head's accuracy is measured before and after, all by
:mod:`edgexfer.runtime.compare` with the tolerance of the precision that ran. Every failure is
collected first, then one :class:`ComparisonError` lists them, one line per output.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgexfer.converters.calibration import EngineInputs, HeldOut, inputs_digest, take
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import (
    ComparisonError,
    Tolerance,
    compare,
    feature_outputs,
    flat_figures,
)
from edgexfer.runtime.golden import golden_inputs
from edgexfer.runtime.heads import Head
from edgexfer.runtime.text import TokenBatch

FeatureFn = Callable[[EngineInputs], np.ndarray]


def run_batched(run: FeatureFn, pixels: EngineInputs, batch: int = 16) -> np.ndarray:
    """Features of every row of ``pixels`` (images, or a TokenBatch of texts), ``batch`` rows per call."""
    if len(pixels) == 0:
        return np.zeros((0, 0), np.float32)
    if isinstance(pixels, TokenBatch):
        # texts of similar length share a batch (a batch is padded to its longest text), in their order after
        order = np.argsort(pixels.attention_mask.sum(axis=1), kind="stable")
        out = np.concatenate([run(take(pixels, order[s:s + batch])) for s in range(0, len(order), batch)])
        return out[np.argsort(order, kind="stable")]
    return np.concatenate([run(take(pixels, slice(s, s + batch))) for s in range(0, len(pixels), batch)])


_REFERENCE_FEATURES: dict[tuple[str, str], np.ndarray] = {}


def reference_features(bundle: Bundle, pixels: EngineInputs) -> np.ndarray:
    """fp32 ONNX Runtime features of the bundle's own backbone (kept in memory per process)."""
    key = (bundle.manifest.backbone.sha256, inputs_digest(pixels))
    if key not in _REFERENCE_FEATURES:
        from edgexfer.runtime.backends.registry import open_reference

        with open_reference(bundle.backbone_path) as engine:
            _REFERENCE_FEATURES[key] = run_batched(engine.run, pixels)
    return _REFERENCE_FEATURES[key]


#: reference features of held-out samples already run in this process: (backbone, holdout key) -> (positions, features)
_REFERENCE_HOLDOUT: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def _streamed(run: FeatureFn, holdout: HeldOut, batch: int) -> tuple[np.ndarray, np.ndarray] | None:
    positions, features = [], []
    for rows, inputs in holdout.batches(batch):
        positions.append(rows)
        features.append(run(inputs))
    return (np.concatenate(positions), np.concatenate(features)) if positions else None


def _reference_pass(bundle: Bundle, holdout: HeldOut, batch: int) -> tuple[np.ndarray, np.ndarray] | None:
    from edgexfer.runtime.backends.registry import open_reference

    with open_reference(bundle.backbone_path) as reference:
        return _streamed(reference.run, holdout, batch)


def holdout_features(features: FeatureFn, bundle: Bundle, holdout: HeldOut,
                     batch: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(reference, candidate, positions)``: the features of the held-out samples that could be read (None when
    none could), streamed a batch at a time through the fp32 reference (once per process), then the candidate.

    One engine per pass: reading the samples twice costs less than two engines' working memory at once.
    """
    key = (bundle.manifest.backbone.sha256, holdout.key)
    if key not in _REFERENCE_HOLDOUT:
        streamed = _reference_pass(bundle, holdout, batch)  # the session is gone when it returns
        if streamed is None:
            return None
        _REFERENCE_HOLDOUT[key] = streamed
    ref_positions, ref = _REFERENCE_HOLDOUT[key]
    streamed = _streamed(features, holdout, batch)
    if streamed is None:
        return None
    positions, new = streamed
    if not np.array_equal(positions, ref_positions):  # a file read in one pass and not in the other
        common, in_ref, in_new = np.intersect1d(ref_positions, positions, return_indices=True)
        return ref[in_ref], new[in_new], common
    return ref, new, positions


def feature_figures(ref: np.ndarray, new: np.ndarray, head: Head, labels: np.ndarray | None = None,
                    tolerance: Tolerance | None = None) -> dict[str, Any]:
    """Agreement of ``new`` features with the reference ``ref`` (and accuracy when labels are known)."""
    return flat_figures(compare(feature_outputs(ref, new, head.logits, labels), tolerance or Tolerance()))


def validate_engine(features: FeatureFn, bundle: Bundle, tolerance: Tolerance,
                    holdout: HeldOut | None = None) -> dict[str, Any]:
    """Run ``features`` and the reference on golden and held-out images; figures and failures.

    Returns the validation section of a conversion report (``passed`` and ``failures`` included);
    :func:`raise_if_failed` turns failures into the typed error.
    """
    head = bundle.head()
    golden = bundle.golden()
    images = golden_inputs(bundle, golden)  # images, or the golden texts' token ids (checked against a re-tokenization)
    ref = reference_features(bundle, images)
    result = compare(feature_outputs(ref, run_batched(features, images), head.logits), tolerance, "golden")
    report: dict[str, Any] = {
        "reference": "onnxruntime fp32 (backbone.onnx)",
        "tolerance": tolerance.to_dict(),
        # the reference is re-run, and must still give the features stored at export
        "golden_reference_drift": float(np.abs(ref - golden["features"]).max()),
        "golden": flat_figures(result),
    }
    failures = list(result.failures)
    streamed = holdout_features(features, bundle, holdout) if holdout is not None else None
    if streamed is not None:
        ref_h, new_h, positions = streamed
        held = compare(feature_outputs(ref_h, new_h, head.logits, holdout.labels[positions]), tolerance, "held-out")
        report["holdout"] = flat_figures(held)
        failures += held.failures
    else:
        report["holdout"] = None
        if tolerance.max_accuracy_drop is not None:
            failures.append("- accuracy: not measured (no held-out labelled images; pass --calib DATA_DIR)")
    report["passed"] = not failures
    report["failures"] = failures
    return report


def raise_if_failed(report: dict[str, Any], what: str) -> None:
    if report["failures"]:
        raise ComparisonError(f"{what} does not match the fp32 reference", report["failures"],
                              todo="the engine was not written and the bundle is unchanged; "
                                   "see docs/converters.md (int8: more --calib images or a larger --max-drop)")
