"""``edgexfer device watch``: frames of a video through the device's head (runtime/watch.py, cli_serve.py).

The video is written here with OpenCV (MJPG in AVI, which the headless wheel writes and reads): three
demo classes, two images each, every image held for 10 frames at 10 fps (60 frames, 6 s), each image
letterboxed onto a white 320x240 frame.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from service_support import DEMO, cli

cv2 = pytest.importorskip("cv2", reason="device watch needs the camera extra (pip install 'edgexfer[camera]')")

from PIL import Image, ImageOps  # noqa: E402

from edgexfer.runtime.errors import InputError  # noqa: E402

VIDEO_FPS = 10
HOLD = 10  # frames per image
SIZE = (320, 240)  # width, height
CLASSES = ("beverages", "fruit", "tools")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """(path, source images in frame order): 60 frames, image i on frames 10*i .. 10*i+9."""
    images = [p for c in CLASSES for p in sorted((DEMO / c).glob("*.jpg"))[:2]]
    path = tmp_path_factory.mktemp("watch") / "clips.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, SIZE)
    assert writer.isOpened(), "this OpenCV cannot write MJPG/AVI"
    for img in images:
        rgb = ImageOps.pad(Image.open(img).convert("RGB"), SIZE, color=(255, 255, 255))
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        for _ in range(HOLD):
            writer.write(bgr)
    writer.release()
    return path, images


@pytest.fixture
def state(served_state, tmp_path):
    """A fresh copy of the installed device state (empty review queue, head 1)."""
    out = tmp_path / "state"
    shutil.copytree(served_state, out)
    return out


def decoded_frames(path) -> list[np.ndarray]:
    """Every frame of the video as RGB, decoded independently of runtime/watch.py."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(np.ascontiguousarray(frame[:, :, ::-1]))
    cap.release()
    return frames


def run_watch(source, state, **options):
    from edgexfer.runtime.watch import watch

    w = watch(source, state, **options)
    return list(w), w.summary


@pytest.mark.parametrize(("fps", "expected_frames"), [
    (2, list(range(0, 60, 5))),  # every 500 ms: every 5th frame of a 10 fps file
    (4, [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30, 33, 35, 38, 40, 43, 45, 48, 50, 53, 55, 58]),  # 250 ms grid
    (0, list(range(60))),  # every frame
])
def test_a_file_is_sampled_by_frame_timestamps(video, served_state, fps, expected_frames):
    results, summary = run_watch(video[0], served_state, fps=fps, review_threshold=0.0)
    assert [r.frame for r in results] == expected_frames
    assert [r.timestamp_ms for r in results] == pytest.approx([100.0 * f for f in expected_frames], abs=0.01)
    assert summary.frames_read == 60 and summary.classified == len(expected_frames)
    assert summary.stopped == "end of file" and not summary.live and summary.queued == 0


