"""``edgexfer convert``: build an engine, validate it, and only then record it in the bundle.

The engine is built in a staging directory inside the bundle; validation runs it against the fp32
ONNX Runtime reference (:mod:`edgexfer.converters.validate`). Only when every figure is within
tolerance do its files move to ``engines/<backend>/<precision>/``, and the manifest (files with
sha256, the engine entry with tool versions and validation figures), ``reports/convert-<backend>-
<precision>.json`` and the comparison table ``reports/engines.{md,json}`` are written. A failed
conversion leaves the bundle exactly as it was.

Re-running with the same inputs (backbone, backend, precision, calibration images and split, options,
tool versions) reuses the recorded engine without recomputing anything, unless ``force=True``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.converters.calibration import CalibrationSplit, load_calibration, take
from edgexfer.converters.engine_build import EngineBuild
from edgexfer.converters.engine_table import write_engine_table
from edgexfer.converters.validate import raise_if_failed, validate_engine
from edgexfer.runtime.backends.registry import BACKENDS as BACKEND_REGISTRY
from edgexfer.runtime.backends.registry import backend_spec
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import tolerance_for
from edgexfer.runtime.cpu import cpu_features
from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.fsutil import StagedDir, file_sha256, write_atomic
from edgexfer.runtime.manifest import EngineEntry, FileEntry
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.precision import check_precision

BACKENDS = tuple(BACKEND_REGISTRY)
#: bump when a conversion recipe changes, so engines made by the old recipe are rebuilt
#: (2: every OpenVINO compile states its execution precision; the int8 overflow fix follows the target)
RECIPE_VERSION = "2"
#: what an int8 engine is quantized for: ``any`` x86-64 CPU (the overflow fix on: correct without VNNI
#: too) or ``native``, this converting CPU's ISA (no fix where it has VNNI: use only when every device has it)
INT8_TARGETS = ("any", "native")


@dataclass(frozen=True)
class ConvertResult:
    bundle: Path
    backend: str
    precision: str
    files: tuple[str, ...]  #: bundle-relative files of the engine (or of the device build kit)
    report: dict[str, Any]  #: the content of reports/convert-<backend>-<precision>.json
    reused: bool  #: True when an engine made from the same inputs was already recorded
    registered: bool  #: True when the manifest lists a runnable engine (False: TensorRT build kit only)

    def summary(self) -> str:
        """Human text for the command line."""
        r = self.report
        v = r["validation"]
        done = "engine written and validated" if self.registered else "device build kit written, its ONNX model validated"
        lines = [f"{self.backend} {self.precision}: " + ("reused the recorded result (same inputs; --force redoes it)"
                                                        if self.reused else done)]
        if not self.registered:
            lines.append("  no engine here (TensorRT absent): device build kit in engines/tensorrt/"
                         f"{self.precision}/ (build_engine.sh, trt_lint.json)")
        samples = r.get("samples", "images")
        for name in ("golden", "holdout"):
            f = v.get(name)
            if f:
                text = (f"  {name:8s} {f['images']:4d} {samples}: max |diff| {f['max_abs_diff']:.2e}, mean cosine "
                        f"{f['mean_cosine']:.5f}, top-1 agreement {f['top1_agreement']:.1%}")
                if "accuracy" in f:
                    text += f", accuracy {f['accuracy_reference']:.3f} -> {f['accuracy']:.3f}"
                lines.append(text)
        kept = r.get("kept_in_float")
        if kept is not None:
            lines.append(f"  kept in float: {', '.join(kept) if kept else 'none'}")
        s = r.get("speed") or {}
        if s.get("batch1_ms"):
            lines.append(f"  latency (batch 1, this CPU): {s['batch1_ms']:.1f} ms vs {s['reference_batch1_ms']:.1f} ms "
                         f"for onnxruntime fp32; load {r['load_seconds']:.2f} s")
        lines.append(f"  report: {self.bundle / r['report_path']}")
        return "\n".join(lines)


def convert(bundle_dir: str | Path, to: str, precision: str, *, calib: str | Path | None = None,
            calib_size: int = 300, force: bool = False, max_drop: float = 0.01, progress: bool = True,
            val_size: int | None = None, seed: int = 0, int8_target: str = "any") -> ConvertResult:
    """Convert the bundle's backbone for ``to`` at ``precision``, validate it, record it.

    ``calib`` is an ImageFolder tree whose folders are named like the head's classes: ``calib_size``
    images calibrate int8 (and steer its search), the others (at most ``val_size``) are held out for
    validation and accuracy. int8 needs it; fp32/fp16 without it are validated on the golden images only.
    ``max_drop`` is the largest accepted int8 (and bf16) accuracy drop on held-out images (0.01 = 1 point).
    ``int8_target`` (see :data:`INT8_TARGETS`) is the CPUs an OpenVINO int8 engine must be correct on.
    """
    if to not in BACKENDS:
        raise InputError("--to", got=repr(to), expected=" or ".join(BACKENDS))
    # an unknown precision, bf16 on another backend or on a CPU without bf16 arithmetic: one line, no work
    check_precision(precision, to)
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 1:
        raise InputError("--max-drop", got=repr(max_drop), expected="an accuracy drop between 0 and 1 (0.01 = 1 point)")
    if int8_target not in INT8_TARGETS:
        raise InputError("--int8-target", got=repr(int8_target), expected=" or ".join(INT8_TARGETS))
    bundle = Bundle.open(bundle_dir)
    if precision == "int8" and calib is None:
        modality = modality_of(bundle)
        raise DataError(f"int8 needs calibration {modality.plural}",
                        got="no --calib", expected=f"{modality.dataset_help} with classes named like the bundle's",
                        todo="pass --calib DATA_DIR (the bundle does not keep its training data)")
    split = load_calibration(bundle, calib, calib_size, val_size=val_size, seed=seed) if calib is not None else None
    # the packages whose versions decide what the conversion produces (part of the reuse key)
    tools = {name: _version(name) for name in backend_spec(to).tools}
    key = _inputs_key(bundle, to, precision, split, calib_size, val_size, seed, max_drop, tools, int8_target)
    report_rel = f"reports/convert-{to}-{precision}.json"
    if not force:
        previous = _recorded(bundle, report_rel, key)
        if previous is not None:
            return ConvertResult(bundle.root, to, precision, tuple(previous["files"]), previous, True,
                                 previous["registered"])
    return _build(bundle, to, precision, split, tools, key, report_rel, max_drop, progress, int8_target)


def _build(bundle: Bundle, to: str, precision: str, split: CalibrationSplit | None, tools: dict[str, str],
           key: str, report_rel: str, max_drop: float, progress: bool, int8_target: str) -> ConvertResult:
    tolerance = tolerance_for(precision, max_drop)
    root = bundle.root
    # staged under the name conversions have always used; the next run removes what a killed one left
    with StagedDir(root / "engines" / to / precision, staging=root / f".convert-{to}-{precision}.partial") as staged:
        with tempfile.TemporaryDirectory(prefix="edgexfer-convert-") as work:
            _say(progress, f"converting {root} to {to} {precision}")
            start = time.perf_counter()
            build = _resolve(backend_spec(to).converter)(bundle, staged.path, precision, split, tolerance, Path(work),
                                                         progress=progress, int8_target=int8_target)
            convert_seconds = time.perf_counter() - start
            _say(progress, "validating against the fp32 ONNX Runtime reference")
            opened = time.perf_counter()
            with build.open_runner() as runner:
                load_seconds = time.perf_counter() - opened
                validation = validate_engine(runner.run, bundle, tolerance, split.holdout if split else None)
                speed = _speed(runner, bundle, validation["passed"]) if build.register else {
                    "note": "no engine here: measure speed on the device"}
                details = dict(runner.details)
                execution = runner.execution
        raise_if_failed(validation, f"{to} {precision} engine")
        return _record(bundle, to, precision, build, staged, split, tools, key, report_rel, validation, speed,
                       {**details, "execution": execution}, load_seconds, convert_seconds)


def _record(bundle: Bundle, to: str, precision: str, build: EngineBuild, staged: StagedDir,
            split: CalibrationSplit | None, tools: dict[str, str], key: str, report_rel: str,
            validation: dict[str, Any], speed: dict[str, Any], details: dict[str, Any], load_seconds: float,
            convert_seconds: float) -> ConvertResult:
    root = bundle.root
    rel_files = [f"engines/{to}/{precision}/{p.name}" for p in build.files]
    report = {
        "schema": "edgexfer.convert-report/1", "backend": to, "precision": precision,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "backbone_sha256": bundle.manifest.backbone.sha256, "inputs_key": key, "report_path": report_rel,
        "registered": build.register, "files": rel_files, "tools": tools, "validated_with": build.validated_with,
        "runner": details, "execution": details.get("execution"), "validation": validation, "speed": speed, "load_seconds": round(load_seconds, 3),
        "convert_seconds": round(convert_seconds, 1), "kept_in_float": build.info.get("kept_in_float"),
        "calibration": split.describe() if split else None, "info": build.info,
        "samples": modality_of(bundle).plural,  # what the "images" counts count
    }
    # the previous engine is kept until the manifest records the new one, and put back if that fails
    with staged.swap():
        write_atomic(root / report_rel, (json.dumps(report, indent=2) + "\n").encode())
        manifest = bundle.manifest
        prefix = f"engines/{to}/{precision}/"
        files = {k: v for k, v in manifest.files.items() if not k.startswith(prefix) and k != report_rel}
        for rel in [*rel_files, report_rel]:
            files[rel] = FileEntry(sha256=file_sha256(root / rel), bytes=(root / rel).stat().st_size)
        engines = [e for e in manifest.engines if (e.backend, e.precision) != (to, precision)]
        if build.register:
            engines.append(EngineEntry(backend=to, precision=precision, files=tuple(rel_files),
                                       validation=_validation_summary(validation),
                                       info={"tools": tools, "kept_in_float": build.info.get("kept_in_float"),
                                             "validated_with": build.validated_with, "inputs_key": key,
                                             "report": report_rel,
                                             # what ran during validation: precision, arithmetic, CPU ISA
                                             "execution": details.get("execution"),
                                             "int8_target": build.info.get("int8_target")}))
        updated = dataclasses.replace(manifest, files=files, engines=tuple(engines))
        for rel in write_engine_table(root, updated):
            files[rel] = FileEntry(sha256=file_sha256(root / rel), bytes=(root / rel).stat().st_size)
        dataclasses.replace(updated, files=files).write(root / "manifest.json")
    Bundle.open(root)  # verify what was recorded
    return ConvertResult(root, to, precision, tuple(rel_files), report, False, build.register)


def _resolve(target: str) -> Callable[..., Any]:
    """A backend spec's ``"module:function"`` (its converter, its device engine builder)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def device_builders() -> dict[str, Callable[[Bundle, str, Path], dict[str, Any]]]:
    """The engine builders of every backend that builds its engine on the device (``edgexfer device install``
    passes them to :class:`~edgexfer.runtime.device.Device`; the runtime never imports the converters)."""
    builders = {}
    for name in BACKEND_REGISTRY:
        target = backend_spec(name).device_builder
        if target:
            builders[name] = (lambda bundle, precision, out, target=target: _resolve(target)(bundle, precision, out))
    return builders


