"""Predictor: image or text -> preprocess -> backbone engine -> head -> label, on host and device alike.

The bundle's modality decides how an input is read: for an image bundle a path or bytes is an image
file; for a text bundle a path or bytes is a text file (one sample), and :meth:`Predictor.predict_texts`
takes literal texts (``--text``, stdin lines).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.backends.registry import open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.heads import Head
from edgexfer.runtime.preprocess import check_array, load_image, stack
from edgexfer.runtime.text import TextTokenizer, check_text, decode_text

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
    batch_size: int = 16
    details: dict[str, Any] = field(default_factory=dict)
    _tokenizer: TextTokenizer | None = field(default=None, repr=False)

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "onnxruntime", precision: str = "fp32",
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
        return self.bundle.modality

    @property
    def tokenizer(self) -> TextTokenizer:
        """The text bundle's tokenizer, loaded (and checked against the manifest) once."""
        if self._tokenizer is None:
            self._tokenizer = self.bundle.tokenizer()
        return self._tokenizer

    def _pixels(self, item: ImageInput) -> np.ndarray:
        spec = self.bundle.preprocess
        if isinstance(item, np.ndarray):
            return check_array(item, spec)
        return load_image(item, spec)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([self.engine.run(pixels[s:s + self.batch_size])
                               for s in range(0, len(pixels), self.batch_size)])

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Features of normalised texts (tokenized in batches of similar length)."""
        from edgexfer.runtime.features import text_features

        return text_features(self.engine, self.tokenizer, texts)[0]

    def predict(self, items: Sequence[ImageInput], top_k: int = 3) -> list[Prediction | SampleError]:
        """One result per input, in order. Bad inputs give a :class:`SampleError` in their place.

        A path or bytes is an image file for an image bundle and a text file for a text bundle.
        """
        if self.modality == "text":
            return self._predict_texts([(_source(item, i), item) for i, item in enumerate(items)], top_k, files=True)
        results: list[Prediction | SampleError | None] = [None] * len(items)
        good: list[int] = []
        arrays: list[np.ndarray] = []
        for i, item in enumerate(items):
            try:
                arrays.append(self._pixels(item))
                good.append(i)
            except EdgexferError as exc:
                results[i] = SampleError(_source(item, i), str(exc), type(exc).__name__)
        if good:
            probs = self.head.probabilities(self.features(stack(arrays)))
            classes = self.head.classes
            k = min(top_k, len(classes))
            for row, i in zip(probs, good):
                if not np.isfinite(row).all():
                    results[i] = SampleError(_source(items[i], i), "non-finite probabilities", "InputError")
                    continue
                order = np.argsort(-row)[:k]
                results[i] = Prediction(_source(items[i], i), classes[order[0]], float(row[order[0]]),
                                        [(classes[j], float(row[j])) for j in order], self.backend, self.precision)
        return results  # type: ignore[return-value]

    def predict_texts(self, texts: Sequence[str], top_k: int = 3,
                      sources: Sequence[str] | None = None) -> list[Prediction | SampleError]:
        """Literal texts (a text bundle's ``--text`` and stdin lines): one result per text, in order."""
        if self.modality != "text":
            raise InputError("texts given to an image bundle", got=f"{len(texts)} text(s) for {self.bundle.root}",
                             expected="image files", todo="use a text bundle, or pass image files")
        sources = list(sources) if sources is not None else [f"text[{i}]" for i in range(len(texts))]
        return self._predict_texts(list(zip(sources, texts)), top_k, files=False)

    def _predict_texts(self, items: list[tuple[str, Any]], top_k: int, *, files: bool) -> list[Prediction | SampleError]:
        results: list[Prediction | SampleError | None] = [None] * len(items)
        good: list[int] = []
        texts: list[str] = []
        for i, (source, item) in enumerate(items):
            try:
                texts.append(_read_text(item, source) if files else check_text(item, source))
                good.append(i)
            except OSError as exc:
                results[i] = SampleError(source, f"cannot read file | got {exc.strerror or exc}", "InputError")
            except EdgexferError as exc:
                results[i] = SampleError(source, str(exc), type(exc).__name__)
        if good:
            self._label(self.head.probabilities(self.text_features(texts)), good, [s for s, _ in items], results, top_k)
        return results  # type: ignore[return-value]

    def _label(self, probs: np.ndarray, good: list[int], sources: list[str], results: list, top_k: int) -> None:
        classes = self.head.classes
        k = min(top_k, len(classes))
        for row, i in zip(probs, good):
            if not np.isfinite(row).all():
                results[i] = SampleError(sources[i], "non-finite probabilities", "InputError")
                continue
            order = np.argsort(-row)[:k]
            results[i] = Prediction(sources[i], classes[order[0]], float(row[order[0]]),
                                    [(classes[j], float(row[j])) for j in order], self.backend, self.precision)

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for an already preprocessed uint8 batch."""
        if pixels.ndim != 4:
            raise InputError("pixels", got=f"shape {pixels.shape}", expected="[N, H, W, 3]")
        return self.head.probabilities(self.features(pixels))


def _read_text(item: Any, source: str) -> str:
    """A text file (path) or its bytes -> the normalised sample."""
    if isinstance(item, (str, os.PathLike)):
        return decode_text(Path(item).read_bytes(), source)
    if isinstance(item, (bytes, bytearray)):
        return decode_text(bytes(item), source)
    raise InputError(f"input {source}", got=type(item).__name__,
                     expected="a text file path or its bytes (literal texts: predict_texts)")


def _source(item: ImageInput, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array[{index}]"
    return f"bytes[{index}]"
