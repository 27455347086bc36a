"""``edgexfer bench``: MLPerf-style latency and throughput of every engine in a bundle, side by side.

Scenarios are driven by MLPerf's LoadGen (``mlperf_loadgen``): SingleStream (one query in flight, batch 1:
latency percentiles) and Offline (all samples at once, processed in batches: throughput). Three layers are
measured separately, so a person can see where time goes:

``engine``      the bare engine call, ``EngineRunner.run(uint8 batch) -> features``
``engine_head`` engine + numpy head, through the :class:`~edgexfer.runtime.predictor.Predictor` wrapper
``end_to_end``  ``Predictor.predict([encoded image bytes])``: decode, resize, engine, head, top-k

Setup costs (engine load/compile, first inference) are reported apart, never mixed into the percentiles.
Every backend x precision the bundle has is measured in one run, plus a PyTorch eager twin of the backbone
when torch is installed (host only). The engine part imports no torch.

Outputs in ``out_dir``: ``bench.json`` (schema ``edgexfer.bench/1``, documented in docs/benchmarks.md),
``bench.md``, ``plots/latency_cdf.png``, ``plots/throughput_vs_batch.png`` and LoadGen's own logs under
``loadgen/``.
"""
from __future__ import annotations

import functools
import gc
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer import __version__
from edgexfer.runtime.backends.registry import BACKENDS, available_backends, backend_class, open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cpu import CpuFeatures, cpu_features
from edgexfer.runtime.errors import BundleError, EdgexferError, InputError, MissingDependencyError
from edgexfer.runtime.optional import is_installed, require
from edgexfer.runtime.precision import PRECISIONS, PrecisionError, check_precision, execution_record
from edgexfer.runtime.predictor import Prediction, Predictor

SCHEMA = "edgexfer.bench/1"
LAYERS: tuple[str, ...] = ("engine", "engine_head", "end_to_end")
SCENARIOS: tuple[str, ...] = ("single-stream", "offline")
#: the host-only reference: the same backbone run by PyTorch eager (not an engine of the bundle)
TORCH_BACKEND = "pytorch-eager"
DEFAULT_BATCHES: tuple[int, ...] = (1, 2, 4, 8, 16)
#: laptop-friendly defaults; ``mlperf=True`` (``--mlperf``) switches to the MLPerf Inference minimums
DEFAULT_MIN_DURATION_S = 2.0
DEFAULT_MIN_QUERIES = 64  # LoadGen's early-stopping estimate of p90 needs at least 64 queries
MLPERF_MIN_DURATION_S = 600.0
MLPERF_MIN_QUERIES = 1024  # SingleStream; Offline needs 24576 samples
MLPERF_MIN_OFFLINE_SAMPLES = 24576
#: fixed seeds: LoadGen's sample order and schedule, and the choice of sample images
SEED = 0
#: un-timed calls before each measurement (caches, lazy allocations, thread pools)
WARMUP_CALLS = 3
#: the offline layer: what a user's throughput is (features and labels)
OFFLINE_LAYER = "engine_head"
#: SingleStream percentiles reported (LoadGen's own, from its detail log)
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 97.0, 99.0, 99.9)


# ------------------------------------------------------------------------------------------ what to run
@dataclass(frozen=True)
class EngineTarget:
    """One backend x precision to measure; ``model`` is None for the PyTorch eager reference."""

    backend: str
    precision: str
    model: Path | None

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"


@dataclass(frozen=True)
class SkippedTarget:
    backend: str
    precision: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "precision": self.precision, "reason": self.reason}


