"""Host-side ImageFolder data sets: scan a class-per-folder tree, split it, decode it once.

Decoding goes through :func:`edgexfer.runtime.preprocess.decode_image`, the same code the device runs,
so training sees exactly the pixels inference will see. No torch here: the feature extraction and
training modules decide what to do with the decoded images.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.imagefolder import IMAGE_EXTENSIONS, ImageFolder, scan_image_folder
from edgexfer.runtime.preprocess import DEFAULT_MAX_PIXELS, decode_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeResult",
    "ImageFolder",
    "decode_all",
    "describe_skipped",
    "scan_image_folder",
    "stratified_split",
]

@dataclass
class DecodeResult:
    """Output of :func:`decode_all`; ``images`` and ``sha256`` are aligned with the input paths."""

    #: The decoded RGB image, or None for a skipped file.
    images: list[Image.Image | None]
    #: Hex sha256 of the file's bytes (the feature cache key), or None for a skipped file.
    sha256: list[str | None]
    #: (path, reason) for every file that could not be read or decoded, in input order.
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def stratified_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (train, val), keeping each class's share; both sorted int64 arrays.

    Each class with n >= 2 samples gives round(n * val_fraction) samples to val (halves round up), but
    at least 1 and at most n - 1, so every class is both trained and measured. A class with a single
    sample goes to train. Each class is shuffled by its own generator seeded with (seed, label), so the
    split of one class does not change when other classes gain or lose samples.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise InputError("validation fraction", got=repr(val_fraction), expected="a number between 0 and 1 (exclusive)",
                         todo="use e.g. 0.2")
    array = np.asarray(labels)
    if array.ndim != 1 or (array.size and (array.dtype.kind not in "iu" or array.min() < 0)):
        raise InputError("labels", got=f"{array.dtype} array of shape {array.shape}",
                         expected="a 1-D sequence of non-negative ints")

    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(array):
        members = np.flatnonzero(array == label)
        count = len(members)
        if count < 2:
            train.append(members)
            continue
        # floor(x + 0.5) rounds halves up; Python's round() would send 2.5 to 2 (banker's rounding).
        n_val = min(max(math.floor(count * val_fraction + 0.5), 1), count - 1)
        shuffled = np.random.default_rng([seed, int(label)]).permutation(members)
        val.append(shuffled[:n_val])
        train.append(shuffled[n_val:])
    return _sorted_indices(train), _sorted_indices(val)


def decode_all(
    paths: Iterable[str | os.PathLike[str]],
    spec_fill: tuple[int, int, int] = (255, 255, 255),
    *,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodeResult:
    """Read and decode every file once; bad files are skipped with a reason, never raised.

    Each file's bytes are read once, hashed (sha256, for the feature cache) and decoded from memory by
    :func:`edgexfer.runtime.preprocess.decode_image` with ``spec_fill`` as the alpha background. A
    progress bar goes to stderr unless ``progress`` is False. Decoded images stay in memory (about
    3 bytes per pixel of the original), which suits data sets of a few thousand images.
    """
    items = [Path(path) for path in paths]
    result = DecodeResult(images=[], sha256=[], skipped=[])
    for path in tqdm(items, desc="decoding images", unit="img", file=sys.stderr, disable=not progress):
        try:
            data = path.read_bytes()
        except OSError as exc:
            _skip(result, path, f"cannot read file: {exc.strerror or exc}")
            continue
        try:
            image = decode_image(data, fill=spec_fill, max_pixels=max_pixels)
        except InputError as exc:
            # ``got`` holds the reason alone; the message's "what" names the bytes, not the path.
            _skip(result, path, str(exc.got) if exc.got is not None else str(exc))
            continue
        result.images.append(image)
        result.sha256.append(hashlib.sha256(data).hexdigest())
    return result


def describe_skipped(skipped: Sequence[tuple[Path, str]], total: int | None = None, *, limit: int = 20) -> str:
    """Human summary of skipped files, one per line, e.g. ``skipped 2 of 240 files:\\n  a.jpg: reason``.

    At most ``limit`` files are listed; the rest are counted. Returns "" when nothing was skipped.
    """
    if not skipped:
        return ""
    of_total = f" of {total}" if total is not None else ""
    lines = [f"skipped {len(skipped)}{of_total} file{'s' if (total or len(skipped)) != 1 else ''}:"]
    lines.extend(f"  {path}: {reason}" for path, reason in skipped[:limit])
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def _skip(result: DecodeResult, path: Path, reason: str) -> None:
    result.images.append(None)
    result.sha256.append(None)
    result.skipped.append((path, reason))


def _sorted_indices(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)
