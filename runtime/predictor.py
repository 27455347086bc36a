"""Predictor: sample -> preprocess -> backbone engine -> head -> label, on host and device alike.

The bundle's modality (:mod:`edgexfer.runtime.modalities`) reads the inputs: a path or bytes is a file of
that modality (an image, a text: one sample); :meth:`Predictor.predict_texts` takes literal samples where
the modality has them (``--text``, stdin lines).
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.backends.registry import HOST_DEFAULT, open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.heads import Head
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.modalities.base import Modality, Sample, source_name
from edgexfer.runtime.text import TextTokenizer

ImageInput = bytes | str | os.PathLike | np.ndarray


@dataclass(frozen=True)
class Prediction:
    source: str
    label: str
    probability: float
    top_k: list[tuple[str, float]]
    backend: str
    precision: str

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "label": self.label, "probability": round(self.probability, 6),
                "top_k": [{"label": lbl, "probability": round(p, 6)} for lbl, p in self.top_k],
                "backend": self.backend, "precision": self.precision}


@dataclass(frozen=True)
class SampleError:
    """A sample that could not be classified; the other samples of the call still are."""

    source: str
    error: str
    kind: str = "InputError"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "error": self.error, "kind": self.kind}


@dataclass
class Predictor:
    bundle: Bundle
    engine: EngineRunner
    head: Head
    backend: str
    precision: str
    #: samples per engine call; None: the modality's own (16 images, 32 texts)
    batch_size: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: hears (features, probabilities, labels) of every classified chunk (``Device`` keeps them for the drift test)
    observer: Callable[[np.ndarray, np.ndarray, list[str]], None] | None = None

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = HOST_DEFAULT, precision: str = "fp32",
                    **engine_options: Any) -> Predictor:
        bundle = Bundle.open(path)
        head = bundle.head()
        engine = open_backend(backend, bundle.engine_file(backend, precision), precision=precision, **engine_options)
        return cls(bundle, engine, head, backend, precision, details={**engine.details, "execution": engine.execution})

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def modality(self) -> str:
        """The name of the bundle's modality (for records)."""
        return self.bundle.modality

    @property
    def tokenizer(self) -> TextTokenizer:
        """The text bundle's tokenizer, loaded (and checked against the manifest) once."""
        return self.bundle.tokenizer()

    def features(self, pixels: Any) -> np.ndarray:
        """Features of sample values (an image batch's pixels, or texts), in batches of the modality's size."""
        return modality_of(self.bundle).features(self.engine, pixels, self.batch_size)

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Features of normalised texts (tokenized in batches of similar length)."""
        return self.features(texts)

    def predict(self, items: Sequence[ImageInput], top_k: int = 3) -> list[Prediction | SampleError]:
        """One result per input, in order. Bad inputs give a :class:`SampleError` in their place.

        A path or bytes is a file of the bundle's modality (an image, a text); an array is an image's pixels.
        """
        modality = modality_of(self.bundle)
        return self._classify([(source_name(item, i), item) for i, item in enumerate(items)], modality.read, top_k)

    def predict_texts(self, texts: Sequence[str], top_k: int = 3,
                      sources: Sequence[str] | None = None) -> list[Prediction | SampleError]:
        """Literal samples (a text bundle's ``--text`` and stdin lines): one result per text, in order."""
        modality = modality_of(self.bundle)
        if not modality.takes_literals:
            raise InputError(f"texts given to an {modality.name} bundle", got=f"{len(texts)} text(s) for {self.bundle.root}",
                             expected=f"{modality.noun} files", todo=f"use a text bundle, or pass {modality.noun} files")
        sources = list(sources) if sources is not None else [f"text[{i}]" for i in range(len(texts))]
        return self._classify(list(zip(sources, texts)), modality.literal, top_k)

    def _classify(self, items: list[tuple[str, Any]], read: Callable[[Any, str], Sample],
                  top_k: int) -> list[Prediction | SampleError]:
        """Read and classify ``items`` a few engine batches at a time: memory is bounded by the chunk."""
        results: list[Prediction | SampleError | None] = [None] * len(items)
        chunk = max(4 * (self.batch_size or 16), 64)
        for start in range(0, len(items), chunk):
            self._classify_chunk(items, range(start, min(start + chunk, len(items))), read, top_k, results)
        return results  # type: ignore[return-value]

    def _classify_chunk(self, items: list[tuple[str, Any]], indices: range, read: Callable[[Any, str], Sample],
                        top_k: int, results: list) -> None:
        good: list[int] = []
        values: list[Any] = []
        for i in indices:
            source, item = items[i]
            try:
                values.append(read(item, source).value)
                good.append(i)
            except EdgexferError as exc:
                results[i] = SampleError(source, str(exc), type(exc).__name__)
            except OSError as exc:  # a plug-in modality that let an unreadable file through
                results[i] = SampleError(source, f"cannot read file {source} | got {exc.strerror or exc}", "InputError")
        if good:
            probs, features = classify_values(modality_of(self.bundle), self.engine, self.head, values,
                                              self.batch_size)
            self._label(probs, good, items, results, top_k)
            if self.observer is not None:
                self.observer(features, probs, [self.head.classes[j] for j in np.argmax(probs, axis=1)])

    def _label(self, probs: np.ndarray, good: list[int], items: list[tuple[str, Any]], results: list,
               top_k: int) -> None:
        classes = self.head.classes
        k = min(top_k, len(classes))
        for row, i in zip(probs, good):
            if not np.isfinite(row).all():
                results[i] = SampleError(items[i][0], "non-finite probabilities", "InputError")
                continue
            order = np.argsort(-row)[:k]
            results[i] = Prediction(items[i][0], classes[order[0]], float(row[order[0]]),
                                    [(classes[j], float(row[j])) for j in order], self.backend, self.precision)

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for an already preprocessed batch (uint8 pixels, float32 waveforms)."""
        rank = len(self.engine.input_spec().shape)  # 4 for pixels [N, H, W, 3], 2 for waveforms [N, S]
        if pixels.ndim != rank:
            raise InputError("engine input batch", got=f"shape {pixels.shape}",
                             expected="[N, H, W, 3]" if rank == 4 else f"a batch of rank {rank}")
        # the engine's own input already (the bench times this step): no modality reads it again
        size = self.batch_size or 16
        features = np.concatenate([self.engine.run(pixels[s:s + size]) for s in range(0, len(pixels), size)])
        return self.head.probabilities(features)


def classify_values(modality: Modality, engine: EngineRunner, head: Head, values: Any,
                    batch_size: int | None = None,
                    timed: Callable[[str, float], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The engine-plus-head step of :class:`Predictor` and of ``device serve``/``watch`` (the service's core).

    Features of sample values (``modality.features``: ``batch_size`` samples per engine call, None: the
    modality's own), then the head's class probabilities. Returns (probabilities float32 ``[N, C]``,
    features float32 ``[N, D]``). ``timed(stage, seconds)`` hears how long the "engine" and the "head" took.
    """
    started = time.perf_counter()
    features = modality.features(engine, values, batch_size)
    mid = time.perf_counter()
    probabilities = head.probabilities(features)
    if timed is not None:
        timed("engine", mid - started)
        timed("head", time.perf_counter() - mid)
    return probabilities.astype(np.float32, copy=False), features.astype(np.float32, copy=False)
