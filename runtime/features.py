"""Features through the feature cache: the backbone runs only for samples the cache lacks.

Shared by host training (frozen mode) and the device (``Device.recompute_features``), so both count and
cache alike, for images and texts (field learning, which also adds the samples, is
:mod:`edgexfer.runtime.learning`):
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
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.preprocess import PreprocessSpec, stack
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


def cached_features(
    backend: EngineRunner,
    cache: FeatureCache,
    backbone_sha256: str,
    spec: PreprocessSpec | TextSpec,
    shas: Sequence[str],
    pixels_of: Callable[[int], np.ndarray] | None,
    *,
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

    ``shas`` are samples already in the cache, and each batch of features is committed on its own, so
    an interrupted run keeps what it extracted.
    """
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
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            feats = dict(zip((shas[i] for i in chunk), backend.run(batch_of(chunk))))
            # each batch is committed on its own: an interrupted run keeps what it extracted
            cache.put_features(backbone_sha256, key, feats)
            bar.update(len(chunk))
    found = cache.get_features(backbone_sha256, key, shas)
    matrix = np.stack([found[sha] for sha in shas]).astype(np.float32) if shas else np.zeros((0, 0), np.float32)
    report = ExtractionReport(requested=len(shas), from_cache=len(shas) - len(todo),
                              extracted=backend.stats.images - images_before,
                              seconds=backend.stats.seconds - seconds_before)
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
