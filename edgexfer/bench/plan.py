"""What ``edgexfer bench`` measures: the settings of a run and the backend x precision targets.

Which engines exist and which are installed comes from :mod:`edgexfer.runtime.backends.registry`
(the one home of backend choice), precisions from :data:`edgexfer.runtime.precision.PRECISIONS`; this
module only decides which of them a run measures, and lists the ones it cannot with the reason.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgexfer.bench.schema import Record
from edgexfer.runtime.backends.registry import BACKENDS, available_backends, has_recorded_engine
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.cpu import CpuFeatures
from edgexfer.runtime.errors import BundleError, InputError, MissingDependencyError
from edgexfer.runtime.optional import is_installed
from edgexfer.runtime.precision import PRECISIONS, PrecisionError, check_precision

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


@dataclass(frozen=True)
class EngineTarget:
    """One backend x precision to measure; ``model`` is None for the PyTorch eager reference."""

    backend: str
    precision: str
    model: Path | None

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.precision}"

    @property
    def slug(self) -> str:
        """The name of its LoadGen log folders."""
        return f"{self.backend}-{self.precision}"


@dataclass(frozen=True)
class SkippedTarget(Record):
    """An engine of the bundle this run does not measure, and why (``skipped[]`` in bench.json)."""

    backend: str
    precision: str
    reason: str  #: one line


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


def recorded_engines(bundle: Bundle) -> tuple[list[tuple[str, str]], list[SkippedTarget]]:
    """Every (backend, precision) engine the bundle has, in registry order, each backend's engines in the
    order of PRECISIONS (fp32 ONNX Runtime, the bundle's own backbone, always); and the engines recorded
    for a backend this edgexfer does not know, as skipped."""
    present = [(b, p) for b in BACKENDS for p in PRECISIONS if has_recorded_engine(bundle, b, p)]
    unknown = [SkippedTarget(e.backend, e.precision, f"'{e.backend}' is not a backend of this edgexfer "
                             f"(one of {', '.join(BACKENDS)})")
               for e in bundle.manifest.engines if e.backend not in BACKENDS]
    return present, unknown


def plan_targets(bundle: Bundle, backends: Sequence[str], precisions: Sequence[str],
                 torch_reference: bool | None = None,
                 features: CpuFeatures | None = None) -> tuple[list[EngineTarget], list[SkippedTarget]]:
    """Every backend x precision to measure, and the ones the bundle has but this machine cannot run.

    ``backends=["all"]``: every engine of the bundle whose package is installed (the others are listed as
    skipped with the reason, never dropped silently), plus the PyTorch eager reference when torch is
    installed. A backend named explicitly must be installed and have an engine for the precisions asked.
    An engine this CPU cannot compute in (bf16 without avx512_bf16/amx_bf16, judged from ``features``,
    default :func:`~edgexfer.runtime.cpu.cpu_features`) is skipped with the one-line reason, or is that
    error when its precision was asked for by name.
    """
    present, unknown = recorded_engines(bundle)
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
    # an engine of a backend this edgexfer does not know can only be among "all"
    skipped = [s for s in unknown if want_all_backends and (want_all_precisions or s.precision in precisions)]
    targets: list[EngineTarget] = []
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
