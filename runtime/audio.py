"""Audio: WAV files -> float32 mono clips at the backbone's rate and length (the one audio preprocessing).

Reading is soundfile (libsndfile: every WAV sample format, 8-32 bit integer and float, WAVE_FORMAT_EXTENSIBLE,
checked headers) and resampling soxr (a high-quality, fast polyphase resampler, the one librosa and
python-soundfile users default to); both ship manylinux/aarch64 wheels with the library inside and no torch
(docs/audio.md). Several channels are averaged. A clip shorter than ``clip_samples`` is padded with silence at
the end; a longer one is cut to its middle ``clip_samples``. A file that is not a WAV (by its RIFF/WAVE header),
cannot be decoded, has no samples, or is all zeros is refused with a one-line :class:`InputError`.

A labelled audio data set is a folder per class of ``.wav`` files (:func:`read_audio_dataset`): every other,
unreadable, empty or silent file is reported and skipped, one line each.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.imagefolder import class_folders
from edgexfer.runtime.optional import require

AUDIO_EXTENSIONS = frozenset({".wav"})
_VERSION = "wav1"  #: bump when the decoding changes what a clip's samples are


@dataclass(frozen=True)
class AudioSpec:
    """How a WAV file becomes the backbone's input; the feature cache's preprocessing key."""

    sample_rate: int = 16000
    clip_samples: int = 16000

    def key(self) -> str:
        return f"{_VERSION}:sr={self.sample_rate}:n={self.clip_samples}"


@dataclass(frozen=True)
class AudioInputSpec:
    """An audio backbone's input in the manifest: float32 mono waveform ``[N, clip_samples]`` at ``sample_rate``."""

    dtype: str = "float32"
    sample_rate: int = 16000  #: samples per second the backbone reads (files at other rates are resampled)
    clip_samples: int = 16000  #: samples per clip: shorter padded with silence, longer cut to the middle

    @classmethod
    def parse(cls, obj: Any, where: str) -> AudioInputSpec:
        from edgexfer.runtime.manifest import Fields

        f = Fields(obj, where)
        spec = cls(
            dtype=f.take("dtype", str, check=lambda v: v == "float32", expect="'float32'"),
            sample_rate=f.take("sample_rate", int, check=lambda v: 1000 <= v <= 192000, expect="an integer 1000..192000"),
            clip_samples=f.take("clip_samples", int, check=lambda v: 1 <= v <= 10_000_000, expect="a positive integer"),
        )
        f.done()
        return spec

    def spec(self) -> AudioSpec:
        return AudioSpec(self.sample_rate, self.clip_samples)


def is_wav(data: bytes) -> bool:
    """Whether ``data`` starts like a WAV file (RIFF/RIFX/RF64 ... WAVE)."""
    return len(data) >= 12 and data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE"


def decode_wav(data: bytes, spec: AudioSpec, source: str = "audio") -> np.ndarray:
    """A WAV file's bytes -> float32 ``[clip_samples]`` mono at ``spec.sample_rate``; InputError if unusable."""
    if not data:
        raise InputError(f"audio {source}", got="an empty file", expected="a WAV file", todo="record it again")
    if not is_wav(data):
        raise InputError(f"audio {source}", got="not a WAV file", expected="a WAV file (RIFF/WAVE)",
                         todo="convert it to WAV (e.g. sox in.mp3 out.wav)")
    sf = require("soundfile", "reading WAV files")
    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, ValueError for bad files
        raise InputError(f"audio {source}", got=f"unreadable WAV ({type(exc).__name__})", expected="a complete WAV file",
                         todo="record or export it again") from None
    if wave.shape[0] == 0:
        raise InputError(f"audio {source}", got="a WAV file without samples", expected="at least one sample",
                         todo="record it again")
    mono = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    if not np.isfinite(mono).all():
        raise InputError(f"audio {source}", got="NaN or infinite samples", expected="finite samples",
                         todo="export it again")
    if not np.any(mono):
        raise InputError(f"audio {source}", got="silence (all samples zero)", expected="a recording",
                         todo="check the microphone and record it again")
    if rate != spec.sample_rate:
        soxr = require("soxr", "resampling audio")
        mono = soxr.resample(mono, rate, spec.sample_rate, quality="HQ").astype(np.float32)
    return fit_clip(mono, spec.clip_samples)


