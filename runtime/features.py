"""Features through the feature cache: the backbone runs only for samples the cache lacks.

Shared by host training (frozen mode) and the device (``Device.learn`` and
``Device.recompute_features``), so all of them count and cache alike, for images and texts:
:func:`cached_features` takes the pixels of one sample (images) or builds the engine input of a batch
(texts: :func:`text_batches`); :func:`text_features` is the uncached "features of these texts" that
predict, export and the golden check call.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.cache import FeatureCache, SampleRecord
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.preprocess import PreprocessSpec, stack
from edgexfer.runtime.state import crash_point
from edgexfer.runtime.text import TextSpec, TextTokenizer

#: texts per engine call: a batch is padded to its longest text, so texts are batched by length
TEXT_BATCH_SIZE = 32


@dataclass(frozen=True)
class ExtractionReport:
    """How many samples were asked for and how many went through the backbone."""

    requested: int
    from_cache: int  #: requested samples whose features were cached already
    extracted: int  #: images that went through the backbone
    seconds: float  #: time spent in the backbone
    #: samples given as ``records`` that the cache's per-class capacity dropped (their rows are left out)
    dropped: tuple[str, ...] = ()


def cached_features(
    backend: EngineRunner,
    cache: FeatureCache,
    backbone_sha256: str,
    spec: PreprocessSpec | TextSpec,
    shas: Sequence[str],
    pixels_of: Callable[[int], np.ndarray] | None,
    *,
    records: Sequence[SampleRecord] | None = None,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "extracting features",
    batch_of: Callable[[list[int]], Any] | None = None,
    order: Callable[[int], Any] | None = None,
) -> tuple[np.ndarray, ExtractionReport]:
    """Features for ``shas``, float32 ``[N, D]`` in their order, and what it took.

    ``pixels_of(i)`` gives the uint8 pixels of ``shas[i]`` and is called only for samples whose
    features are missing, so decoding work is skipped with the backbone work. Texts pass
    ``pixels_of=None`` and ``batch_of(indices)``, the engine input of those samples (a
    :class:`~edgexfer.runtime.text.TokenBatch`), and ``order`` (a sort key of a sample index: texts of
    similar length share a batch, so little of it is padding); see :func:`text_batches`.

    Two ways to commit:

    * ``records=None`` (host training, recomputing after a backbone change): ``shas`` are samples
      already in the cache, and each batch of features is committed on its own, so an interrupted
      run keeps what it extracted.
    * ``records`` given (field learning): ``records[i]`` is the sample ``shas[i]``, to be added. All
      features are extracted first, then the samples are added and their features stored in one
      transaction: a sample is confirmed with its features or not at all. The cache's per-class
      capacity may drop some of them; they are listed in ``report.dropped`` and have no row.
    """
    if records is not None and [r.sha256 for r in records] != list(shas):
        raise InputError("cached_features: records and shas differ", got=f"{len(records)} records for {len(shas)} shas",
                         expected="records[i].sha256 == shas[i]", todo="pass shas=[r.sha256 for r in records]")
    key = spec.key()
    missing = set(cache.missing(backbone_sha256, key, shas))
    todo = [i for i, sha in enumerate(shas) if sha in missing]
    # the same image may appear twice in one request: extract it once
    first_index: dict[str, int] = {}
    for i in todo:
        first_index.setdefault(shas[i], i)
    todo = sorted(first_index.values())
    if order is not None:
        todo.sort(key=order)
    if batch_of is None:
        if pixels_of is None:
            raise InputError("cached_features", got="neither pixels_of nor batch_of", expected="one of them")
        batch_of = lambda chunk: stack([pixels_of(i) for i in chunk])  # noqa: E731
    images_before, seconds_before = backend.stats.images, backend.stats.seconds
    extracted: dict[str, np.ndarray] = {}
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            feats = dict(zip((shas[i] for i in chunk), backend.run(batch_of(chunk))))
            if records is None:
                # each batch is committed on its own: an interrupted run keeps what it extracted
                cache.put_features(backbone_sha256, key, feats)
            else:
                extracted.update(feats)
            bar.update(len(chunk))
    kept = set(shas)
    if records is not None:
        crash_point("learn-before-commit")  # the crash tests kill field learning here: extracted, nothing committed
        # one transaction: the samples and their features are confirmed together or not at all
        with cache.transaction():
            kept = set(cache.add_samples(records))  # the capacity policy may drop some
            cache.put_features(backbone_sha256, key, {sha: f for sha, f in extracted.items() if sha in kept})
    wanted = [sha for sha in shas if sha in kept]
    found = cache.get_features(backbone_sha256, key, wanted)
    matrix = np.stack([found[sha] for sha in wanted]).astype(np.float32) if wanted else np.zeros((0, 0), np.float32)
    report = ExtractionReport(requested=len(shas), from_cache=len(shas) - len(todo),
                              extracted=backend.stats.images - images_before,
                              seconds=backend.stats.seconds - seconds_before,
                              dropped=tuple(sha for sha in dict.fromkeys(shas) if sha not in kept))
    return matrix, report


def text_batches(tokenizer: TextTokenizer, texts: Sequence[str]) -> dict[str, Any]:
    """The text arguments of :func:`cached_features`: ``batch_of``, ``order``, ``batch_size``, ``pixels_of``."""
    return {"pixels_of": None, "batch_of": lambda chunk: tokenizer.encode([texts[i] for i in chunk]),
            "order": lambda i: len(texts[i]), "batch_size": TEXT_BATCH_SIZE}


def text_features(backend: EngineRunner, tokenizer: TextTokenizer, texts: Sequence[str],
                  batch_size: int = TEXT_BATCH_SIZE) -> tuple[np.ndarray, int]:
    """Features of ``texts`` (normalised samples), float32 ``[N, D]`` in their order, and how many were truncated.

    Texts are tokenized and run in batches of similar length (a batch is padded to its longest text).
    """
    if not texts:
        return np.zeros((0, 0), np.float32), 0
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows: list[np.ndarray] = [np.empty(0)] * len(texts)
    truncated = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tokenizer.encode([texts[i] for i in chunk])
        truncated += batch.truncated
        for i, row in zip(chunk, backend.run(batch)):
            rows[i] = row
    return np.stack(rows).astype(np.float32, copy=False), truncated
