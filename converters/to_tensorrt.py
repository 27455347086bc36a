"""TensorRT: a plan built with the TensorRT Python API where it imports, else the device build kit.

Everything lands in ``engines/tensorrt/<precision>/``:

* ``backbone.onnx`` (fp32/fp16) or ``backbone.qdq.onnx`` (int8: symmetric QDQ, see
  :mod:`edgexfer.converters.qdq`): the ONNX model TensorRT parses, after rewrites TensorRT needs
  (the exported graph transposes its uint8 input before casting it; TensorRT wants the Cast first).
* ``trt_lint.json``: the static lint of that model (:mod:`edgexfer.converters.trt_lint`).
* ``build_engine.sh``: the exact ``trtexec`` call (shapes, precision flags, timing cache, output).

Optimisation profiles (:func:`profile_shapes`): an image backbone has one dynamic dimension, the batch
(``BATCH_PROFILE``); a text backbone two, the batch and the sequence length of both ``input_ids``
and ``attention_mask`` (``SEQUENCE_PROFILE``, up to the manifest's ``max_length``; both in
:mod:`edgexfer.runtime.engine_store`). TensorRT builds
kernels for the ``opt`` shape and accepts any shape between ``min`` and ``max``.
* with TensorRT: ``backbone.plan``, ``engine_key.json`` (what the plan is valid for) and
  ``timing.cache``. The runtime backend refuses a plan whose key does not match the device.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from edgexfer.converters.calibration import CalibrationSplit
from edgexfer.converters.engine_build import EngineBuild
from edgexfer.converters.qdq import SYMMETRIC, QdqRunner, quantize_with_search
from edgexfer.converters.trt_lint import cast_before_transpose, lint_model
from edgexfer.runtime.backends.tensorrt import (
    BATCH_PROFILE,
    TensorRtSpec,
    tensorrt_key,
    tensorrt_profile_id,
    tensorrt_profiles,
)
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import Tolerance
from edgexfer.runtime.engine_store import EngineKey
from edgexfer.runtime.errors import BundleError, DataError
from edgexfer.runtime.optional import is_installed, require

#: name -> ((min shape), (opt shape), (max shape)) of every dynamic network input
Profiles = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def profile_shapes(bundle: Bundle) -> Profiles:
    """The optimisation profile of every input of the bundle's backbone (see the module docstring; the
    shapes live in :mod:`edgexfer.runtime.engine_store`, whose keys name them)."""
    return tensorrt_profiles(bundle.manifest.backbone)


#: builder workspace limit
WORKSPACE_MIB = 1024


def engine_store_key(tensorrt_version: str, gpu_name: str, compute_capability: str, precision: str,
                     backbone_sha256: str, profile: str = "") -> str:
    """The name a TensorRT plan is stored under: a plan is only valid for exactly these five things
    (and, for a text backbone, the shape ``profile`` it accepts: :func:`tensorrt_profile_id`).

    A plan built by another TensorRT version, for another GPU (name or compute capability), another
    precision or another backbone must never be loaded, so each part changes the key. The same key
    names the device's cache entry (``state/engines/<key>/``, :mod:`edgexfer.runtime.engine_store`).
    """
    return EngineKey("tensorrt", tensorrt_version, f"{gpu_name} sm{compute_capability}", precision,
                     backbone_sha256, profile=profile).key


def build_device_engine(bundle: Bundle, precision: str, out_dir: Path) -> dict[str, Any]:
    """Build the bundle's TensorRT plan on this device from its TensorRT kit, into ``out_dir``.

    The engine builder of ``edgexfer device install``: :meth:`edgexfer.runtime.device.Device.prepare_engine`
    calls it only when ``state/engines/<key>/`` has no plan for this TensorRT, GPU, precision and backbone.
    Needs TensorRT only (no onnx): the kit's model already has the rewrites TensorRT needs.
    """
    kit = TensorRtSpec.kit(bundle, precision)
    if kit is None:
        raise BundleError("the bundle has no TensorRT kit for this precision", got=f"no engines/tensorrt/{precision}/",
                          expected="the kit written by `edgexfer convert --to tensorrt`",
                          todo=f"run `edgexfer convert BUNDLE --to tensorrt --precision {precision}` on the host "
                               "and flash the bundle again")
    trt = require("tensorrt", "building a TensorRT engine")
    build_plan(trt, kit, out_dir / "backbone.plan", precision, profile_shapes(bundle), out_dir / "timing.cache")
    return {"model": str(kit.relative_to(bundle.root)), "tensorrt": trt.__version__}


def convert_tensorrt(bundle: Bundle, out_dir: Path, precision: str, split: CalibrationSplit | None,
                     tolerance: Tolerance, workdir: Path, *, progress: bool = True,
                     int8_target: str = "any") -> EngineBuild:
    # int8_target is OpenVINO's CPU overflow fix; a TensorRT plan computes on the GPU: not used here
    onnx = require("onnx", "preparing a model for TensorRT")
    profiles = profile_shapes(bundle)
    source_lint = lint_model(onnx.load(str(bundle.backbone_path)), profiles=profiles, precision=precision)
    model = onnx.load(str(bundle.backbone_path))
    rewrites = cast_before_transpose(model)
    onnx.checker.check_model(model)
    info: dict[str, Any] = {"rewrites": rewrites, "source_lint_errors": [p for p in source_lint["problems"]
                                                                          if p["severity"] == "error"]}
    if precision == "int8":
        if split is None:
            raise DataError("int8 needs calibration images", got="no --calib", expected="an ImageFolder tree",
                            todo="pass --calib DATA_DIR")
        workdir.mkdir(parents=True, exist_ok=True)
        prepared = workdir / "trt_input.onnx"
        onnx.save(model, str(prepared))
        model_path = out_dir / "backbone.qdq.onnx"
        info["quantization"] = quantize_with_search(prepared, model_path, SYMMETRIC, bundle, split.calibration,
                                                    tolerance, workdir / "qdq", progress=progress)
        info["kept_in_float"] = info["quantization"]["kept_in_float"]
    else:
        model_path = out_dir / "backbone.onnx"
        onnx.save(model, str(model_path))
    lint = lint_model(onnx.load(str(model_path)), profiles=profiles, precision=precision)
    (out_dir / "trt_lint.json").write_text(json.dumps(lint, indent=2) + "\n")
    info["lint"] = {"tensorrt": lint["tensorrt"], "errors": lint["errors"], "warnings": lint["warnings"]}
    script = out_dir / "build_engine.sh"
    script.write_text(build_script(model_path.name, precision, profiles))
    script.chmod(0o755)
    files = [model_path, out_dir / "trt_lint.json", script]
    info["batch_profile"] = dict(zip(("min", "opt", "max"), BATCH_PROFILE))
    info["profiles"] = {name: dict(zip(("min", "opt", "max"), (list(s) for s in shapes)))
                        for name, shapes in profiles.items()}

    key = (tensorrt_key(precision, bundle.manifest.backbone.sha256, profile=tensorrt_profile_id(bundle.manifest.backbone))
           if is_installed("tensorrt") else None)
    if key is None:
        info["engine"] = ("not built: TensorRT or a CUDA GPU is absent here; run build_engine.sh, or "
                          f"`edgexfer convert BUNDLE --to tensorrt --precision {precision}` on the device")
        optimized = False  # the QDQ reference semantics, or plain fp32 for the fp32/fp16 input model
        return EngineBuild(files=files, open_runner=lambda: QdqRunner(model_path, optimized=optimized), info=info,
                           validated_with="the ONNX model TensorRT will parse, run by ONNX Runtime on CPU "
                                          "(QDQ reference semantics); the engine itself is validated when built",
                           register=False)
    trt = require("tensorrt", "building a TensorRT engine")
    plan = out_dir / "backbone.plan"
    build_plan(trt, model_path, plan, precision, profiles, out_dir / "timing.cache")
    (out_dir / "engine_key.json").write_text(json.dumps(key.record(), indent=2) + "\n")
    gpu = dict(key.extra)
    info.update({"tensorrt": trt.__version__, "gpu": {"name": gpu["gpu"], "compute_capability": gpu["sm"]},
                 "engine_key": key.key})
    from edgexfer.runtime.backends.registry import open_backend

    return EngineBuild(files=[plan, out_dir / "engine_key.json", out_dir / "timing.cache", *files],
                       open_runner=lambda: open_backend("tensorrt", plan, precision=precision), info=info,
                       validated_with=f"edgexfer.runtime.backends.tensorrt on {gpu['gpu']}")


def build_plan(trt, onnx_path: Path, plan_path: Path, precision: str, profiles: Profiles, timing_cache: Path) -> None:
    """Build a serialized engine with the TensorRT Python API (explicit batch, one profile, timing cache)."""
    config, network, builder, _parser = builder_config(trt, onnx_path, precision, profiles)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BundleError("TensorRT could not build the engine", got=f"{onnx_path.name} at {precision}",
                          expected="a serialized engine", todo="read the TensorRT log above")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def builder_config(trt, onnx_path: Path, precision: str, profiles: Profiles):
    """The parsed network and the builder config of :func:`build_plan`: precision flags and one
    optimisation profile holding every dynamic input (``profiles``; an input it lacks is an error).

    Returns ``(config, network, builder, parser)``: the parser owns the network's weights, so it must
    outlive the build.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is the only mode from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError("TensorRT cannot parse the ONNX model", got=errors[:300], expected="a parsable model",
                          todo="see engines/tensorrt/<precision>/trt_lint.json")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_MIB << 20)
    # TensorRT computes fp32 layers in TF32 on Ampere and later (Orin) unless told otherwise: float
    # layers stay fp32, as the engine's name says (fp16 engines still get fp16 kernels from the flag below)
    config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: scales come from the Q/DQ nodes
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    missing = [n for n in names if n not in profiles]
    if missing:
        raise BundleError("no optimisation profile for a network input", got=", ".join(missing),
                          expected=f"a profile for each of {', '.join(names)}",
                          todo="report this as a bug with the backbone name")
    for name in names:
        profile.set_shape(name, *profiles[name])
    config.add_optimization_profile(profile)
    return config, network, builder, parser


