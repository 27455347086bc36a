"""One ``edgexfer bench`` run: check the options, plan the targets, open each engine in turn and measure
it through LoadGen and the paired timings, then write the report and its outputs."""
from __future__ import annotations

import functools
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer import __version__
from edgexfer.bench.environment import capture_environment
from edgexfer.bench.loadgen import (
    LoadGenSettings,
    loadgen_latency_ms,
    offline,
    require_loadgen,
    single_stream,
)
from edgexfer.bench.measure import interleaved_engines, latency_stats, median_call, paired_head_overhead
from edgexfer.bench.plan import (
    DEFAULT_BATCHES,
    DEFAULT_MIN_DURATION_S,
    DEFAULT_MIN_QUERIES,
    LAYERS,
    MLPERF_MIN_DURATION_S,
    MLPERF_MIN_OFFLINE_SAMPLES,
    MLPERF_MIN_QUERIES,
    OFFLINE_LAYER,
    SCENARIOS,
    SEED,
    TORCH_BACKEND,
    WARMUP_CALLS,
    EngineTarget,
    parse_batches,
    parse_list,
    plan_targets,
)
from edgexfer.bench.render import write_outputs
from edgexfer.bench.report import (
    SCHEMA,
    BundleInfo,
    Comparison,
    EngineRecord,
    Execution,
    HeadOverhead,
    OfflineResult,
    Report,
    Settings,
    SideBySide,
    SingleStreamResult,
    compare_reports,
    load_report,
    summarize,
)
from edgexfer.bench.runners import open_target, threads_used
from edgexfer.bench.samples import SampleSet
from edgexfer.bench.text import (
    TEXT_LAYERS,
    TokenSamples,
    bench_text_target,
    first_row,
    side_by_side_length,
)
from edgexfer.modalities import host_modality
from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.heads import Head
from edgexfer.runtime.precision import PRECISIONS
from edgexfer.runtime.predictor import Prediction, Predictor


