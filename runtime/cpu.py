"""The CPU features that decide how an engine computes, read once per process.

Engines pick kernels by instruction set, not by CPU name: OpenVINO computes in bf16 by default where
the CPU has AVX512-BF16 or AMX, int8 convolutions saturate int16 accumulators on x86 CPUs without a
dot-product instruction (VNNI), and a compiled engine is only valid for the ISA it was compiled on.
Everything that keys or decides on the CPU (the device engine store key, the conversion reuse key, the
int8 overflow decision, bench environments, the ISA recorded with an int8 engine) uses
:func:`cpu_features`; the CPU's model name is kept for people, never for decisions.

``EDGEXFER_HIDE_CPU_FLAGS=flag,flag`` hides flags from edgexfer's decisions (tests use it to act as an
older CPU); it cannot add a flag the CPU lacks, and the engines themselves still see the real CPU.
``ONEDNN_MAX_CPU_ISA`` (which OpenVINO's CPU plugin obeys: ``AVX2`` makes it pick AVX2 kernels on an
AVX-512 CPU) hides the flags above that ISA too, so edgexfer and the engine agree on what the CPU has.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass

#: x86-64 flags (as /proc/cpuinfo spells them) that change what an engine computes or how fast
X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")
#: aarch64 equivalents: asimd (NEON), asimdhp (fp16 arithmetic), asimddp (int8 dot product), i8mm, bf16, sve
ARM_FLAGS = ("asimd", "fphp", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")

#: flags that give a CPU native bf16 arithmetic (OpenVINO's bf16 execution needs one of them)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: flags that give an x86 CPU an int8 dot product without int16 saturation
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class CpuFeatures:
    machine: str  #: x86_64, aarch64, ...
    model: str  #: the CPU's model name, for people (never used in a key or a decision)
    flags: tuple[str, ...]  #: the flags of X86_FLAGS / ARM_FLAGS this CPU has, in that order

    def has(self, *names: str) -> bool:
        """True when the CPU has any of ``names``."""
        return any(n in self.flags for n in names)

    @property
    def is_x86(self) -> bool:
        return self.machine in ("x86_64", "AMD64", "amd64", "i686", "i386")

    @property
    def bf16(self) -> bool:
        """Native bf16 arithmetic that OpenVINO's CPU plugin uses (AVX512-BF16 or AMX-BF16)."""
        return self.is_x86 and self.has(*BF16_FLAGS)

    @property
    def int8_dot(self) -> bool:
        """An int8 dot product that accumulates in int32 (x86 VNNI/AMX; aarch64 SDOT)."""
        return self.has(*INT8_DOT_FLAGS) if self.is_x86 else self.has("asimddp")

    @property
    def signature(self) -> str:
        """``machine:flag+flag``: what keys a compiled engine or a validation to this kind of CPU."""
        return f"{self.machine}:{'+'.join(self.flags) or 'baseline'}"

    def missing(self, *names: str) -> list[str]:
        return [n for n in names if n not in self.flags]

    def describe(self) -> str:
        """One line for people: model and the flags that matter."""
        return f"{self.model} ({self.machine}: {', '.join(self.flags) or 'no extended ISA'})"

    def to_dict(self) -> dict[str, object]:
        return {"machine": self.machine, "model": self.model, "flags": list(self.flags),
                "signature": self.signature, "bf16": self.bf16, "int8_dot": self.int8_dot}


#: ONEDNN_MAX_CPU_ISA value -> the flags of X86_FLAGS that stay visible under it
_ONEDNN_ISA_FLAGS = {
    "SSE41": ("sse4_2",),
    "AVX": ("sse4_2", "avx"),
    "AVX2": ("sse4_2", "avx", "avx2", "fma", "f16c"),
    "AVX2_VNNI": ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni"),
    "AVX512_CORE": ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw"),
    "AVX512_CORE_VNNI": ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"),
    "AVX512_CORE_BF16": ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                         "avx512_bf16"),
}


def _onednn_hidden(value: str) -> tuple[str, ...]:
    visible = _ONEDNN_ISA_FLAGS.get(value.strip().upper())
    return () if visible is None else tuple(f for f in X86_FLAGS if f not in visible)


def parse_cpuinfo(text: str, machine: str, hidden: tuple[str, ...] = ()) -> CpuFeatures:
    """The features in a ``/proc/cpuinfo`` text (``flags`` on x86, ``Features`` on aarch64)."""
    model = ""
    found: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not found:
            found = set(value.split())
        elif key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
    known = ARM_FLAGS if machine in ("aarch64", "arm64") else X86_FLAGS
    flags = tuple(f for f in known if f in found and f not in hidden)
    return CpuFeatures(machine=machine, model=model or platform.processor() or machine, flags=flags)


@functools.lru_cache(maxsize=1)
def cpu_features() -> CpuFeatures:
    """This machine's CPU features (read once per process)."""
    text = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    hidden = tuple(f.strip() for f in os.environ.get("EDGEXFER_HIDE_CPU_FLAGS", "").split(",") if f.strip())
    hidden += _onednn_hidden(os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    return parse_cpuinfo(text, platform.machine(), hidden)
