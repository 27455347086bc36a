"""Field learning that scales and resumes (issue 28): ``device learn`` commits per batch, decides the per-class
capacity before the backbone runs, walks directories and reads ``--from-list`` files, survives a Ctrl-C, and
holds one batch in memory whatever the number of files. Real bundle, ONNX Runtime, SQLite and processes."""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.device import Device
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.learning import learn_inputs, paths_from_list
from edgexfer.runtime.modalities import modality_of


@pytest.fixture(scope="module")
def installed(tmp_path_factory, device_bundle) -> Path:
    root = tmp_path_factory.mktemp("installed") / "state"
    with Device(root) as dev:
        dev.install(device_bundle)
    return root


def _clone(seed: Path, dest: Path) -> Path:
    """A copy of an installed state (bundles are immutable: hard links)."""
    def copy(src: str, dst: str) -> None:
        if f"{os.sep}bundles{os.sep}" in src:
            os.link(src, dst)
        else:
            shutil.copy2(src, dst)

    shutil.copytree(seed, dest, copy_function=copy, symlinks=True)
    return dest


def _png(seed: int, side: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _write_pngs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:04d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        path.write_bytes(_png(seed * 100_000 + i))
    return paths


def _raw(path: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def _learned(root: Path) -> tuple[list[str], list[str]]:
    """The labelled samples with features for the active bundle, and those without any (must be none)."""
    with Device(root) as dev:
        bundle = dev.bundle()
        key, backbone = bundle.preprocess.key(), bundle.manifest.backbone.sha256
        with dev.cache() as cache:
            return cache.labelled(backbone, key)[0], cache.samples_without_features(backbone, key)


# ------------------------------------------------------------------------------------------ capacity
def test_the_capacity_admits_before_the_backbone_and_the_batch_split_changes_nothing(installed, tmp_path):
    images = _write_pngs(tmp_path / "in", 12)
    kept = {}
    for batch in (1, 4, 12):
        root = _clone(installed, tmp_path / f"batch{batch}")
        with Device(root, per_class_capacity=3) as dev:
            engine = dev.engine()
            before = engine.stats.images
            report = dev.learn(images, "noise", batch_size=batch)
            # a sample the capacity turns away never reaches the backbone: every run is a sample added now
            assert engine.stats.images - before == report.backbone_runs == report.added, batch
            assert report.added + report.dropped == 12 and report.batches == math.ceil(12 / batch)
            assert report.dropped > 0 and report.capacity == 3
            assert dev.status()["cache"] == {"samples_per_class": {"noise": 3}, "features_for_backbone": 3}
            if batch == 12:  # one batch: admitted before any run, so the backbone ran for the 3 kept only
                assert (report.added, report.evicted) == (3, 0)
        kept[batch], orphans = _learned(root)
        assert orphans == []
    # Algorithm R's draws depend on the arrival order only, not on how the arrivals were batched
    assert kept[1] == kept[4] == kept[12]


def test_a_sample_that_fails_to_decode_after_its_header_is_reported_and_never_arrives(installed, tmp_path):
    root = _clone(installed, tmp_path / "state")
    good = [_png(1, 64), _png(2, 64)]
    truncated = _png(3, 64)[:-200]  # its header is fine; the pixel data is cut
    with Device(root) as dev:
        report = dev.learn([good[0], truncated, good[1]], "noise")
    assert (report.added, report.backbone_runs, report.dropped) == (2, 2, 0)
    assert [e["source"] for e in report.errors] == ["bytes[1]"] and "truncated" in report.errors[0]["error"]
    # it was admitted, failed to decode, and the batch was admitted again without it: it is no arrival
    assert _raw(root / "features.sqlite", "SELECT seen, members FROM label_stats WHERE label = 'noise'") == [(2, 2)]


# ------------------------------------------------------------------------------------------ inputs
def test_directories_are_walked_sorted_and_recursive_for_the_modality_files(installed, tmp_path):
    tree = tmp_path / "tree"
    for rel in ("b.png", "a/c.JPG", "a/.hidden.png", ".git/x.png", "notes.txt", "sub/deeper/e.png", "sub/d.bmp"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    modality = modality_of(Bundle.open(next((installed / "bundles").iterdir())))
    names = [name for name, _, _ in learn_inputs(modality, [tree, tmp_path / "empty", b"raw"])]
    assert names == [str(tree / rel) for rel in ("a/c.JPG", "b.png", "sub/d.bmp", "sub/deeper/e.png")] + [
        str(tmp_path / "empty"), "bytes[2]"]
    with Device(_clone(installed, tmp_path / "state")) as dev:
        report = dev.learn([tmp_path / "empty"], "noise")
    assert report.added == 0 and "no image files in directory" in report.errors[0]["error"]


def test_from_list_reads_paths_and_a_missing_list_is_one_line(installed, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edgexfer.cli import main

    images = _write_pngs(tmp_path / "in", 5)
    monkeypatch.chdir(tmp_path)
    listing = tmp_path / "list.txt"
    listing.write_text("# five images, two of them relative\n\n" + "\n".join(
        [*(str(p) for p in images[:3]), f"  in/{images[3].name}  ", f"in/{images[4].name}"]) + "\n")
    assert list(paths_from_list(listing)) == [*(str(p) for p in images[:3]), f"in/{images[3].name}",
                                              f"in/{images[4].name}"]
    with pytest.raises(InputError) as err:
        paths_from_list(tmp_path / "nope.txt")
    assert "\n" not in str(err.value) and str(err.value).count(" | ") == 3 and "nope.txt" in str(err.value)

    root = _clone(installed, tmp_path / "state")
    runner = CliRunner()
    args = ["device", "learn", "--label", "noise", "--state", str(root), "--json"]
    result = runner.invoke(main, [*args, "--from-list", str(listing)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["added"], report["batches"], report["errors"]) == (5, 1, [])
    missing = runner.invoke(main, [*args, "--from-list", "nope.txt"])
    assert missing.exit_code == 1 and "cannot read the list nope.txt" in missing.stderr


# ------------------------------------------------------------------------------------------ resuming
def test_committed_batches_survive_an_interruption_and_a_rerun_skips_them(installed, tmp_path):
    images = _write_pngs(tmp_path / "in", 40)
    root = _clone(installed, tmp_path / "state")
    seen = []

    def interrupt_after_two(report):
        seen.append(report.batches)
        if report.batches == 2:
            raise KeyboardInterrupt

    with Device(root) as dev:
        with pytest.raises(KeyboardInterrupt):
            dev.learn(images, "noise", batch_size=8, on_batch=interrupt_after_two)
        assert seen == [1, 2] and dev.status()["cache"]["samples_per_class"] == {"noise": 16}
        again = dev.learn(images, "noise", batch_size=8)
    assert (again.already_known, again.added, again.backbone_runs, again.batches) == (16, 24, 24, 5)
    assert _learned(root)[1] == []


SIGINT_IMAGES = 200


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A shell starts background jobs with SIGINT
    ignored (a CI script started with `&`), Python then keeps it ignored, and Ctrl-C could not be tested."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="needs POSIX signals")
def test_sigint_keeps_the_finished_batches_and_the_rerun_runs_the_backbone_on_the_rest(installed, tmp_path):
    folder = tmp_path / "in"
    paths = _write_pngs(folder, SIGINT_IMAGES)
    root = _clone(installed, tmp_path / "state")
    cache_path = root / "features.sqlite"
    # the paths come on stdin (--from-list -): after two batches' worth the learner waits for more, and the
    # SIGINT lands while it waits, however fast or loaded the machine (a poll racing a running learner could
    # see it finish first)
    child = subprocess.Popen([sys.executable, "-m", "edgexfer.cli", "device", "learn", "--from-list", "-", "--label",
                              "noise", "--state", str(root), "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    child.stdin.write("".join(f"{p}\n" for p in paths[:32]))
    child.stdin.flush()
    deadline = time.monotonic() + 120
    committed = 0
    while child.poll() is None and time.monotonic() < deadline and committed < 32:
        committed = sum(n for (n,) in _raw(cache_path, "SELECT members FROM label_stats WHERE label = 'noise'"))
        time.sleep(0.05)
    assert committed == 32, f"two batches of 16 were not committed: {committed} (exit {child.poll()})"
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130, f"the learner was not interrupted in time: exit {child.returncode}\n{err[-2000:]}"
    assert "interrupted:" in err and "the same command again skips" in err
    kept, orphans = _learned(root)
    assert orphans == [] and len(kept) == 32
    partial = json.loads(out)
    assert partial["interrupted"] and partial["added"] == len(kept)

    with Device(root) as dev:
        report = dev.learn([folder], "noise")
    assert (report.already_known, report.added) == (len(kept), SIGINT_IMAGES - len(kept))
    assert report.backbone_runs == SIGINT_IMAGES - len(kept)  # the backbone ran only on the rest
    assert len(_learned(root)[0]) == SIGINT_IMAGES


# ------------------------------------------------------------------------------------------ memory
# One learn call in a fresh process; prints its peak RSS (the kernel's ru_maxrss of the process, in kB).
LEARNER = textwrap.dedent("""
    import json, resource, sys
    from edgexfer.runtime.device import Device
    root, folder, augment = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with Device(root) as dev:
        report = dev.learn([folder], "noise", augment=augment)
    print(json.dumps({"peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "added": report.added,
                      "views": report.views_added}))
""")


WRAPPER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def _write_bmps(folder: Path, n: int, side: int = 800) -> None:
    """Uncompressed images of 1.9 MB each (written at once, decoded fast), each with its own content."""
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    for i in range(n):
        pixels[0, :4] = np.frombuffer(i.to_bytes(12, "little"), np.uint8).reshape(4, 3)
        Image.fromarray(pixels).save(folder / f"big_{i:03d}.bmp")


def test_peak_memory_does_not_grow_with_the_number_of_files(installed, tmp_path):
    """16 then 48 files of 1.9 MB (with one augmented view each): holding every file's bytes, pixels or decoded
    image would add over 120 MB; one batch at a time adds nothing. benchmarks/learn_scaling.py has 2,000 files."""
    peaks = {}
    for n in (16, 48):
        _write_bmps(tmp_path / f"in{n}", n)
        root = _clone(installed, tmp_path / f"state{n}")
        # through a small wrapper: a process started straight from this (large) test process inherits its
        # high-water mark across exec, and both figures would read as pytest's own
        run = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-c", LEARNER, str(root),
                              str(tmp_path / f"in{n}"), "1"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        result = json.loads(run.stdout)
        assert (result["added"], result["views"]) == (n, n)
        peaks[n] = result["peak_kb"] / 1024
        shutil.rmtree(tmp_path / f"in{n}")
    assert peaks[48] - peaks[16] < 32, f"peak RSS grew with the files: {peaks} MB"
