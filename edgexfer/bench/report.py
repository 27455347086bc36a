"""The bench report (``bench.json``, schema ``edgexfer.bench/1``, documented in docs/benchmarks.md).

The report is the :class:`Report` record and the records it holds; ``Report.to_dict()`` is the JSON that
is written, and :func:`validate_report` checks a JSON object against the schema those records' type
hints define (:func:`report_schema`), so the check and the writer cannot drift apart. Every field is
required except ``side_by_side`` and ``compare``, left out when not measured.

What reads a report (the summary, ``--compare``, the markdown) reads its JSON form, the same object
a later run loads from disk.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgexfer.bench.plan import TORCH_BACKEND, SkippedTarget
from edgexfer.bench.schema import NON_EMPTY, OMIT_IF_NONE, Record, json_schema, schema_problems
from edgexfer.runtime.errors import InputError

SCHEMA = "edgexfer.bench/1"


# ------------------------------------------------------------------------------------------ the records
@dataclass(frozen=True, kw_only=True)
class BundleInfo(Record):
    path: str
    name: str
    arch: str
    backbone_sha256: str
    feature_dim: int
    head_kind: str
    classes: int  #: how many


@dataclass(frozen=True, kw_only=True)
class SampleInfo(Record):
    count: int
    source: str  #: the golden images, or the --images folder and seed
    mean_encoded_bytes: int  #: text bundles: mean UTF-8 bytes of the texts the token samples were cut from
    pixels_shape: list[int]  #: [H, W, 3]; text bundles: [] (see sequence_lengths)
    #: text bundles: the token counts every sample set has, one set per length (left out for images)
    sequence_lengths: list[int] | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True, kw_only=True)
class Settings(Record):
    backends: list[str]
    precisions: list[str]
    scenarios: list[str]
    layers: list[str]
    batches: list[int]
    min_duration_s: float
    min_queries: int
    threads: int | None  #: None: each engine's default
    mlperf_minimums: bool
    warmup_calls: int
    seed: int
    offline_layer: str
    samples: SampleInfo


@dataclass(frozen=True, kw_only=True)
class CpuRecord(Record):
    """:meth:`edgexfer.runtime.cpu.CpuFeatures.to_dict` and the flags hidden from edgexfer."""

    machine: str
    model: str
    flags: list[str]  #: the ISA flags of edgexfer.runtime.cpu this CPU has
    signature: str = field(metadata=NON_EMPTY)  #: ``machine:flag+flag``
    bf16: bool
    int8_dot: bool
    hidden_flags: list[str]  #: EDGEXFER_HIDE_CPU_FLAGS


@dataclass(frozen=True, kw_only=True)
class Jetson(Record):
    model: str | None
    l4t: str | None
    nvpmodel: dict[str, Any]  #: {available, returncode, output} of ``nvpmodel -q``
    jetson_clocks: dict[str, Any]  #: the same of ``jetson_clocks --show``
    tegrastats: str | None  #: one line


@dataclass(frozen=True, kw_only=True)
class Environment(Record):
    cpu_model: str | None
    cpu: CpuRecord
    machine: str
    logical_cores: int | None
    cores_usable: int | None  #: CPU affinity of this process
    threads_requested: int | None
    governor: str | None
    load_average_1_5_15: list[float] | None
    os: str
    python: str
    versions: dict[str, str | None]
    temperatures_c: dict[str, float] | None  #: sysfs thermal zone type -> °C
    jetson: Jetson | None


@dataclass(frozen=True, kw_only=True)
class Execution(Record):
    """:func:`edgexfer.runtime.precision.execution_record`: what an engine really computed in."""

    precision: str
    inference_precision: str  #: f32, f16, bf16
    isa: str  #: the CPU signature
    cpu: str | None  #: the CPU model


@dataclass(frozen=True, kw_only=True)
class EngineRecord(Record):
    backend: str
    precision: str
    model: str | None  #: path in the bundle; None for pytorch-eager
    load_seconds: float
    first_inference_ms: float
    threads: int | str  #: the count, "engine default" or "not applicable"
    execution: Execution
    details: dict[str, Any]  #: what the engine reports (providers, device, compiled-model properties)


@dataclass(frozen=True, kw_only=True)
class _Result(Record):
    """What identifies a ``results[]`` row; each scenario's row narrows ``scenario`` to its own name
    (a field redefined in a subclass keeps its place, first)."""

    scenario: str
    backend: str
    precision: str
    layer: str
    batch: int
    #: text bundles: tokens per sample of this row (left out for images)
    sequence_length: int | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True, kw_only=True)
class SingleStreamResult(_Result):
    """One SingleStream test: LoadGen's latencies (ms), ours (``sut_timed``, every query's)."""

    scenario: Literal["single-stream"] = "single-stream"
    p50_ms: float | None
    p90_ms: float | None
    p95_ms: float | None
    p97_ms: float | None
    p99_ms: float | None
    p99_9_ms: float | None
    max_ms: float | None
    min_ms: float | None
    mean_ms: float | None
    count: int
    std_ms: float
    throughput_sps: float | None  #: LoadGen's QPS with its overhead
    validity: str | None  #: VALID or INVALID by MLPerf's rules
    invalid_reason: str | None
    early_stopping: str | None
    sut_timed: dict[str, float]
    latencies_ms: list[float]


@dataclass(frozen=True, kw_only=True)
class OfflineResult(_Result):
    """One Offline test at one batch size."""

    scenario: Literal["offline"] = "offline"
    samples: int  #: in LoadGen's one query
    throughput_sps: float | None  #: LoadGen's samples/s
    sut_timed_sps: float | None
    validity: str | None
    invalid_reason: str | None


@dataclass(frozen=True, kw_only=True)
class HeadOverhead(Record):
    """:func:`edgexfer.bench.measure.paired_head_overhead` of one engine."""

    backend: str
    precision: str
    pairs: int
    engine_p50_ms: float
    engine_head_p50_ms: float
    head_only_p50_ms: float
    ratio: float | None
    pairwise_ratio_median: float
    outside_engine_p50_ms: float | None
    decomposed_ratio: float | None


@dataclass(frozen=True, kw_only=True)
class SideBySide(Record):
    """:func:`edgexfer.bench.measure.interleaved_engines`: every engine once per round."""

    rounds: int
    layer: str
    batch: int
    p50_ms: dict[str, float]  #: "backend/precision" -> ms
    p90_ms: dict[str, float]
    #: text bundles: tokens per sample of the interleaved calls (left out for images)
    sequence_length: int | None = field(default=None, metadata=OMIT_IF_NONE)


@dataclass(frozen=True, kw_only=True)
class Comparison(Record):
    old_created_utc: str | None
    old_path: str
    rows: list[dict[str, Any]]  #: compare_reports()


@dataclass(kw_only=True)
class Report(Record):
    schema: Literal[SCHEMA] = SCHEMA
    created_utc: str  #: ISO 8601 UTC
    edgexfer: str  #: package version
    bundle: BundleInfo
    settings: Settings
    environment: Environment
    engines: list[EngineRecord]
    skipped: list[SkippedTarget]
    results: list[SingleStreamResult | OfflineResult]
    head_overhead: list[HeadOverhead]
    side_by_side: SideBySide | None = field(default=None, metadata=OMIT_IF_NONE)
    summary: dict[str, Any]  #: summarize()
    compare: Comparison | None = field(default=None, metadata=OMIT_IF_NONE)
    outputs: list[str] = field(default_factory=list)  #: files written, relative to the output directory


@functools.cache
def report_schema() -> dict[str, Any]:
    """The JSON Schema of bench.json, from the records above."""
    return json_schema(Report)


def validate_report(report: Any) -> list[str]:
    """Problems with a bench.json object against the schema, one line each (empty list = valid)."""
    return schema_problems(report, report_schema(), "report")


def load_report(path: str | Path) -> dict[str, Any]:
    """An earlier bench.json for ``--compare``: its schema name and results are all that is needed."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError("--compare file not found", got=str(p), expected="a bench.json of an earlier run") from None
    except ValueError as exc:
        raise InputError("--compare file is not JSON", got=f"{p}: {exc}", expected="a bench.json") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("results"), list):
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise InputError("--compare file is not an edgexfer bench report", got=f"schema {got!r}",
                         expected=f"schema {SCHEMA!r}", todo="pass the bench.json written by `edgexfer bench`")
    return data


