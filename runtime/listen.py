"""``edgexfer device listen``: spot words and sounds in a long recording or a live microphone (docs/audio.md).

The audio is read in chunks (a WAV file through soundfile, a microphone through PortAudio's ``sounddevice``,
optional), mixed to mono and resampled to the bundle's rate (soxr, streaming). Memory is bounded by the chunk,
the context, the longest event and the batch, never by the recording's length. As a keyword spotter with a
voice activity detector, it finds sound events first and classifies only them, each in windows centred on it:

1. **Gate.** Each 10 ms frame's energy (dBFS) is compared with its *noise floor*: the 30th percentile of the
   frame energies of the ``context`` seconds before it and of those after it (half a window next to the frame
   left out: the word itself), the louder of the two (the edge of a stretch of steady noise is measured against
   the noise), never below -80 dBFS. Frames ``gate_db`` above their floor, with quieter gaps of at most
   ``bridge`` seconds between them, form a *sound event* (cut at ``max_event``, dropped under ``min_event``
   or if its loudest frame is not ``peak_db`` above its floor: the flicker of a steady noise).
   Quiet and steady noise make no event and are never classified, detected or queued for review.
2. **Centred windows.** An event is heard in windows of ``window`` seconds centred on the centre of its energy
   above the floor and ``shift`` seconds before and after it; their probabilities are averaged. The head was
   trained on clips with the word roughly in the middle: a centred window hears what the head hears in a clip,
   and the shifted ones make the answer robust to where the centre falls (docs/audio.md: the figures).
3. **Detection.** An event whose mean top probability reaches ``threshold`` is a detection: its label, that
   probability, its time (the energy centre), its first and last frame above the gate.

Uncertain events go to the device's review queue (the centred window as a 16-bit WAV, source
``listen:<name>@<window start>``), at most one every ``review_gap`` seconds and ``review_max`` per run, so a noisy room
cannot flood it. Labels named in ``ignore`` (a "background" class a device learned, say) are never reported.
No torch here; soundfile and soxr come with the ``audio`` extra, ``sounddevice`` only for a microphone.
"""
from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.audio import fit_clip, is_wav
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.optional import require

__all__ = ["Detection", "Listen", "ListenOptions", "ListenSummary", "listen"]

log = logging.getLogger("edgexfer.listen")

FLOOR_PERCENTILE = 30  #: of a window's context's frame energies: its noise floor (docs/audio.md: why 30)
FLOOR_STEP_S = 0.05  #: seconds between two noise floors taken (it moves slowly)
FLOOR_MIN_DB = -80.0  #: the noise floor is never taken below this (digital silence would let any hiss in)
_EPS = 1e-10


@dataclass(frozen=True)
class ListenOptions:
    window: float | None = None  #: seconds per window (None: the bundle's clip length)
    shift: float = 0.15  #: seconds: an event is heard in windows centred on it and this much before and after it
    threshold: float = 0.3  #: an event's mean top probability a detection needs
    gate_db: float = 10.0  #: dB above the noise floor a frame must reach to be part of a sound event
    frame: float = 0.01  #: seconds per energy frame of the gate
    peak_db: float = 14.0  #: dB above the floor an event's loudest frame must reach (a noise's flicker does not)
    context: float = 1.5  #: seconds on each side of a frame whose quiet part is its noise floor
    bridge: float = 0.3  #: seconds: a quieter gap up to this long inside one event
    min_event: float = 0.05  #: seconds: shorter events (clicks) are dropped
    max_event: float = 2.0  #: seconds: longer events are cut
    review_gap: float = 5.0  #: seconds between two windows queued for review at least
    review_max: int = 20  #: windows queued for review per run at most (0: none)
    ignore: tuple[str, ...] = ()  #: labels never reported (a learned "background" class)
    chunk_seconds: float = 2.0  #: audio read at a time
    max_seconds: float | None = None  #: stop after this much audio
    backend: str = "auto"
    precision: str = "fp32"

    def check(self) -> None:
        for name, low, high in (("window", 0.05, 60.0), ("shift", 0.0, 30.0), ("threshold", 0.0, 1.0),
                                ("gate_db", 0.0, 120.0), ("peak_db", 0.0, 120.0), ("frame", 0.001, 1.0),
                                ("context", 0.1, 30.0), ("bridge", 0.0, 10.0),
                                ("min_event", 0.0, 60.0), ("max_event", 0.05, 60.0),
                                ("review_gap", 0.0, 86400.0), ("chunk_seconds", 0.05, 60.0)):
            value = getattr(self, name)
            if value is None and name == "window":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InputError(f"listen --{name.replace('_', '-')}", got=repr(value), expected=f"{low:g}..{high:g}")
        if isinstance(self.review_max, bool) or not isinstance(self.review_max, int) or self.review_max < 0:
            raise InputError("listen --review-max", got=repr(self.review_max), expected="a whole number >= 0")