def _validation_summary(validation: dict[str, Any]) -> dict[str, Any]:
    """The manifest keeps the headline figures; the report keeps everything."""
    out: dict[str, Any] = {}
    for name in ("golden", "holdout"):
        f = validation.get(name)
        if f:
            for k in ("images", "max_abs_diff", "mean_cosine", "top1_agreement", "accuracy_reference", "accuracy"):
                if k in f:
                    out[f"{name}_{k}"] = round(f[k], 6) if isinstance(f[k], float) else f[k]
    return out


def _speed(runner, bundle: Bundle, measure: bool) -> dict[str, Any]:
    """Median batch-1 latency and batch-8 throughput on this machine, and the same for the reference."""
    if not measure:
        return {}
    from edgexfer.runtime.backends.registry import open_reference
    from edgexfer.runtime.golden import golden_inputs

    images = golden_inputs(bundle, bundle.golden())  # images, or the golden texts' token ids
    out = _timings(runner.run, images)
    # the reference is timed at the same moment, so a busy machine shows in both figures
    with open_reference(bundle.backbone_path) as reference:
        ref = _timings(reference.run, images)
    return {**out, "reference_batch1_ms": ref["batch1_ms"], "reference_batch8_images_per_s": ref["batch8_images_per_s"],
            "machine": "this converting machine's CPU (see info.cpu); not the target device"}


