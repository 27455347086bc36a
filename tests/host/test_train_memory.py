"""``edgexfer train`` holds a bounded number of images, at the backbone's size: peak memory does not grow
with the number of photos (a 3-MP photo decodes to 9 MB; holding every one is what used to fill a machine)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("torch")

PHOTO = (1600, 1200)  # 1.9 MP: 5.8 MB decoded


def _photos(root: Path, count: int) -> Path:
    """``count`` seeded 2-MP JPEGs in 2 classes (smooth content, so the files stay small)."""
    rng = np.random.default_rng(count)
    w, h = PHOTO
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    for i in range(count):
        cls = root / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        tint = np.array([(230, 60, 40), (40, 90, 230)][i % 2], np.float32)
        small = rng.normal(0, 20, (h // 64, w // 64, 3)).astype(np.float32)
        noise = np.asarray(Image.fromarray(np.uint8(np.clip(small + 128, 0, 255))).resize((w, h))).astype(np.float32)
        pixels = np.clip(ramp * tint + noise - 128, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(cls / f"{i:04d}.jpg", quality=85)
    return root


#: runs its arguments and prints their peak RSS (kB) as its last line on stderr. The wrapper is small, so its
#: child's high-water mark is the child's own: a process started straight from this (large) test process
#: would inherit the test process's across exec.
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def _train_peak_mb(data: Path, out: Path, cache: Path) -> tuple[float, dict]:
    """Run the real CLI in a child process; its own peak RSS in MB and its metrics."""
    run = subprocess.run([sys.executable, "-c", WRAPPER, sys.executable, "-m", "edgexfer", "train", str(data),
                          "--out", str(out), "--cache", str(cache), "--quiet", "--json", "--workers", "2"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(run.stderr.strip().splitlines()[-1]) / 1024, json.loads(run.stdout)


def test_peak_memory_of_train_does_not_grow_with_the_number_of_photos(tmp_path):
    few_mb, few = _train_peak_mb(_photos(tmp_path / "few", 40), tmp_path / "run40", tmp_path / "a.sqlite")
    many_mb, many = _train_peak_mb(_photos(tmp_path / "many", 100), tmp_path / "run100", tmp_path / "b.sqlite")
    assert few["images_decoded"] == 40 and many["images_decoded"] == 100
    # holding the decoded photos would add 60 x 5.8 MB = 350 MB; streaming holds a few batches at 224x224
    print(f"peak RSS: {few_mb:.0f} MB at 40 photos, {many_mb:.0f} MB at 100")
    assert many_mb - few_mb < 150, (few_mb, many_mb)
    warm_mb, warm = _train_peak_mb(tmp_path / "many", tmp_path / "warm", tmp_path / "b.sqlite")
    assert warm["images_decoded"] == 0 and warm["backbone_images_run"] == 0
    assert warm_mb < many_mb
