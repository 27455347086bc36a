"""What a run measures (:mod:`edgexfer.bench.plan`): the bundle's engines from the backend registry,
the ones skipped with their reason, and the option lists."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

from edgexfer.bench import plan
from edgexfer.bench.plan import parse_batches, plan_targets
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cpu import CpuFeatures
from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.precision import PRECISIONS, PrecisionError


def test_an_engine_the_bundle_lacks_is_an_error_not_a_quiet_omission(bench_bundle):
    pytest.importorskip("onnxruntime")
    bundle = Bundle.open(bench_bundle)
    with pytest.raises(BundleError, match="no engine in the bundle"):
        plan_targets(bundle, ["onnxruntime"], ["int8"])
    with pytest.raises(InputError, match="--backend"):
        plan_targets(bundle, ["onnx"], ["all"])
    targets, _ = plan_targets(bundle, ["all"], ["all"], torch_reference=False)
    assert ("onnxruntime", "fp32") in {(t.backend, t.precision) for t in targets}


@pytest.mark.parametrize("value", ["1,x", "0", ""])
def test_bad_batch_lists_are_one_line_errors(value):
    with pytest.raises(InputError, match="--batch"):
        parse_batches(value)


# ------------------------------------------------------------------------------ bf16 targets
def _bundle_with(engines):
    """What plan_targets reads of a bundle: its engine entries and their files."""
    root = Path("/bundle")
    entries = [types.SimpleNamespace(backend=b, precision=p) for b, p in engines]

    def engine_file(backend, precision):
        if (backend, precision) == ("onnxruntime", "fp32") or (backend, precision) in engines:
            return root / "engines" / backend / precision / "backbone.xml"
        raise BundleError("no engine in the bundle for this backend and precision", got=f"{backend}/{precision}")

    return types.SimpleNamespace(root=root, manifest=types.SimpleNamespace(engines=entries), engine_file=engine_file)


def test_bf16_is_planned_next_to_fp32_and_int8_on_a_bf16_cpu_and_skipped_with_the_reason_elsewhere(monkeypatch):
    monkeypatch.setattr(plan, "available_backends", lambda: ["onnxruntime", "openvino"])
    bundle = _bundle_with([("openvino", "int8"), ("openvino", "bf16"), ("openvino", "fp32")])
    zen4 = CpuFeatures("x86_64", "AMD EPYC", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16"))
    avx2 = CpuFeatures("x86_64", "older x86", ("avx2", "fma"))

    targets, skipped = plan_targets(bundle, ["openvino"], ["all"], torch_reference=False, features=zen4)
    assert [t.label for t in targets] == ["openvino/fp32", "openvino/bf16", "openvino/int8"]
    assert skipped == []

    targets, skipped = plan_targets(bundle, ["all"], ["all"], torch_reference=False, features=avx2)
    assert [t.label for t in targets] == ["onnxruntime/fp32", "openvino/fp32", "openvino/int8"]
    assert [(s.backend, s.precision) for s in skipped] == [("openvino", "bf16")]
    reason = skipped[0].reason
    assert "\n" not in reason and "avx512_bf16" in reason and "older x86" in reason, reason

    # asked for by name on such a CPU: the one-line error, not a quiet omission
    for backends in (["openvino"], ["all"]):
        with pytest.raises(PrecisionError, match="bf16 execution.*avx512_bf16"):
            plan_targets(bundle, backends, ["fp32", "bf16"], torch_reference=False, features=avx2)
    assert plan.PRECISIONS is PRECISIONS


def test_engines_come_in_registry_order_and_every_one_the_run_cannot_measure_is_listed(monkeypatch):
    """Backends in the registry's order whatever order convert recorded them in; an engine whose backend is
    not installed, or that no backend of this edgexfer runs, is skipped with the reason, never dropped."""
    monkeypatch.setattr(plan, "available_backends", lambda: ["onnxruntime", "openvino"])
    bundle = _bundle_with([("tensorrt", "fp16"), ("future-engine", "fp32"), ("openvino", "int8")])
    avx2 = CpuFeatures("x86_64", "older x86", ("avx2", "fma"))

    targets, skipped = plan_targets(bundle, ["all"], ["all"], torch_reference=False, features=avx2)
    assert [t.label for t in targets] == ["onnxruntime/fp32", "openvino/int8"]
    reasons = {(s.backend, s.precision): s.reason for s in skipped}
    assert set(reasons) == {("tensorrt", "fp16"), ("future-engine", "fp32")}
    assert "not installed" in reasons[("tensorrt", "fp16")]
    assert "not a backend" in reasons[("future-engine", "fp32")]
    # an explicit backend list leaves the others out without listing them
    _, skipped = plan_targets(bundle, ["openvino"], ["all"], torch_reference=False, features=avx2)
    assert skipped == []