def test_frames_are_labelled_as_device_predict_labels_the_same_pixels(video, served_state, tmp_path):
    """The frames go through the image preprocessing: device predict on the decoded frames (saved as PNG,
    lossless) gives the same labels and probabilities. Against the original images, the lossy MJPG codec
    and the 320x240 letterbox change pixels, so only most labels (>= 10 of 12) must agree."""
    from edgexfer.runtime.device import Device

    path, images = video
    results, _ = run_watch(path, served_state, fps=2, review_threshold=0.0)
    frames = decoded_frames(path)
    pngs = []
    for r in results:
        pngs.append(tmp_path / f"frame{r.frame:03d}.png")
        Image.fromarray(frames[r.frame]).save(pngs[-1])
    with Device(served_state) as dev:
        on_frames = dev.predict(pngs)
        on_images = dev.predict([images[r.frame // HOLD] for r in results])
        head = dev.state.active().head
    assert [r.label for r in results] == [p.label for p in on_frames]
    assert [r.probability for r in results] == pytest.approx([p.probability for p in on_frames], abs=1e-5)
    assert {r.head for r in results} == {head}
    assert results[0].top_k[0] == {"label": results[0].label, "probability": round(results[0].probability, 6)}
    agree = sum(r.label == p.label for r, p in zip(results, on_images))
    assert agree >= 10, f"only {agree} of {len(results)} frames labelled as their source image"


def test_low_confidence_frames_go_to_the_review_queue_and_the_head_follows_the_device(video, state):
    from edgexfer.runtime.device import Device
    from edgexfer.runtime.review import ReviewQueue
    from edgexfer.runtime.watch import watch

    w = watch(video[0], state, fps=2, review_threshold=0.99)
    results = []
    for r in w:
        results.append(r)
        if len(results) == 4:  # another process activates a new head (as retrain/update would)
            with Device(state) as dev:
                active = dev.state.active()
                head = dev.state.load_head(active.head)
                version = dev.state.add_head(head, backbone_sha256=active.bundle, parent=active.head,
                                             status="accepted", source="test").version
                dev.state.activate_head(version)
    assert [r.head for r in results] == [1] * 4 + [version] * (len(results) - 4)
    low = [r for r in results if r.probability < 0.99]
    assert low, "no frame below 0.99: the test cannot see the queue"
    assert all(r.low_confidence == (r.probability < 0.99) for r in results)
    assert all(r.review_id is None for r in results if not r.low_confidence)
    queued = [r for r in results if r.review_id is not None]
    # a frame identical to a queued one (the same image held) is queued once
    assert queued and all(r.low_confidence for r in queued)
    assert w.summary.queued == len(queued)
    with ReviewQueue(state / "features.sqlite") as queue:
        entries = {e.id: e for e in queue.entries(1000)}
        assert set(entries) == {r.review_id for r in queued}
        for r in queued:
            e = entries[r.review_id]
            assert (e.label, e.head, e.source, e.media_type) == (r.label, r.head, f"watch:{video[0]}", "image/jpeg")
            assert e.probability == pytest.approx(r.probability) and e.top_k == r.top_k
            data, _ = queue.sample(r.review_id)
            assert data[:3] == b"\xff\xd8\xff" and Image.open(io.BytesIO(data)).size == SIZE


def test_cli_writes_json_lines_and_a_summary(video, state, tmp_path):
    out = tmp_path / "frames.jsonl"
    proc = cli("device", "watch", str(video[0]), "--state", str(state), "--fps", "2", "--max-frames", "5",
               "--out", str(out), "--review-threshold", "0")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [d["frame"] for d in lines] == [0, 5, 10, 15, 20]
    assert [d["timestamp_ms"] for d in lines] == pytest.approx([0, 500, 1000, 1500, 2000], abs=0.01)
    assert set(lines[0]) >= {"frame", "timestamp_ms", "label", "probability", "top_k", "head", "backend",
                             "precision", "review_id"}
    assert {d["head"] for d in lines} == {1} and {d["precision"] for d in lines} == {"fp32"}
    in_process, _ = run_watch(video[0], state, fps=2, max_frames=5, review_threshold=0.0)
    assert [d["label"] for d in lines] == [r.label for r in in_process]
    assert proc.stdout == ""
    summary = proc.stderr.strip().splitlines()[-1]
    assert "21 frame(s) read, 5 classified, 0 queued" in summary and "(max frames)" in summary


@pytest.mark.parametrize("kind", ["missing", "not-a-video", "text-file", "still-image", "rtsp-refused"])
def test_a_bad_source_is_one_line_error_and_exit_1(state, tmp_path, kind):
    """A text file is the case that matters: FFmpeg's tty demuxer opens any .txt as 25 fps ANSI art, and
    before the check the watch "classified" its frames and exited 0."""
    says = {"text-file": "is a text file, not a video", "still-image": "is a still image"}.get(kind, "")
    if kind == "missing":
        source = str(tmp_path / "nothing.avi")
    elif kind == "not-a-video":
        source = str(tmp_path / "garbage.avi")
        (tmp_path / "garbage.avi").write_bytes(b"not a video " * 100)
    elif kind == "text-file":
        source = str(tmp_path / "notes.txt")
        (tmp_path / "notes.txt").write_text("\n".join(f"note {i}: buy milk, call the plumber" for i in range(300)))
    elif kind == "still-image":
        source = str(sorted((DEMO / CLASSES[0]).glob("*.jpg"))[0])
    else:  # nothing listens on port 9: refused at once; the password must not show
        source = "rtsp://viewer:s3cret@127.0.0.1:9/stream"
    proc = cli("device", "watch", source, "--state", str(state), check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and " | got " in lines[0] and " | expected " in lines[0]
    assert says in lines[0]
    assert "s3cret" not in proc.stderr and proc.stdout == ""


class FakeLiveCapture:
    """A live source: ``frames`` good reads, then nothing; counts opens and releases."""

    def __init__(self, frames, on_read=None):
        self.frames = list(frames)
        self.on_read = on_read

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return True

    def get(self, prop):
        return -1.0

    def read(self):
        if self.on_read:
            self.on_read(len(self.frames))
        if self.frames:
            return True, np.ascontiguousarray(self.frames.pop(0)[:, :, ::-1])
        return False, None

    def release(self):
        pass


def test_a_live_source_that_stops_is_retried_then_an_error(video, state, monkeypatch):
    import edgexfer.runtime.watch as watch_module
    from edgexfer.runtime.review import ReviewQueue

    frames = decoded_frames(video[0])[::HOLD][:3]  # three different images
    captures = []

    def open_capture(cv2_module, src):
        captures.append(FakeLiveCapture(frames if not captures else []))
        return captures[-1]

    monkeypatch.setattr(watch_module, "_open_capture", open_capture)
    w = watch_module.watch("rtsp://viewer:s3cret@camera.local:554/live?token=abc&profile=1", state, fps=0,
                           retries=3, retry_delay_s=0.01, review_threshold=1.0)
    got = []
    with pytest.raises(InputError, match="stopped delivering frames") as err:
        for r in w:
            got.append(r)
    assert [r.frame for r in got] == [0, 1, 2] and w.summary.live
    assert w.summary.retries == 3 and w.summary.stopped == "error"
    assert len(captures) == 2  # reopened once after two failed reads
    assert "s3cret" not in str(err.value) and "abc" not in str(err.value)
    with ReviewQueue(state / "features.sqlite") as queue:
        sources = {e.source for e in queue.entries()}
    assert sources == {"watch:rtsp://camera.local:554/live?token=REDACTED&profile=1"}


_SIGTERM_CHILD = """
import json, os, signal, sys
import numpy as np
import edgexfer.runtime.watch as watch_module
from edgexfer.cli import main

frames = list(np.load(sys.argv[1])["frames"])
opened = []


class Live:  # a live camera: the frames, then nothing; SIGTERM to this process during the fourth read
    def __init__(self, frames):
        self.frames = frames
    def isOpened(self):
        return True
    def get(self, prop):
        return -1.0
    def read(self):
        if len(self.frames) == 17:
            os.kill(os.getpid(), signal.SIGTERM)
        return (True, np.ascontiguousarray(self.frames.pop(0)[:, :, ::-1])) if self.frames else (False, None)
    def release(self):
        pass


def open_capture(cv2_module, src):  # a reopen gets no frames, so a missed signal ends in an error
    opened.append(Live(frames if not opened else []))
    return opened[-1]


watch_module._open_capture = open_capture
before = signal.getsignal(signal.SIGTERM)
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    print("handler restored" if signal.getsignal(signal.SIGTERM) is before else "handler NOT restored", file=sys.stderr)
"""


def test_sigterm_stops_the_cli_cleanly(video, state, tmp_path):
    """SIGTERM during a live watch: the frame in progress is written, the summary printed, exit 0.

    The CLI runs in a child process, as under systemd: the signal never reaches the test runner.
    """
    frames = tmp_path / "frames.npz"
    np.savez(frames, frames=np.stack(decoded_frames(video[0])[:20]))
    out = tmp_path / "frames.jsonl"
    done = subprocess.run([sys.executable, "-c", _SIGTERM_CHILD, str(frames), "device", "watch", "/dev/video0",
                           "--state", str(state), "--fps", "0", "--retries", "0", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [json.loads(line)["frame"] for line in out.read_text().splitlines()] == [0, 1, 2, 3]
    assert "4 frame(s) read, 4 classified" in done.stderr and "(stopped)" in done.stderr
    assert "handler restored" in done.stderr


@pytest.mark.parametrize(("source", "shown"), [
    ("rtsp://admin:hunter2@10.0.0.5:554/h264", "rtsp://10.0.0.5:554/h264"),
    ("http://cam.local/mjpg?user=a&password=b&fps=5", "http://cam.local/mjpg?user=a&password=REDACTED&fps=5"),
    ("/dev/video0", "/dev/video0"),
    ("v4l2src ! videoconvert ! appsink", "v4l2src ! videoconvert ! appsink"),
    (0, "0"),
])
def test_the_source_name_has_no_credentials(source, shown):
    from edgexfer.runtime.watch import describe_source

    assert describe_source(source) == shown
