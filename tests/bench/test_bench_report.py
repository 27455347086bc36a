"""The report (:mod:`edgexfer.bench.report`): records written as bench.json, the schema derived from them
(checked by ``validate_report`` and documented in docs/benchmarks.md), and ``--compare`` ratios."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from edgexfer.bench import SCHEMA, validate_report
from edgexfer.bench.plan import SkippedTarget
from edgexfer.bench.render import format_compare
from edgexfer.bench.report import (
    BundleInfo,
    CpuRecord,
    EngineRecord,
    Environment,
    Execution,
    OfflineResult,
    Report,
    SampleInfo,
    Settings,
    SingleStreamResult,
    compare_reports,
    load_report,
    report_schema,
)
from edgexfer.runtime.errors import InputError

REPO = Path(__file__).resolve().parents[2]


def _latencies(**values):
    keys = ("p50_ms", "p90_ms", "p95_ms", "p97_ms", "p99_ms", "p99_9_ms", "max_ms", "min_ms", "mean_ms")
    return {k: values.get(k, 1.0) for k in keys}


def _small_report() -> Report:
    """A report of one engine, one SingleStream and one Offline row, built from the records."""
    cpu = CpuRecord(machine="x86_64", model="Test CPU", flags=["avx2"], signature="x86_64:avx2", bf16=False,
                    int8_dot=False, hidden_flags=[])
    return Report(
        created_utc="2026-11-25T00:00:00Z", edgexfer="0.1.0",
        bundle=BundleInfo(path="/b", name="b", arch="efficientnet_lite0", backbone_sha256="0" * 64,
                          feature_dim=1280, head_kind="linear", classes=8),
        settings=Settings(backends=["all"], precisions=["all"], scenarios=["single-stream", "offline"],
                          layers=["engine"], batches=[1], min_duration_s=0.05, min_queries=3, threads=None,
                          mlperf_minimums=False, warmup_calls=3, seed=0, offline_layer="engine_head",
                          samples=SampleInfo(count=4, source="golden", mean_encoded_bytes=900,
                                             pixels_shape=[224, 224, 3])),
        environment=Environment(cpu_model="Test CPU", cpu=cpu, machine="x86_64", logical_cores=2, cores_usable=2,
                                threads_requested=None, governor=None, load_average_1_5_15=[0.5, 0.5, 0.5],
                                os="Linux", python="3.12", versions={"numpy": "2.0", "tensorrt": None},
                                temperatures_c=None, jetson=None),
        engines=[EngineRecord(backend="onnxruntime", precision="fp32", model="backbone.onnx", load_seconds=0.1,
                              first_inference_ms=5.0, threads="engine default",
                              execution=Execution(precision="fp32", inference_precision="f32", isa="x86_64:avx2",
                                                  cpu="Test CPU"), details={"providers": ["CPUExecutionProvider"]})],
        skipped=[SkippedTarget("openvino", "bf16", "bf16 execution | got CPU 'Test CPU'")],
        results=[SingleStreamResult(backend="onnxruntime", precision="fp32", layer="engine", batch=1,
                                    **_latencies(), count=3, std_ms=0.1, throughput_sps=900, validity="INVALID",
                                    invalid_reason=None, early_stopping=None, sut_timed={"p50_ms": 1.0, "count": 3},
                                    latencies_ms=[1.0, 1.0, 1.0]),
                 OfflineResult(backend="onnxruntime", precision="fp32", layer="engine_head", batch=1, samples=3,
                               throughput_sps=950.0, sut_timed_sps=None, validity="VALID", invalid_reason=None)],
        head_overhead=[], summary={})


def test_a_report_built_from_the_records_is_valid_and_written_in_the_documented_order():
    written = _small_report().to_dict()
    assert validate_report(written) == []
    assert validate_report(json.loads(json.dumps(written))) == []
    assert list(written) == ["schema", "created_utc", "edgexfer", "bundle", "settings", "environment", "engines",
                             "skipped", "results", "head_overhead", "summary", "outputs"]  # no side_by_side, compare
    assert written["schema"] == SCHEMA and written["results"][0]["scenario"] == "single-stream"
    assert written["results"][1]["scenario"] == "offline" and written["results"][1]["sut_timed_sps"] is None
    assert written["skipped"] == [{"backend": "openvino", "precision": "bf16",
                                   "reason": "bf16 execution | got CPU 'Test CPU'"}]


@pytest.mark.parametrize("change,problem", [
    (lambda r: r.pop("summary"), "report: missing summary"),
    (lambda r: r.update(schema="edgexfer.bundle/1"), "report.schema is 'edgexfer.bundle/1', expected 'edgexfer.bench/1'"),
    (lambda r: r["results"][0].pop("p50_ms"), "report.results[0]: missing p50_ms"),
    (lambda r: r["results"][1].pop("samples"), "report.results[1]: missing samples"),
    (lambda r: r["results"][0].update(scenario="server"), "report.results[0].scenario is 'server'"),
    (lambda r: r["results"][0].update(count="3"), "report.results[0].count is string, expected integer"),
    (lambda r: r["results"][0].update(latencies_ms=None), "report.results[0].latencies_ms is null, expected array"),
    (lambda r: r["engines"][0]["execution"].pop("isa"), "report.engines[0].execution: missing isa"),
    (lambda r: r["engines"][0].pop("threads"), "report.engines[0]: missing threads"),
    (lambda r: r["environment"]["cpu"].update(signature=""), "report.environment.cpu.signature is empty"),
    (lambda r: r["environment"]["cpu"].update(flags="avx2"), "report.environment.cpu.flags is string"),
    (lambda r: r["environment"].pop("cpu"), "report.environment: missing cpu"),
    (lambda r: r["settings"].update(threads=True), "report.settings.threads is boolean, expected integer or null"),
    (lambda r: r.update(skipped={}), "report.skipped is object, expected array"),
])
def test_validation_names_each_problem_of_a_report(change, problem):
    report = copy.deepcopy(_small_report().to_dict())
    change(report)
    problems = validate_report(report)
    assert any(p.startswith(problem) for p in problems), problems


def test_validation_of_something_that_is_not_a_report():
    assert validate_report([]) == ["report is array, expected object"]


def _schema_fields(schema, where="report"):
    """(path, field name) of every field of every record in the schema."""
    for name, sub in schema.get("properties", {}).items():
        yield where, name
        for part in [sub, sub.get("items", {}), *sub.get("anyOf", []), *sub.get("items", {}).get("anyOf", [])]:
            if part.get("type") == "object" and "properties" in part:
                yield from _schema_fields(part, f"{where}.{name}")


def test_docs_describe_every_field_the_report_writes():
    """docs/benchmarks.md documents bench.json: every field of the schema is named there, in backticks."""
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    documented = set(re.findall(r"`([a-z0-9_]+)(?:\[\])?`", docs))  # `engines[]`: a list
    missing = sorted({f"{where}.{name}" for where, name in _schema_fields(report_schema()) if name not in documented})
    assert missing == []


# ------------------------------------------------------------------------------ --compare
def _report(results):
    return {"schema": SCHEMA, "created_utc": "2026-11-25T00:00:00Z", "results": results}


def test_compare_computes_new_over_old_ratios_per_matching_row():
    old = _report([
        {"scenario": "single-stream", "backend": "onnxruntime", "precision": "fp32", "layer": "engine", "batch": 1,
         "p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 40.0, "throughput_sps": 100.0},
        {"scenario": "offline", "backend": "openvino", "precision": "int8", "layer": "engine_head", "batch": 8,
         "throughput_sps": 50.0},
    ])
    new = _report([
        {"scenario": "single-stream", "backend": "onnxruntime", "precision": "fp32", "layer": "engine", "batch": 1,
         "p50_ms": 5.0, "p90_ms": 30.0, "p99_ms": 40.0, "throughput_sps": 200.0},
        {"scenario": "offline", "backend": "onnxruntime", "precision": "fp32", "layer": "engine_head", "batch": 8,
         "throughput_sps": 75.0},
    ])
    rows = {(r["backend"], r["scenario"]): r for r in compare_reports(new, old)}
    both = rows[("onnxruntime", "single-stream")]
    assert both["status"] == "both"
    assert both["p50_ms_ratio"] == pytest.approx(0.5)
    assert both["p90_ms_ratio"] == pytest.approx(1.5)
    assert both["p99_ms_ratio"] == pytest.approx(1.0)
    assert both["throughput_sps_ratio"] == pytest.approx(2.0)
    assert rows[("onnxruntime", "offline")]["status"] == "new only"
    assert rows[("openvino", "offline")]["status"] == "old only"
    table = format_compare(compare_reports(new, old))
    assert "| 0.500 | 1.000 | 2.000 |" in table


def test_compare_refuses_a_file_that_is_not_a_bench_report(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "edgexfer.bundle/1"}))
    with pytest.raises(InputError, match="not an edgexfer bench report"):
        load_report(path)
    with pytest.raises(InputError, match="not found"):
        load_report(tmp_path / "missing.json")