def parse_list(value: str | Sequence[str], option: str, choices: Sequence[str] | None = None) -> list[str]:
    """``"a,b"`` or a sequence -> list; ``all`` stays ``["all"]``. Unknown names are an InputError."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if str(v).strip()]
    if not items:
        raise InputError(option, got="an empty list", expected="all or a comma-separated list")
    if "all" in items:
        if len(items) > 1:
            raise InputError(option, got=",".join(items), expected="'all' alone or a list without 'all'")
        return ["all"]
    if choices is not None:
        bad = [v for v in items if v not in choices]
        if bad:
            raise InputError(option, got=", ".join(bad), expected=f"all or any of {', '.join(choices)}")
    return list(dict.fromkeys(items))


def parse_batches(value: str | Sequence[int]) -> list[int]:
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        batches = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise InputError("--batch", got=repr(value), expected="comma-separated positive integers, e.g. 1,2,4,8,16",
                         todo="fix the --batch value") from None
    if not batches or any(b < 1 or b > 1024 for b in batches):
        raise InputError("--batch", got=repr(value), expected="integers between 1 and 1024")
    return sorted(set(batches))


def plan_targets(bundle: Bundle, backends: Sequence[str], precisions: Sequence[str],
                 torch_reference: bool | None = None,
                 features: CpuFeatures | None = None) -> tuple[list[EngineTarget], list[SkippedTarget]]:
    """Every backend x precision to measure, and the ones the bundle has but this machine cannot run.

    ``backends=["all"]``: every engine of the bundle whose package is installed (the others are listed as
    skipped with the reason, never dropped silently), plus the PyTorch eager reference when torch is
    installed. A backend named explicitly must be installed and have an engine for the precisions asked.
    An engine this CPU cannot compute in (bf16 without avx512_bf16/amx_bf16, judged from ``features``,
    default :func:`cpu_features`) is skipped with the one-line reason, or is that error when its
    precision was asked for by name.
    """
    present = [("onnxruntime", "fp32")] + [(e.backend, e.precision) for e in bundle.manifest.engines]
    present = list(dict.fromkeys(present))
    # one backend's engines together, in the order fp32, fp16, bf16, int8
    backend_order = list(dict.fromkeys(b for b, _ in present))
    present.sort(key=lambda bp: (backend_order.index(bp[0]),
                                 PRECISIONS.index(bp[1]) if bp[1] in PRECISIONS else len(PRECISIONS)))
    installed = set(available_backends())
    want_all_backends = list(backends) == ["all"]
    want_all_precisions = list(precisions) == ["all"]
    if not want_all_backends:
        unknown = [b for b in backends if b not in BACKENDS and b != TORCH_BACKEND]
        if unknown:
            raise InputError("--backend", got=", ".join(unknown),
                             expected=f"all or any of {', '.join([*BACKENDS, TORCH_BACKEND])}")
        for b in backends:
            if b in BACKENDS and b not in installed:
                raise MissingDependencyError(f"backend {b} is not installed", got=f"no '{b}' package",
                                             expected=f"'{b}' importable", todo=f"pip install 'edgexfer[{b}]'")
    targets: list[EngineTarget] = []
    skipped: list[SkippedTarget] = []
    for backend, precision in present:
        if not want_all_backends and backend not in backends:
            continue
        if not want_all_precisions and precision not in precisions:
            continue
        if backend not in installed:
            skipped.append(SkippedTarget(backend, precision, f"the '{backend}' package is not installed here"))
            continue
        try:
            check_precision(precision, backend, features)
        except PrecisionError as exc:
            if not want_all_precisions:
                raise  # asked for by name: the one-line error naming the missing CPU flags
            skipped.append(SkippedTarget(backend, precision, exc.one_line()))
            continue
        targets.append(EngineTarget(backend, precision, bundle.engine_file(backend, precision)))
    if not want_all_backends and not want_all_precisions:
        # an explicit backend and precision that the bundle lacks is an error, not a quiet omission
        for backend in backends:
            if backend == TORCH_BACKEND:
                continue
            for precision in precisions:
                check_precision(precision, backend, features)
                bundle.engine_file(backend, precision)
    elif not want_all_backends:
        for backend in backends:
            if backend != TORCH_BACKEND and not any(t.backend == backend for t in targets):
                raise BundleError(f"no {backend} engine in the bundle for the precisions asked",
                                  got=",".join(precisions),
                                  expected=", ".join(f"{b}/{p}" for b, p in present),
                                  todo=f"run `edgexfer convert {bundle.root} --to {backend} --precision ...`")
    wants_torch = TORCH_BACKEND in backends or (want_all_backends and torch_reference is not False)
    if torch_reference is False:
        wants_torch = False
    if wants_torch and (want_all_precisions or "fp32" in precisions):
        if is_installed("torch"):
            targets.append(EngineTarget(TORCH_BACKEND, "fp32", None))
        elif TORCH_BACKEND in backends:
            raise MissingDependencyError("the PyTorch eager reference needs torch", got="torch not installed",
                                         expected="torch importable (host only)", todo="pip install 'edgexfer[train]'")
        else:
            skipped.append(SkippedTarget(TORCH_BACKEND, "fp32", "torch is not installed (host-only reference)"))
    if not targets:
        raise InputError("nothing to benchmark", got=f"backends {','.join(backends)}, precisions {','.join(precisions)}",
                         expected=f"one of {', '.join(f'{b}/{p}' for b, p in present)}",
                         todo="choose --backend/--precision the bundle has, or convert the bundle")
    return targets, skipped


# ------------------------------------------------------------------------------------------ engines
class TorchEagerRunner:
    """The bundle's backbone architecture run by PyTorch eager: uint8 NHWC in, features out (host only).

    Weights: the packaged ImageNet weights of ``manifest.backbone.arch``. For a bundle trained in frozen
    mode that is exactly the bundle's backbone; ``details['parity_max_abs_diff']`` against the golden
    features tells whether it is (a partly fine-tuned backbone differs in weights, not in work done).
    """

    name = TORCH_BACKEND

    def __init__(self, bundle: Bundle, threads: int | None = None):
        torch = require("torch", "the PyTorch eager reference")
        from edgexfer.backbones import build_backbone
        from edgexfer.pixel_model import PixelBackbone

        self.precision = "fp32"
        self._torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        bb = bundle.manifest.backbone
        self.model = PixelBackbone(build_backbone(bb.arch), tuple(bb.input.mean), tuple(bb.input.std)).eval()
        golden = bundle.golden()
        feats = self.run(golden["images"][:2])
        diff = float(np.abs(feats - golden["features"][:2]).max())
        self.details = {"torch": torch.__version__, "threads": torch.get_num_threads(), "weights": f"packaged {bb.arch}",
                        "parity_max_abs_diff": diff,
                        "same_weights_as_bundle": bool(diff <= 1e-3)}

    @property
    def execution(self) -> dict[str, Any]:
        """PyTorch eager on the CPU computes in float32 (no autocast)."""
        return execution_record("fp32", "f32")

    def run(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model(self._torch.from_numpy(np.ascontiguousarray(batch))).numpy()

    def close(self) -> None:
        self.model = None


def open_target(target: EngineTarget, bundle: Bundle, threads: int | None):
    """Open the engine; returns (runner, load seconds, threads note)."""
    start = time.perf_counter()
    if target.backend == TORCH_BACKEND:
        runner = TorchEagerRunner(bundle, threads)
        return runner, time.perf_counter() - start, runner.details["threads"]
    options: dict[str, Any] = {}
    accepts_threads = backend_class(target.backend).takes_threads
    if threads and accepts_threads:
        options["threads"] = int(threads)
    runner = open_backend(target.backend, target.model, precision=target.precision, **options)
    used: int | str = int(threads) if options else ("engine default" if accepts_threads else "not applicable")
    return runner, runner.stats.load_seconds, used


# ------------------------------------------------------------------------------------------ samples
@dataclass
class SampleSet:
    """Preloaded samples: encoded bytes (end-to-end layer) and their preprocessed pixels (other layers)."""

    encoded: list[bytes]
    pixels: np.ndarray
    source: str
    names: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        sizes = [len(b) for b in self.encoded]
        return {"count": len(self.encoded), "source": self.source, "mean_encoded_bytes": int(np.mean(sizes)),
                "pixels_shape": list(self.pixels.shape[1:])}


def load_samples(bundle: Bundle, images: str | Path | None = None, count: int = 32) -> SampleSet:
    """``images`` (a folder, searched recursively) or the bundle's golden images encoded as JPEG (quality 90)."""
    from PIL import Image

    from edgexfer.runtime.preprocess import load_image

    spec = bundle.preprocess
    if images is None:
        encoded = []
        for arr in bundle.golden()["images"]:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            encoded.append(buf.getvalue())
        source, names = "bundle golden.npz images, JPEG quality 90", [f"golden[{i}]" for i in range(len(encoded))]
    else:
        root = Path(images)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in
                       (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"))
        if not files:
            raise InputError("--images", got=f"no image files under {root}", expected="a folder of images")
        pick = np.random.default_rng(SEED).permutation(len(files))[:count]
        files = [files[i] for i in sorted(pick)]
        encoded = [f.read_bytes() for f in files]
        source, names = f"{len(files)} files from {root} (seed {SEED})", [str(f.relative_to(root)) for f in files]
    pixels = np.stack([load_image(b, spec) for b in encoded])
    return SampleSet(encoded, pixels, source, names)


# ------------------------------------------------------------------------------------------ LoadGen
@dataclass(frozen=True)
class LoadGenSettings:
    min_duration_s: float
    min_queries: int
    log_dir: Path


def _lg():
    return require("mlperf_loadgen", "edgexfer bench (MLPerf LoadGen)")


def _lg_settings(lg, scenario, s: LoadGenSettings):
    ts = lg.TestSettings()
    ts.scenario = scenario
    ts.mode = lg.TestMode.PerformanceOnly
    ts.min_duration_ms = int(round(s.min_duration_s * 1000))
    ts.qsl_rng_seed = SEED
    ts.sample_index_rng_seed = SEED
    ts.schedule_rng_seed = SEED
    return ts


def _lg_log(lg, log_dir: Path):
    log_dir.mkdir(parents=True, exist_ok=True)
    ls = lg.LogSettings()
    ls.log_output.outdir = str(log_dir)
    ls.log_output.copy_summary_to_stdout = False
    ls.log_output.copy_detail_to_stdout = False
    ls.enable_trace = False
    return ls


def parse_loadgen_detail(path: Path) -> dict[str, Any]:
    """The ``result_*`` and early-stopping entries of LoadGen's ``mlperf_log_detail.txt``."""
    out: dict[str, Any] = {}
    if not path.is_file():
        raise InputError("LoadGen wrote no detail log", got=str(path), expected="mlperf_log_detail.txt",
                         todo="check that the --out directory is writable")
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith(":::MLLOG "):
            continue
        try:
            entry = json.loads(line[len(":::MLLOG "):])
        except ValueError:
            continue
        key = entry.get("key", "")
        if key.startswith(("result_", "early_stopping")) or key in ("loadgen_version", "effective_samples_per_query",
                                                                    "effective_min_query_count",
                                                                    "effective_min_duration_ms"):
            out[key] = entry.get("value")
    return out


def _run_loadgen(lg, settings, issue: Callable, n_samples: int, log_dir: Path) -> dict[str, Any]:
    qsl = lg.ConstructQSL(n_samples, n_samples, lambda idx: None, lambda idx: None)  # samples are preloaded
    sut = lg.ConstructSUT(issue, lambda: None)
    try:
        lg.StartTestWithLogSettings(sut, qsl, settings, _lg_log(lg, log_dir))
    finally:
        lg.DestroySUT(sut)
        lg.DestroyQSL(qsl)
    return parse_loadgen_detail(log_dir / "mlperf_log_detail.txt")


def single_stream(work: Callable[[int], Any], n_samples: int, s: LoadGenSettings, expected_s: float) -> dict[str, Any]:
    """LoadGen SingleStream: one query of one sample in flight. ``work(index)`` does the layer's work.

    Returns LoadGen's results plus our own per-query latencies (from the SUT's entry to completion), which
    give the CDF and the std LoadGen does not report.
    """
    lg = _lg()
    latencies: list[float] = []
    failure: list[BaseException] = []

    def issue(queries):
        for q in queries:
            start = time.perf_counter()
            try:
                if not failure:
                    work(q.index)
            except BaseException as exc:  # noqa: BLE001 - re-raised after LoadGen stops; a C++ caller can't take it
                failure.append(exc)
            latencies.append(time.perf_counter() - start)
            lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0)])

    ts = _lg_settings(lg, lg.TestScenario.SingleStream, s)
    ts.min_query_count = int(s.min_queries)
    ts.single_stream_expected_latency_ns = max(1, int(expected_s * 1e9))
    loadgen = _run_loadgen(lg, ts, issue, n_samples, s.log_dir)
    if failure:
        raise failure[0]
    return {"loadgen": loadgen, "latencies_s": latencies}


