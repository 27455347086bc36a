"""A checkpoint per completed round of a federation, so that ``fleet serve --resume`` continues after a crash.

``DIR/round-0003/`` holds the round's head (``head.safetensors``), the best round's on ``--val`` so far
(``best.safetensors``, with a validation set) and ``state.json``: the round records
so far, the fleet's sample total the devices scale their L2 strength by, the merge strategy's state
(server momentum, the DP noise generator) and the backbone sha256. A round directory is written under
a temporary name and renamed, so the highest ``round-*`` is always complete; older ones are removed.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.heads import Head

FORMAT = "edgexfer.fleet-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    head: Head
    rounds: list[dict[str, Any]]
    fleet_samples: int
    best: tuple[int, Head] | None = None  #: (round, head) of the best round on --val so far


def save(directory: Path, head: Head, rounds: list[dict[str, Any]], fleet_samples: int, strategy: Any,
         backbone_sha256: str, best: tuple[int, Head] | None = None) -> Path:
    """Write the checkpoint of the last completed round (``len(rounds)``); returns its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"round-{len(rounds):04d}"
    partial = directory / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    head.save(partial / "head.safetensors")
    if best is not None:
        best[1].save(partial / "best.safetensors")
    state = {"format": FORMAT, "backbone_sha256": backbone_sha256, "round": len(rounds), "rounds": rounds,
             "fleet_samples": int(fleet_samples), "strategy": strategy.state(),
             "best_round": best[0] if best is not None else None}
    (partial / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in directory.glob("round-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(directory: Path, backbone_sha256: str, strategy: Any) -> Checkpoint | None:
    """The last completed round's checkpoint (and the strategy's state restored), or None when there is none."""
    done = sorted(directory.glob("round-*")) if directory.is_dir() else []
    if not done:
        return None
    last = done[-1]
    try:
        state = json.loads((last / "state.json").read_text())
        head = Head.load(last / "head.safetensors")
        best_round = state.get("best_round")
        best = (int(best_round), Head.load(last / "best.safetensors")) if best_round else None
    except (OSError, ValueError) as exc:
        raise InputError("the federation's checkpoint is unreadable", got=f"{last}: {str(exc)[:80]}",
                         expected="head.safetensors and state.json", todo="start without --resume") from exc
    if state.get("format") != FORMAT or state.get("backbone_sha256") != backbone_sha256:
        raise InputError("the federation's checkpoint is for another bundle or format", got=str(last),
                         expected=f"{FORMAT} for backbone {backbone_sha256[:12]}", todo="resume with the same --bundle")
    strategy.load_state(state.get("strategy", {}))
    return Checkpoint(head, list(state["rounds"]), int(state["fleet_samples"]), best)
