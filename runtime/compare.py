"""One comparator for every check of outputs against a reference, with one tolerance table.

Export parity (ONNX Runtime against PyTorch), conversion validation (an engine against the fp32
reference), the golden check on a device (the engine against the outputs recorded at export) and the
update health check (engine plus new head against the logits the publisher signed) all describe what
they compare as :class:`Output` values and call :func:`compare`. Each output is judged on:

* element-wise closeness: ``|new - ref| <= atol + rtol * |ref|`` (numpy's ``allclose`` rule);
* direction: the mean cosine similarity of the rows;
* for classification outputs (logits): top-1 agreement, and with labels the accuracy drop.

Which of these apply, and how tight, is :data:`TOLERANCES`, keyed by the precision that ran. Every
failure is collected first; :class:`ComparisonError` then lists one line per failing output.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from edgexfer.runtime.errors import ValidationError


@dataclass(frozen=True)
class Tolerance:
    """What an output computed in one precision must meet against its reference (None: not judged)."""

    atol: float | None = None  #: element-wise absolute tolerance (with ``rtol``: allclose)
    rtol: float | None = None  #: element-wise relative tolerance, times ``|ref|``
    min_cosine: float | None = None  #: mean cosine similarity of the rows
    min_top1: float | None = None  #: classification outputs: share of rows whose argmax is unchanged
    max_accuracy_drop: float | None = None  #: classification outputs with labels: accuracy drop (0.01 = 1 point)

    def with_accuracy_drop(self, drop: float | None) -> Tolerance:
        """The same tolerance with another accuracy drop (only where the precision judges accuracy)."""
        if self.max_accuracy_drop is None or drop is None:
            return self
        return replace(self, max_accuracy_drop=float(drop))

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


#: Keyed by the precision that ran. fp32 engines compute the same graph as the reference (other kernels,
#: other summation order, another ISA: OpenVINO f32 against ONNX Runtime differs by <= 1.1e-5 on
#: EfficientNet-Lite0 features and logits, inside 1e-4 + 1e-4·|x|); fp16 rounds weights, so it is judged on direction and labels; bf16 keeps 8 bits of mantissa
#: through every layer and int8 quantizes, so both are judged on direction and accuracy, and their top-1
#: agreement is reported, not required.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, min_top1=1.0),
    "fp16": Tolerance(min_cosine=0.999, min_top1=0.99),
    "bf16": Tolerance(min_cosine=0.995, max_accuracy_drop=0.01),
    "int8": Tolerance(min_cosine=0.97, max_accuracy_drop=0.01),
}


def tolerance_for(precision: str, max_accuracy_drop: float | None = None) -> Tolerance:
    if precision not in TOLERANCES:
        raise ValueError(f"no tolerance for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[precision].with_accuracy_drop(max_accuracy_drop)


@dataclass(frozen=True)
class Output:
    """One output to compare: ``new`` against ``ref`` (rows are images)."""

    name: str  #: e.g. "features", "logits"
    ref: np.ndarray
    new: np.ndarray
    classes: bool = False  #: argmax over a row is a label (top-1 agreement and accuracy are judged)
    labels: np.ndarray | None = None  #: true labels (column indices of ``ref``) for accuracy


def figures(out: Output, tol: Tolerance | None = None) -> dict[str, Any]:
    """The agreement figures of one output; with ``tol``, also how many elements break its allclose rule."""
    ref64 = np.asarray(out.ref, dtype=np.float64)
    new64 = np.asarray(out.new, dtype=np.float64)
    if ref64.shape != new64.shape:
        return {"images": int(len(ref64)), "shape_reference": list(ref64.shape), "shape": list(new64.shape)}
    rows = ref64.reshape(len(ref64), -1) if ref64.ndim else ref64.reshape(1, 1)
    new_rows = new64.reshape(rows.shape)
    diff = np.abs(rows - new_rows)
    fig: dict[str, Any] = {"images": int(len(rows))}
    if diff.size == 0:
        return fig
    norms = np.linalg.norm(rows, axis=1) * np.linalg.norm(new_rows, axis=1)
    cos = np.sum(rows * new_rows, axis=1) / np.maximum(norms, 1e-12)
    fig.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
               max_rel_diff=float(np.max(diff / np.maximum(np.abs(rows), 1e-6))),
               mean_cosine=float(cos.mean()), min_cosine=float(cos.min()),
               finite=bool(np.isfinite(new_rows).all()))
    if tol is not None and (tol.atol is not None or tol.rtol is not None):
        bound = (tol.atol or 0.0) + (tol.rtol or 0.0) * np.abs(rows)
        fig["allclose_violations"] = int(np.sum(~(diff <= bound)))
    if out.classes:
        ref_top, new_top = rows.argmax(1), new_rows.argmax(1)
        fig["top1_agreement"] = float(np.mean(ref_top == new_top))
        if out.labels is not None:
            labels = np.asarray(out.labels)
            fig["accuracy_reference"] = float(np.mean(ref_top == labels))
            fig["accuracy"] = float(np.mean(new_top == labels))
            fig["accuracy_drop"] = fig["accuracy_reference"] - fig["accuracy"]
    return fig


def problems(fig: dict[str, Any], tol: Tolerance, margin: float = 0.0) -> list[str]:
    """What in ``fig`` breaks ``tol`` (empty: it passes). ``margin`` tightens cosine and top-1 (searches)."""
    if "shape" in fig:
        return [f"shape {tuple(fig['shape'])} != reference {tuple(fig['shape_reference'])}"]
    if fig["images"] == 0 or "max_abs_diff" not in fig:
        return []
    out = []
    if not fig.get("finite", True):
        out.append("NaN or inf values")
    if fig.get("allclose_violations"):
        out.append(f"max |diff| = {fig['max_abs_diff']:.2e}, {fig['allclose_violations']} elements outside "
                   f"atol {tol.atol or 0:.0e} + rtol {tol.rtol or 0:.0e}·|ref|")
    if tol.min_cosine is not None and not fig["mean_cosine"] >= tol.min_cosine + margin:
        out.append(f"mean cosine = {fig['mean_cosine']:.4f} (min {tol.min_cosine + margin:.4f})")
    if tol.min_top1 is not None and "top1_agreement" in fig:
        need = min(1.0, tol.min_top1 + margin)
        if fig["top1_agreement"] < need:
            out.append(f"top-1 agreement = {fig['top1_agreement']:.3f} (min {need:.3f})")
    if tol.max_accuracy_drop is not None and "accuracy_drop" in fig and \
            fig["accuracy_drop"] > tol.max_accuracy_drop + 1e-9:
        out.append(f"accuracy {fig['accuracy']:.3f} vs {fig['accuracy_reference']:.3f} for the reference, drop "
                   f"{100 * fig['accuracy_drop']:.1f} points (max {100 * tol.max_accuracy_drop:.1f})")
    return out


@dataclass
class Comparison:
    """Figures per output and one failure line per failing output."""

    tolerance: Tolerance
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def merge(self, other: Comparison) -> Comparison:
        """Both comparisons in one (outputs of another image set, say); names must differ."""
        return Comparison(self.tolerance, {**self.outputs, **other.outputs}, self.failures + other.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance.to_dict(), "outputs": self.outputs, "passed": self.passed,
                "failures": list(self.failures)}

    def raise_if_failed(self, what: str, todo: str | None = None) -> None:
        if self.failures:
            raise ComparisonError(what, self.failures, todo=todo)


class ComparisonError(ValidationError):
    """Outputs outside their tolerance; ``failures`` has one line per output."""


def compare(outputs: Iterable[Output], tolerance: Tolerance, where: str = "") -> Comparison:
    """Compare every output against its reference; all failures are collected, none raised."""
    result = Comparison(tolerance)
    for out in outputs:
        fig = figures(out, tolerance)
        result.outputs[out.name] = fig
        found = problems(fig, tolerance)
        if found:
            label = f"{out.name} ({where}, {fig['images']} images)" if where else out.name
            result.failures.append(f"- {label}: " + "; ".join(found))
    return result


def feature_outputs(ref: np.ndarray, new: np.ndarray, logits: Callable[[np.ndarray], np.ndarray],
                    labels: np.ndarray | None = None) -> list[Output]:
    """What is compared on one image set: the backbone's features, and a head's ``logits`` of them."""
    return [Output("features", ref, new), Output("logits", logits(ref), logits(new), classes=True, labels=labels)]


def flat_figures(comparison: Comparison) -> dict[str, Any]:
    """One image set's figures as one record: the features' figures, then the logits' (``logits_*``;
    top-1 agreement and accuracy under their own names), as reports and searches read them."""
    out = dict(comparison.outputs.get("features", {}))
    for k, v in comparison.outputs.get("logits", {}).items():
        plain = k == "top1_agreement" or k.startswith("accuracy")
        out[k if plain else f"logits_{k}"] = v
    return out


def meets(fig: dict[str, Any], tol: Tolerance, margin: float = 0.0, *, one_sample: bool | None = None) -> bool:
    """True when one output's figures satisfy ``tol`` (with ``margin``: for searches on calibration images).

    On a search's small image sets one image is worth more than the accuracy tolerance, so a search
    accepts a drop of one image (``one_sample``, default: whenever there is a margin); held-out
    validation decides.
    """
    if one_sample is None:
        one_sample = bool(margin)
    if one_sample and tol.max_accuracy_drop is not None and fig.get("images"):
        tol = replace(tol, max_accuracy_drop=max(tol.max_accuracy_drop, 1.0 / fig["images"]))
    return not problems(fig, tol, margin)
