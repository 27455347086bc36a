"""ONNX Runtime engines: an offline-optimised fp32 model, an fp16 model, an int8 QDQ model.

fp32: the graph optimisations that do not depend on the CPU (``ORT_ENABLE_EXTENDED``) are applied once
and saved, so a device skips them at load time. fp16: weights and arithmetic in float16, uint8 input
and float32 features kept. int8: asymmetric QDQ with the sensitivity search of
:mod:`edgexfer.converters.qdq`, validated with the kernels ONNX Runtime runs on this CPU.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from edgexfer.converters.calibration import CalibrationSplit
from edgexfer.converters.engine_build import EngineBuild
from edgexfer.converters.qdq import ASYMMETRIC, quantize_with_search
from edgexfer.runtime.backends.registry import open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import Tolerance
from edgexfer.runtime.cpu import cpu_features
from edgexfer.runtime.errors import DataError
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.optional import require


def convert_onnxruntime(bundle: Bundle, out_dir: Path, precision: str, split: CalibrationSplit | None,
                        tolerance: Tolerance, workdir: Path, *, progress: bool = True,
                        int8_target: str = "any") -> EngineBuild:
    # int8_target (the CPUs an int8 engine must be correct on) is OpenVINO's overflow fix: ONNX Runtime's
    # QDQ kernels are correct on every x86-64 CPU, so the argument of the common signature is not used
    ort = require("onnxruntime", "converting for ONNX Runtime")
    target = out_dir / "backbone.onnx"
    info: dict[str, Any] = {"onnxruntime": ort.__version__}
    if precision == "fp32":
        opts = ort.SessionOptions()
        # EXTENDED, not ALL: ALL adds layout changes specific to this CPU, which a device may not share.
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.optimized_model_filepath = str(target)
        opts.log_severity_level = 3
        ort.InferenceSession(str(bundle.backbone_path), sess_options=opts, providers=["CPUExecutionProvider"])
        info["optimization"] = "ORT_ENABLE_EXTENDED, saved offline"
    elif precision == "fp16":
        onnx = require("onnx", "converting to fp16")
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(bundle.backbone_path)), keep_io_types=True)
        onnx.checker.check_model(model)
        onnx.save(model, str(target))
        info["conversion"] = "onnxruntime.transformers.float16 (keep_io_types: uint8 in, float32 out)"
    else:
        if split is None:
            raise DataError(f"int8 needs calibration {modality_of(bundle).plural}", got="no --calib",
                            expected=modality_of(bundle).dataset_help,
                            todo="pass --calib DATA_DIR")
        info["quantization"] = quantize_with_search(bundle.backbone_path, target, ASYMMETRIC, bundle,
                                                    split.calibration, tolerance, workdir, progress=progress)
        info["kept_in_float"] = info["quantization"]["kept_in_float"]
        info["cpu"] = cpu_features().to_dict()
    return EngineBuild(files=[target], open_runner=lambda: open_backend("onnxruntime", target, precision=precision),
                       info=info, validated_with="edgexfer.runtime.backends.onnxruntime (CPUExecutionProvider)")