# long: the bench's steps in the order they run (check the options, plan the
# targets, measure each, compare, write); each step is a call, the function is the table of contents.
def run_bench(bundle_dir: str | Path, backends: str | Sequence[str] = "all", precisions: str | Sequence[str] = "all",
              scenarios: str | Sequence[str] = SCENARIOS, batches: str | Sequence[int] = DEFAULT_BATCHES,
              min_duration_s: float = DEFAULT_MIN_DURATION_S, min_queries: int = DEFAULT_MIN_QUERIES,
              threads: int | None = None, out_dir: str | Path = "bench-out", compare: str | Path | None = None,
              progress: bool = True, *, layers: str | Sequence[str] = LAYERS, images: str | Path | None = None,
              torch_reference: bool | None = None, mlperf: bool = False, plots: bool = True) -> dict[str, Any]:
    """Benchmark every backend x precision of the bundle; write bench.json, bench.md, plots; return the report.

    ``mlperf=True`` sets MLPerf Inference's minimums (600 s, 1024 queries, 24576 offline samples) instead of
    ``min_duration_s``/``min_queries``. ``compare`` is an older bench.json: ratios go into ``report['compare']``.
    The return value is the bench.json object (:meth:`Report.to_dict`).
    """
    backends_l = parse_list(backends, "--backend")
    precisions_l = parse_list(precisions, "--precision", PRECISIONS)
    scenarios_l = parse_list(scenarios, "--scenario", SCENARIOS)
    scenarios_l = list(SCENARIOS) if scenarios_l == ["all"] else scenarios_l
    layers_l = parse_list(layers, "--layer", LAYERS)
    layers_l = list(LAYERS) if layers_l == ["all"] else layers_l
    batches_l = parse_batches(batches)
    if mlperf:
        min_duration_s, min_queries = MLPERF_MIN_DURATION_S, MLPERF_MIN_QUERIES
    if not (isinstance(min_duration_s, (int, float)) and min_duration_s > 0):
        raise InputError("--min-duration", got=repr(min_duration_s), expected="seconds > 0")
    if isinstance(min_queries, bool) or not isinstance(min_queries, int) or min_queries < 1:
        raise InputError("--min-queries", got=repr(min_queries), expected="an integer >= 1")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InputError("--threads", got=repr(threads), expected="an integer >= 1")
    old = load_report(compare) if compare is not None else None
    require_loadgen()  # fail before any work when LoadGen is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bundle = Bundle.open(bundle_dir)
    samples = host_modality(bundle.modality).bench_samples(bundle, images)
    text = isinstance(samples, TokenSamples)
    if text:
        # token samples: the engine layer per sequence length (edgexfer.bench.text)
        if layers_l != list(LAYERS) and layers_l != list(TEXT_LAYERS):
            raise InputError("--layer with a text bundle", got=",".join(layers_l), expected="engine (or all)",
                             todo="leave --layer out: a text bench measures the engine per sequence length")
        layers_l = list(TEXT_LAYERS)
        if TORCH_BACKEND in backends_l:
            raise InputError("--backend pytorch-eager with a text bundle", got=TORCH_BACKEND,
                             expected="an engine backend", todo="the PyTorch eager twin is built for image backbones")
    no_twin = text or not host_modality(bundle.modality).bench_torch_reference
    targets, skipped = plan_targets(bundle, backends_l, precisions_l, False if no_twin else torch_reference)
    head = bundle.head()
    environment = capture_environment(threads)
    created_utc = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # when the measurements start
    for s in skipped:
        _say(progress, f"skipped {s.backend}/{s.precision}: {s.reason}")
    settings = Settings(backends=backends_l, precisions=precisions_l, scenarios=scenarios_l, layers=layers_l,
                        batches=batches_l, min_duration_s=float(min_duration_s), min_queries=int(min_queries),
                        threads=threads, mlperf_minimums=bool(mlperf), warmup_calls=WARMUP_CALLS, seed=SEED,
                        offline_layer=OFFLINE_LAYER, samples=samples.describe())
    lengths = len(samples.by_length) if text else 1
    run = _Run(bundle, head, samples, settings, out, progress,
               steps=len(targets) * lengths * (("single-stream" in scenarios_l) * len(layers_l)
                                               + ("offline" in scenarios_l) * len(batches_l)))
    engines: list[EngineRecord] = []
    results: list[SingleStreamResult | OfflineResult] = []
    overheads: list[HeadOverhead] = []
    for target in targets:
        engine_record, target_results, overhead = _bench_target(target, run)
        engines.append(engine_record)
        results += target_results
        if overhead is not None:
            overheads.append(overhead)
        # free the closed engine now: an idle ONNX Runtime / OpenVINO thread pool would otherwise compete with
        # the next target's threads on a small machine
        gc.collect()
    side = None
    if len(targets) > 1 and "single-stream" in scenarios_l:
        _say(progress, f"side by side: {len(targets)} engines, {max(int(min_queries), 16)} interleaved rounds")
        if text:
            length = side_by_side_length(samples)
            rows = samples.by_length[length]
            side = SideBySide(**_side_by_side(targets, bundle, threads, None, max(int(min_queries), 16),
                                              lambda i: rows.rows(slice(i % len(rows), i % len(rows) + 1))),
                              sequence_length=length)
        else:
            side = SideBySide(**_side_by_side(targets, bundle, threads, samples.pixels, max(int(min_queries), 16)))
        gc.collect()
    m = bundle.manifest
    report = Report(
        schema=SCHEMA,
        created_utc=created_utc,
        edgexfer=__version__,
        bundle=BundleInfo(path=str(bundle.root), name=m.name, arch=m.backbone.arch,
                          backbone_sha256=m.backbone.sha256, feature_dim=m.backbone.feature_dim,
                          head_kind=head.kind, classes=len(head.classes)),
        settings=settings,
        environment=environment, engines=engines, skipped=skipped, results=results, head_overhead=overheads,
        side_by_side=side, summary={})
    report.summary = summarize(report.to_dict())  # summary and --compare read the JSON form, as from disk
    if old is not None:
        report.compare = Comparison(old_created_utc=old.get("created_utc"), old_path=str(compare),
                                    rows=compare_reports(report.to_dict(), old))
    written = report.to_dict()
    write_outputs(written, out, plots=plots)  # adds the names of the files written to "outputs"
    return written


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


@dataclass
class _Run:
    """What every target is measured with (one run's settings and preloaded data)."""

    bundle: Bundle
    head: Head
    samples: SampleSet | TokenSamples
    settings: Settings
    out: Path
    progress: bool
    steps: int
    step: int = 0

    def say(self, text: str) -> None:
        self.step += 1
        _say(self.progress, f"[{self.step}/{self.steps}] {text}")

    def loadgen(self, target: EngineTarget, test: str) -> LoadGenSettings:
        s = self.settings
        return LoadGenSettings(s.min_duration_s, s.min_queries, self.out / "loadgen" / f"{target.slug}-{test}")