def offline(work_batch: Callable[[list[int]], Any], n_samples: int, batch: int, s: LoadGenSettings,
            expected_qps: float, min_samples: int) -> dict[str, Any]:
    """LoadGen Offline: every sample in one query; the SUT works through it in batches of ``batch``."""
    lg = _lg()
    failure: list[BaseException] = []
    spans: list[float] = []

    def issue(queries):
        start = time.perf_counter()
        for i in range(0, len(queries), batch):
            chunk = queries[i:i + batch]
            try:
                if not failure:
                    work_batch([q.index for q in chunk])
            except BaseException as exc:  # noqa: BLE001 - see single_stream
                failure.append(exc)
            lg.QuerySamplesComplete([lg.QuerySampleResponse(q.id, 0, 0) for q in chunk])
        spans.append(time.perf_counter() - start)

    ts = _lg_settings(lg, lg.TestScenario.Offline, s)
    ts.min_query_count = 1
    # LoadGen sizes the one offline query as expected_qps x min_duration (x1.1); ask for at least min_samples
    ts.offline_expected_qps = max(float(expected_qps), min_samples / (1.1 * max(s.min_duration_s, 1e-3)))
    loadgen = _run_loadgen(lg, ts, issue, n_samples, s.log_dir)
    if failure:
        raise failure[0]
    return {"loadgen": loadgen, "wall_s": float(sum(spans))}