# ------------------------------------------------------------------------------------------ reading it
def find_rows(results: list[dict[str, Any]], **want: Any) -> list[dict[str, Any]]:
    """The rows whose fields have the values ``want`` gives."""
    return [r for r in results if all(r.get(k) == v for k, v in want.items())]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a person looks for first: best engine, its ratio to PyTorch eager, the head's overhead."""
    results = report["results"]
    # a text report's summary speaks of its middle sequence length (128 tokens), the side-by-side one
    length = (report.get("side_by_side") or {}).get("sequence_length")
    results = [r for r in results if r.get("sequence_length") in (None, length)]
    engines = [r for r in find_rows(results, scenario="single-stream", layer="engine") if r["backend"] != TORCH_BACKEND]
    torch_rows = find_rows(results, scenario="single-stream", layer="engine", backend=TORCH_BACKEND)
    summary: dict[str, Any] = {}
    if engines:
        best = min(engines, key=lambda r: r["p50_ms"])
        summary["best_single_stream"] = {"backend": best["backend"], "precision": best["precision"],
                                         "engine_p50_ms": best["p50_ms"]}
        if torch_rows:
            t50 = torch_rows[0]["p50_ms"]
            summary["pytorch_eager_engine_p50_ms"] = t50
            summary["speedup_vs_pytorch_eager"] = t50 / best["p50_ms"]
    side = report.get("side_by_side")
    if side:
        p50 = side["p50_ms"]
        engine_labels = [k for k in p50 if not k.startswith(TORCH_BACKEND + "/")]
        if engine_labels:
            best_label = min(engine_labels, key=p50.get)
            summary["side_by_side_best"] = {"engine": best_label, "p50_ms": p50[best_label]}
            torch_label = f"{TORCH_BACKEND}/fp32"
            if torch_label in p50:
                summary["side_by_side_speedup_vs_pytorch_eager"] = p50[torch_label] / p50[best_label]
    if report.get("head_overhead"):
        summary["head_overhead"] = {f"{h['backend']}/{h['precision']}": {
            "ratio": h["ratio"], "pairwise_ratio_median": h["pairwise_ratio_median"],
            "decomposed_ratio": h.get("decomposed_ratio")} for h in report["head_overhead"]}
    offline_rows = find_rows(results, scenario="offline")
    if offline_rows:
        top = max(offline_rows, key=lambda r: r.get("throughput_sps") or 0)
        summary["best_offline"] = {"backend": top["backend"], "precision": top["precision"], "batch": top["batch"],
                                   "throughput_sps": top["throughput_sps"]}
    return summary


