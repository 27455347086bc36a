"""A long recording for ``device listen`` (issue 26 acceptance 3), built from spoken14 test clips (unseen voices):
words at known times between stretches of quiet (a microphone's hiss) and of noise (white or brown, seeded).

A word's true time is the energy centre of its clip: the clip's 10 ms frame energies above the clip's own
quietest tenth, weighted (each clip is one word with its own noise around it). Also used by the figures in
docs/audio.md (several seeds): ``python benchmarks/listen_study.py STATE SEEDS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

RATE = 16000


@dataclass(frozen=True)
class Placed:
    label: str
    time: float  #: seconds: the word's energy centre
    clip: str


def word_centre(clip: np.ndarray, rate: int = RATE) -> float:
    """Seconds from the clip's start to its word's energy centre."""
    frame = rate // 100
    n = len(clip) // frame
    power = np.mean(np.square(clip[:n * frame].reshape(n, frame), dtype=np.float64), axis=1)
    weight = np.clip(power - np.percentile(power, 10), 0, None)
    return float((np.dot(weight, np.arange(n)) / weight.sum() + 0.5) * frame / rate)


def _noise(rng: np.random.Generator, n: int, brown: bool) -> np.ndarray:
    x = rng.standard_normal(n)
    if brown:  # as make_spoken.py: integrated white noise, its slow drift taken away
        x = np.cumsum(x)
        x -= np.convolve(x, np.ones(400) / 400, "same")
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-12)).astype(np.float32)


def _fade(x: np.ndarray, samples: int) -> np.ndarray:
    ramp = np.linspace(0, 1, samples, dtype=np.float32)
    x = x.copy()
    x[:samples] *= ramp
    x[-samples:] *= ramp[::-1]
    return x


def build_recording(test_dir: Path, words: list[str], seed: int, seconds: float = 60.0, count: int = 18,
                    usable: set[str] | None = None) -> tuple[np.ndarray, list[Placed]]:
    """``seconds`` of 16 kHz mono audio with ``count`` words of ``words`` (spoken14 ``test/`` clips) at
    seeded times, clips at least 2 s apart (at 24 a minute, 1.2 s apart at least, the gate's noise floor
    rises with the neighbours' clips and words are lost: docs/audio.md), over a hiss at about -60 dBFS and 2-3 stretches of 4-8 s of white or brown
    noise at -45..-35 dBFS (a fan, a passing car): the words' own clips carry their noise at 0-20 dB SNR.
    ``usable``: the clip paths that may be chosen (None: all)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    total = int(seconds * RATE)
    audio = _noise(rng, total, brown=False) * 10 ** (-60 / 20)
    for _ in range(int(rng.integers(2, 4))):
        length = int(rng.uniform(4, 8) * RATE)
        at = int(rng.integers(0, total - length))
        audio[at:at + length] += _fade(_noise(rng, length, bool(rng.integers(2))) * 10 ** (rng.uniform(-45, -35) / 20),
                                       RATE // 20)
    # clip starts on a 0.5 s grid from 0.5 s to seconds - 2 s, at least 2 s (4 steps) apart: sorted draws from a
    # grid shortened by the gaps, each moved on by its gaps
    steps = int((seconds - 2.5) / 0.5) + 1 - 4 * (count - 1)
    slots = 0.5 + 0.5 * (np.sort(rng.choice(steps, size=count, replace=False)) + 4 * np.arange(count))
    placed = []
    for start in slots:
        label = str(rng.choice([w for w in words if usable is None
                                or any(str(f) in usable for f in (test_dir / w).glob("*.wav"))]))
        files = [f for f in sorted((test_dir / label).glob("*.wav")) if usable is None or str(f) in usable]
        path = files[int(rng.integers(len(files)))]
        clip, rate = sf.read(str(path), dtype="float32")
        assert rate == RATE and clip.ndim == 1
        at = int(start * RATE)
        audio[at:at + len(clip)] += _fade(clip, RATE // 100)
        placed.append(Placed(label, start + word_centre(clip), path.name))
    return np.clip(audio, -1, 1), placed


def score(detections: list[dict], placed: list[Placed], seconds: float, tolerance: float = 0.5
          ) -> tuple[float, float, list[str]]:
    """(fraction of placed words found with the right label within ``tolerance`` s, false detections per
    minute, lines about the misses and false ones). A detection matches at most one word."""
    used: set[int] = set()
    found, notes = 0, []
    for p in placed:
        hit = next((i for i, d in enumerate(detections) if i not in used and d["label"] == p.label
                    and abs(d["time"] - p.time) <= tolerance), None)
        if hit is None:
            near = [f"{d['label']}@{d['time']:.2f}({d['confidence']:.2f})" for d in detections
                    if abs(d["time"] - p.time) <= 1.0]
            notes.append(f"missed {p.label}@{p.time:.2f} ({p.clip}); near: {', '.join(near) or 'nothing'}")
        else:
            used.add(hit)
            found += 1
    false = [d for i, d in enumerate(detections) if i not in used]
    notes += [f"false {d['label']}@{d['time']:.2f} ({d['confidence']:.2f}, {d['windows']} windows)" for d in false]
    return found / len(placed), len(false) / (seconds / 60), notes