# ------------------------------------------------------------------------------------------ statistics
def latency_stats(latencies_s: Sequence[float]) -> dict[str, float]:
    """Milliseconds: p50/p90/p95/p99/max, mean, std, count (numpy's linear percentile)."""
    a = np.asarray(latencies_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return {"count": 0}
    out = {f"p{_pct_name(p)}_ms": float(np.percentile(a, p)) for p in PERCENTILES}
    out.update({"max_ms": float(a.max()), "min_ms": float(a.min()), "mean_ms": float(a.mean()),
                "std_ms": float(a.std(ddof=1)) if a.size > 1 else 0.0, "count": int(a.size)})
    return out


def _pct_name(p: float) -> str:
    return f"{p:g}".replace(".", "_")


def _loadgen_latency_ms(loadgen: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in PERCENTILES:
        value = loadgen.get(f"result_{p:.2f}_percentile_latency_ns")
        if value is not None:
            out[f"p{_pct_name(p)}_ms"] = value / 1e6
    for key in ("max", "min", "mean"):
        if loadgen.get(f"result_{key}_latency_ns") is not None:
            out[f"{key}_ms"] = loadgen[f"result_{key}_latency_ns"] / 1e6
    return out


def paired_head_overhead(engine, predictor: Predictor, pixels: np.ndarray, pairs: int) -> dict[str, Any]:
    """Engine vs engine + head on the same sample, interleaved (ABBA order) so load drift cancels out.

    On a shared, busy machine two separate runs can differ by more than the head costs. Three views:
    ``ratio`` (median of engine + head calls / median of bare engine calls, interleaved), ``pairwise_ratio_median``
    (median of per-pair ratios) and ``decomposed_ratio``: inside each engine + head call, the time spent in
    the engine itself (``EngineRunner.stats``) is subtracted, so the wrapper's and head's own cost is measured
    without the engine's jitter; ratio = (engine p50 + that cost's p50) / engine p50.
    """
    t_engine: list[float] = []
    t_full: list[float] = []
    t_outside: list[float] = []
    t_head: list[float] = []
    head = predictor.head
    feats = engine.run(pixels[:1])
    stats = getattr(engine, "stats", None)
    for i in range(max(4, pairs)):
        x = pixels[i % len(pixels)][None]
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            inside_before = stats.seconds if stats is not None else 0.0
            start = time.perf_counter()
            if which == 0:
                engine.run(x)
            else:
                predictor.classify_pixels(x)
            took = time.perf_counter() - start
            if which == 0:
                t_engine.append(took)
            else:
                t_full.append(took)
                if stats is not None:
                    t_outside.append(took - (stats.seconds - inside_before))
        start = time.perf_counter()
        head.probabilities(feats)
        t_head.append(time.perf_counter() - start)
    e50, f50 = float(np.median(t_engine)) * 1e3, float(np.median(t_full)) * 1e3
    out: dict[str, Any] = {
        "pairs": len(t_engine), "engine_p50_ms": e50, "engine_head_p50_ms": f50,
        "head_only_p50_ms": float(np.median(t_head)) * 1e3,
        "ratio": f50 / e50 if e50 > 0 else None,
        "pairwise_ratio_median": float(np.median(np.asarray(t_full) / np.asarray(t_engine))),
        "outside_engine_p50_ms": None, "decomposed_ratio": None,
    }
    if t_outside:
        outside50 = float(np.median(t_outside)) * 1e3
        out["outside_engine_p50_ms"] = outside50
        out["decomposed_ratio"] = (e50 + outside50) / e50 if e50 > 0 else None
    return out


def interleaved_engines(runners: dict[str, Any], pixels: np.ndarray, rounds: int) -> dict[str, Any]:
    """Every engine called once per round on the same sample, round after round, in a rotating order.

    Separate LoadGen tests run one after the other, so a load change on a shared machine can favour one
    engine; here each round gives every engine the same conditions, and the medians compare them fairly.
    """
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:
        for _ in range(WARMUP_CALLS):
            runners[name].run(pixels[:1])
    for r in range(max(4, rounds)):
        x = pixels[r % len(pixels)][None]
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            start = time.perf_counter()
            runners[name].run(x)
            times[name].append(time.perf_counter() - start)
    return {"rounds": max(4, rounds), "layer": "engine", "batch": 1,
            "p50_ms": {name: float(np.median(t)) * 1e3 for name, t in times.items()},
            "p90_ms": {name: float(np.percentile(t, 90)) * 1e3 for name, t in times.items()}}


# ------------------------------------------------------------------------------------------ environment
def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(args: list[str], timeout: float = 5.0) -> dict[str, Any]:
    if shutil.which(args[0]) is None:
        return {"available": False}
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        return {"available": True, "returncode": done.returncode,
                "output": (done.stdout or done.stderr).strip()[:2000]}
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"available": True, "error": str(exc)[:200]}


def _tegrastats_line(seconds: float = 1.5) -> str | None:
    """One line of tegrastats (Jetson), read from a process this function starts and stops."""
    if shutil.which("tegrastats") is None:
        return None
    try:
        proc = subprocess.Popen(["tegrastats", "--interval", "500"], stdout=subprocess.PIPE, text=True)
    except OSError:
        return None
    try:
        time.sleep(seconds)
    finally:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    lines = [ln for ln in (out or "").splitlines() if ln.strip()]
    return lines[-1] if lines else None


def capture_environment(threads: int | None) -> dict[str, Any]:
    """CPU (model and the ISA flags that decide what engines compute), cores, governor, load, library
    versions; on a Jetson also power mode, clocks and temperatures."""
    cpuinfo = _read("/proc/cpuinfo") or ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                  if ln.lower().startswith(("model name", "hardware", "cpu model"))), platform.processor() or None)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    temps = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        kind, temp = _read(str(zone / "type")), _read(str(zone / "temp"))
        if temp and temp.lstrip("-").isdigit():
            temps[kind or zone.name] = int(temp) / 1000.0
    hidden = [f.strip() for f in os.environ.get("EDGEXFER_HIDE_CPU_FLAGS", "").split(",") if f.strip()]
    env: dict[str, Any] = {
        "cpu_model": model,
        # what keys engines and decides precisions: flags, not the model name (see edgexfer.runtime.cpu)
        "cpu": {**cpu_features().to_dict(), "hidden_flags": hidden},
        "machine": platform.machine(),
        "logical_cores": os.cpu_count(),
        "cores_usable": affinity,
        "threads_requested": threads,
        "governor": _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(dist) for name, dist in (
            ("edgexfer", "edgexfer"), ("numpy", "numpy"), ("pillow", "pillow"), ("onnxruntime", "onnxruntime"),
            ("openvino", "openvino"), ("tensorrt", "tensorrt"), ("torch", "torch"),
            ("mlperf_loadgen", "mlcommons-loadgen"), ("matplotlib", "matplotlib"))},
        "temperatures_c": temps or None,
    }
    tegra = _read("/etc/nv_tegra_release")
    dt_model = _read("/proc/device-tree/model")
    if tegra or (dt_model and "jetson" in dt_model.lower()):
        env["jetson"] = {
            "model": (dt_model or "").rstrip("\x00") or None,
            "l4t": tegra.splitlines()[0] if tegra else None,
            "nvpmodel": _command(["nvpmodel", "-q"]),
            "jetson_clocks": _command(["jetson_clocks", "--show"]),
            "tegrastats": _tegrastats_line(),
        }
    else:
        env["jetson"] = None
    return env


