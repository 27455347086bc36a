"""Helpers shared by the host tests."""
from __future__ import annotations

import shutil
from pathlib import Path


def subset(src: Path, dst: Path, classes: int, per_class: int) -> Path:
    """Copy the first ``per_class`` files of the first ``classes`` class folders of ``src`` into ``dst``."""
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir())[:classes]:
        (dst / cls).mkdir(parents=True)
        for f in sorted((src / cls).iterdir())[:per_class]:
            shutil.copy(f, dst / cls / f.name)
    return dst