#: what identifies a result row across two reports
_ROW_KEY: tuple[str, ...] = ("scenario", "backend", "precision", "layer", "batch", "sequence_length")
#: the metrics --compare puts side by side
_COMPARED: tuple[str, ...] = ("p50_ms", "p90_ms", "p99_ms", "throughput_sps")


def compare_reports(new: dict[str, Any], old: dict[str, Any]) -> list[dict[str, Any]]:
    """Per matching result (scenario, backend, precision, layer, batch): new / old ratios.

    Latency ratios below 1 and throughput ratios above 1 mean the new run is faster. Rows present in only
    one report are listed with ``status`` ``new only`` or ``old only``.
    """
    def key(r: dict[str, Any]) -> tuple:
        return tuple(r.get(k) for k in _ROW_KEY)

    old_by_key = {key(r): r for r in old.get("results", [])}
    new_by_key = {key(r): r for r in new.get("results", [])}
    rows: list[dict[str, Any]] = []
    for k, r in new_by_key.items():
        o = old_by_key.get(k)
        if o is None:
            rows.append({**dict(zip(_ROW_KEY, k)), "status": "new only"})
            continue
        row = {**dict(zip(_ROW_KEY, k)), "status": "both"}
        for metric in _COMPARED:
            a, b = r.get(metric), o.get(metric)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
                row[f"{metric}_new"], row[f"{metric}_old"], row[f"{metric}_ratio"] = a, b, a / b
        rows.append(row)
    for k in old_by_key.keys() - new_by_key.keys():
        rows.append({**dict(zip(_ROW_KEY, k)), "status": "old only"})
    return rows
