"""``edgexfer device watch``: classify the frames of a video file, a stream or a camera (docs/service.md).

Frames come from OpenCV (the ``camera`` extra, imported lazily). Sources:

* a video file (anything OpenCV's FFmpeg backend reads): frames are read as fast as they decode and
  chosen by their **timestamps** (``CAP_PROP_POS_MSEC``), so the choice is deterministic: a 30 fps file
  at ``fps=2`` classifies frames 0, 15, 30, ... (timestamps 0, 500, 1000 ms);
* a live source, chosen by the **wall clock** (at most ``fps`` per second; every frame is still read so
  the stream's buffer never falls behind): an RTSP/RTMP/UDP/SRT URL, an HTTP(S) URL whose capture has
  no frame count (an MJPEG camera), ``/dev/videoN`` or a camera index ``N`` (V4L2), or a GStreamer
  pipeline (a source that contains ``!``; needs an OpenCV built with GStreamer, e.g. JetPack's, not
  the PyPI wheel). An HTTP(S) URL with a frame count is a file.

Each chosen frame goes BGR -> RGB -> ``PIL.Image`` -> :func:`~edgexfer.runtime.preprocess.resize_to_spec`,
the same preprocessing as image files, and is classified by
:meth:`~edgexfer.runtime.service.core.ServiceCore.classify_now`, so the head follows the device
(``device retrain``, ``update``, ``rollback`` take effect at the next frame). Frames whose top
probability is below the review threshold (default: 1.25 times chance, 1/C for a head of C classes,
:func:`~edgexfer.runtime.review.review_threshold`) go to the review queue as JPEG bytes, with source
``watch:<source>`` (credentials of a URL removed).

A live source that stops delivering frames is retried (reopened after a few failed reads); after
``retries`` failed reads in a row :class:`InputError` is raised. A file ends at its last frame.
No torch here, no OpenCV at import time.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from PIL import Image

from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.optional import require
from edgexfer.runtime.preprocess import resize_to_spec

__all__ = ["FrameResult", "Watch", "WatchSummary", "describe_source", "watch"]

log = logging.getLogger("edgexfer.watch")

PURPOSE = "edgexfer device watch"
#: URL schemes of live streams (wall-clock pacing)
LIVE_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "udp", "rtp", "srt", "tcp"})
#: URL schemes that may be a file (a frame count) or a live stream (none)
HTTP_SCHEMES = frozenset({"http", "https"})
#: query parameters whose values are removed from the source name
_SECRET_KEYS = re.compile(r"pass|pwd|token|secret|key|auth|sig|cred", re.IGNORECASE)
#: a file's timestamps are compared with this slack (ms), so 300.00000000000006 counts as 300
_TS_SLACK_MS = 0.5
#: FFmpeg codecs that draw a text file as frames (its tty demuxer takes .txt, .nfo, .asc, ...): no video
TEXT_CODECS = frozenset({"ansi", "bint", "xbin", "idf "})
#: magic bytes of still-image files (FFmpeg opens them as a video of one frame)
_STILL_IMAGES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM")
_EXPECTED_SOURCE = ("a video file, an rtsp:// or http:// URL, /dev/videoN or a camera index N, "
                    "or a GStreamer pipeline ending in appsink")


@dataclass(frozen=True)
class FrameResult:
    """One classified frame: one JSON line of ``device watch``."""

    frame: int  #: index of the frame in the source, counting every frame read (0-based)
    timestamp_ms: float  #: file: the frame's timestamp; live: ms since the watch started
    label: str
    probability: float
    top_k: list[dict[str, Any]]
    head: int  #: version of the head that classified the frame
    backend: str
    precision: str
    review_id: int | None  #: new review-queue entry, None if not queued (confident, or the same image is queued)
    low_confidence: bool

    def to_dict(self) -> dict[str, Any]:
        return {"frame": self.frame, "timestamp_ms": round(self.timestamp_ms, 3), "label": self.label,
                "probability": round(self.probability, 6), "top_k": self.top_k, "head": self.head,
                "backend": self.backend, "precision": self.precision, "low_confidence": self.low_confidence,
                "review_id": self.review_id}


@dataclass
class WatchSummary:
    source: str  #: without credentials
    live: bool = False
    frames_read: int = 0
    classified: int = 0
    queued: int = 0  #: new review-queue entries
    seconds: float = 0.0
    stopped: str = ""  #: "end of file", "max frames", "stopped" (signal), "error"
    retries: int = 0  #: failed reads of a live source that were retried

    def line(self) -> str:
        return (f"watch {self.source}: {self.frames_read} frame(s) read, {self.classified} classified, "
                f"{self.queued} queued for review, {self.seconds:.1f} s ({self.stopped or 'running'})")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("source", "live", "frames_read", "classified", "queued", "seconds",
                                              "stopped", "retries")}


def describe_source(source: str | int) -> str:
    """The source as it may be logged and stored: no ``user:pass@``, no values of secret-looking query keys."""
    text = str(source).strip()
    if "!" in text or "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        host = parts.netloc.rsplit("@", 1)[-1]
        query = urlencode([(k, "REDACTED" if _SECRET_KEYS.search(k) else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="/:,")
        return urlunsplit((parts.scheme, host, parts.path, query, parts.fragment))
    except ValueError:
        return re.sub(r"//[^/@]*@", "//", text)


@dataclass(frozen=True)
class _Source:
    kind: str  #: "file", "url", "camera", "gstreamer"
    target: str | int  #: what cv2.VideoCapture gets
    live: bool | None  #: None: decided after opening (HTTP)
    name: str  #: describe_source(...)


def _classify_source(source: str | int) -> _Source:
    name = describe_source(source)
    if isinstance(source, int) and not isinstance(source, bool):
        return _Source("camera", source, True, name)
    text = str(source).strip()
    if not text:
        raise InputError("watch source", got="an empty string", expected=_EXPECTED_SOURCE)
    if "!" in text:
        return _Source("gstreamer", text, True, name)
    if text.isdigit():
        return _Source("camera", int(text), True, name)
    if re.fullmatch(r"/dev/video\d+", text):
        return _Source("camera", text, True, name)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme in LIVE_SCHEMES:
            return _Source("url", text, True, name)
        if scheme in HTTP_SCHEMES:
            return _Source("url", text, None, name)
        if scheme != "file":
            raise InputError("watch source URL scheme", got=repr(scheme),
                             expected=f"one of {', '.join(sorted(LIVE_SCHEMES | HTTP_SCHEMES | {'file'}))}",
                             todo="pass a stream URL, a file path, /dev/videoN or a GStreamer pipeline")
        text = text[len("file://"):]
    path = Path(text)
    if not path.is_file():
        raise InputError("watch source file", got=f"{name} ({'a directory' if path.is_dir() else 'no such file'})",
                         expected=_EXPECTED_SOURCE, todo="check the path")
    return _Source("file", str(path), False, name)


def _open_capture(cv2: Any, src: _Source) -> Any:
    """``cv2.VideoCapture`` for ``src`` (tests replace this)."""
    if src.kind == "gstreamer":
        return cv2.VideoCapture(src.target, cv2.CAP_GSTREAMER)
    if src.kind == "camera":
        return cv2.VideoCapture(src.target, cv2.CAP_V4L2) if hasattr(cv2, "CAP_V4L2") else cv2.VideoCapture(src.target)
    return cv2.VideoCapture(src.target)


def _refuse_non_video(cv2: Any, cap: Any, src: _Source) -> None:
    """A file FFmpeg opened that is not a video: a text file (drawn as ANSI art) or a still image."""
    fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)) & 0xFFFFFFFF
    codec = fourcc.to_bytes(4, "little").decode("latin-1").lower()
    if codec in TEXT_CODECS:
        raise InputError("watch source is a text file, not a video",
                         got=f"{src.name} (FFmpeg would draw its characters as frames)", expected=_EXPECTED_SOURCE,
                         todo="pass a video file; classify texts with device predict")
    with open(src.target, "rb") as f:
        head = f.read(16)
    if head.startswith(_STILL_IMAGES) and cap.get(cv2.CAP_PROP_FRAME_COUNT) <= 1:
        raise InputError("watch source is a still image, not a video", got=src.name, expected=_EXPECTED_SOURCE,
                         todo=f"classify it with: edgexfer device predict {src.name}")


def _has_gstreamer(cv2: Any) -> bool:
    try:
        return re.search(r"GStreamer:\s*YES", cv2.getBuildInformation()) is not None
    except Exception:  # noqa: BLE001 - a build without the call: let the open decide
        return True


class Watch:
    """Iterate to classify; :meth:`stop` (any thread, a signal handler) ends the iteration after the current frame.

    ``summary`` is up to date during and after the iteration.
    """

    def __init__(self, source: str | int, state: str | Path | None, *, fps: float = 2.0,
                 max_frames: int | None = None, review_threshold: float | None = None,
                 backend: str = "auto", precision: str = "fp32", top_k: int = 3, retries: int = 5,
                 retry_delay_s: float = 1.0, jpeg_quality: int = 90,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 <= fps <= 1000:
            raise InputError("watch --fps", got=repr(fps), expected="0..1000 frames per second (0: every frame)")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise InputError("watch --max-frames", got=repr(max_frames), expected="an integer >= 1")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InputError("watch retries", got=repr(retries), expected="an integer >= 0")
        self.source = _classify_source(source)
        self.state = state
        self.fps = float(fps)
        self.max_frames = max_frames
        self.review_threshold = review_threshold
        self.backend = backend
        self.precision = precision
        self.top_k = top_k
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.jpeg_quality = jpeg_quality
        self.clock = clock
        self.summary = WatchSummary(self.source.name)
        self._stop = threading.Event()

    def stop(self) -> None:
        """End the iteration after the frame in progress (safe from a signal handler)."""
        self._stop.set()

    @property
    def review_source(self) -> str:
        return f"watch:{self.source.name}"

    # ------------------------------------------------------------------------------ opening
    def _open(self, cv2: Any) -> Any:
        src = self.source
        if src.kind == "gstreamer" and not _has_gstreamer(cv2):
            raise InputError("watch source is a GStreamer pipeline, this OpenCV has no GStreamer",
                             got=f"OpenCV {cv2.__version__} without GStreamer (the PyPI wheel)",
                             expected="an OpenCV built with GStreamer",
                             todo="on a Jetson use JetPack's OpenCV (python3-opencv) in a venv with "
                                  "--system-site-packages; elsewhere pass a file, URL or /dev/videoN")
        cap = _open_capture(cv2, src)
        if cap is None or not cap.isOpened():
            if cap is not None:
                cap.release()
            raise InputError("cannot open the watch source", got=f"{src.name} (OpenCV could not open it)",
                             expected=_EXPECTED_SOURCE,
                             todo="check the path, the URL and its credentials, or the camera (v4l2-ctl --list-devices)")
        if src.kind == "file":
            try:
                _refuse_non_video(cv2, cap, src)
            except InputError:
                cap.release()
                raise
        return cap

    # ------------------------------------------------------------------------------ the loop
    # long: opening the source and the core, the frame loop (pick by timestamp or wall clock, classify,
    # queue for review) and the one cleanup in `finally` belong to one try block: a generator's cleanup
    # must see every resource it opened, whichever frame it stopped at
    def __iter__(self) -> Iterator[FrameResult]:
        from edgexfer.runtime.service.core import ServiceConfig, ServiceCore

        # FFmpeg's own log lines (a refused RTSP connection, ...) would break the one-line error;
        # OPENCV_FFMPEG_LOGLEVEL=24 (warnings) shows them again
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        cv2 = require("cv2", PURPOSE)
        summary = self.summary
        started = self.clock()
        cap: Any = None
        core: ServiceCore | None = None
        try:
            cap = self._open(cv2)
            live = self.source.live
            if live is None:  # HTTP(S): a file has a frame count, a camera stream has none
                live = not cap.get(cv2.CAP_PROP_FRAME_COUNT) > 0
            summary.live = live
            core = ServiceCore(self.state, ServiceConfig(backend=self.backend, precision=self.precision,
                                                         review_threshold=self.review_threshold, top_k=self.top_k))
            model = core.open()
            if not modality_of(model.bundle).streams:
                raise InputError("device watch classifies video frames", got=f"the active bundle {model.name} reads "
                                 f"{modality_of(model.bundle).plural}", expected="an image bundle",
                                 todo="serve texts with device serve (input 'text'), or install an image bundle")
            log.info("watching %s with %s head %s (%s)", summary.source, model.name, model.head_version, model.backend)
            period_ms = 1000.0 / self.fps if self.fps > 0 else 0.0
            next_due = 0.0
            failures = 0
            while not self._stop.is_set():
                ok, frame = cap.read()
                now_ms = (self.clock() - started) * 1000.0
                if not ok or frame is None:
                    if not live:
                        if summary.frames_read == 0:
                            raise InputError("watch source has no readable frame", got=summary.source,
                                             expected="a video OpenCV's FFmpeg can decode",
                                             todo="check the file (ffprobe FILE)")
                        summary.stopped = "end of file"
                        break
                    failures += 1
                    if failures > self.retries:
                        raise InputError("watch source stopped delivering frames",
                                         got=f"{failures} failed reads in a row from {summary.source} after "
                                             f"{summary.frames_read} frame(s)",
                                         expected="frames from a live source",
                                         todo="check the camera or the stream, then run device watch again")
                    summary.retries += 1
                    log.warning("no frame from %s (%d/%d), retrying", summary.source, failures, self.retries)
                    if self._stop.wait(self.retry_delay_s):
                        summary.stopped = "stopped"
                        break
                    if failures % 2 == 0:  # reopen: a dropped RTSP session does not come back by itself
                        cap.release()
                        try:
                            cap = self._open(cv2)
                        except InputError as exc:
                            log.warning("reopening %s failed: %s", summary.source, exc)
                    continue
                failures = 0
                index = summary.frames_read
                summary.frames_read += 1
                if live:
                    timestamp = now_ms
                else:
                    timestamp = float(cap.get(cv2.CAP_PROP_POS_MSEC))
                    if not timestamp >= 0:  # a container without timestamps: from the frame rate
                        file_fps = float(cap.get(cv2.CAP_PROP_FPS))
                        timestamp = index * 1000.0 / file_fps if file_fps > 0 else now_ms
                if timestamp + _TS_SLACK_MS < next_due:
                    continue
                if period_ms:
                    # next grid point after this frame; a live source that fell behind skips, it does not burst
                    next_due += period_ms * max(1, int((timestamp + _TS_SLACK_MS - next_due) // period_ms) + 1)
                yield self._classify(cv2, core, frame, index, timestamp)
                if self.max_frames is not None and summary.classified >= self.max_frames:
                    summary.stopped = "max frames"
                    break
            else:
                summary.stopped = "stopped"
        except GeneratorExit:  # the caller stopped iterating
            summary.stopped = summary.stopped or "closed"
            raise
        except BaseException:
            summary.stopped = summary.stopped or "error"
            raise
        finally:
            if cap is not None:
                cap.release()
            if core is not None:
                core.close()
            summary.seconds = self.clock() - started

    def _classify(self, cv2: Any, core: Any, frame: np.ndarray, index: int, timestamp: float) -> FrameResult:
        if frame.ndim == 2:  # a grey camera
            frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        elif frame.shape[2] == 4:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        rgb = np.ascontiguousarray(frame[:, :, ::-1])
        spec = core.model.bundle.preprocess
        pixels = resize_to_spec(Image.fromarray(rgb, "RGB"), spec)
        result = core.classify_now(pixels[None])
        row = result.top(self.top_k)[0]
        label, probability = row[0]
        top_k = [{"label": lbl, "probability": round(p, 6)} for lbl, p in row]
        low = core.wants_review(probability, len(result.classes))
        review_id = None
        if low:
            ok, encoded = cv2.imencode(".jpg", frame, [int(cv2.IMWRITE_JPEG_QUALITY), int(self.jpeg_quality)])
            if ok:
                data = encoded.tobytes()
                review_id = core.review_sync(lambda q: q.add(
                    sha256=FeatureCache.content_sha256(data), data=data, media_type="image/jpeg", label=label,
                    probability=probability, top_k=top_k, head=result.head_version, source=self.review_source))
            else:
                log.warning("frame %d could not be encoded as JPEG; not queued", index)
        self.summary.classified += 1
        if review_id is not None:
            self.summary.queued += 1
        return FrameResult(index, timestamp, label, float(probability), top_k, result.head_version, result.backend,
                           result.precision, review_id, low)


def watch(source: str | int, state: str | Path | None, **options: Any) -> Watch:
    """A :class:`Watch` of ``source`` with the device in ``state``; iterate it for :class:`FrameResult` s.

    Options: ``fps`` (0: every frame), ``max_frames``, ``review_threshold``, ``backend``, ``precision``,
    ``top_k``, ``retries``, ``retry_delay_s``, ``jpeg_quality``. The source is checked here (a missing
    file raises :class:`InputError` at once); OpenCV opens it when the iteration starts.
    """
    return Watch(source, state, **options)

