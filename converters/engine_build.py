"""What a backend converter hands back to :func:`edgexfer.converters.convert`."""
from __future__ import annotations

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
