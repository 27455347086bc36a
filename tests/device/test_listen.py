"""``device listen`` (issue 26 acceptance 3), torch-free: words spotted in a 60 s recording built here from
spoken14 test clips (unseen voices) between quiet and noise; uncertain windows reach the review queue; bad
input is a one-line error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgexfer.runtime.device import Device
from edgexfer.runtime.review import ReviewQueue

sf = pytest.importorskip("soundfile")
sys.path.insert(0, str(Path(__file__).parent))
from listen_support import RATE, build_recording, score  # noqa: E402

NEW_WORD = "zero"  # the device audio bundle is trained without it (tests/conftest.py AUDIO_NEW_WORD)
#: the recording's seed: not one listen's defaults were tuned on (101-120) nor one of docs/audio.md's figures (1-10)
SEED = 2026


def _listen(state: Path, wav: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgexfer.cli", "device", "listen", "--state", str(state),
                           "--file", str(wav), *args], capture_output=True, text=True, timeout=300)


def _invoke(state: Path, wav: Path, *args: str):
    """The same command in this process (click's runner): no interpreter start, for the small tests."""
    from click.testing import CliRunner

    from edgexfer.cli import main

    return CliRunner().invoke(main, ["device", "listen", "--state", str(state), "--file", str(wav), *args])


@pytest.fixture(scope="module")
def listening(tmp_path_factory, device_audio_bundle) -> Path:
    state = tmp_path_factory.mktemp("listen") / "state"
    with Device(state) as dev:
        dev.install(device_audio_bundle)
    return state


def test_acceptance_3_words_found_in_a_long_recording(listening, spoken14, tmp_path):
    """>= 90 % of the placed words found (right label, within 0.5 s), at most 1 false detection a minute, on one
    60 s recording (18 words; docs/audio.md: 10 of 10 other seeds within the acceptance).

    The words are clips the device classifies right when it hears them alone (of the first 6 of each word):
    this measures finding words in a stream, not the head's accuracy on unseen voices, which is acceptance 1's
    (0.867 on these clips; docs/audio.md has listen's figures on all clips too)."""
    test = spoken14 / "test"
    words = sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != NEW_WORD)
    files = [f for w in words for f in sorted((test / w).glob("*.wav"))[:6]]
    with Device(listening) as dev:
        alone = dev.predict(files, top_k=1)
    usable = {str(f) for f, r in zip(files, alone) if getattr(r, "label", None) == f.parent.name}
    audio, placed = build_recording(test, words, SEED, usable=usable)
    wav = tmp_path / "long.wav"
    sf.write(str(wav), audio, RATE, subtype="PCM_16")
    proc = _listen(listening, wav)
    assert proc.returncode == 0, proc.stderr
    detections = [json.loads(line) for line in proc.stdout.splitlines()]
    found, false_per_minute, notes = score(detections, placed, len(audio) / RATE)
    print(proc.stderr.strip(), f"found {found:.3f}, {false_per_minute:.2f} false a minute", *notes, sep="\n")
    assert len(audio) == 60 * RATE and len(placed) == 18
    assert found >= 0.9 and false_per_minute <= 1.0, notes
    assert all({"label", "confidence", "time", "start", "end"} <= d.keys() and d["start"] <= d["time"] <= d["end"]
               for d in detections)


