"""``edgexfer bench`` on real OpenVINO fp32, bf16 and int8 engines, side by side in one run.

It lives beside the conversion tests to reuse their session's converted bundle (conversions are slow);
the benchmark itself is tiny. No wall-clock figure is asserted.
"""
from __future__ import annotations

import json

import pytest

from edgexfer.runtime.cpu import cpu_features


def test_bench_shows_openvino_bf16_next_to_fp32_and_int8_with_what_each_computes_in(
        converted, conversion_bundle, tmp_path):
    pytest.importorskip("mlperf_loadgen")
    pytest.importorskip("openvino")
    if not cpu_features().bf16:
        pytest.skip(f"this CPU has no bf16 arithmetic ({cpu_features().describe()}): no bf16 engine to measure")
    from edgexfer import bench

    for precision in ("fp32", "bf16", "int8"):
        converted("openvino", precision)
    out = tmp_path / "bench"
    report = bench.run_bench(conversion_bundle, backends="openvino", precisions="fp32,bf16,int8",
                             scenarios="single-stream", layers="engine", min_duration_s=0.05, min_queries=3,
                             out_dir=out, progress=False, torch_reference=False, plots=False)
    assert bench.validate_report(report) == []
    engines = {e["precision"]: e for e in report["engines"]}
    assert [e["precision"] for e in report["engines"]] == ["fp32", "bf16", "int8"]
    want = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: its float parts compute in f32
    for precision, ran in want.items():
        execution = engines[precision]["execution"]
        assert execution["precision"] == precision and execution["inference_precision"] == ran, execution
        assert execution["isa"] == cpu_features().signature
        assert engines[precision]["details"]["inference_precision"] == ran
    assert {(r["precision"], r["layer"]) for r in report["results"]} == {(p, "engine") for p in want}
    assert set(report["side_by_side"]["p50_ms"]) == {f"openvino/{p}" for p in want}

    md = (out / "bench.md").read_text()
    table = md.split("## Backends side by side")[1].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| openvino |")]
    assert [[c.strip() for c in row.strip("|").split("|")][1:3] for row in rows] == [
        ["fp32", "f32"], ["bf16", "bf16"], ["int8", "f32"]], table
    assert json.loads((out / "bench.json").read_text())["environment"]["cpu"]["bf16"] is True
