"""What a backend converter hands back to :func:`edgexfer.converters.convert`."""
from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgexfer.runtime.backends.base import EngineRunner


@dataclass
class EngineBuild:
    """Files written into the staging directory, how to run them, and what the converter did."""

    files: list[Path]  #: every file of the engine, inside the staging directory
    open_runner: Callable[[], EngineRunner] | None  #: opens the engine for validation (None: nothing runnable here)
    info: dict[str, Any] = field(default_factory=dict)  #: tool versions, options, layers kept in float, search log
    validated_with: str = ""  #: what actually ran during validation
    register: bool = True  #: False when no engine exists yet (TensorRT absent: only the device build kit)


def cpu_description() -> dict[str, Any]:
    """The ISA features that decide int8 behaviour on x86 (VNNI avoids the u8*s8 int16 saturation)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16", "f16c")
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "flags": [f for f in wanted if f in flags],
            "vnni": bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})}
