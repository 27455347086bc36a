"""A toy modality, registered from the tests alone: a sample is a ``.vec`` file of float32 values.

It proves the modality seam: edgexfer reads, hashes, batches and golden-checks these samples through
this class only (nothing under edgexfer/, converters/ or runtime/ knows it).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.errors import BundleError, InputError
from edgexfer.runtime.manifest import Fields
from edgexfer.runtime.modalities.base import Modality, Sample


@dataclass(frozen=True)
class VectorInputSpec:
    """``backbone.input`` of a toy bundle: the number of float32 values a sample holds."""

    dim: int = 4

    @classmethod
    def parse(cls, obj: Any, where: str) -> VectorInputSpec:
        f = Fields(obj, where)
        spec = cls(dim=f.take("dim", int, check=lambda v: 1 <= v <= 1024, expect="an integer 1..1024"))
        f.done()
        return spec


@dataclass(frozen=True)
class VectorSpec:
    dim: int

    def key(self) -> str:
        return f"vec1:dim={self.dim}"


class VectorModality(Modality):
    name = "vector"
    noun = "vector"
    plural = "vectors"
    input_spec = VectorInputSpec
    batch_size = 8

    @property
    def preprocess(self) -> VectorSpec:
        return VectorSpec(self.backbone.input.dim)

    def _value(self, data: bytes, source: str) -> np.ndarray:
        dim = self.backbone.input.dim
        if len(data) != 4 * dim:
            raise InputError(f"vector {source}", got=f"{len(data)} bytes", expected=f"{4 * dim} bytes ({dim} float32)",
                             todo="write the vector with numpy.float32(...).tobytes()")
        value = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(value).all():
            raise InputError(f"vector {source}", got="NaN or inf", expected="finite values")
        return value

    def read(self, item: Any, source: str) -> Sample:
        if isinstance(item, (str, os.PathLike)):
            data = Path(item).read_bytes()
        elif isinstance(item, (bytes, bytearray)):
            data = bytes(item)
        else:
            raise InputError(f"vector {source}", got=type(item).__name__, expected="a .vec path or its bytes")
        return Sample(hashlib.sha256(data).hexdigest(), data, self._value(data, source), source)

    def decode(self, data: bytes, source: str, max_pixels: int | None = None) -> np.ndarray:
        return self._value(data, source)

    def stored_value(self, data: bytes) -> np.ndarray | None:
        try:
            return self._value(data, "stored")
        except InputError:
            return None

    def accepts_stored(self, data: bytes) -> bool:
        return len(data) == 4 * self.backbone.input.dim

    def feed(self, values: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(np.stack(list(values)).astype(np.float32))

    def golden_feed(self, golden: dict[str, np.ndarray]) -> np.ndarray:
        if "vectors" not in golden:
            raise BundleError("golden.npz of a vector bundle", got=", ".join(golden), expected="vectors")
        return golden["vectors"].astype(np.float32)