def _timings(run, images, seconds: float = 0.5) -> dict[str, float]:
    one = take(images, slice(0, 1))
    eight = take(images, np.arange(8) % len(images))
    run(one)
    run(eight)
    laps = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(laps) < 5:
        t = time.perf_counter()
        run(one)
        laps.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(2):
        run(eight)
    per_batch = (time.perf_counter() - t) / 2
    return {"batch1_ms": round(1000 * statistics.median(laps), 2), "batch8_images_per_s": round(8 / per_batch, 1)}


def _recorded(bundle: Bundle, report_rel: str, key: str) -> dict[str, Any] | None:
    """The recorded report when its engine was made from the same inputs and all its files are listed."""
    if report_rel not in bundle.manifest.files:
        return None
    try:
        report = json.loads((bundle.root / report_rel).read_text())
    except (OSError, ValueError):
        return None
    if report.get("inputs_key") != key or not all(f in bundle.manifest.files for f in report.get("files", [])):
        return None
    registered = any(e.backend == report["backend"] and e.precision == report["precision"]
                     for e in bundle.manifest.engines)
    if report.get("registered") and not registered:
        return None
    return report


def _inputs_key(bundle: Bundle, to: str, precision: str, split: CalibrationSplit | None, calib_size: int,
                val_size: int | None, seed: int, max_drop: float, tools: dict[str, str], int8_target: str) -> str:
    # the CPU's ISA is part of it: validation (and an int8 search) ran on this CPU's kernels, so a
    # result from another kind of CPU is not reused
    parts = {"recipe": RECIPE_VERSION, "backbone": bundle.manifest.backbone.sha256,
             "head": file_sha256(bundle.head_path), "to": to, "precision": precision,
             "calib": split.fingerprint if split else None, "calib_size": calib_size, "val_size": val_size,
             "seed": seed, "max_drop": max_drop if precision in ("int8", "bf16") else None, "tools": tools,
             "isa": cpu_features().signature, "int8_target": int8_target if precision == "int8" else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)