def test_sound_events_are_bursts_not_steady_noise_and_memory_stays_bounded():
    """The gate alone (no engine): 0.4 s tone bursts over a -60 dBFS hiss, one inside 30 s of -40 dBFS noise,
    are five events at their centres; the noise's edges are none (the louder side's floor); fed 2 s at a time
    over 120 s, the finder keeps a bounded number of frames, not the recording's."""
    from edgexfer.runtime.listen import EventFinder, frame_db

    rng = np.random.default_rng(3)
    audio = rng.standard_normal(120 * RATE).astype(np.float32) * 1e-3
    audio[30 * RATE:60 * RATE] += rng.standard_normal(30 * RATE).astype(np.float32) * 1e-2
    centres = (5.2, 15.2, 40.2, 80.2, 100.2)
    for c in centres:
        at = int((c - 0.2) * RATE)
        audio[at:at + int(0.4 * RATE)] += 0.1 * np.sin(2 * np.pi * 440 * np.arange(int(0.4 * RATE)) / RATE)
    finder = EventFinder(guard=50, ctx=150, gate_db=10, bridge=30, max_len=200, min_len=5, frame_s=0.01,
                         peak_db=14)
    events, held = [], 0
    for start in range(0, len(audio), 2 * RATE):
        finder.push(frame_db(audio[start:start + 2 * RATE], RATE // 100))
        events += finder.decide(ended=start + 2 * RATE >= len(audio))
        held = max(held, len(finder.db))
    assert [round(e.centre, 1) for e in events] == list(centres), events
    assert held <= 2 * (50 + 150) + 200 + 200, held  # context both sides, the longest event, a chunk


def test_uncertain_windows_go_to_the_review_queue_and_silence_never(listening, spoken14, tmp_path):
    """At --threshold 1 every window loud enough to be classified is uncertain: a few reach the queue (one per
    --review-gap, as WAV clips of one window at the bundle's rate), the quiet ones none. The file is 44.1 kHz
    stereo: it is mixed and resampled as it is read."""
    clip, _ = sf.read(str(sorted((spoken14 / "test" / "yes").glob("*.wav"))[0]), dtype="float32")
    rng = np.random.default_rng(0)
    quiet = rng.standard_normal(RATE * 3).astype(np.float32) * 1e-3
    mono = np.concatenate([quiet, clip, quiet, clip, quiet, clip, quiet])
    import soxr

    stereo = np.stack([soxr.resample(mono, RATE, 44100)] * 2, axis=1)
    wav = tmp_path / "three-words.wav"
    sf.write(str(wav), stereo, 44100, subtype="PCM_16")
    with ReviewQueue(listening / "features.sqlite") as queue:
        before = {e.id for e in queue.entries(1000)}
    proc = _invoke(listening, wav, "--threshold", "1", "--review-gap", "3")
    assert proc.exit_code == 0, proc.stderr
    with ReviewQueue(listening / "features.sqlite") as queue:
        new = [e for e in queue.entries(1000) if e.id not in before]
        samples = [queue.sample(e.id) for e in new]
    assert 1 <= len(new) <= 3, (len(new), proc.stderr)  # three words 4 s apart, one entry a 3 s gap at most
    assert all(e.source.startswith(f"listen:{wav}@") for e in new)
    for data, media in samples:
        wave, rate = sf.read(__import__("io").BytesIO(data), dtype="float32")
        assert media == "audio/wav" and rate == RATE and len(wave) == RATE
    times = sorted(float(e.source.rsplit("@", 1)[1].rstrip("s")) for e in new)
    words_at = [3 + i * 4 for i in range(3)]  # the clips' starts, seconds
    assert all(any(w - 1 <= t <= w + 1 for w in words_at) for t in times), times  # no window of the quiet


def test_bad_input_is_a_one_line_error(listening, tmp_path, device_bundle, monkeypatch):
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a recording\n")
    cut = tmp_path / "cut.wav"
    cut.write_bytes(b"RIFF\xff\xff\x00\x00WAVEfmt ")
    image_state = tmp_path / "image-state"
    with Device(image_state) as dev:
        dev.install(device_bundle)
    silent = tmp_path / "silence.wav"
    sf.write(str(silent), np.zeros(RATE, np.float32), RATE)
    for state, wav, says in ((listening, tmp_path / "missing.wav", "no such file"), (listening, not_audio,
                             "not a WAV file"), (listening, cut, "unreadable WAV"),
                             (image_state, silent, "a bundle whose modality listens")):
        proc = _invoke(state, wav)
        lines = proc.stderr.strip().splitlines()
        assert proc.exit_code != 0 and len(lines) == 1 and says in lines[0] and lines[0].count(" | ") == 3, \
            proc.stderr
        assert proc.stdout == ""
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # no PortAudio: a microphone is a one-line error
    from click.testing import CliRunner

    from edgexfer.cli import main

    proc = CliRunner().invoke(main, ["device", "listen", "--state", str(listening)])
    assert proc.exit_code != 0 and proc.stderr.count("\n") == 1 and "pip install sounddevice" in proc.stderr
