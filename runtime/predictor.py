"""Predictor: image -> preprocess -> backbone engine -> head -> label, on host and device alike."""
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

    def _pixels(self, item: ImageInput) -> np.ndarray:
        spec = self.bundle.preprocess
        if isinstance(item, np.ndarray):
            return check_array(item, spec)
        return load_image(item, spec)

    def features(self, pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([self.engine.run(pixels[s:s + self.batch_size])
                               for s in range(0, len(pixels), self.batch_size)])

    def predict(self, items: Sequence[ImageInput], top_k: int = 3) -> list[Prediction | SampleError]:
        """One result per input, in order. Bad inputs give a :class:`SampleError` in their place."""
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

    def classify_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities for an already preprocessed uint8 batch."""
        if pixels.ndim != 4:
            raise InputError("pixels", got=f"shape {pixels.shape}", expected="[N, H, W, 3]")
        return self.head.probabilities(self.features(pixels))


def _source(item: ImageInput, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    if isinstance(item, np.ndarray):
        return f"array[{index}]"
    return f"bytes[{index}]"
