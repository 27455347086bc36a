"""Synthetic, photo-like, labelled JPEGs for ``benchmarks/scaling.py``, generated once into a cache folder.

Each image is a smooth colour gradient with low-frequency blotches, a few small distractor shapes, one large
shape whose kind (and, in 70 % of images, hue) names its class, and fine sensor-like noise, so JPEG sizes are
photo-like (a 256x256 image ~18 KB, a 3-MP photo ~0.8 MB at quality 90) and a linear probe has something to
learn.
Everything is seeded by (seed, kind, class, index): the same call writes the same bytes on any machine with
the same Pillow and numpy.

    python benchmarks/scaling_images.py OUT_DIR --count 400 --size 256x256
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: class name -> (shape, base hue as RGB): the classifier tells them apart by shape and dominant colour
CLASSES = {
    "circles": ("circle", (205, 60, 50)),
    "squares": ("square", (60, 170, 70)),
    "stripes": ("stripes", (225, 195, 50)),
    "triangles": ("triangle", (55, 85, 200)),
}
JPEG_QUALITY = 90
#: share of images whose main shape has its class's hue (the others: any colour)
HUE_SHARE = 0.7
#: per-pixel uniform noise in [-NOISE, NOISE] (std ~7 of 255): 3-MP photos ~0.75 MB, 256x256 ~18 KB at JPEG_QUALITY
NOISE = 12


def class_counts(total: int) -> dict[str, int]:
    """``total`` images spread over the classes as evenly as possible (the first classes get the remainder)."""
    names = list(CLASSES)
    return {name: total // len(names) + (i < total % len(names)) for i, name in enumerate(names)}


def render(seed: int, kind_id: int, cls: int, index: int, size: tuple[int, int]) -> Image.Image:
    """One image of class number ``cls`` (order of :data:`CLASSES`), ``size`` = (width, height)."""
    rng = np.random.default_rng([seed, kind_id, cls, index])
    w, h = size
    # background: a diagonal gradient between two muted colours plus low-frequency blotches (upscaled noise)
    c0, c1 = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * np.linspace(0, 1, w, dtype=np.float32)[None, :]
         + np.sin(angle) * np.linspace(0, 1, h, dtype=np.float32)[:, None])
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t[..., None]
    blot = rng.normal(0, 18, (max(h // 64, 3), max(w // 64, 3), 3)).astype(np.float32)
    blot_img = Image.fromarray(np.clip(blot + 128, 0, 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    bg += np.asarray(blot_img, dtype=np.float32) - 128
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    scale = min(w, h)
    for _ in range(int(rng.integers(2, 6))):  # distractors: small shapes of any colour
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.09) * scale
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
    shape, hue = list(CLASSES.values())[cls]
    if rng.random() < HUE_SHARE:
        colour = tuple(int(np.clip(v + rng.normal(0, 22), 0, 255)) for v in hue)
    else:  # any colour: only the shape tells the class
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    _draw_main(draw, shape, colour, rng, w, h, scale)
    pixels = np.asarray(img, dtype=np.int16)
    pixels += rng.integers(-NOISE, NOISE + 1, pixels.shape, dtype=np.int16)  # sensor noise: a photo's JPEG size
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _draw_main(draw: ImageDraw.ImageDraw, shape: str, colour, rng, w: int, h: int, scale: int) -> None:
    """The class's shape, large, somewhere near the middle."""
    cx, cy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)
    r = scale * rng.uniform(0.1, 0.3)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    else:  # stripes across the whole image
        period = scale * rng.uniform(0.08, 0.14)
        for k in range(int(max(w, h) / period) + 2):
            x = k * period
            draw.rectangle([x, 0, x + period * 0.45, h], fill=colour)


def _write_one(job: tuple[int, int, int, int, tuple[int, int], str]) -> int:
    seed, kind_id, cls, index, size, path = job
    tmp = f"{path}.tmp{os.getpid()}"
    render(seed, kind_id, cls, index, size).save(tmp, format="JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, path)  # a generation cut short never leaves a truncated JPEG under the final name
    return os.path.getsize(path)


def ensure_images(root: Path, per_class: int, size: tuple[int, int], *, seed: int = 0, kind_id: int = 0,
                  workers: int = 2) -> dict[str, list[Path]]:
    """``root/<class>/<index>.jpg`` for indices ``0..per_class-1`` of every class; missing ones are written
    (on ``workers`` processes), existing ones reused. Returns the paths per class, in index order."""
    jobs, paths = [], {}
    for cls, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        have = set(os.listdir(folder))
        paths[name] = [folder / f"{i:06d}.jpg" for i in range(per_class)]
        jobs += [(seed, kind_id, cls, i, size, str(p)) for i, p in enumerate(paths[name]) if p.name not in have]
    if jobs:
        if workers > 1 and len(jobs) > 8:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_one, jobs, chunksize=8))
        else:
            for job in jobs:
                _write_one(job)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--count", type=int, default=40, help="images per class")
    ap.add_argument("--size", default="256x256", help="WIDTHxHEIGHT")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    paths = ensure_images(args.out, args.count, (w, h), seed=args.seed, workers=args.workers)
    sizes = [p.stat().st_size for ps in paths.values() for p in ps]
    print(f"{len(sizes)} images in {args.out}, mean {np.mean(sizes) / 1e3:.1f} KB")


if __name__ == "__main__":
    main()
