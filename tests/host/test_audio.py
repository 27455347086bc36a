"""Audio as the third modality (issue 26): the composed speech_embedding graph, WAV reading, acceptance 1."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("soundfile")

from edgexfer.runtime.audio import AudioSpec, read_audio_dataset  # noqa: E402


def test_composed_graph_matches_the_two_models_run_separately():
    """One graph: waveform -> mel -> windows -> mean+max, equal to the two original models run one clip at a
    time, on a batch of clips of very different loudness (the mel graph's dB floor must be per clip)."""
    import onnxruntime as ort

    from edgexfer.backbones import get_config
    from edgexfer.backbones import speech_embedding as se

    cfg = get_config("speech_embedding")
    model = se.compose(*se.model_paths(cfg), cfg.clip_samples)
    assert [i.name for i in model.graph.input] == ["waveform"] and [o.name for o in model.graph.output] == ["features"]
    waves = se.test_waves(cfg.clip_samples, count=4)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"waveform": waves})[0]
    ref = se.reference(cfg)(waves)
    assert got.shape == (4, 192)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
    # one clip alone gives the same features as in the batch (nothing is shared across the batch)
    alone = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"waveform": waves[2:3]})[0]
    np.testing.assert_allclose(alone[0], got[2], atol=1e-5)


def _write(path, wave, rate=16000, channels=1):
    import soundfile as sf

    data = np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave
    sf.write(str(path), data, rate, subtype="PCM_16")


def test_bad_audio_files_are_reported_and_skipped_one_line_each(tmp_path):
    rng = np.random.default_rng(0)
    for word in ("yes", "no"):
        (tmp_path / word).mkdir()
        for i in range(2):
            _write(tmp_path / word / f"{i}.wav", 0.2 * rng.standard_normal(16000).astype(np.float32))
    # a stereo 8 kHz clip of 0.5 s is fine: mixed to mono, resampled, padded
    _write(tmp_path / "yes" / "stereo8k.wav", 0.2 * rng.standard_normal(4000).astype(np.float32), 8000, 2)
    (tmp_path / "yes" / "empty.wav").write_bytes(b"")
    _write(tmp_path / "yes" / "silent.wav", np.zeros(16000, np.float32))
    (tmp_path / "no" / "notes.txt").write_text("not audio")
    (tmp_path / "no" / "fake.wav").write_bytes(b"ID3\x03 an mp3 named .wav" * 10)
    good = (tmp_path / "no" / "0.wav").read_bytes()
    (tmp_path / "no" / "cut.wav").write_bytes(good[:30])  # a WAV header cut short
    ds = read_audio_dataset(tmp_path, AudioSpec())
    assert len(ds.sources) == 5 and ds.waves.shape == (5, 16000) and ds.waves.dtype == np.float32
    reasons = {p.split("/")[-1]: why for p, why in ds.skipped}
    assert set(reasons) == {"empty.wav", "silent.wav", "notes.txt", "fake.wav", "cut.wav"}
    assert "empty" in reasons["empty.wav"] and "silence" in reasons["silent.wav"]
    assert "not a WAV" in reasons["notes.txt"] and "not a WAV" in reasons["fake.wav"]
    assert "unreadable" in reasons["cut.wav"]
    assert all("\n" not in why for why in reasons.values())


def _logmel_baseline(train: np.ndarray, train_y, test: np.ndarray, test_y) -> float:
    """Pooled log-mel statistics (40 bands, 25 ms / 10 ms; mean, std, max over time) + logistic regression."""
    from scipy.signal import stft
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def mel_filters(n_fft=400, sr=16000, bands=40):
        mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
        hz = lambda m: 700 * (10 ** (m / 2595) - 1)  # noqa: E731
        edges = hz(np.linspace(mel(20), mel(sr / 2), bands + 2))
        freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
        return np.stack([np.clip(np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)), 0, None)
                         for lo, c, hi in zip(edges, edges[1:], edges[2:])])

    fb = mel_filters()

    def pooled(waves):
        _, _, z = stft(waves, fs=16000, nperseg=400, noverlap=240, axis=-1)
        logmel = np.log(np.einsum("mf,nft->nmt", fb, np.abs(z) ** 2) + 1e-8)
        return np.concatenate([logmel.mean(-1), logmel.std(-1), logmel.max(-1)], axis=1)

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000))
    return float(clf.fit(pooled(train), train_y).score(pooled(test), test_y))