def trtexec_command(model_name: str, precision: str, profiles: Profiles) -> list[str]:
    """The ``trtexec`` call of the build kit: one ``--minShapes/--optShapes/--maxShapes`` entry per input."""

    def shapes(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in profiles.items())

    cmd = ["trtexec", f"--onnx={model_name}", "--saveEngine=backbone.plan",
           f"--minShapes={shapes(0)}", f"--optShapes={shapes(1)}", f"--maxShapes={shapes(2)}",
           f"--memPoolSize=workspace:{WORKSPACE_MIB}", "--timingCacheFile=timing.cache",
           "--noTF32"]  # fp32 layers in fp32, not TF32 (Ampere/Orin default)
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd.append("--int8")  # explicit int8 from the Q/DQ nodes; no calibration cache needed
    return cmd


def build_script(model_name: str, precision: str, profiles: Profiles) -> str:
    cmd = trtexec_command(model_name, precision, profiles)
    shown = " \\\n  ".join(shlex.quote(c) for c in cmd[1:])
    return f"""#!/usr/bin/env bash
# Build the TensorRT {precision} engine of this bundle on the target device (Jetson: JetPack's TensorRT).
# Written by `edgexfer convert --to tensorrt --precision {precision}` on a machine without TensorRT.
#
# Preferred on the device: `edgexfer convert <bundle> --to tensorrt --precision {precision}{' --calib DATA_DIR' if precision == 'int8' else ''}`
# builds the same engine with the TensorRT Python API, validates it against the fp32 reference and
# records it (with its engine store key) in manifest.json. A plan made by this script is for
# inspection and benchmarking: it is not recorded in the manifest, so edgexfer will not load it.
set -euo pipefail
cd "$(dirname "$0")"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
"$TRTEXEC" \\
  {shown}
"""