@dataclass(frozen=True)
class Detection:
    """One word or sound heard: one JSON line of ``device listen``."""

    label: str
    confidence: float  #: the top probability of its windows' mean
    time: float  #: seconds from the start: the centre of the event's energy above the noise floor
    start: float  #: the event's first frame above the gate
    end: float  #: the end of its last frame above the gate
    windows: int  #: windows it was heard in
    head: int

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "confidence": round(self.confidence, 6), "time": round(self.time, 3),
                "start": round(self.start, 3), "end": round(self.end, 3), "windows": self.windows, "head": self.head}


@dataclass
class ListenSummary:
    source: str
    seconds_heard: float = 0.0  #: audio read
    events: int = 0  #: sound events found (through the gate)
    windows: int = 0  #: windows classified
    detections: int = 0
    queued: int = 0
    floor_db: float | None = None  #: the last window's noise floor
    seconds: float = 0.0  #: wall clock
    stopped: str = ""

    def line(self) -> str:
        floor = "" if self.floor_db is None else f", noise floor {self.floor_db:.1f} dBFS"
        return (f"listen {self.source}: {self.seconds_heard:.1f} s of audio, {self.events} sound event(s), "
                f"{self.windows} window(s) classified, {self.detections} detection(s), {self.queued} queued for "
                f"review{floor}, {self.seconds:.1f} s ({self.stopped or 'running'})")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("source", "seconds_heard", "events", "windows", "detections",
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


def side_floor(db: np.ndarray) -> float | None:
    """One side's noise floor: the FLOOR_PERCENTILE-th percentile of its frame energies (None: no frames)."""
    return float(np.percentile(db, FLOOR_PERCENTILE)) if len(db) else None


@dataclass(frozen=True)
class Event:
    """A sound event: a stretch of frames above the local noise floor (gaps shorter than ``bridge`` inside)."""

    start: float  #: seconds: its first frame above the gate
    end: float  #: seconds: the end of its last frame above the gate
    centre: float  #: seconds: the centre of its energy above the floor
    peak_db: float  #: its loudest frame's dB above the floor


class EventFinder:
    """10 ms frame energies in (in time order, any number at a time) -> :class:`Event` s out.

    A frame is *above the gate* if it is ``gate_db`` above its noise floor: the louder of the FLOOR_PERCENTILE-th
    percentiles of the ``ctx`` frames before and after it, ``guard`` frames on each side left out (the word
    itself), never below FLOOR_MIN_DB; the louder side, so that the edge of a stretch of steady noise (quiet
    before, noise after) is measured against the noise, not the quiet. The floor is taken every FLOOR_STEP_S seconds.
    Frames above the gate at most ``bridge`` frames apart form one event; an event is cut at ``max_len`` frames
    and dropped below ``min_len`` or if no frame of it is ``peak_db`` above its floor. A frame is decided once
    the ``guard + ctx`` frames after it are in (or at the end).
    """

    def __init__(self, *, guard: int, ctx: int, gate_db: float, bridge: int, max_len: int, min_len: int,
                 frame_s: float, peak_db: float = 0.0) -> None:
        self.guard, self.ctx, self.gate_db, self.bridge = guard, ctx, gate_db, bridge
        self.max_len, self.min_len, self.frame_s, self.peak_db = max_len, min_len, frame_s, peak_db
        self.floor_step = max(1, int(round(FLOOR_STEP_S / frame_s)))
        self.db = np.zeros(0, np.float32)
        self.db_at = 0  #: frame index of db[0]
        self.next = 0  #: the next frame to decide
        self.floor_db: float | None = None  #: the latest noise floor
        self._open: list[float] | None = None  #: first, last, weight, weight * frame, peak (at its last frame)
        self._gap = (0.0, 0.0)  #: weight and weight * frame of the frames after the open event's last one

    def push(self, db: np.ndarray) -> None:
        self.db = np.concatenate([self.db, db])

    def needed(self) -> int:
        """The first frame still needed (frames before it are dropped here; a caller may drop their audio)."""
        first = self.next if self._open is None else min(self.next, int(self._open[0]))
        return max(0, first - self.guard - self.ctx)

    def _floor(self, k: int) -> float:
        at = self.db_at
        left = self.db[max(0, k - self.guard - self.ctx - at):max(0, k - self.guard - at)]
        right = self.db[k + self.guard + 1 - at:k + self.guard + 1 + self.ctx - at]
        return max([FLOOR_MIN_DB, *(f for f in (side_floor(left), side_floor(right)) if f is not None)])

    def decide(self, ended: bool) -> list[Event]:
        """The events that end before the last decidable frame (all, once ``ended``)."""
        total = self.db_at + len(self.db)
        upto = total if ended else total - self.guard - self.ctx
        events: list[Event] = []
        floor = self.floor_db
        for k in range(self.next, upto):
            if floor is None or k % self.floor_step == 0:
                floor = self._floor(k)
            db = float(self.db[k - self.db_at])
            weight = max(0.0, 10.0 ** (db / 10.0) - 10.0 ** (floor / 10.0))
            e = self._open
            if db - floor >= self.gate_db:
                if e is None:
                    self._open = [k, k, weight, weight * k, db - floor]
                else:
                    e[1], e[2], e[3], e[4] = k, e[2] + self._gap[0] + weight, e[3] + self._gap[1] + weight * k, \
                        max(e[4], db - floor)
                self._gap = (0.0, 0.0)
            elif e is not None:
                self._gap = (self._gap[0] + weight, self._gap[1] + weight * k)
            e = self._open
            if e is not None and (k - e[1] > self.bridge or k - e[0] + 1 >= self.max_len):
                events += self._close()
        self.floor_db = floor
        self.next = max(self.next, upto)
        if ended and self._open is not None:
            events += self._close()
        drop = self.needed() - self.db_at
        if drop > 0:
            self.db, self.db_at = self.db[drop:], self.db_at + drop
        return events

    def _close(self) -> list[Event]:
        first, last, weight, moment, peak = self._open  # type: ignore[misc]
        self._open, self._gap = None, (0.0, 0.0)
        if last - first + 1 < self.min_len or peak < self.peak_db:
            return []
        centre = moment / weight if weight > 0 else (first + last) / 2
        return [Event(first * self.frame_s, (last + 1) * self.frame_s, (centre + 0.5) * self.frame_s, float(peak))]


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

    def stop(self) -> None:
        self._stop.set()

    # long: opening the core, the chunk loop (frames, events, windows, batches) and the one cleanup in `finally`
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
            frame = max(1, int(round(o.frame * rate)))
            frame_s = frame / rate
            shift = int(round(o.shift * rate))
            finder = EventFinder(guard=int(round(win / 2 / frame)), ctx=int(round(o.context / frame_s)),
                                 gate_db=o.gate_db, bridge=int(round(o.bridge / frame_s)),
                                 max_len=max(1, int(round(o.max_event / frame_s))),
                                 min_len=max(1, int(round(o.min_event / frame_s))), frame_s=frame_s,
                                 peak_db=o.peak_db)
            chunks = (_file_chunks(self.file, rate, o.chunk_seconds, self._stop) if self.file is not None
                      else _mic_chunks(self.mic, rate, o.chunk_seconds, self._stop))
            media = modality.service_input().media_type or "application/octet-stream"
            buf = np.zeros(0, np.float32)
            buf_at = 0  #: sample index of buf[0]
            frames = 0  #: frames measured
            ended = False
            while not ended:
                chunk = next(chunks, None)
                if chunk is None or self._stop.is_set():
                    ended = True
                else:
                    buf = np.concatenate([buf, chunk])
                    summary.seconds_heard += len(chunk) / rate
                    if o.max_seconds is not None and summary.seconds_heard >= o.max_seconds:
                        ended = True
                whole = (buf_at + len(buf)) // frame
                finder.push(frame_db(buf[frames * frame - buf_at:whole * frame - buf_at], frame))
                frames = whole
                batch: list[tuple[Event, list[np.ndarray]]] = []
                for event in finder.decide(ended):
                    waves = [_cut(buf, buf_at, int(round(event.centre * rate)) + s - win // 2, win)
                             for s in ((0,) if shift == 0 else (-shift, 0, shift))]
                    batch.append((event, [fit_clip(w, clip) for w in waves]))
                    if sum(len(w) for _, w in batch) >= modality.batch_size:
                        yield from self._classify(core, batch, rate, win, media)
                        batch = []
                yield from self._classify(core, batch, rate, win, media)
                summary.floor_db = None if finder.floor_db is None else round(finder.floor_db, 1)
                # every chunk ends with the events that ended announced (a microphone's latency: a chunk, a
                # window and the context after it); the audio before what the finder and a window need is dropped
                keep = min(finder.needed() * frame - win - shift, frames * frame)
                if keep > buf_at:
                    buf, buf_at = buf[keep - buf_at:], keep
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

    def _classify(self, core: Any, batch: list[tuple[Event, list[np.ndarray]]], rate: int, win: int,
                  media: str) -> Iterator[Detection]:
        """Classify the windows of a batch of events; an event's probabilities are its windows' mean. A confident
        event is a detection, an uncertain one may go to the review queue (its centred window)."""
        if not batch:
            return
        o, summary = self.options, self.summary
        result = core.classify_now(np.stack([w for _, waves in batch for w in waves]))
        summary.events += len(batch)
        summary.windows += len(result.probabilities)
        at = 0
        for event, waves in batch:
            row = np.mean(result.probabilities[at:at + len(waves)], axis=0)
            at += len(waves)
            j = int(np.argmax(row))
            label, p = result.classes[j], float(row[j])
            if label in o.ignore:
                continue
            if p >= o.threshold:
                summary.detections += 1
                yield Detection(label, p, event.centre, event.start, event.end,
                                len(waves), result.head_version)
            else:
                self._review(core, event.centre - win / rate / 2, waves[len(waves) // 2], row, result, rate, media)

    def _review(self, core: Any, t0: float, wave: np.ndarray, row: np.ndarray, result: Any, rate: int,
                media: str) -> None:
        """Queue an uncertain event's window for review: at most one every ``review_gap`` s, ``review_max`` a run."""
        o = self.options
        if self.summary.queued >= o.review_max or t0 - self._last_queued < o.review_gap:
            return
        order = np.argsort(-row)[:3]
        top_k = [{"label": result.classes[k], "probability": round(float(row[k]), 6)} for k in order]
        data = encode_wav(wave, rate)
        entry = {"sha256": FeatureCache.content_sha256(data), "data": data, "media_type": media,
                 "label": result.classes[order[0]], "probability": float(row[order[0]]), "top_k": top_k,
                 "head": result.head_version, "source": f"listen:{self.summary.source}@{max(0.0, t0):.2f}s"}
        if core.review_sync(lambda q, entry=entry: q.add(**entry)) is not None:
            self.summary.queued += 1
            self._last_queued = t0


def _cut(buf: np.ndarray, buf_at: int, start: int, length: int) -> np.ndarray:
    """``length`` samples from sample ``start`` of the stream whose samples from ``buf_at`` on are ``buf``;
    silence where it has none (before the recording, after its end)."""
    out = np.zeros(length, np.float32)
    lo, hi = max(start, buf_at), min(start + length, buf_at + len(buf))
    if hi > lo:
        out[lo - start:hi - start] = buf[lo - buf_at:hi - buf_at]
    return out


def listen(state: str | Path | None, file: str | Path | None = None, **options: Any) -> Listen:
    """A :class:`Listen` of ``file`` (None: the microphone ``mic``) with the device in ``state``."""
    mic = options.pop("mic", None)
    return Listen(state, file, mic=mic, options=ListenOptions(**options))
