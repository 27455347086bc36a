"""``edgexfer bench`` end to end (:mod:`edgexfer.bench.run`): a tiny run on the bundle's ONNX Runtime
engine writes every output, and the click command drives it.

No test asserts a wall-clock time: timings on a shared machine say nothing about correctness.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("mlperf_loadgen")
pytest.importorskip("onnxruntime")

from edgexfer.bench import SCHEMA, run_bench, validate_report  # noqa: E402
from edgexfer.bench.plan import LAYERS, OFFLINE_LAYER, SEED  # noqa: E402
from edgexfer.runtime.bundle import Bundle  # noqa: E402
from edgexfer.runtime.errors import InputError  # noqa: E402


def test_tiny_run_writes_every_output_with_the_documented_schema(tiny_report):
    report, out = tiny_report
    assert validate_report(report) == []
    on_disk = json.loads((out / "bench.json").read_text())
    assert validate_report(on_disk) == []
    assert on_disk["schema"] == SCHEMA
    for name in ("bench.json", "bench.md", "plots/latency_cdf.png", "plots/throughput_vs_batch.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "plots/latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_layer_and_batch_is_reported_for_the_engine(tiny_report):
    report, _ = tiny_report
    ss = [r for r in report["results"] if r["scenario"] == "single-stream"]
    assert sorted(r["layer"] for r in ss) == sorted(LAYERS)
    off = [r for r in report["results"] if r["scenario"] == "offline"]
    assert sorted(r["batch"] for r in off) == [1, 2]
    assert all(r["layer"] == OFFLINE_LAYER for r in off)
    for r in ss:
        assert r["backend"] == "onnxruntime" and r["precision"] == "fp32" and r["batch"] == 1
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        # LoadGen counted exactly the queries our SUT completed
        assert r["count"] == len(r["latencies_ms"]) >= 3
    for r in off:
        assert r["samples"] >= 3 and r["throughput_sps"] > 0
    engine = report["engines"][0]
    assert engine["load_seconds"] > 0 and engine["first_inference_ms"] > 0 and engine["threads"] == 1
    overhead = report["head_overhead"][0]
    assert overhead["pairs"] >= 16
    # The time outside the engine (a 1280 x 8 head and the wrapper) is a small part of a backbone call: an
    # "outside" as large as the engine itself means the engine's own time was not subtracted.
    assert 0 < overhead["outside_engine_p50_ms"] < 0.5 * overhead["engine_p50_ms"], overhead
    assert engine["execution"]["precision"] == "fp32" and engine["execution"]["inference_precision"] == "f32"


def test_environment_and_bundle_identity_are_recorded(tiny_report, bench_bundle):
    report, out = tiny_report
    env = report["environment"]
    for key in ("cpu_model", "logical_cores", "governor", "versions", "jetson", "load_average_1_5_15"):
        assert key in env
    # bench.json on disk names the ISA flags engines decide on, the same cpu_features() reads
    from edgexfer.runtime.cpu import cpu_features

    on_disk = json.loads((out / "bench.json").read_text())["environment"]["cpu"]
    assert on_disk["flags"] == list(cpu_features().flags) and on_disk["signature"] == cpu_features().signature
    assert on_disk["model"] == cpu_features().model and isinstance(on_disk["bf16"], bool)
    assert env["versions"]["onnxruntime"] and env["versions"]["mlperf_loadgen"]
    assert report["bundle"]["backbone_sha256"] == Bundle.open(bench_bundle).manifest.backbone.sha256
    assert report["settings"]["seed"] == SEED


def test_loadgen_logs_are_kept_per_test(tiny_report):
    _, out = tiny_report
    logs = sorted(p.parent.name for p in (out / "loadgen").glob("*/mlperf_log_summary.txt"))
    assert "onnxruntime-fp32-single-stream-engine" in logs and "onnxruntime-fp32-offline-b2" in logs


def test_an_undecodable_image_stops_the_benchmark_instead_of_timing_an_error(bench_bundle, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(InputError):
        run_bench(bench_bundle, backends="onnxruntime", scenarios="single-stream", layers="end_to_end",
                  min_duration_s=0.05, min_queries=2, out_dir=tmp_path / "o", progress=False,
                  images=images, torch_reference=False, plots=False)


# ------------------------------------------------------------------------------ the click command
def test_cli_compare_prints_ratios_against_an_earlier_run(tiny_report, bench_bundle, tmp_path):
    from click.testing import CliRunner

    from edgexfer.cli_bench import bench as bench_command

    _, first = tiny_report
    result = CliRunner().invoke(bench_command, [
        str(bench_bundle), "--backend", "onnxruntime", "--precision", "fp32", "--scenario", "single-stream",
        "--layer", "engine", "--min-duration", "0.05", "--min-queries", "3", "--out", str(tmp_path / "second"),
        "--compare", str(first / "bench.json"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Compared with" in result.output
    report = json.loads((tmp_path / "second" / "bench.json").read_text())
    row = next(r for r in report["compare"]["rows"] if r["layer"] == "engine" and r["scenario"] == "single-stream")
    assert row["status"] == "both" and row["p50_ms_ratio"] > 0
    assert {r["status"] for r in report["compare"]["rows"]} == {"both", "old only"}


def test_cli_json_prints_the_report_on_stdout(bench_bundle, tmp_path):
    from click.testing import CliRunner

    from edgexfer.cli_bench import bench as bench_command

    result = CliRunner().invoke(bench_command, [
        str(bench_bundle), "--backend", "onnxruntime", "--scenario", "offline", "--batch", "2",
        "--min-duration", "0.05", "--min-queries", "2", "--out", str(tmp_path / "j"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert validate_report(report) == []
    assert [(r["scenario"], r["batch"]) for r in report["results"]] == [("offline", 2)]


def test_registered_under_the_edgexfer_group_a_bad_option_is_a_one_line_error(bench_bundle):
    import click
    from click.testing import CliRunner

    from edgexfer.cli import _Group
    from edgexfer.cli_bench import bench as bench_command

    @click.group(cls=_Group)
    @click.pass_context
    def group(ctx):
        ctx.ensure_object(dict)

    group.add_command(bench_command)
    result = CliRunner().invoke(group, ["bench", str(bench_bundle), "--scenario", "server", "--quiet"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == ["error: --scenario | got server | expected all or any of single-stream, offline"]
