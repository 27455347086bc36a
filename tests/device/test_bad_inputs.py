"""Bad inputs and a full disk (issue 4, acceptance 6), with the real bundle, ONNX Runtime and SQLite.

Every kind of bad input the Predictor can meet gets its own typed per-sample error while the good
samples of the same call still get their results, unchanged and in their places. ``learn`` on a full
disk (a real tmpfs, and SQLite or the OS reporting a full disk inside the transaction) raises,
confirms no part of the batch, and leaves a cache that keeps working.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from image_support import png_declaring
from PIL import Image

from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.device import Device
from edgexfer.runtime.errors import CacheError
from edgexfer.runtime.predictor import Prediction, Predictor, SampleError
from edgexfer.runtime.preprocess import load_image

DEMO = Path(__file__).resolve().parents[2] / "data" / "clipart8-demo"


def _image(cls: str, index: int = 0) -> Path:
    return sorted((DEMO / cls).iterdir())[index]


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _noise(side: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def _nan_pixels() -> np.ndarray:
    arr = np.full((224, 224, 3), 0.5, dtype=np.float32)
    arr[100, 100, 1] = np.nan
    return arr


# id -> (builder of the bad item given a tmp dir, text its error must contain)
BAD_INPUTS = {
    "undecodable bytes": (lambda tmp: b"GIF89a but not really an image \x00\x01\x02" * 10, "not a recognised image"),
    "empty bytes": (lambda tmp: b"", "empty file"),
    "truncated jpeg": (lambda tmp: _encode(_noise(256, 1), "JPEG")[:9000], "truncated"),
    "truncated png": (lambda tmp: _encode(_noise(256, 2), "PNG")[:90000], "truncated"),
    "bomb over Pillow's limit": (lambda tmp: png_declaring(100_000, 100_000), "too large"),
    "bomb over edgexfer's limit": (lambda tmp: png_declaring(8_000, 8_000), "too large: 8000x8000"),
    "float32 array": (lambda tmp: np.full((224, 224, 3), 0.5, dtype=np.float32), "dtype float32"),
    "int64 array": (lambda tmp: np.full((224, 224, 3), 128, dtype=np.int64), "dtype int64"),
    "uint16 array": (lambda tmp: np.full((224, 224, 3), 40000, dtype=np.uint16), "dtype uint16"),
    "NaN float array": (lambda tmp: _nan_pixels(), "containing NaN"),
    "grayscale array": (lambda tmp: np.zeros((224, 224), dtype=np.uint8), "shape (224, 224)"),
    "RGBA array": (lambda tmp: np.zeros((224, 224, 4), dtype=np.uint8), "shape (224, 224, 4)"),
    "batch-shaped array": (lambda tmp: np.zeros((1, 224, 224, 3), dtype=np.uint8), "shape (1, 224, 224, 3)"),
    "array not resized": (lambda tmp: np.zeros((100, 120, 3), dtype=np.uint8), "shape (100, 120, 3)"),
    "empty array": (lambda tmp: np.zeros((0,), dtype=np.uint8), "shape (0,)"),
    "missing file": (lambda tmp: tmp / "no-such-image.png", "cannot read image"),
    "directory": (lambda tmp: tmp, "cannot read image"),
    "not an image source": (lambda tmp: 12345, "image source"),
}


@pytest.fixture(scope="module")
def predictor(device_bundle) -> Predictor:
    with Predictor.from_bundle(device_bundle) as pred:
        pred.batch_size = 4  # so a mixed call spans several engine batches
        yield pred


@pytest.fixture(scope="module")
def good(predictor) -> list:
    """Good inputs of every kind: a path, encoded bytes, a preprocessed uint8 array."""
    return [_image("fruit"), _image("music").read_bytes(), load_image(_image("tools"), predictor.bundle.preprocess)]


@pytest.fixture(scope="module")
def reference(predictor, good) -> list[Prediction]:
    """What the good inputs get when they are alone in a call."""
    results = [predictor.predict([item])[0] for item in good]
    assert all(isinstance(r, Prediction) for r in results)
    return results


def _assert_same_prediction(got, want: Prediction, where: str) -> None:
    assert isinstance(got, Prediction), f"{where}: {got}"
    assert got.label == want.label and [lbl for lbl, _ in got.top_k] == [lbl for lbl, _ in want.top_k], where
    np.testing.assert_allclose([p for _, p in got.top_k], [p for _, p in want.top_k], atol=1e-5, err_msg=where)


def _assert_typed_error(got, expected_text: str, where: str) -> None:
    assert isinstance(got, SampleError), f"{where}: got a result instead of an error: {got}"
    assert got.kind == "InputError", where
    assert expected_text in got.error, f"{where}: {got.error}"
    json.dumps(got.to_dict())  # reportable as it is


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_each_bad_input_gets_a_typed_error_and_the_good_ones_still_get_results(case, predictor, good, reference,
                                                                               tmp_path):
    make, expected_text = BAD_INPUTS[case]
    results = predictor.predict([good[0], make(tmp_path), good[1], good[2]])
    assert len(results) == 4
    _assert_typed_error(results[1], expected_text, case)
    for got, want, where in zip([results[0], *results[2:]], reference, ["path", "bytes", "array"]):
        _assert_same_prediction(got, want, f"{case}: good {where}")


def test_a_mixed_call_across_batches_keeps_every_result_in_its_place(predictor, good, reference, tmp_path):
    items, expected = [], []
    for i, (case, (make, text)) in enumerate(BAD_INPUTS.items()):
        items.append(make(tmp_path))
        expected.append((case, text))
        items.append(good[i % 3])
        expected.append(reference[i % 3])
    images_before = predictor.engine.stats.images
    results = predictor.predict(items)
    assert len(results) == len(items)
    for i, (got, want) in enumerate(zip(results, expected)):
        if isinstance(want, Prediction):
            _assert_same_prediction(got, want, f"item {i}")
        else:
            _assert_typed_error(got, want[1], f"item {i} ({want[0]})")
    # only the good samples went through the backbone
    assert predictor.engine.stats.images - images_before == len(BAD_INPUTS)


def test_a_call_with_only_bad_inputs_runs_no_backbone(predictor, tmp_path):
    images_before = predictor.engine.stats.images
    results = predictor.predict([make(tmp_path) for make, _ in BAD_INPUTS.values()])
    for got, (case, (_, text)) in zip(results, BAD_INPUTS.items()):
        _assert_typed_error(got, text, case)
    assert predictor.engine.stats.images == images_before


@pytest.fixture
def device(tmp_path, device_bundle):
    with Device(tmp_path / "state") as dev:
        dev.install(device_bundle)
        yield dev


def test_device_predict_cli_reports_bad_files_and_labels_the_good_one(device, tmp_path):
    files = {"good.png": _image("fruit").read_bytes(), "garbage.jpg": b"\xff\xd8\xff not really a jpeg",
             "truncated.jpg": _encode(_noise(256, 3), "JPEG")[:9000], "bomb.png": png_declaring(100_000, 100_000)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    proc = subprocess.run([sys.executable, "-m", "edgexfer.cli", "device", "predict", *(str(tmp_path / n) for n in files),
                           "--state", str(device.state.root), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr  # some inputs failed
    results = json.loads(proc.stdout)["results"]
    assert results[0]["label"] == "fruit" and results[0]["backend"] == "onnxruntime"
    assert [r.get("kind") for r in results[1:]] == ["InputError"] * 3
    assert "too large" in results[3]["error"] and "truncated" in results[2]["error"]


def test_learn_reports_bad_files_and_keeps_the_good_ones(device, tmp_path):
    bad = {"truncated": _encode(_noise(256, 4), "JPEG")[:9000], "bomb": png_declaring(100_000, 100_000),
           "garbage": b"\x00" * 100}
    good = [_image("sports", 0).read_bytes(), _image("sports", 1).read_bytes()]
    report = device.learn([good[0], *bad.values(), good[1]], "sports")
    assert report.added == 2 and report.backbone_runs == 2 and len(report.errors) == 3
    assert _confirmed(device, [FeatureCache.content_sha256(b) for b in [*good, *bad.values()]]) == {
        FeatureCache.content_sha256(b): "sports" for b in good}


# ------------------------------------------------------------------------------------------ full disk
def _confirmed(device: Device, shas: list[str]) -> dict[str, str]:
    """The samples among ``shas`` that the cache holds with features for the active bundle, and their labels."""
    bundle = device.bundle()
    backbone, key = bundle.manifest.backbone.sha256, bundle.preprocess.key()
    with device.cache() as cache:
        assert cache.integrity_check() == "ok"
        assert cache.samples_without_features(backbone, key) == []  # nothing half-confirmed
        feats = cache.get_features(backbone, key, shas)
        labelled, _, labels = cache.labelled(backbone, key)
    by_sha = dict(zip(labelled, labels))
    return {sha: by_sha[sha] for sha in feats}


def _batch(n: int, seed: int) -> list[bytes]:
    """Incompressible PNGs of ~200 kB each: a batch far larger than the room left on a small disk."""
    return [_encode(_noise(256, seed + i), "PNG") for i in range(n)]


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m,mode=0755", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], check=True)


def _fill(path: Path, leave: int) -> None:
    """Fill the file system of ``path`` to the last byte, then give back ``leave`` bytes."""
    block = b"\xa5" * (64 * 1024)
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(block)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        size = fh.tell()
    with open(path, "r+b") as fh:
        fh.truncate(max(0, size - leave))


def test_learn_on_a_full_tmpfs_fails_whole_and_the_cache_keeps_working(small_tmpfs, device_bundle):
    with Device(small_tmpfs / "state") as dev:
        dev.install(device_bundle)  # about 15 MB of the 20
        first = [_image("vehicles", i).read_bytes() for i in range(2)]
        assert dev.learn(first, "vehicles").added == 2
        filler = small_tmpfs / "filler"
        batch = _batch(4, seed=10)  # ~800 kB
        shas = [FeatureCache.content_sha256(b) for b in batch]
        # 256 kB free: the transaction's pages do not fit (SQLITE_FULL at commit). 0 free: not even
        # SQLite's shared-memory file can be created, and SQLite calls that a "disk I/O error".
        for leave, reported in ((256 * 1024, "database or disk is full"), (0, "disk I/O error")):
            _fill(filler, leave=leave)
            with pytest.raises(CacheError) as err:
                dev.learn(batch, "noise")
            assert reported in str(err.value), err.value
            assert "free disk space" in str(err.value), f"the advice must name the full disk: {err.value}"
            if leave:  # the cache still reads while the disk is full
                assert dev.status()["cache"]["samples_per_class"] == {"vehicles": 2}
            filler.unlink()
            assert _confirmed(dev, shas) == {}, leave  # no sample of the failed batch is confirmed
            assert dev.status()["cache"]["samples_per_class"] == {"vehicles": 2}

        report = dev.learn(batch, "noise")  # space again: the same cache takes the same batch
        assert report.added == 4 and report.errors == []
        assert _confirmed(dev, shas) == dict.fromkeys(shas, "noise")
        assert dev.status()["cache"]["samples_per_class"] == {"noise": 4, "vehicles": 2}


def _fail_after_writing(exc: BaseException):
    """put_features that writes its rows inside the transaction, then fails like a full disk."""
    real = FeatureCache.put_features

    def put_features(self, *args, **kwargs):
        real(self, *args, **kwargs)
        raise exc

    return put_features


@pytest.mark.parametrize("fault", ["SQLITE_FULL from SQLite", "sqlite full injected", "ENOSPC OSError injected"])
def test_learn_when_the_disk_fills_inside_the_transaction(fault, device, monkeypatch):
    if fault == "SQLITE_FULL from SQLite":
        # a real SQLITE_FULL: the file may not grow by a single page
        real_connect = sqlite3.connect

        def connect(*args, **kwargs):
            conn = real_connect(*args, **kwargs)
            conn.execute("PRAGMA max_page_count = 1")  # SQLite keeps it at the current size
            return conn

        monkeypatch.setattr(sqlite3, "connect", connect)
        expected = CacheError
    elif fault == "sqlite full injected":
        monkeypatch.setattr(FeatureCache, "put_features",
                            _fail_after_writing(sqlite3.OperationalError("database or disk is full")))
        expected = CacheError
    else:
        monkeypatch.setattr(FeatureCache, "put_features",
                            _fail_after_writing(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
        expected = OSError
    batch = _batch(3, seed=20)
    shas = [FeatureCache.content_sha256(b) for b in batch]

    with pytest.raises(expected) as err:
        device.learn(batch, "noise")
    if expected is CacheError:
        assert "database or disk is full" in str(err.value) and "free disk space" in str(err.value)
    monkeypatch.undo()
    assert _confirmed(device, shas) == {}
    assert device.status()["cache"]["samples_per_class"] == {}

    report = device.learn(batch, "noise")  # the cache takes the same batch afterwards
    assert report.added == 3 and report.backbone_runs == 3
    assert _confirmed(device, shas) == dict.fromkeys(shas, "noise")
