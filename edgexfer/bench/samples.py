"""The samples every test runs on, preloaded before any timing: encoded bytes and their pixels."""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgexfer.bench.plan import SEED
from edgexfer.bench.report import SampleInfo
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.imagefolder import IMAGE_EXTENSIONS


@dataclass
class SampleSet:
    """Preloaded samples: encoded bytes (end-to-end layer) and their preprocessed pixels (other layers)."""

    encoded: list[bytes]
    pixels: np.ndarray
    source: str
    names: list[str] = field(default_factory=list)

    def describe(self) -> SampleInfo:
        sizes = [len(b) for b in self.encoded]
        return SampleInfo(count=len(self.encoded), source=self.source, mean_encoded_bytes=int(np.mean(sizes)),
                          pixels_shape=list(self.pixels.shape[1:]))


def load_samples(bundle: Bundle, images: str | Path | None = None, count: int = 32) -> SampleSet:
    """``images`` (a folder, searched recursively) or the bundle's golden images encoded as JPEG (quality 90)."""
    from PIL import Image

    from edgexfer.runtime.preprocess import load_image

    spec = bundle.preprocess
    if images is None:
        encoded = []
        for arr in bundle.golden()["images"]:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            encoded.append(buf.getvalue())
        source, names = "bundle golden.npz images, JPEG quality 90", [f"golden[{i}]" for i in range(len(encoded))]
    else:
        root = Path(images)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InputError("--images", got=f"no image files under {root}", expected="a folder of images")
        pick = np.random.default_rng(SEED).permutation(len(files))[:count]
        files = [files[i] for i in sorted(pick)]
        encoded = [f.read_bytes() for f in files]
        source, names = f"{len(files)} files from {root} (seed {SEED})", [str(f.relative_to(root)) for f in files]
    pixels = np.stack([load_image(b, spec) for b in encoded])
    return SampleSet(encoded, pixels, source, names)