# ------------------------------------------------------------------------------------------ the run
def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _median_call(fn: Callable[[], Any], calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_bench(bundle_dir: str | Path, backends: str | Sequence[str] = "all", precisions: str | Sequence[str] = "all",
              scenarios: str | Sequence[str] = SCENARIOS, batches: str | Sequence[int] = DEFAULT_BATCHES,
              min_duration_s: float = DEFAULT_MIN_DURATION_S, min_queries: int = DEFAULT_MIN_QUERIES,
              threads: int | None = None, out_dir: str | Path = "bench-out", compare: str | Path | None = None,
              progress: bool = True, *, layers: str | Sequence[str] = LAYERS, images: str | Path | None = None,
              torch_reference: bool | None = None, mlperf: bool = False, plots: bool = True) -> dict[str, Any]:
    """Benchmark every backend x precision of the bundle; write bench.json, bench.md, plots; return the report.

    ``mlperf=True`` sets MLPerf Inference's minimums (600 s, 1024 queries, 24576 offline samples) instead of
    ``min_duration_s``/``min_queries``. ``compare`` is an older bench.json: ratios go into ``report['compare']``.
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
    _lg()  # fail before any work when LoadGen is missing
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bundle = Bundle.open(bundle_dir)
    targets, skipped = plan_targets(bundle, backends_l, precisions_l, torch_reference)
    samples = load_samples(bundle, images)
    head = bundle.head()
    environment = capture_environment(threads)
    m = bundle.manifest
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "edgexfer": __version__,
        "bundle": {"path": str(bundle.root), "name": m.name, "arch": m.backbone.arch,
                   "backbone_sha256": m.backbone.sha256, "feature_dim": m.backbone.feature_dim,
                   "head_kind": head.kind, "classes": len(head.classes)},
        "settings": {"backends": backends_l, "precisions": precisions_l, "scenarios": scenarios_l,
                     "layers": layers_l, "batches": batches_l, "min_duration_s": float(min_duration_s),
                     "min_queries": int(min_queries), "threads": threads, "mlperf_minimums": bool(mlperf),
                     "warmup_calls": WARMUP_CALLS, "seed": SEED, "offline_layer": OFFLINE_LAYER,
                     "samples": samples.describe()},
        "environment": environment,
        "engines": [],
        "skipped": [s.to_dict() for s in skipped],
        "results": [],
        "head_overhead": [],
    }
    for s in skipped:
        _say(progress, f"skipped {s.backend}/{s.precision}: {s.reason}")
    plan = _Plan(bundle, head, samples, scenarios_l, layers_l, batches_l, float(min_duration_s), int(min_queries),
                 threads, out, mlperf, progress,
                 steps=len(targets) * (("single-stream" in scenarios_l) * len(layers_l)
                                       + ("offline" in scenarios_l) * len(batches_l)))
    for target in targets:
        engine_record, results, overhead = _bench_target(target, plan)
        report["engines"].append(engine_record)
        report["results"] += results
        if overhead is not None:
            report["head_overhead"].append(overhead)
        # free the closed engine now: an idle ONNX Runtime / OpenVINO thread pool would otherwise compete with
        # the next target's threads on a small machine
        gc.collect()
    if len(targets) > 1 and "single-stream" in scenarios_l:
        _say(progress, f"side by side: {len(targets)} engines, {max(int(min_queries), 16)} interleaved rounds")
        report["side_by_side"] = _side_by_side(targets, bundle, threads, samples.pixels, max(int(min_queries), 16))
        gc.collect()
    report["summary"] = summarize(report)
    if old is not None:
        report["compare"] = {"old_created_utc": old.get("created_utc"), "old_path": str(compare),
                             "rows": compare_reports(report, old)}
    write_outputs(report, out, plots=plots)
    return report


@dataclass
class _Plan:
    """What every target is measured with (one run's settings and preloaded data)."""

    bundle: Bundle
    head: Any
    samples: SampleSet
    scenarios: list[str]
    layers: list[str]
    batches: list[int]
    min_duration_s: float
    min_queries: int
    threads: int | None
    out: Path
    mlperf: bool
    progress: bool
    steps: int
    step: int = 0

    def say(self, text: str) -> None:
        self.step += 1
        _say(self.progress, f"[{self.step}/{self.steps}] {text}")


def _bench_target(target: EngineTarget, plan: _Plan) -> tuple[dict[str, Any], list[dict[str, Any]], dict | None]:
    """Open one engine, time its setup, then run every scenario x layer (x batch) on it through LoadGen."""
    samples, n = plan.samples, len(plan.samples.encoded)
    _say(plan.progress, f"opening {target.label}")
    runner, load_s, threads_used = open_target(target, plan.bundle, plan.threads)
    results: list[dict[str, Any]] = []
    overhead = None
    try:
        start = time.perf_counter()
        runner.run(samples.pixels[:1])
        first_s = time.perf_counter() - start
        engine_record = {"backend": target.backend, "precision": target.precision,
                         "model": str(target.model.relative_to(plan.bundle.root)) if target.model else None,
                         "load_seconds": load_s, "first_inference_ms": first_s * 1e3,
                         "threads": threads_used, "execution": _jsonable(runner.execution),
                         "details": _jsonable(getattr(runner, "details", {}))}
        predictor = Predictor(plan.bundle, runner, plan.head, target.backend, target.precision,
                              batch_size=max(plan.batches))
        work = {
            "engine": lambda i: runner.run(samples.pixels[i:i + 1]),
            "engine_head": lambda i: predictor.classify_pixels(samples.pixels[i:i + 1]),
            "end_to_end": lambda i: _classified(predictor.predict([samples.encoded[i]]), samples, i),
        }
        if "single-stream" in plan.scenarios:
            for layer in plan.layers:
                plan.say(f"{target.label} single-stream {layer}")
                expected = _median_call(functools.partial(work[layer], 0), WARMUP_CALLS)
                run = single_stream(work[layer], n, LoadGenSettings(
                    plan.min_duration_s, plan.min_queries,
                    plan.out / "loadgen" / f"{_slug(target)}-single-stream-{layer}"), expected)
                stats = latency_stats(run["latencies_s"])
                lg = run["loadgen"]
                results.append({
                    "scenario": "single-stream", "backend": target.backend, "precision": target.precision,
                    "layer": layer, "batch": 1, **_loadgen_latency_ms(lg),
                    "count": int(lg.get("result_query_count") or stats["count"]),
                    "std_ms": stats["std_ms"], "throughput_sps": lg.get("result_qps_with_loadgen_overhead"),
                    "validity": lg.get("result_validity"), "invalid_reason": lg.get("result_invalid_reason"),
                    "early_stopping": lg.get("early_stopping_result"),
                    "sut_timed": stats, "latencies_ms": [round(x * 1e3, 4) for x in run["latencies_s"]],
                })
            if "engine" in plan.layers and "engine_head" in plan.layers:
                overhead = {"backend": target.backend, "precision": target.precision,
                            **paired_head_overhead(runner, predictor, samples.pixels, max(plan.min_queries, 16))}
        if "offline" in plan.scenarios:
            min_samples = MLPERF_MIN_OFFLINE_SAMPLES if plan.mlperf else plan.min_queries

            def classify(ids: list[int]) -> np.ndarray:
                return predictor.classify_pixels(samples.pixels[ids])

            for b in plan.batches:
                plan.say(f"{target.label} offline batch {b}")
                expected_qps = b / _median_call(functools.partial(classify, [i % n for i in range(b)]), WARMUP_CALLS)
                run = offline(classify, n, b, LoadGenSettings(
                    plan.min_duration_s, plan.min_queries, plan.out / "loadgen" / f"{_slug(target)}-offline-b{b}"),
                    expected_qps, min_samples)
                lg = run["loadgen"]
                samples_done = int(lg.get("effective_samples_per_query") or 0)
                results.append({
                    "scenario": "offline", "backend": target.backend, "precision": target.precision,
                    "layer": OFFLINE_LAYER, "batch": b, "samples": samples_done,
                    "throughput_sps": lg.get("result_samples_per_second"),
                    "sut_timed_sps": samples_done / run["wall_s"] if run["wall_s"] > 0 else None,
                    "validity": lg.get("result_validity"), "invalid_reason": lg.get("result_invalid_reason"),
                })
    finally:
        runner.close()
    return engine_record, results, overhead


def _classified(results: list, samples: SampleSet, index: int) -> list:
    """A sample the predictor could not classify stops the benchmark: timing an error path would lie."""
    if not isinstance(results[0], Prediction):
        raise InputError(f"benchmark sample {samples.names[index]} cannot be classified", got=results[0].error,
                         expected="a decodable image", todo="pass --images with readable image files")
    return results


def _side_by_side(targets: list[EngineTarget], bundle: Bundle, threads: int | None, pixels: np.ndarray,
                  rounds: int) -> dict[str, Any]:
    runners: dict[str, Any] = {}
    try:
        for target in targets:
            runners[target.label] = open_target(target, bundle, threads)[0]
        return interleaved_engines(runners, pixels, rounds)
    finally:
        for runner in runners.values():
            runner.close()


def _slug(target: EngineTarget) -> str:
    return f"{target.backend}-{target.precision}"


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# ------------------------------------------------------------------------------------------ summary
def _find(results: list[dict[str, Any]], **want: Any) -> list[dict[str, Any]]:
    return [r for r in results if all(r.get(k) == v for k, v in want.items())]


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a person looks for first: best engine, its ratio to PyTorch eager, the head's overhead."""
    results = report["results"]
    engines = [r for r in _find(results, scenario="single-stream", layer="engine") if r["backend"] != TORCH_BACKEND]
    torch_rows = _find(results, scenario="single-stream", layer="engine", backend=TORCH_BACKEND)
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
    offline_rows = _find(results, scenario="offline")
    if offline_rows:
        top = max(offline_rows, key=lambda r: r.get("throughput_sps") or 0)
        summary["best_offline"] = {"backend": top["backend"], "precision": top["precision"], "batch": top["batch"],
                                   "throughput_sps": top["throughput_sps"]}
    return summary


# ------------------------------------------------------------------------------------------ compare
def load_report(path: str | Path) -> dict[str, Any]:
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


def _key(r: dict[str, Any]) -> tuple:
    return (r.get("scenario"), r.get("backend"), r.get("precision"), r.get("layer"), r.get("batch"))


def compare_reports(new: dict[str, Any], old: dict[str, Any]) -> list[dict[str, Any]]:
    """Per matching result (scenario, backend, precision, layer, batch): new / old ratios.

    Latency ratios below 1 and throughput ratios above 1 mean the new run is faster. Rows present in only
    one report are listed with ``status`` ``new only`` or ``old only``.
    """
    old_by_key = {_key(r): r for r in old.get("results", [])}
    new_by_key = {_key(r): r for r in new.get("results", [])}
    rows: list[dict[str, Any]] = []
    for key, r in new_by_key.items():
        base = {"scenario": key[0], "backend": key[1], "precision": key[2], "layer": key[3], "batch": key[4]}
        o = old_by_key.get(key)
        if o is None:
            rows.append({**base, "status": "new only"})
            continue
        row = {**base, "status": "both"}
        for metric in ("p50_ms", "p90_ms", "p99_ms", "throughput_sps"):
            a, b = r.get(metric), o.get(metric)
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
                row[f"{metric}_new"], row[f"{metric}_old"], row[f"{metric}_ratio"] = a, b, a / b
        rows.append(row)
    for key in old_by_key.keys() - new_by_key.keys():
        rows.append({"scenario": key[0], "backend": key[1], "precision": key[2], "layer": key[3], "batch": key[4],
                     "status": "old only"})
    return rows


def format_compare(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | backend/precision | layer | batch | p50 new/old | p99 new/old | throughput new/old |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "both":
            lines.append(f"| {r['scenario']} | {r['backend']}/{r['precision']} | {r['layer']} | {r['batch']} | "
                         f"{r['status']} | | |")
            continue
        cells = [f"{r[k]:.3f}" if k in r else "–" for k in ("p50_ms_ratio", "p99_ms_ratio", "throughput_sps_ratio")]
        lines.append(f"| {r['scenario']} | {r['backend']}/{r['precision']} | {r['layer']} | {r['batch']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ outputs
def _ms(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "–"


def cpu_line(env: dict[str, Any]) -> str:
    """``CPU model (machine; ISA: flag, flag)``: what a figure was measured on, for every table."""
    cpu = env.get("cpu") or {}
    flags = ", ".join(cpu.get("flags") or []) or "no extended ISA"
    hidden = f"; hidden from edgexfer: {', '.join(cpu['hidden_flags'])}" if cpu.get("hidden_flags") else ""
    return f"CPU {cpu.get('model') or env.get('cpu_model')} ({cpu.get('machine') or env.get('machine')}; " \
           f"ISA: {flags}{hidden})"


def render_markdown(report: dict[str, Any]) -> str:
    """bench.md: the headline table first (engine + head SingleStream, best Offline), then the details."""
    b, s, env = report["bundle"], report["settings"], report["environment"]
    results = report["results"]
    lines = [f"# edgexfer bench: {b['name']} ({b['arch']})", "",
             f"Measured {report['created_utc']} on {cpu_line(env)}", "",
             f"backbone sha256 `{b['backbone_sha256'][:16]}…` · head {b['head_kind']}, "
             f"{b['classes']} classes · samples: {s['samples']['count']} ({s['samples']['source']})", "",
             f"{env.get('cores_usable')} usable of {env.get('logical_cores')} cores · "
             f"threads: {s['threads'] or 'engine default'} · governor: {env.get('governor') or 'n/a'} · "
             f"load average at start: {env.get('load_average_1_5_15')}", "",
             f"LoadGen: min duration {s['min_duration_s']} s, min queries {s['min_queries']}"
             f"{' (MLPerf minimums)' if s['mlperf_minimums'] else ' (short defaults, not MLPerf-grade)'}, "
             f"seed {s['seed']}, {s['warmup_calls']} warm-up calls before each test.", ""]
    lines += ["## Backends side by side", "",
              "SingleStream latency of the classifier (engine + head, batch 1), ms; best Offline throughput.", "",
              "| backend | precision | computes in | p50 | p90 | p99 | throughput (samples/s) | at batch |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    pairs = list(dict.fromkeys((e["backend"], e["precision"]) for e in report["engines"]))
    computes = {(e["backend"], e["precision"]): (e.get("execution") or {}).get("inference_precision", "–")
                for e in report["engines"]}
    for backend, precision in pairs:
        ss = _find(results, scenario="single-stream", backend=backend, precision=precision, layer="engine_head")
        off = _find(results, scenario="offline", backend=backend, precision=precision)
        top = max(off, key=lambda r: r.get("throughput_sps") or 0) if off else None
        r = ss[0] if ss else {}
        lines.append(f"| {backend} | {precision} | {computes[(backend, precision)]} | {_ms(r.get('p50_ms'))} | "
                     f"{_ms(r.get('p90_ms'))} | {_ms(r.get('p99_ms'))} | {_ms(top and top.get('throughput_sps'))} | "
                     f"{top['batch'] if top else '–'} |")
    for sk in report.get("skipped", []):
        reason = str(sk["reason"]).replace("|", "\\|")  # one-line errors separate their parts with |
        lines.append(f"| {sk['backend']} | {sk['precision']} | not measured: {reason} | | | | | |")
    summ = report.get("summary", {})
    lines += [""]
    if "speedup_vs_pytorch_eager" in summ:
        best = summ["best_single_stream"]
        lines.append(f"Best engine (SingleStream, engine layer): {best['backend']}/{best['precision']} "
                     f"p50 {best['engine_p50_ms']:.2f} ms, {summ['speedup_vs_pytorch_eager']:.2f}x faster than "
                     f"PyTorch eager ({summ['pytorch_eager_engine_p50_ms']:.2f} ms).")
        lines.append("")
    side = report.get("side_by_side")
    if side:
        lines += ["## Engines interleaved (engine layer, batch 1)", "",
                  f"Each of {side['rounds']} rounds calls every engine once on the same image, in rotating order, so "
                  "load changes on the machine hit all engines alike. ms.", "",
                  "| engine | p50 | p90 | p50 relative to the fastest |", "|---|---:|---:|---:|"]
        fastest = min(side["p50_ms"].values())
        for name, v in sorted(side["p50_ms"].items(), key=lambda kv: kv[1]):
            lines.append(f"| {name} | {v:.2f} | {side['p90_ms'][name]:.2f} | {v / fastest:.2f}x |")
        if "side_by_side_speedup_vs_pytorch_eager" in summ:
            lines += ["", f"Best engine interleaved: {summ['side_by_side_best']['engine']}, "
                          f"{summ['side_by_side_speedup_vs_pytorch_eager']:.2f}x faster than PyTorch eager (p50)."]
        lines.append("")
    ss_rows = _find(results, scenario="single-stream")
    if ss_rows:
        lines += ["## SingleStream latency by layer (LoadGen percentiles, ms)", "",
                  "| backend | precision | layer | p50 | p90 | p95 | p99 | max | mean | std | queries | LoadGen |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in ss_rows:
            lines.append(f"| {r['backend']} | {r['precision']} | {r['layer']} | {_ms(r.get('p50_ms'))} | "
                         f"{_ms(r.get('p90_ms'))} | {_ms(r.get('p95_ms'))} | {_ms(r.get('p99_ms'))} | "
                         f"{_ms(r.get('max_ms'))} | {_ms(r.get('mean_ms'))} | {_ms(r.get('std_ms'))} | "
                         f"{r['count']} | {r.get('validity')} |")
        lines.append("")
    if report.get("head_overhead"):
        lines += ["## What the head and the wrapper add (paired, interleaved calls)", "",
                  "ms; ratio = engine + head p50 / engine p50 over interleaved calls; decomposed = the same with the "
                  "engine's own time subtracted inside each call (immune to the engine's jitter).", "",
                  "| backend | precision | pairs | engine p50 | engine + head p50 | ratio | pairwise ratio | "
                  "outside the engine p50 | decomposed ratio | head alone p50 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for h in report["head_overhead"]:
            outside = h.get("outside_engine_p50_ms")
            lines.append(f"| {h['backend']} | {h['precision']} | {h['pairs']} | {h['engine_p50_ms']:.3f} | "
                         f"{h['engine_head_p50_ms']:.3f} | {h['ratio']:.3f} | {h['pairwise_ratio_median']:.3f} | "
                         f"{'–' if outside is None else f'{outside:.3f}'} | "
                         f"{'–' if h.get('decomposed_ratio') is None else format(h['decomposed_ratio'], '.4f')} | "
                         f"{h['head_only_p50_ms'] * 1e3:.1f} µs |")
        lines.append("")
    off_rows = _find(results, scenario="offline")
    if off_rows:
        batches = sorted({r["batch"] for r in off_rows})
        lines += [f"## Offline throughput (samples/s, layer {OFFLINE_LAYER}) by batch size", "",
                  "| backend | precision | " + " | ".join(f"b={x}" for x in batches) + " |",
                  "|---|---|" + "---:|" * len(batches)]
        for backend, precision in pairs:
            cells = []
            for x in batches:
                rr = _find(off_rows, backend=backend, precision=precision, batch=x)
                cells.append(_ms(rr[0].get("throughput_sps")) if rr else "–")
            lines.append(f"| {backend} | {precision} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Setup costs (not in the percentiles)", "", "| backend | precision | load/compile s | first inference ms |"
              " threads |", "|---|---|---:|---:|---|"]
    for e in report["engines"]:
        lines.append(f"| {e['backend']} | {e['precision']} | {e['load_seconds']:.3f} | {e['first_inference_ms']:.1f} | "
                     f"{e['threads']} |")
    invalid = [r for r in results if r.get("validity") not in (None, "VALID")]
    lines += ["", "## Notes", ""]
    if invalid:
        lines.append(f"- {len(invalid)} LoadGen test(s) are INVALID by MLPerf rules (usually too short for early "
                     "stopping at p99 or the offline minimums); the figures are measured, the MLPerf validity is "
                     "recorded per row in bench.json.")
    lines.append("- Percentiles are LoadGen's; std and the CDF plot come from the SUT's own per-query timing.")
    lines.append("- Timings on a shared or busy machine are noisy: compare ratios measured in one run.")
    torch_engine = next((e for e in report["engines"] if e["backend"] == TORCH_BACKEND), None)
    if torch_engine is not None:
        lines.append(f"- PyTorch eager ran with {torch_engine['threads']} OpenMP thread(s); when other processes hold "
                     "the cores it degrades far more than the engines' thread pools. `--threads 1` compares "
                     "like for like.")
    if env.get("jetson"):
        j = env["jetson"]
        lines.append(f"- Jetson: {j.get('model')}; nvpmodel: {(j.get('nvpmodel') or {}).get('output', 'n/a')}")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines += [f"- Versions: {versions}", ""]
    if report.get("compare"):
        lines += ["## Compared with " + str(report["compare"]["old_path"]), "",
                  "Ratios new/old: latency below 1 and throughput above 1 mean faster now.", "",
                  format_compare(report["compare"]["rows"]), ""]
    lines += ["Plots: `plots/latency_cdf.png`, `plots/throughput_vs_batch.png`.", ""]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Latency CDF per backend/precision (one panel per layer) and throughput against batch size."""
    require("matplotlib", "bench plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    ss = _find(report["results"], scenario="single-stream")
    layers = [layer for layer in LAYERS if _find(ss, layer=layer)]
    if ss:
        fig, axes = plt.subplots(1, len(layers), figsize=(5.4 * len(layers), 5.0), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for r in _find(ss, layer=layer):
                lat = np.sort(np.asarray(r["latencies_ms"]))
                if lat.size:
                    ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post",
                            label=f"{r['backend']}/{r['precision']} (p50 {r['p50_ms']:.1f} ms)")
            ax.set_title(f"SingleStream latency CDF: {layer}")
            ax.set_xlabel("latency per query (ms)")
            ax.set_ylabel("fraction of queries")
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        fig.tight_layout()
        fig.savefig(out / "plots" / "latency_cdf.png", dpi=110)
        plt.close(fig)
        written.append("plots/latency_cdf.png")
    off = _find(report["results"], scenario="offline")
    if off:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for backend, precision in dict.fromkeys((r["backend"], r["precision"]) for r in off):
            rows = sorted(_find(off, backend=backend, precision=precision), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["throughput_sps"] or 0 for r in rows], marker="o",
                    label=f"{backend}/{precision}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in off}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples / s (LoadGen Offline)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"Offline throughput ({OFFLINE_LAYER}) vs batch size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "plots" / "throughput_vs_batch.png", dpi=110)
        plt.close(fig)
        written.append("plots/throughput_vs_batch.png")
    return written


def write_outputs(report: dict[str, Any], out: Path, plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["outputs"] = ["bench.json", "bench.md"] + (write_plots(report, out) if plots else [])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(render_markdown(report))


def validate_report(report: Any) -> list[str]:
    """Problems with a bench.json object against the documented schema (empty list = valid)."""
    problems: list[str] = []
    if not isinstance(report, dict):
        return [f"report is {type(report).__name__}, expected an object"]
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")
    for key, kind in (("created_utc", str), ("bundle", dict), ("settings", dict), ("environment", dict),
                      ("engines", list), ("skipped", list), ("results", list), ("head_overhead", list),
                      ("summary", dict)):
        if not isinstance(report.get(key), kind):
            problems.append(f"{key}: missing or not {kind.__name__}")
    for i, r in enumerate(report.get("results") or []):
        need = {"scenario", "backend", "precision", "layer", "batch", "throughput_sps", "validity"}
        if r.get("scenario") == "single-stream":
            need |= {"p50_ms", "p90_ms", "p99_ms", "count", "std_ms", "latencies_ms"}
        elif r.get("scenario") == "offline":
            need |= {"samples"}
        else:
            problems.append(f"results[{i}].scenario: {r.get('scenario')!r}")
        missing = sorted(need - set(r))
        if missing:
            problems.append(f"results[{i}]: missing {', '.join(missing)}")
    for i, e in enumerate(report.get("engines") or []):
        missing = sorted({"backend", "precision", "load_seconds", "first_inference_ms", "threads", "execution"}
                         - set(e))
        if missing:
            problems.append(f"engines[{i}]: missing {', '.join(missing)}")
        elif not {"precision", "inference_precision", "isa"} <= set(e["execution"] or {}):
            problems.append(f"engines[{i}].execution: needs precision, inference_precision and isa")
    cpu = (report.get("environment") or {}).get("cpu")
    if not isinstance(cpu, dict) or not isinstance(cpu.get("flags"), list) or not cpu.get("signature"):
        problems.append("environment.cpu: missing, or without flags and signature")
    return problems


__all__ = ["EdgexferError", "LAYERS", "SCENARIOS", "SCHEMA", "compare_reports", "capture_environment",
           "format_compare", "latency_stats", "load_report", "plan_targets", "render_markdown", "run_bench",
           "summarize", "validate_report"]
