"""Images: files Pillow decodes, resized by the manifest's policy to the backbone's ``uint8[H, W, 3]`` input.

A sample's identity is the sha256 of its file's bytes (the cache keeps those bytes); its value is its
resized pixels (:mod:`edgexfer.runtime.preprocess`, the one image preprocessing of edgexfer). An
in-memory array is taken as pixels already resized (predict only: it has no file to keep).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.imagefolder import IMAGE_EXTENSIONS
from edgexfer.runtime.manifest import InputSpec
from edgexfer.runtime.modalities.base import Modality, Sample, ServiceInput
from edgexfer.runtime.preprocess import (
    DEFAULT_MAX_PIXELS,
    PreprocessSpec,
    check_array,
    check_header,
    decode_image,
    read_source,
    resize_to_spec,
    stack,
)


class ImageModality(Modality):
    name = "image"
    noun = "image"
    plural = "images"
    input_spec = InputSpec
    augmentable = True
    streams = True
    batch_size = 16
    file_suffixes = tuple(sorted(IMAGE_EXTENSIONS))
    dataset_help = "an ImageFolder tree"
    calibration_loader = "edgexfer.converters.calibration:load_image_calibration"

    def __init__(self, backbone: Any, root=None):
        super().__init__(backbone, root)
        inp = backbone.input
        self._spec = PreprocessSpec(size=tuple(inp.size), resize=inp.resize, fill=tuple(inp.fill))

    @property
    def preprocess(self) -> PreprocessSpec:
        return self._spec

    def read(self, item: Any, source: str) -> Sample:
        if isinstance(item, np.ndarray):
            pixels = check_array(item, self._spec)
            return Sample(hashlib.sha256(pixels.tobytes()).hexdigest(), None, pixels, source)
        data, name = read_source(item)  # a path or bytes; one-line InputError for anything else
        return Sample(hashlib.sha256(data).hexdigest(), data, self.pixels(data, name), source)

    def identify(self, item: Any, source: str) -> Sample:
        """The file's bytes and sha256, its header checked (an image of a known format and a sane size); the
        pixels are decoded by :meth:`value_of` when needed."""
        if isinstance(item, np.ndarray):
            return self.read(item, source)
        data, name = read_source(item)
        check_header(data, name=name)
        return Sample(hashlib.sha256(data).hexdigest(), data, None, source)

    def value_of(self, sample: Sample) -> np.ndarray:
        return sample.value if sample.value is not None else self.pixels(sample.data, sample.source)

    def pixels(self, data: bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """An image file's bytes -> the backbone's resized pixels."""
        return resize_to_spec(decode_image(data, fill=self._spec.fill, max_pixels=max_pixels, name=name), self._spec)

    def decoded(self, data: bytes):
        """The full-size RGB image of a sample's bytes (augmentation crops it before resizing)."""
        return decode_image(data, fill=self._spec.fill)

    def decode(self, data: bytes, source: str, max_pixels: int | None = None) -> np.ndarray:
        return self.pixels(data, None, max_pixels or DEFAULT_MAX_PIXELS)

    def stored_value(self, data: bytes) -> np.ndarray | None:
        return self.pixels(data)

    def feed(self, values: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        if isinstance(values, np.ndarray) and values.ndim == 4:  # a batch already (bench, classify_pixels)
            return np.ascontiguousarray(values)
        return stack(values)

    def golden_feed(self, golden: dict[str, np.ndarray]) -> np.ndarray:
        return golden["images"]

    def service_input(self) -> ServiceInput:
        # encoded files, or pixels already resized to the backbone's input
        h, w = self._spec.height, self._spec.width
        return ServiceInput(({"name": "image", "datatype": "BYTES", "shape": [-1]},
                             {"name": "pixels", "datatype": "UINT8", "shape": [-1, h, w, 3]}),
                            expected="exactly one of 'image' (BYTES) or 'pixels' (UINT8 [N,H,W,3])",
                            datatype="BYTES", sample="an image", title="Classify an image", accept="image/*",
                            shown_as="image")

    def check_batch(self, pixels: np.ndarray) -> np.ndarray:
        """A batch of pixels sent as a tensor (the service's ``pixels`` input): each row checked."""
        spec = self._spec
        if pixels.ndim != 4 or pixels.shape[1:] != (spec.height, spec.width, 3):
            raise InputError("pixels shape", got=list(pixels.shape), expected=f"[N, {spec.height}, {spec.width}, 3]",
                             todo="resize to the model's input (GET /v2/models/NAME), or send encoded images as 'image'")
        return np.stack([check_array(a, spec) for a in pixels]) if len(pixels) else pixels

    def engine_shapes(self, batch: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        h, w = self._spec.size
        return {"image": tuple((n, h, w, 3) for n in batch)}
