"""``edgexfer device listen``: spot words and sounds in a long recording or a live microphone (docs/audio.md).

The audio is read in chunks (a WAV file through soundfile, a microphone through PortAudio's ``sounddevice``,
optional), mixed to mono and resampled to the bundle's rate (soxr, streaming), and cut into windows of
``window`` seconds every ``hop`` seconds. Memory is bounded by the chunk, the window and the batch, never by the
recording's length. Three steps turn windows into detections:

1. **Gate.** A window's loudness is the 90th percentile of its 10 ms frame energies (dBFS); its *noise floor* is
   the 30th percentile of the frame energies of the ``context`` seconds before it and of those after it, the
   louder of the two (the edge of a stretch of steady noise is measured against the noise), never below -80
   dBFS. A window is classified only if it is ``gate_db`` above its floor and the centre of its energy above
   the floor lies within ``centre`` of its middle (a window holding a word's edge or a clip's noise tail is
   not a word). Quiet and steady noise are never classified, detected or queued for review; the gated-in
   windows reach the engine in batches of the modality's batch size.
2. **Grouping.** Overlapping classified windows of the same top label form a group; a group with
   ``min_windows`` windows whose best window reaches ``threshold`` may be a detection (a word is heard whole in
   several overlapping windows, a click in one). A window below ``threshold`` is *uncertain*.
3. **Non-maximum suppression over time.** Of overlapping groups of different labels (half the shorter span
   shared) the one with the larger score (its windows' probability times dB above the floor, summed) is kept.
   Each kept group is one detection: its first window's start, its last window's end, its time (the
   score-weighted mean of its windows' centres) and its best window's probability.

Uncertain windows that overlap no detection go to the device's review queue (the window as a 16-bit WAV,
source ``listen:<name>``), at most one every ``review_gap`` seconds and ``review_max`` per run, so a noisy room
cannot flood it. Labels named in ``ignore`` (a "background" class a device learned, say) are never reported.
No torch here; soundfile and soxr come with the ``audio`` extra, ``sounddevice`` only for a microphone.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.audio import fit_clip, is_wav
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.optional import require

__all__ = ["Detection", "Listen", "ListenOptions", "ListenSummary", "listen"]

log = logging.getLogger("edgexfer.listen")

FRAME_S = 0.010  #: the gate's energy frames
FLOOR_PERCENTILE = 30  #: of a window's context's frame energies: its noise floor (docs/audio.md: why 30)
FLOOR_MIN_DB = -80.0  #: the noise floor is never taken below this (digital silence would let any hiss in)
_EPS = 1e-10


@dataclass(frozen=True)
class ListenOptions:
    window: float | None = None  #: seconds per window (None: the bundle's clip length)
    hop: float = 0.25  #: seconds between window starts
    threshold: float = 0.6  #: top probability a detection's best window needs
    gate_db: float = 10.0  #: dB above the noise floor a window must reach to be classified (0: no gate)
    centre: float = 0.25  #: how far off the window's middle its energy's centre may lie (fraction of the window)
    context: float = 1.5  #: seconds on each side of a window whose quiet part is its noise floor
    min_windows: int = 2  #: windows a detection needs (1: every confident window counts)
    review_gap: float = 5.0  #: seconds between two windows queued for review at least
    review_max: int = 20  #: windows queued for review per run at most (0: none)
    ignore: tuple[str, ...] = ()  #: labels never reported (a learned "background" class)
    chunk_seconds: float = 2.0  #: audio read at a time
    max_seconds: float | None = None  #: stop after this much audio
    backend: str = "auto"
    precision: str = "fp32"

    def check(self) -> None:
        for name, low, high in (("window", 0.05, 60.0), ("hop", 0.01, 60.0), ("threshold", 0.0, 1.0),
                                ("gate_db", 0.0, 120.0), ("context", 0.1, 30.0), ("centre", 0.0, 0.5),
                                ("review_gap", 0.0, 86400.0), ("chunk_seconds", 0.05, 60.0)):
            value = getattr(self, name)
            if value is None and name == "window":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InputError(f"listen --{name.replace('_', '-')}", got=repr(value), expected=f"{low:g}..{high:g}")
        for name in ("min_windows", "review_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "min_windows" else 0):
                raise InputError(f"listen --{name.replace('_', '-')}", got=repr(value), expected="a whole number >= 1"
                                 if name == "min_windows" else "a whole number >= 0")


@dataclass(frozen=True)
class Detection:
    """One word or sound heard: one JSON line of ``device listen``."""

    label: str
    confidence: float  #: the peak window's top probability
    time: float  #: seconds from the start: score-weighted mean of the group's window centres
    start: float  #: the first window's start
    end: float  #: the last window's end
    windows: int  #: windows merged into it
    head: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "confidence": round(self.confidence, 6), "time": round(self.time, 3),
                "start": round(self.start, 3), "end": round(self.end, 3), "windows": self.windows, "head": self.head}


@dataclass
class ListenSummary:
    source: str
    seconds_heard: float = 0.0  #: audio read
    windows: int = 0
    classified: int = 0  #: windows through the gate
    detections: int = 0
    queued: int = 0
    floor_db: float | None = None  #: the last window's noise floor
    seconds: float = 0.0  #: wall clock
    stopped: str = ""

    def line(self) -> str:
        floor = "" if self.floor_db is None else f", noise floor {self.floor_db:.1f} dBFS"
        return (f"listen {self.source}: {self.seconds_heard:.1f} s of audio, {self.windows} window(s), "
                f"{self.classified} above the gate, {self.detections} detection(s), {self.queued} queued for "
                f"review{floor}, {self.seconds:.1f} s ({self.stopped or 'running'})")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("source", "seconds_heard", "windows", "classified", "detections",
                                              "queued", "floor_db", "seconds", "stopped")}


# ------------------------------------------------------------------------------------------ sources
def _file_chunks(path: Path, rate: int, chunk_s: float, stop: threading.Event) -> Iterator[np.ndarray]:
    """A WAV file as float32 mono chunks at ``rate``."""
    name = str(path)
    check_file(path)
    sf = require("soundfile", "reading WAV files")
    try:
        sound = sf.SoundFile(str(path))
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError for a bad file
        raise InputError("listen --file", got=f"{name}: unreadable WAV ({type(exc).__name__})",
                         expected="a complete WAV file", todo="record or export it again") from None
    with sound:
        if sound.frames == 0:
            raise InputError("listen --file", got=f"{name}: a WAV file without samples", expected="a recording",
                             todo="record it again")
        stream = None
        if sound.samplerate != rate:
            soxr = require("soxr", "resampling audio")
            stream = soxr.ResampleStream(sound.samplerate, rate, 1, dtype="float32", quality="HQ")
        block = max(1, int(chunk_s * sound.samplerate))
        while not stop.is_set():
            try:
                data = sound.read(block, dtype="float32", always_2d=True)
            except Exception as exc:  # noqa: BLE001 - a file cut in the middle
                raise InputError("listen --file", got=f"{name}: unreadable after {sound.tell()} frames "
                                 f"({type(exc).__name__})", expected="a complete WAV file",
                                 todo="record or export it again") from None
            last = len(data) < block
            mono = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
            if not np.isfinite(mono).all():
                raise InputError("listen --file", got=f"{name}: NaN or infinite samples", expected="finite samples",
                                 todo="export it again")
            if stream is not None:
                mono = stream.resample_chunk(mono, last=last)
            if len(mono):
                yield np.ascontiguousarray(mono, np.float32)
            if last:
                return


def check_file(path: Path) -> None:
    """A file ``device listen`` can read: one that exists and starts like a WAV file (else one-line InputError)."""
    if not path.is_file():
        raise InputError("listen --file", got=f"{path} ({'a directory' if path.is_dir() else 'no such file'})",
                         expected="a WAV file", todo="check the path")
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as exc:
        raise InputError("listen --file", got=f"{path} ({exc.strerror or exc})", expected="a readable WAV file",
                         todo="check its permissions") from None
    if not is_wav(head):
        raise InputError("listen --file", got=f"{path} is not a WAV file", expected="a WAV file (RIFF/WAVE)",
                         todo="convert it to WAV (e.g. sox in.mp3 -r 16000 -c 1 out.wav)")


def sounddevice() -> Any:
    """The optional ``sounddevice`` module (PortAudio), or a one-line InputError saying what to install."""
    try:
        import sounddevice as sd  # PortAudio; on Linux it needs the system's libportaudio2
    except (ImportError, OSError) as exc:
        raise InputError("listen needs sounddevice (PortAudio) for a microphone",
                         got=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'not importable'}",
                         expected="sounddevice importable with PortAudio",
                         todo="pip install sounddevice (and apt install libportaudio2), or pass --file") from None
    return sd


def _mic_chunks(device: str | int | None, rate: int, chunk_s: float, stop: threading.Event) -> Iterator[np.ndarray]:
    """A microphone through PortAudio (``sounddevice``) as float32 mono chunks at ``rate``."""
    sd = sounddevice()
    try:
        info = sd.query_devices(device, "input")
        native = int(info["default_samplerate"])
        stream_in = sd.InputStream(samplerate=native, channels=1, dtype="float32", device=device,
                                   blocksize=max(1, int(chunk_s * native)))
    except Exception as exc:  # noqa: BLE001 - PortAudioError, ValueError for an unknown device
        raise InputError("cannot open the microphone", got=f"{device if device is not None else 'default'} "
                         f"({type(exc).__name__})", expected="an input device PortAudio lists",
                         todo="list them with: python -m sounddevice") from None
    resampler = None
    if native != rate:
        resampler = require("soxr", "resampling audio").ResampleStream(native, rate, 1, dtype="float32", quality="HQ")
    with stream_in:
        while not stop.is_set():
            data, overflowed = stream_in.read(max(1, int(chunk_s * native)))
            if overflowed:
                log.warning("the microphone overflowed: some audio was lost")
            mono = np.ascontiguousarray(data[:, 0], np.float32)
            yield resampler.resample_chunk(mono) if resampler is not None else mono


def encode_wav(wave: np.ndarray, rate: int) -> bytes:
    """A float32 waveform as a 16-bit PCM WAV file's bytes (what the review queue keeps)."""
    sf = require("soundfile", "writing WAV files")
    out = io.BytesIO()
    sf.write(out, np.clip(wave, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return out.getvalue()


# ------------------------------------------------------------------------------------------ the gate
def frame_db(wave: np.ndarray, frame: int) -> np.ndarray:
    """Mean-square energy in dBFS of each whole ``frame``-sample frame of ``wave``."""
    n = len(wave) // frame
    if n == 0:
        return np.zeros(0, np.float32)
    power = np.mean(np.square(wave[:n * frame].reshape(n, frame), dtype=np.float64), axis=1)
    return (10.0 * np.log10(power + _EPS)).astype(np.float32)


def noise_floor(left: np.ndarray, right: np.ndarray, frame: int) -> float:
    """A window's noise floor: the louder of the FLOOR_PERCENTILE-th percentiles of the frame energies before
    and after it (a side without audio is left out), never below FLOOR_MIN_DB. The louder side, so that the edge of a
    stretch of steady noise (quiet before, noise after) is measured against the noise, not the quiet."""
    floors = [float(np.percentile(db, FLOOR_PERCENTILE))
              for db in (frame_db(left, frame), frame_db(right, frame)) if len(db)]
    return max([FLOOR_MIN_DB, *floors])


# ------------------------------------------------------------------------------------------ merging
@dataclass
class _Group:
    """Overlapping classified windows of one top label."""

    label: str
    start: float
    end: float
    peak: float  #: the highest top probability of its windows
    score: float = 0.0  #: the sum of its windows' weights (probability times dB above the floor)
    weights: list[float] = field(default_factory=list)
    centres: list[float] = field(default_factory=list)

    def overlaps(self, other: _Group) -> bool:
        """At least half of the shorter group's span is shared."""
        shared = min(self.end, other.end) - max(self.start, other.start)
        return shared > 0 and shared >= 0.5 * min(self.end - self.start, other.end - other.start)

    def detection(self, head: int) -> Detection:
        w = np.asarray(self.weights)
        return Detection(self.label, self.peak, float(np.dot(w, self.centres) / w.sum()), self.start, self.end,
                         len(self.weights), head)


class Merger:
    """Non-maximum suppression over time: candidate windows (in time order) -> one detection per word.

    A group is decided once no group still open overlaps it (a rival's peak can still rise while it is open);
    it is kept if it has ``min_windows`` windows and no overlapping group of another label with as many has a
    higher peak.
    """

    def __init__(self, min_windows: int, threshold: float = 0.0) -> None:
        self.min_windows = min_windows
        self.threshold = threshold
        self._open: dict[str, _Group] = {}  #: the latest group of each label
        self._closed: list[_Group] = []  #: finished, not decided yet
        self._decided: deque[_Group] = deque(maxlen=64)  #: recent decided groups: rivals of later ones
        self.kept: deque[tuple[float, float]] = deque(maxlen=64)  #: (start, end) of emitted detections

    def add(self, label: str, start: float, end: float, confidence: float, margin_db: float = 1.0) -> None:
        """A candidate window (in time order): its label, span, top probability and loudness above the floor."""
        g = self._open.get(label)
        if g is not None and start < g.end:
            g.end = end
            g.peak = max(g.peak, confidence)
        else:
            if g is not None:
                self._closed.append(g)
            g = self._open[label] = _Group(label, start, end, confidence)
        g.weights.append(confidence * max(margin_db, 1e-3))
        g.score += g.weights[-1]
        g.centres.append((start + end) / 2)

    def flush(self, now: float | None, head: int) -> list[Detection]:
        """The groups that can be decided once every window starting before ``now`` (None: all) was added,
        kept ones as detections in time order."""
        for label, g in list(self._open.items()):
            if now is None or g.end <= now:
                self._closed.append(self._open.pop(label))
        ready = [g for g in self._closed if not any(r.start < g.end for r in self._open.values())]
        self._closed = [g for g in self._closed if g not in ready]
        rivals = [r for r in [*ready, *self._closed, *self._decided] if self._valid(r)]
        out = []
        for g in sorted(ready, key=lambda g: g.start):
            if self._valid(g) and not any(
                    r is not g and r.label != g.label and r.score > g.score and r.overlaps(g) for r in rivals):
                out.append(g)
                self.kept.append((g.start, g.end))
        self._decided.extend(ready)
        return [g.detection(head) for g in out]

    def _valid(self, g: _Group) -> bool:
        return len(g.weights) >= self.min_windows and g.peak >= self.threshold

    def overlaps_detection(self, start: float, end: float) -> bool:
        """Whether [start, end) overlaps a detection emitted or a group that may become one."""
        return any(s < end and start < e for s, e in self.kept) or any(
            g.start < end and start < g.end and self._valid(g) for g in [*self._closed, *self._open.values()])


# ------------------------------------------------------------------------------------------ the run
class Listen:
    """Iterate for :class:`Detection` s; :meth:`stop` (any thread, a signal handler) ends after the current chunk."""

    def __init__(self, state: str | Path | None, file: str | Path | None = None, *, mic: str | int | None = None,
                 options: ListenOptions | None = None) -> None:
        self.options = options or ListenOptions()
        self.options.check()
        self.state = state
        self.file = None if file is None else Path(file)
        if self.file is not None:  # at once, before the engine is opened
            check_file(self.file)
        else:
            sounddevice()
        self.mic = mic
        self.summary = ListenSummary(str(self.file) if self.file is not None else f"microphone {mic or 'default'}")
        self._stop = threading.Event()
        self._last_queued = -np.inf
        self._pending: list[tuple[float, float, np.ndarray, np.ndarray, list[str], int]] = []

    def stop(self) -> None:
        self._stop.set()

    # long: opening the core, the chunk loop (windows, gate, batches, merging) and the one cleanup in `finally`
    # belong to one try block: a generator's cleanup must see every resource it opened
    def __iter__(self) -> Iterator[Detection]:
        from edgexfer.runtime.service.core import ServiceConfig, ServiceCore

        o, summary = self.options, self.summary
        started = time.monotonic()
        core = None
        try:
            core = ServiceCore(self.state, ServiceConfig(backend=o.backend, precision=o.precision))
            model = core.open()
            modality = model.input_modality
            if not modality.listens:
                raise InputError("device listen classifies audio", got=f"the active bundle {model.name} reads "
                                 f"{modality.plural}", expected="a bundle whose modality listens (audio)",
                                 todo="install an audio bundle (edgexfer train DIR --backbone speech_embedding)")
            rate, clip = modality.preprocess.sample_rate, modality.preprocess.clip_samples
            win = int(round((o.window if o.window is not None else clip / rate) * rate))
            hop = max(1, int(round(o.hop * rate)))
            if hop > win:
                raise InputError("listen --hop", got=f"{o.hop:g} s, longer than the window ({win / rate:g} s)",
                                 expected="a hop no longer than the window", todo="pass a smaller --hop")
            frame = max(1, int(round(FRAME_S * rate)))
            chunks = (_file_chunks(self.file, rate, o.chunk_seconds, self._stop) if self.file is not None
                      else _mic_chunks(self.mic, rate, o.chunk_seconds, self._stop))
            ctx = int(round(o.context * rate))
            merger = Merger(o.min_windows, o.threshold)
            media = modality.service_input().media_type or "application/octet-stream"
            buf = np.zeros(0, np.float32)
            buf_at = 0  #: sample index of buf[0]: the next window's left context starts there or later
            next_start = 0  #: sample index of the next window
            batch: list[tuple[int, np.ndarray, float]] = []
            ended = False
            while not ended:
                chunk = next(chunks, None)
                if chunk is None or self._stop.is_set():
                    ended = True
                else:
                    keep = max(buf_at, next_start - ctx)
                    buf = np.concatenate([buf[keep - buf_at:], chunk])
                    buf_at = keep
                    summary.seconds_heard += len(chunk) / rate
                    if o.max_seconds is not None and summary.seconds_heard >= o.max_seconds:
                        ended = True
                end = buf_at + len(buf)
                # a window waits for its right context (ctx samples after it), except at the end
                while next_start + win + (0 if ended else ctx) <= end or (ended and next_start < end
                                                                         and summary.windows == 0):
                    at = next_start - buf_at
                    wave = buf[at:at + win]
                    summary.windows += 1
                    floor = noise_floor(buf[max(0, at - ctx):at], buf[at + win:at + win + ctx], frame)
                    summary.floor_db = round(floor, 1)
                    margin = _loudness(wave, frame) - floor
                    if o.gate_db <= 0 or (margin >= o.gate_db and off_centre(wave, frame, floor) <= o.centre):
                        batch.append((next_start, fit_clip(wave, clip), margin))
                    next_start += hop
                    if len(batch) >= modality.batch_size:
                        yield from self._run(core, batch, merger, rate, win, media, next_start / rate)
                        batch = []
                # every chunk ends with its windows classified and the words that ended announced (a microphone's
                # latency: a chunk and a window)
                now = None if ended else next_start / rate
                if batch:
                    yield from self._run(core, batch, merger, rate, win, media, now)
                    batch = []
                else:
                    for d in merger.flush(now, model.head_version):
                        summary.detections += 1
                        yield d
                    self._review(core, merger, rate, win, media, now)
            summary.stopped = "stopped" if self._stop.is_set() else (
                "max seconds" if o.max_seconds is not None and summary.seconds_heard >= o.max_seconds else "end of file")
        except GeneratorExit:
            summary.stopped = summary.stopped or "closed"
            raise
        except BaseException:
            summary.stopped = summary.stopped or "error"
            raise
        finally:
            if core is not None:
                core.close()
            summary.seconds = time.monotonic() - started

    def _run(self, core: Any, batch: list[tuple[int, np.ndarray, float]], merger: Merger, rate: int, win: int,
             media: str, now: float | None) -> Iterator[Detection]:
        """Classify one batch of gated windows, merge the confident ones, queue uncertain ones for review."""
        o = self.options
        result = core.classify_now(np.stack([w for _, w, _ in batch]))
        self.summary.classified += len(batch)
        for (start, wave, margin), row in zip(batch, result.probabilities):
            j = int(np.argmax(row))
            label, p = result.classes[j], float(row[j])
            t0, t1 = start / rate, (start + win) / rate
            if label in o.ignore:
                continue
            merger.add(label, t0, t1, p, margin)
            if p < o.threshold and self.summary.queued + len(self._pending) < o.review_max:
                self._pending.append((t0, t1, wave, row, result.classes, result.head_version))
        for d in merger.flush(now, result.head_version):
            self.summary.detections += 1
            yield d
        self._review(core, merger, rate, win, media, now)

    def _review(self, core: Any, merger: Merger, rate: int, win: int, media: str, now: float | None) -> None:
        """Queue the uncertain windows no detection can overlap any more (decided a window after their end)."""
        o, keep = self.options, []
        for item in self._pending:
            t0, t1, wave, row, classes, head = item
            if now is not None and now < t1 + win / rate:
                keep.append(item)
                continue
            if self.summary.queued >= o.review_max or t0 - self._last_queued < o.review_gap \
                    or merger.overlaps_detection(t0, t1):
                continue  # the cap, or the edge of a word that was detected
            order = np.argsort(-row)[:3]
            top_k = [{"label": classes[k], "probability": round(float(row[k]), 6)} for k in order]
            data = encode_wav(wave, rate)
            entry = {"sha256": FeatureCache.content_sha256(data), "data": data, "media_type": media,
                     "label": classes[order[0]], "probability": float(row[order[0]]), "top_k": top_k, "head": head,
                     "source": f"listen:{self.summary.source}@{t0:.2f}s"}
            new = core.review_sync(lambda q, entry=entry: q.add(**entry))
            if new is not None:
                self.summary.queued += 1
                self._last_queued = t0
        self._pending = keep


def _loudness(wave: np.ndarray, frame: int) -> float:
    """A window's loudness: the 90th percentile of its frame energies (dBFS)."""
    db = frame_db(wave, frame)
    return float(np.percentile(db, 90)) if len(db) else -200.0


def off_centre(wave: np.ndarray, frame: int, floor_db: float) -> float:
    """How far (a fraction of the window, 0..0.5) the centre of the window's energy above the floor lies from its
    middle: a word heard whole is near the middle of some window; a window that holds only its edge (or the
    edge of a stretch of noise) has its energy at one end."""
    db = frame_db(wave, frame)
    above = np.clip(np.power(10.0, db / 10.0) - 10.0 ** (floor_db / 10.0), 0.0, None)
    if len(db) == 0 or above.sum() <= 0:
        return 0.5
    return float(abs(np.dot(above, np.arange(len(db)) + 0.5) / above.sum() / len(db) - 0.5))


def listen(state: str | Path | None, file: str | Path | None = None, **options: Any) -> Listen:
    """A :class:`Listen` of ``file`` (None: the microphone ``mic``) with the device in ``state``."""
    mic = options.pop("mic", None)
    return Listen(state, file, mic=mic, options=ListenOptions(**options))