def test_spoken14_frozen_speech_embedding_beats_a_logmel_baseline(audio_bundle, spoken14):
    """Acceptance 1: frozen speech_embedding + linear head >= 0.80 on test/ (unseen voices), >= 25 points above
    pooled log-mel statistics; export's parity held and the bundle is one graph waveform -> features."""
    from edgexfer.evaluate import evaluate

    report = evaluate(audio_bundle, spoken14 / "test", progress=False)
    accuracy = report["accuracy"]
    assert report["unit"] == "audio clips"
    train = read_audio_dataset(spoken14 / "train", AudioSpec())
    test = read_audio_dataset(spoken14 / "test", AudioSpec())
    baseline = _logmel_baseline(train.waves, train.labels, test.waves, test.labels)
    print(f"spoken14 test: speech_embedding {accuracy:.3f}, log-mel baseline {baseline:.3f}")
    assert accuracy >= 0.80 and accuracy - baseline >= 0.25, (accuracy, baseline)
    export_report = json.loads((audio_bundle / "reports" / "export.json").read_text())
    assert export_report["top1_agreement"] == 1.0 and export_report["max_abs_diff"] < 1e-4
    manifest = json.loads((audio_bundle / "manifest.json").read_text())
    assert manifest["backbone"]["modality"] == "audio"
    assert manifest["backbone"]["input"] == {"dtype": "float32", "sample_rate": 16000, "clip_samples": 16000}


def test_bench_samples_of_an_audio_bundle_run_every_layer_alike(audio_bundle):
    """`edgexfer bench`'s audio samples: the golden clips as WAV bytes (end to end) and waveforms (engine layers)
    classify alike; an ONNX-only backbone has no PyTorch eager twin."""
    from edgexfer.modalities import host_modality
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.predictor import Predictor

    modality = host_modality("audio")
    samples = modality.bench_samples(Bundle.open(audio_bundle), None)
    assert samples.pixels.shape == (len(samples.encoded), 16000) and not modality.bench_torch_reference
    with Predictor.from_bundle(audio_bundle, backend="onnxruntime") as predictor:
        probs = predictor.classify_pixels(samples.pixels)
        results = predictor.predict(samples.encoded, top_k=1)
    classes = list(predictor.head.classes)
    assert [r.label for r in results] == [classes[i] for i in probs.argmax(1)]
    assert max(abs(r.probability - float(p.max())) for r, p in zip(results, probs)) < 1e-5


def test_int8_calibration_reads_wav_folders_splits_them_and_streams_the_held_out_clips(audio_bundle, spoken14, tmp_path):
    """`convert --precision int8 --calib` of an audio bundle (it refused audio before: no calibration reader):
    folders named like the head's classes, non-WAV files and a clip filed under two classes reported, the
    calibration clips decoded at once, the held-out ones a batch at a time at the bundle's rate and length."""
    from edgexfer.converters.calibration import load_calibration
    from edgexfer.runtime.bundle import Bundle

    calib = tmp_path / "calib"
    for word in ("yes", "no", "left"):
        (calib / word).mkdir(parents=True)
        for clip in sorted((spoken14 / "test" / word).glob("*.wav"))[:10]:
            (calib / word / clip.name).symlink_to(clip)
    first = sorted((spoken14 / "test" / "yes").glob("*.wav"))[0]
    (calib / "no" / "also-yes.wav").symlink_to(first)  # one recording filed under two classes: dropped
    (calib / "left" / "notes.txt").write_text("not a recording")
    (calib / "hello").mkdir()  # not a class of the head: ignored, and said
    split = load_calibration(Bundle.open(audio_bundle), calib, calib_size=12, seed=0)
    assert split.calibration.pixels.shape == (12, 16000) and split.calibration.pixels.dtype == np.float32
    assert sorted(np.bincount(split.calibration.labels)[np.bincount(split.calibration.labels) > 0]) == [4, 4, 4]
    reasons = dict(split.skipped)
    assert reasons[str(calib / "left" / "notes.txt")] == "not a WAV file (.wav)"
    assert "filed under two classes" in reasons.values() and split.ignored_folders == ("hello",)
    assert len(split.holdout) == 29 - 12  # 30 clips, the doubly filed one out
    seen = 0
    for positions, waves in split.holdout.batches(size=5):
        assert waves.shape == (len(positions), 16000) and len(positions) <= 5
        seen += len(positions)
    assert seen == len(split.holdout) and not split.holdout.skipped
