"""Features through the feature cache: the backbone runs only for samples the cache lacks.

Shared by host training (frozen mode) and device field learning, so both count and cache alike.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.cache import FeatureCache
from edgexfer.runtime.preprocess import PreprocessSpec, stack


@dataclass(frozen=True)
class ExtractionReport:
    """How many samples were asked for and how many went through the backbone."""

    requested: int
    from_cache: int
    extracted: int
    seconds: float


def cached_features(
    backend: EngineRunner,
    cache: FeatureCache,
    backbone_sha256: str,
    spec: PreprocessSpec,
    shas: Sequence[str],
    pixels_of: Callable[[int], np.ndarray],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "extracting features",
) -> tuple[np.ndarray, ExtractionReport]:
    """Features for ``shas`` (samples already in the cache's ``samples`` table).

    ``pixels_of(i)`` gives the uint8 pixels of ``shas[i]`` and is called only for samples whose
    features are missing, so decoding work is skipped with the backbone work.
    """
    key = spec.key()
    missing = set(cache.missing(backbone_sha256, key, shas))
    todo = [i for i, sha in enumerate(shas) if sha in missing]
    # the same image may appear twice in one request: extract it once
    first_index: dict[str, int] = {}
    for i in todo:
        first_index.setdefault(shas[i], i)
    todo = sorted(first_index.values())
    images_before, seconds_before = backend.stats.images, backend.stats.seconds
    with tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo, leave=False) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            feats = backend.run(stack([pixels_of(i) for i in chunk]))
            # each batch is committed on its own: an interrupted run keeps what it extracted
            cache.put_features(backbone_sha256, key, {shas[i]: f for i, f in zip(chunk, feats)})
            bar.update(len(chunk))
    found = cache.get_features(backbone_sha256, key, list(shas))
    matrix = np.stack([found[sha] for sha in shas]).astype(np.float32) if shas else np.zeros((0, 0), np.float32)
    report = ExtractionReport(requested=len(shas), from_cache=len(shas) - len(todo),
                              extracted=backend.stats.images - images_before,
                              seconds=backend.stats.seconds - seconds_before)
    return matrix, report