def fit_clip(wave: np.ndarray, samples: int) -> np.ndarray:
    """``wave`` padded with silence at the end, or cut to its middle, to ``samples`` samples (float32)."""
    wave = np.asarray(wave, np.float32)
    if len(wave) >= samples:
        start = (len(wave) - samples) // 2
        return np.ascontiguousarray(wave[start:start + samples])
    return np.concatenate([wave, np.zeros(samples - len(wave), np.float32)])


def check_waves(waves: Any, spec: AudioSpec) -> np.ndarray:
    """A batch of waveforms given as an array: float32 ``[N, clip_samples]``, finite."""
    if not isinstance(waves, np.ndarray) or waves.ndim != 2 or waves.shape[1] != spec.clip_samples:
        shape = list(waves.shape) if isinstance(waves, np.ndarray) else type(waves).__name__
        raise InputError("audio waveforms", got=shape, expected=f"float32 [N, {spec.clip_samples}]",
                         todo=f"send mono clips of {spec.clip_samples} samples at {spec.sample_rate} Hz, or WAV files")
    if not np.isfinite(waves).all():
        raise InputError("audio waveforms", got="NaN or infinite samples", expected="finite samples")
    return np.ascontiguousarray(waves, np.float32)


@dataclass(frozen=True)
class AudioDataset:
    """A read audio data set: the kept clips and what was left out, with the reason."""

    root: Path
    classes: tuple[str, ...]
    sources: tuple[str, ...]
    labels: tuple[int, ...]
    shas: tuple[str, ...]  #: sha256 of each kept file's bytes
    waves: np.ndarray  #: float32 [N, clip_samples]
    skipped: tuple[tuple[str, str], ...]


def is_audio_dataset(path: str | os.PathLike[str]) -> bool:
    """Class folders whose files are mostly ``.wav`` (a stray README beside them does not matter)."""
    path = Path(path)
    if not path.is_dir():
        return False
    wavs = others = 0
    for name in class_folders(path):
        for f in (path / name).rglob("*"):
            if f.is_file() and not f.name.startswith("."):
                wavs, others = (wavs + 1, others) if f.suffix.lower() in AUDIO_EXTENSIONS else (wavs, others + 1)
    return wavs > 0 and wavs >= others


def read_audio_dataset(path: str | os.PathLike[str], spec: AudioSpec) -> AudioDataset:
    """Read a folder of class folders of WAV files; never raises for one bad file (it is skipped, with why)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError("audio data set", got=str(root), expected="a folder of class folders of .wav files",
                        todo="check the path")
    classes = class_folders(root)
    sources, labels, shas, waves, skipped = [], [], [], [], []
    seen: set[str] = set()
    for label, name in enumerate(classes):
        for f in sorted(p for p in (root / name).rglob("*") if p.is_file() and not p.name.startswith(".")):
            if f.suffix.lower() not in AUDIO_EXTENSIONS:
                skipped.append((str(f), "not a WAV file (.wav)"))
                continue
            try:
                data = f.read_bytes()
                wave = decode_wav(data, spec, str(f))
            except InputError as exc:
                skipped.append((str(f), str(exc.got) if getattr(exc, "got", None) else str(exc)))
                continue
            except OSError as exc:
                skipped.append((str(f), f"unreadable ({exc.strerror or exc})"))
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:
                skipped.append((str(f), "duplicate of another file"))
                continue
            seen.add(sha)
            sources.append(str(f))
            labels.append(label)
            shas.append(sha)
            waves.append(wave)
    kept = sorted(set(labels))
    if len(kept) < 2:
        raise DataError("audio data set", got=f"{len(kept)} class(es) with usable .wav files in {root}",
                        expected="at least 2 class folders of WAV files", todo="add recordings of more words")
    empty = [classes[i] for i in range(len(classes)) if i not in kept]
    if empty:
        raise DataError("audio data set", got=f"no usable WAV file in {', '.join(empty)}",
                        expected="every class folder with recordings", todo="add recordings or remove the folder")
    stacked = np.stack(waves) if waves else np.zeros((0, spec.clip_samples), np.float32)
    return AudioDataset(root, tuple(classes), tuple(sources), tuple(labels), tuple(shas), stacked, tuple(skipped))
