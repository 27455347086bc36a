"""Audio: WAV files, decoded, mixed to mono, resampled and fitted to the backbone's clip (:mod:`edgexfer.runtime.audio`).

A sample's identity is the sha256 of its file's bytes (the cache keeps those bytes); its value is its float32
``[clip_samples]`` waveform. An in-memory array is taken as one waveform already at the bundle's rate and length.
The engine's feed is a float32 ``[N, clip_samples]`` batch named ``waveform``; the mel front end, the embedding
windows and the pooling are inside ``backbone.onnx``.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgexfer.runtime.audio import AUDIO_EXTENSIONS, AudioInputSpec, check_waves, decode_wav, is_wav
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.modalities.base import Modality, Sample, ServiceInput, read_bytes


class AudioModality(Modality):
    name = "audio"
    noun = "audio clip"
    plural = "audio clips"
    input_spec = AudioInputSpec
    batch_size = 16
    listens = True
    calibration_loader = "edgexfer.converters.calibration:load_audio_calibration"
    file_suffixes = tuple(sorted(AUDIO_EXTENSIONS))
    dataset_help = "a folder per class of .wav files"

    def __init__(self, backbone: Any, root=None):
        super().__init__(backbone, root)
        self._spec = backbone.input.spec()

    @property
    def preprocess(self):
        return self._spec

    def read(self, item: Any, source: str) -> Sample:
        if isinstance(item, np.ndarray):
            wave = check_waves(item.reshape(1, -1) if item.ndim == 1 else item, self._spec)
            if len(wave) != 1:
                raise InputError(f"audio {source}", got=f"{len(wave)} waveforms", expected="one waveform per sample")
            return Sample(hashlib.sha256(wave.tobytes()).hexdigest(), None, wave[0], source)
        try:
            data = read_bytes(item, f"audio {source}")
        except OSError as exc:
            raise InputError(f"cannot read file {source}", got=exc.strerror or str(exc),
                             expected="a readable WAV file", todo="check the path and its permissions") from None
        return Sample(hashlib.sha256(data).hexdigest(), data, decode_wav(data, self._spec, source), source)

    def decode(self, data: bytes, source: str, max_pixels: int | None = None) -> np.ndarray:
        return decode_wav(data, self._spec, source)

    def stored_value(self, data: bytes) -> np.ndarray | None:
        if not is_wav(data):
            return None  # another modality's sample (an image kept before this bundle was installed)
        try:
            return decode_wav(data, self._spec)
        except InputError:
            return None

    def accepts_stored(self, data: bytes) -> bool:
        return is_wav(data)

    def describe(self, value: np.ndarray) -> str:
        return f"{len(value) / self._spec.sample_rate:.2f} s of audio"

    def service_input(self) -> ServiceInput:
        return ServiceInput(({"name": "audio", "datatype": "BYTES", "shape": [-1]},),
                            expected="the input 'audio' (BYTES: WAV files)", datatype="BYTES (WAV files)",
                            sample="a WAV file", media_type="audio/wav", title="Classify a sound",
                            accept=".wav,audio/wav", shown_as="audio",
                            record_s=self._spec.clip_samples / self._spec.sample_rate)

    def feed(self, values: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        if isinstance(values, np.ndarray) and values.ndim == 2:
            return check_waves(values, self._spec)
        return np.ascontiguousarray(np.stack([np.asarray(v, np.float32) for v in values]))

    def golden_feed(self, golden: dict[str, np.ndarray]) -> np.ndarray:
        return check_waves(golden["waveform"].astype(np.float32), self._spec)

    def engine_shapes(self, batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        return {"waveform": tuple((n, self._spec.clip_samples) for n in batch)}
