"""A camera-like degradation of images, for the drift tests (issue 27): clipart8 against its shifted copy."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

DEMO = Path(__file__).resolve().parents[1] / "data" / "clipart8-demo"


def camera_shift(data: bytes, rng: np.random.Generator) -> bytes:
    """A seeded camera-like degradation of one image file: tilt, blur, dim light, lower contrast, a warm colour
    cast, sensor noise and a low JPEG quality."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    img = img.rotate(float(rng.uniform(-12, 12)), resample=Image.BILINEAR, fillcolor=(255, 255, 255))
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 2.5))))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.55, 0.8)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.6, 0.9)))
    pixels = np.asarray(img, dtype=np.float32) * np.array([1.08, 1.0, 0.85]) + rng.normal(0, 10, (img.height, img.width, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=int(rng.integers(15, 35)))
    return out.getvalue()


def held_out(clipart8: Path) -> list[Path]:
    """clipart8's images that the demo bundle never trained on (336 of 576)."""
    demo = {p.name for p in DEMO.rglob("*.jpg")}
    return sorted(p for p in clipart8.rglob("*.jpg") if p.name not in demo)
