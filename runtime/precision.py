"""Precisions, and how each engine is told to compute in the precision its name promises.

An engine's name says what it computes in; nothing is left to an engine's default. Each backend's own
module tells its engine (OpenVINO: :func:`edgexfer.runtime.backends.openvino.openvino_config`, since on CPUs
with AVX512-BF16 or AMX its CPU plugin computes in bf16 unless told otherwise, and on arm64 CPUs with fp16
arithmetic (a Jetson's) in f16: the demo bundle on an emulated Cortex-A76 gave a max feature difference of
0.09 instead of 5e-6):

======== =============================== =====================================================
name     weights                          arithmetic (CPU)
======== =============================== =====================================================
fp32     float32                          float32 everywhere
fp16     float16 (decompressed on load)   float32 on CPUs (x86 has no fp16 arithmetic to use; on
                                          arm64 too, as the conversion validated it); float16 on
                                          GPUs (OpenVINO GPU, TensorRT, ORT CUDA)
bf16     float32                          bfloat16 (OpenVINO on CPUs with avx512_bf16 or amx_bf16)
int8     int8 (quantized layers)          int8 in quantized layers, float32 in the float parts
======== =============================== =====================================================

Conversion validation, NNCF's calibration and search, ``device install`` and ``predict`` all compile
with the backend's one config, and every result records ``execution`` (:func:`execution_record`): the precision
asked for, what the engine reports it computed in, and the CPU's ISA signature.
"""
from __future__ import annotations

from typing import Any

from edgexfer.runtime.cpu import BF16_FLAGS, CpuFeatures, cpu_features
from edgexfer.runtime.errors import InputError

PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")


class PrecisionError(InputError):
    """A precision this backend or this CPU cannot run."""


def check_precision(precision: str, backend: str | None = None, features: CpuFeatures | None = None) -> None:
    """Raise a one-line :class:`PrecisionError` unless ``backend`` can run ``precision`` on this CPU."""
    if precision not in PRECISIONS:
        raise PrecisionError("precision", got=repr(precision), expected=" or ".join(PRECISIONS))
    if backend is None:
        if precision == "bf16":
            require_bf16(features)
        return
    # the backends' own modules know their precisions
    from edgexfer.runtime.backends.registry import backend_spec

    spec = backend_spec(backend)
    if precision not in spec.precisions:
        raise PrecisionError(f"{precision} on {backend}", got=f"{backend} has no {precision} engines",
                             expected=f"one of {', '.join(spec.precisions)}",
                             todo="bf16 runs on OpenVINO: pass --backend openvino, or pick another --precision")
    if precision == "bf16" and spec.bf16_on_cpu:
        require_bf16(features)


def require_bf16(features: CpuFeatures | None = None) -> None:
    """bf16 execution needs native bf16 arithmetic; elsewhere it would be emulated or refused by the engine."""
    cpu = features or cpu_features()
    if not cpu.bf16:
        have = ", ".join(cpu.flags) or "no extended ISA"
        raise PrecisionError("bf16 execution", got=f"CPU {cpu.model!r} ({cpu.machine}: {have})",
                             expected=f"a CPU with {' or '.join(BF16_FLAGS)}",
                             todo="use fp32, fp16 or int8 on this CPU")


def execution_record(precision: str, inference_precision: str, features: CpuFeatures | None = None) -> dict[str, Any]:
    """What ran, for manifests and result files: precision asked for, arithmetic, the CPU's ISA."""
    cpu = features or cpu_features()
    return {"precision": precision, "inference_precision": inference_precision, "isa": cpu.signature,
            "cpu": cpu.model}
