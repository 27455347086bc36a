"""edgexfer bench: the report schema, the LoadGen wiring (tiny runs) and --compare ratios.

No test asserts a wall-clock time: timings on a shared machine say nothing about correctness.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("mlperf_loadgen")
pytest.importorskip("onnxruntime")

from edgexfer import bench  # noqa: E402
from edgexfer.runtime.bundle import Bundle  # noqa: E402
from edgexfer.runtime.errors import BundleError, InputError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_bundle(request) -> Path:
    """$EDGEXFER_TEST_BUNDLE, else the repository's build/test-bundle, else the demo bundle built with torch."""
    env = os.environ.get("EDGEXFER_TEST_BUNDLE")
    if env:
        return Path(env)
    built = REPO / "build" / "test-bundle"
    if (built / "manifest.json").is_file():
        return built
    return request.getfixturevalue("device_bundle")


@pytest.fixture(scope="module")
def tiny_report(bench_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    report = bench.run_bench(bench_bundle, backends="onnxruntime", precisions="fp32",
                             scenarios="single-stream,offline", batches="1,2", min_duration_s=0.05, min_queries=3,
                             threads=1, out_dir=out, progress=False, layers="all", torch_reference=False)
    return report, out


def test_tiny_run_writes_every_output_with_the_documented_schema(tiny_report):
    report, out = tiny_report
    assert bench.validate_report(report) == []
    on_disk = json.loads((out / "bench.json").read_text())
    assert bench.validate_report(on_disk) == []
    assert on_disk["schema"] == bench.SCHEMA
    for name in ("bench.json", "bench.md", "plots/latency_cdf.png", "plots/throughput_vs_batch.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "plots/latency_cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_layer_and_batch_is_reported_for_the_engine(tiny_report):
    report, _ = tiny_report
    ss = [r for r in report["results"] if r["scenario"] == "single-stream"]
    assert sorted(r["layer"] for r in ss) == sorted(bench.LAYERS)
    off = [r for r in report["results"] if r["scenario"] == "offline"]
    assert sorted(r["batch"] for r in off) == [1, 2]
    assert all(r["layer"] == bench.OFFLINE_LAYER for r in off)
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


def test_markdown_lists_every_backend_and_precision_with_percentiles(tiny_report):
    report, out = tiny_report
    md = (out / "bench.md").read_text()
    assert "| backend | precision | computes in | p50 | p90 | p99 | throughput (samples/s) | at batch |" in md
    row = next(line for line in md.splitlines() if line.startswith("| onnxruntime | fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(c not in ("", "–") for c in cells), row
    assert cells[2] == "f32", row
    # where the figures come from: the CPU model, its ISA flags and the date, at the top
    cpu = report["environment"]["cpu"]
    header = md.split("## Backends side by side")[0]
    assert cpu["model"] in header and ", ".join(cpu["flags"]) in header, header
    assert report["created_utc"][:10] in header
    # a skipped engine's one-line reason (parts joined by " | ") stays inside its table cell
    skipped = {"backend": "openvino", "precision": "bf16", "reason": "bf16 execution | got CPU 'x' | expected avx512_bf16"}
    row = next(line for line in bench.render_markdown({**report, "skipped": [skipped]}).splitlines()
               if line.startswith("| openvino | bf16 |"))
    assert len([c for c in row.replace("\\|", "").strip("|").split("|")]) == 8, row


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
    assert report["settings"]["seed"] == bench.SEED


def test_loadgen_logs_are_kept_per_test(tiny_report):
    _, out = tiny_report
    logs = sorted(p.parent.name for p in (out / "loadgen").glob("*/mlperf_log_summary.txt"))
    assert "onnxruntime-fp32-single-stream-engine" in logs and "onnxruntime-fp32-offline-b2" in logs


# ------------------------------------------------------------------------------ LoadGen wiring alone
def test_single_stream_issues_one_sample_at_a_time_until_the_minimum(tmp_path):
    seen: list[int] = []
    run = bench.single_stream(seen.append, 5, bench.LoadGenSettings(0.01, 7, tmp_path / "ss"), expected_s=0.001)
    lg = run["loadgen"]
    assert lg["result_query_count"] == len(seen) == len(run["latencies_s"]) >= 7
    assert set(seen) <= set(range(5))
    assert "result_50.00_percentile_latency_ns" in lg and "result_validity" in lg


def test_offline_issues_every_sample_in_batches_no_larger_than_asked(tmp_path):
    batches: list[list[int]] = []
    run = bench.offline(batches.append, 6, 4, bench.LoadGenSettings(0.01, 10, tmp_path / "off"),
                        expected_qps=100.0, min_samples=10)
    done = sum(len(b) for b in batches)
    assert done == run["loadgen"]["effective_samples_per_query"] >= 10
    assert max(len(b) for b in batches) == 4
    assert all(0 <= i < 6 for b in batches for i in b)
    assert run["loadgen"]["result_samples_per_second"] > 0


def test_an_error_inside_the_system_under_test_is_raised_after_loadgen_stops(tmp_path):
    def broken(index: int) -> None:
        raise InputError("engine exploded", got=index)

    with pytest.raises(InputError, match="engine exploded"):
        bench.single_stream(broken, 3, bench.LoadGenSettings(0.01, 3, tmp_path / "bad"), expected_s=0.001)


# ------------------------------------------------------------------------------ --compare
def _report(results):
    return {"schema": bench.SCHEMA, "created_utc": "2026-11-25T00:00:00Z", "results": results}


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
    rows = {(r["backend"], r["scenario"]): r for r in bench.compare_reports(new, old)}
    both = rows[("onnxruntime", "single-stream")]
    assert both["status"] == "both"
    assert both["p50_ms_ratio"] == pytest.approx(0.5)
    assert both["p90_ms_ratio"] == pytest.approx(1.5)
    assert both["p99_ms_ratio"] == pytest.approx(1.0)
    assert both["throughput_sps_ratio"] == pytest.approx(2.0)
    assert rows[("onnxruntime", "offline")]["status"] == "new only"
    assert rows[("openvino", "offline")]["status"] == "old only"
    table = bench.format_compare(bench.compare_reports(new, old))
    assert "| 0.500 | 1.000 | 2.000 |" in table


def test_compare_refuses_a_file_that_is_not_a_bench_report(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "edgexfer.bundle/1"}))
    with pytest.raises(InputError, match="not an edgexfer bench report"):
        bench.load_report(path)
    with pytest.raises(InputError, match="not found"):
        bench.load_report(tmp_path / "missing.json")


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


# ------------------------------------------------------------------------------ choosing what to run
def test_an_engine_the_bundle_lacks_is_an_error_not_a_quiet_omission(bench_bundle):
    bundle = Bundle.open(bench_bundle)
    with pytest.raises(BundleError, match="no engine in the bundle"):
        bench.plan_targets(bundle, ["onnxruntime"], ["int8"])
    with pytest.raises(InputError, match="--backend"):
        bench.plan_targets(bundle, ["onnx"], ["all"])
    targets, _ = bench.plan_targets(bundle, ["all"], ["all"], torch_reference=False)
    assert ("onnxruntime", "fp32") in {(t.backend, t.precision) for t in targets}


@pytest.mark.parametrize("value", ["1,x", "0", ""])
def test_bad_batch_lists_are_one_line_errors(value):
    with pytest.raises(InputError, match="--batch"):
        bench.parse_batches(value)


def test_latency_stats_of_known_values():
    stats = bench.latency_stats([0.001, 0.002, 0.003, 0.004])
    assert stats["count"] == 4
    assert stats["p50_ms"] == pytest.approx(2.5)
    assert stats["max_ms"] == pytest.approx(4.0)
    assert stats["mean_ms"] == pytest.approx(2.5)


def test_interleaved_engines_give_every_engine_the_same_rounds():
    import numpy as np

    class Fake:
        def __init__(self):
            self.calls = 0

        def run(self, batch):
            self.calls += 1
            return np.zeros((len(batch), 4), np.float32)

    runners = {"a/fp32": Fake(), "b/int8": Fake()}
    side = bench.interleaved_engines(runners, np.zeros((3, 8, 8, 3), np.uint8), rounds=10)
    assert side["rounds"] == 10
    assert runners["a/fp32"].calls == runners["b/int8"].calls == 10 + bench.WARMUP_CALLS
    assert set(side["p50_ms"]) == set(runners) and all(v >= 0 for v in side["p50_ms"].values())
    report = {"results": [], "side_by_side": {**side, "p50_ms": {"a/fp32": 2.0, "pytorch-eager/fp32": 10.0}}}
    summary = bench.summarize(report)
    assert summary["side_by_side_best"]["engine"] == "a/fp32"
    assert summary["side_by_side_speedup_vs_pytorch_eager"] == pytest.approx(5.0)


def test_cli_json_prints_the_report_on_stdout(bench_bundle, tmp_path):
    from click.testing import CliRunner

    from edgexfer.cli_bench import bench as bench_command

    result = CliRunner().invoke(bench_command, [
        str(bench_bundle), "--backend", "onnxruntime", "--scenario", "offline", "--batch", "2",
        "--min-duration", "0.05", "--min-queries", "2", "--out", str(tmp_path / "j"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert bench.validate_report(report) == []
    assert [(r["scenario"], r["batch"]) for r in report["results"]] == [("offline", 2)]


def test_an_undecodable_image_stops_the_benchmark_instead_of_timing_an_error(bench_bundle, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(InputError):
        bench.run_bench(bench_bundle, backends="onnxruntime", scenarios="single-stream", layers="end_to_end",
                        min_duration_s=0.05, min_queries=2, out_dir=tmp_path / "o", progress=False,
                        images=images, torch_reference=False, plots=False)


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


# ------------------------------------------------------------------------------ the head-overhead decomposition
class _Clock:
    """A stand-in for time.perf_counter that moves only when the fake engine or head works."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_head_overhead_parts_add_up_to_the_measured_engine_plus_head(monkeypatch):
    """Engine calls of known, varying cost and a head of known cost: the decomposition must find the head's
    cost, and engine p50 + outside-the-engine p50 must equal the engine + head p50 measured directly."""
    import types

    import numpy as np

    from edgexfer.runtime.backends import base
    from edgexfer.runtime.backends.base import EngineRunner, TensorSpec
    from edgexfer.runtime.predictor import Predictor

    clock = _Clock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(bench, "time", fake_time)
    monkeypatch.setattr(base, "time", fake_time)
    head_cost_s = 0.0005
    # one cost per pair (both calls of a pair see it), a jittery engine: 4 ms with 8 ms and 20 ms outliers
    costs = [0.004, 0.0041, 0.0039, 0.008, 0.004, 0.02, 0.0042, 0.0038]
    calls = {"n": 1}  # paired_head_overhead's first engine call takes slot 0 alone; then pair i takes slot i + 1

    class ClockEngine(EngineRunner):
        name = "clock"

        def input_spec(self):
            return TensorSpec("image", (None, 4, 4, 3), "uint8")

        def run_impl(self, batch):
            clock.now += costs[(calls["n"] // 2) % len(costs)]
            calls["n"] += 1
            return np.ones((len(batch), 5), np.float32)

    class ClockHead:
        classes = ["a", "b"]

        def probabilities(self, feats):
            clock.now += head_cost_s
            return np.full((len(feats), 2), 0.5, np.float32)

    engine = ClockEngine("clock.onnx", "fp32")
    predictor = Predictor(None, engine, ClockHead(), "clock", "fp32")
    h = bench.paired_head_overhead(engine, predictor, np.zeros((4, 4, 4, 3), np.uint8), pairs=32)

    assert h["pairs"] == 32
    assert h["outside_engine_p50_ms"] == pytest.approx(head_cost_s * 1e3, rel=1e-6)
    assert h["head_only_p50_ms"] == pytest.approx(head_cost_s * 1e3, rel=1e-6)
    assert h["engine_p50_ms"] == pytest.approx(float(np.median(costs)) * 1e3, rel=1e-6)
    # the parts add up to the directly measured engine + head figure (1 % tolerance; exact with this clock)
    assert h["engine_p50_ms"] + h["outside_engine_p50_ms"] == pytest.approx(h["engine_head_p50_ms"], rel=0.01)
    assert h["decomposed_ratio"] == pytest.approx(h["engine_head_p50_ms"] / h["engine_p50_ms"], rel=0.01)


# ------------------------------------------------------------------------------ bf16 targets
def _bundle_with(engines):
    """What plan_targets reads of a bundle: its engine entries and their files."""
    import types

    root = Path("/bundle")
    entries = [types.SimpleNamespace(backend=b, precision=p) for b, p in engines]

    def engine_file(backend, precision):
        if (backend, precision) == ("onnxruntime", "fp32") or (backend, precision) in engines:
            return root / "engines" / backend / precision / "backbone.xml"
        raise BundleError("no engine in the bundle for this backend and precision", got=f"{backend}/{precision}")

    return types.SimpleNamespace(root=root, manifest=types.SimpleNamespace(engines=entries), engine_file=engine_file)


def test_bf16_is_planned_next_to_fp32_and_int8_on_a_bf16_cpu_and_skipped_with_the_reason_elsewhere(monkeypatch):
    from edgexfer.runtime.cpu import CpuFeatures
    from edgexfer.runtime.precision import PRECISIONS, PrecisionError

    monkeypatch.setattr(bench, "available_backends", lambda: ["onnxruntime", "openvino"])
    bundle = _bundle_with([("openvino", "int8"), ("openvino", "bf16"), ("openvino", "fp32")])
    zen4 = CpuFeatures("x86_64", "AMD EPYC", ("avx2", "avx512f", "avx512_vnni", "avx512_bf16"))
    avx2 = CpuFeatures("x86_64", "older x86", ("avx2", "fma"))

    targets, skipped = bench.plan_targets(bundle, ["openvino"], ["all"], torch_reference=False, features=zen4)
    assert [t.label for t in targets] == ["openvino/fp32", "openvino/bf16", "openvino/int8"]
    assert skipped == []

    targets, skipped = bench.plan_targets(bundle, ["all"], ["all"], torch_reference=False, features=avx2)
    assert [t.label for t in targets] == ["onnxruntime/fp32", "openvino/fp32", "openvino/int8"]
    assert [(s.backend, s.precision) for s in skipped] == [("openvino", "bf16")]
    reason = skipped[0].reason
    assert "\n" not in reason and "avx512_bf16" in reason and "older x86" in reason, reason

    # asked for by name on such a CPU: the one-line error, not a quiet omission
    for backends in (["openvino"], ["all"]):
        with pytest.raises(PrecisionError, match="bf16 execution.*avx512_bf16"):
            bench.plan_targets(bundle, backends, ["fp32", "bf16"], torch_reference=False, features=avx2)
    assert bench.PRECISIONS is PRECISIONS