def _bench_target(target: EngineTarget, run: _Run) -> tuple[EngineRecord, list, HeadOverhead | None]:
    """Open one engine, time its setup, then run every scenario x layer (x batch) on it through LoadGen."""
    samples, settings = run.samples, run.settings
    text = isinstance(samples, TokenSamples)
    _say(run.progress, f"opening {target.label}")
    runner = open_target(target, run.bundle, settings.threads)
    results: list[SingleStreamResult | OfflineResult] = []
    overhead = None
    try:
        start = time.perf_counter()
        runner.run(first_row(samples) if text else samples.pixels[:1])
        first_s = time.perf_counter() - start
        engine_record = EngineRecord(
            backend=target.backend, precision=target.precision,
            model=str(target.model.relative_to(run.bundle.root)) if target.model else None,
            load_seconds=runner.stats.load_seconds, first_inference_ms=first_s * 1e3, threads=threads_used(runner),
            execution=Execution(**_jsonable(runner.execution)), details=_jsonable(runner.details))
        if text:
            return engine_record, bench_text_target(target, runner, samples, run, _single_stream_result), None
        n = len(samples.encoded)
        predictor = Predictor(run.bundle, runner, run.head, target.backend, target.precision,
                              batch_size=max(settings.batches))
        work = {
            "engine": lambda i: runner.run(samples.pixels[i:i + 1]),
            "engine_head": lambda i: predictor.classify_pixels(samples.pixels[i:i + 1]),
            "end_to_end": lambda i: _classified(predictor.predict([samples.encoded[i]]), samples, i),
        }
        if "single-stream" in settings.scenarios:
            for layer in settings.layers:
                run.say(f"{target.label} single-stream {layer}")
                expected = median_call(functools.partial(work[layer], 0), WARMUP_CALLS)
                measured = single_stream(work[layer], n, run.loadgen(target, f"single-stream-{layer}"), expected)
                results.append(_single_stream_result(target, layer, measured))
            if "engine" in settings.layers and "engine_head" in settings.layers:
                overhead = HeadOverhead(backend=target.backend, precision=target.precision, **paired_head_overhead(
                    runner, predictor, samples.pixels, max(settings.min_queries, 16)))
        if "offline" in settings.scenarios:
            min_samples = MLPERF_MIN_OFFLINE_SAMPLES if settings.mlperf_minimums else settings.min_queries

            def classify(ids: list[int]) -> np.ndarray:
                return predictor.classify_pixels(samples.pixels[ids])

            for b in settings.batches:
                run.say(f"{target.label} offline batch {b}")
                expected_qps = b / median_call(functools.partial(classify, [i % n for i in range(b)]), WARMUP_CALLS)
                measured = offline(classify, n, b, run.loadgen(target, f"offline-b{b}"), expected_qps, min_samples)
                lg = measured["loadgen"]
                samples_done = int(lg.get("effective_samples_per_query") or 0)
                results.append(OfflineResult(
                    backend=target.backend, precision=target.precision, layer=OFFLINE_LAYER, batch=b,
                    samples=samples_done, throughput_sps=lg.get("result_samples_per_second"),
                    sut_timed_sps=samples_done / measured["wall_s"] if measured["wall_s"] > 0 else None,
                    validity=lg.get("result_validity"), invalid_reason=lg.get("result_invalid_reason")))
    finally:
        runner.close()
    return engine_record, results, overhead


def _single_stream_result(target: EngineTarget, layer: str, measured: dict[str, Any],
                          sequence_length: int | None = None) -> SingleStreamResult:
    stats = latency_stats(measured["latencies_s"])
    lg = measured["loadgen"]
    return SingleStreamResult(
        backend=target.backend, precision=target.precision, layer=layer, batch=1, sequence_length=sequence_length,
        **loadgen_latency_ms(lg),
        count=int(lg.get("result_query_count") or stats["count"]), std_ms=stats["std_ms"],
        throughput_sps=lg.get("result_qps_with_loadgen_overhead"), validity=lg.get("result_validity"),
        invalid_reason=lg.get("result_invalid_reason"), early_stopping=lg.get("early_stopping_result"),
        sut_timed=stats, latencies_ms=[round(x * 1e3, 4) for x in measured["latencies_s"]])


def _classified(results: list, samples: SampleSet, index: int) -> list:
    """A sample the predictor could not classify stops the benchmark: timing an error path would lie."""
    if not isinstance(results[0], Prediction):
        raise InputError(f"benchmark sample {samples.names[index]} cannot be classified", got=results[0].error,
                         expected="a decodable image", todo="pass --images with readable image files")
    return results


def _side_by_side(targets: list[EngineTarget], bundle: Bundle, threads: int | None, pixels: np.ndarray | None,
                  rounds: int, sample=None) -> dict[str, Any]:
    runners: dict[str, EngineRunner] = {}
    try:
        for target in targets:
            runners[target.label] = open_target(target, bundle, threads)
        return interleaved_engines(runners, pixels, rounds, sample)
    finally:
        for runner in runners.values():
            runner.close()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
