"""Host-side ImageFolder data sets: scan a class-per-folder tree, split it, and stream it batch by batch.

Memory is bounded by the batch, never by the data set: a scan reads each file once in chunks to hash it
(:func:`hash_files`, the feature cache's key) and keeps only paths and digests; :class:`ImageFiles` decodes
an image when it is asked for one; :func:`stream_pixels` decodes and resizes a batch at a time on worker
threads (Pillow releases the GIL while it decodes and resamples), a few batches ahead of the engine.
Decoding goes through :func:`edgexfer.runtime.preprocess.decode_image`, the same code the device runs,
so training sees exactly the pixels inference will see. No torch here.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.imagefolder import IMAGE_EXTENSIONS, ImageFolder, scan_image_folder
from edgexfer.runtime.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec, decode_image, resize_to_spec

__all__ = [
    "IMAGE_EXTENSIONS",
    "HashResult",
    "ImageFiles",
    "ImageFolder",
    "default_workers",
    "describe_skipped",
    "hash_files",
    "scan_image_folder",
    "stratified_split",
    "stream_pixels",
]

#: bytes read at a time while hashing (a 12 MB photo is never held whole)
_CHUNK = 1 << 20


def default_workers() -> int:
    """Decoding threads when none are asked for: the cores, at most 4 (the engine needs cores too)."""
    return max(1, min(4, os.cpu_count() or 1))


def check_workers(workers: object) -> int:
    """``workers`` as a positive int, or the one-line error of a bad ``--workers``."""
    if workers is None:
        return default_workers()
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise InputError("--workers", got=repr(workers), expected="an integer 1..64 (decoding threads)",
                         todo=f"leave it out for {default_workers()} on this machine")
    return workers


@dataclass
class HashResult:
    """Output of :func:`hash_files`: ``sha256`` is aligned with the input paths (None: unreadable)."""

    sha256: list[str | None]
    #: (path, reason) for every file that could not be read, in input order.
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def hash_files(paths: Sequence[str | os.PathLike[str]], *, workers: int = 1, progress: bool = True) -> HashResult:
    """sha256 of every file's bytes (the feature cache's key), read in 1 MiB chunks on ``workers`` threads.

    Nothing is decoded: a file that is no image is found when it is decoded, and skipped then. A file
    that cannot be read is skipped here with its reason, never raised.
    """
    items = [Path(path) for path in paths]

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    result = HashResult(sha256=[])
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = _bounded_map(pool, digest, items, ahead=8 * max(1, workers))
        for path, future in tqdm(zip(items, futures), total=len(items), desc="hashing files", unit="file",
                                 file=sys.stderr, disable=not progress):
            try:
                result.sha256.append(future.result())
            except OSError as exc:
                result.sha256.append(None)
                result.skipped.append((path, f"cannot read file: {exc.strerror or exc}"))
    return result


class ImageFiles(Sequence):
    """Images on disk as a sequence of decoded RGB images: ``files[i]`` decodes ``paths[i]`` when asked.

    Only the last decoded image is kept (augmented views of one image are asked for in a row), so
    memory does not grow with the data set. ``decoded`` counts the decodes (a warm ``train`` decodes
    no cached image). A file that cannot be decoded raises :class:`InputError` whose ``got`` is the reason.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], fill: tuple[int, int, int] = (255, 255, 255),
                 max_pixels: int = DEFAULT_MAX_PIXELS, *, counter: list[int] | None = None):
        self.paths = tuple(Path(p) for p in paths)
        self.fill, self.max_pixels = fill, max_pixels
        self._count = counter if counter is not None else [0]  # shared by subsets: one count per data set
        self._lock = threading.Lock()
        self._last: tuple[int, Image.Image] | None = None

    @property
    def decoded(self) -> int:
        """How many times a file was decoded (by this sequence, its subsets and their streams)."""
        return self._count[0]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.subset(range(len(self))[i])
        i = range(len(self))[i]  # negative indices, IndexError
        last = self._last
        if last is not None and last[0] == i:
            return last[1]
        image = self.decode(i)
        self._last = (i, image)
        return image

    def decode(self, i: int) -> Image.Image:
        """Decode file ``i`` now (thread-safe, not remembered)."""
        with self._lock:
            self._count[0] += 1
        return decode_image(self.paths[i], fill=self.fill, max_pixels=self.max_pixels)

    def pixels(self, i: int, spec: PreprocessSpec) -> np.ndarray:
        """File ``i`` decoded and resized to ``spec``: the uint8 ``[H, W, 3]`` input of the backbone."""
        return resize_to_spec(self.decode(i), spec)

    def subset(self, indices: Sequence[int]) -> ImageFiles:
        """The files ``indices``, in that order, counting their decodes with this sequence's."""
        return ImageFiles([self.paths[i] for i in indices], self.fill, self.max_pixels, counter=self._count)


def stream_pixels(
    files: ImageFiles,
    indices: Sequence[int],
    spec: PreprocessSpec,
    *,
    batch_size: int = 16,
    workers: int = 1,
    convert: Callable[[int], Any] | None = None,
) -> Iterator[tuple[list[int], list[Any], list[tuple[int, str]]]]:
    """Decode ``indices`` of ``files`` on ``workers`` threads and yield them a batch at a time, in order.

    Yields ``(done, values, failed)``: the indices that decoded, their values (``files.pixels(i, spec)``,
    or ``convert(i)``) and ``(index, reason)`` of the ones that did not. At most a few batches are in
    flight, so memory is bounded by the batch (at the backbone's input size), whatever the data set.
    """
    work = convert or (lambda i: files.pixels(i, spec))

    def attempt(i: int) -> tuple[bool, Any]:
        try:
            return True, work(i)
        except InputError as exc:
            return False, str(exc.got) if exc.got is not None else str(exc)

    batch_size = max(1, batch_size)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        futures = _bounded_map(pool, attempt, list(indices), ahead=2 * batch_size + workers)
        done: list[int] = []
        values: list[Any] = []
        failed: list[tuple[int, str]] = []
        for i, future in zip(indices, futures):
            ok, value = future.result()
            if ok:
                done.append(i)
                values.append(value)
            else:
                failed.append((i, value))
            if len(done) + len(failed) == batch_size:
                yield done, values, failed
                done, values, failed = [], [], []
        if done or failed:
            yield done, values, failed


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Sequence[Any], *,
                 ahead: int) -> Iterator[Future]:
    """``pool.submit(fn, item)`` for each item, in order, never more than ``ahead`` unfinished results."""
    queue: deque[Future] = deque()
    items_iter = iter(items)
    for item in items_iter:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
            break
    while queue:
        future = queue.popleft()
        yield future
        for item in items_iter:
            queue.append(pool.submit(fn, item))
            break


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


def _sorted_indices(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)
