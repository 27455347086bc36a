"""Augmentation of decoded images, built around the inference resize (host fine-tuning and device views).

Every augmented sample goes through :func:`edgexfer.runtime.preprocess.resize_to_spec`, so training
images have the same geometry (letterbox bars or centre crop, same size, same resampling) as the images
the device feeds the backbone; colour jitter touches only the image area, never the bars. Randomness comes only from the ``numpy.random.Generator`` passed in, so a
seeded generator reproduces an epoch exactly.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.preprocess import PreprocessSpec, content_box, resize_to_spec

__all__ = ["AUGMENT_SETTINGS", "AUGMENT_TAG", "DEFAULT_AUGMENT", "MAX_AUGMENT", "Augmenter", "view_key"]

# Attempts at drawing a crop that fits inside the image before the whole image is used instead.
_CROP_TRIES = 10

# ------------------------------------------------------------------ the device's views (learn --augment)
#: the mild :class:`Augmenter` settings of ``Device.learn(augment=K)``: flips and crops of at least 70% of
#: the image with a near-square aspect, no colour jitter (colour carries class information in clip art)
AUGMENT_SETTINGS: dict[str, Any] = {"scale": (0.7, 1.0), "ratio": (0.9, 1.1), "hflip": 0.5,
                                    "brightness": 0.0, "contrast": 0.0, "saturation": 0.0}
#: names AUGMENT_SETTINGS in the views' cache key: change it with the settings, so old views are not reused
AUGMENT_TAG = "aug1"
#: views per image ``learn`` makes by default. Measured on clipart8 (benchmarks/fewshot_curves.py): 4 views
#: gain under one point at 3-5 shots per class and nothing from 10 on, for 5x the backbone work: off
DEFAULT_AUGMENT = 0
#: the most views per image (``learn`` makes at most this many; ``retrain`` looks for no more)
MAX_AUGMENT = 16


def view_key(preprocess_key: str, view: int) -> str:
    """The feature-cache key of a sample's augmented view ``view``: the sample's own row, another key.

    Views are features of their sample (same sha256) under this key, so the train/holdout split, which
    is drawn over samples, keeps a sample and its views on one side, and deleting a sample (capacity,
    cascade) deletes its views. ``FeatureCache.labelled`` reads one exact key, so views never pass
    for samples.
    """
    return f"{preprocess_key}|view{view}|{AUGMENT_TAG}"


@dataclass(frozen=True)
class Augmenter:
    """Random resized crop and horizontal flip, ``resize_to_spec(spec)``, then colour jitter.

    Call it with a decoded RGB image and a generator: ``Augmenter(spec)(img, rng)`` returns a new
    ``uint8[H, W, 3]`` array.
    """

    #: The inference preprocessing whose resize finishes every sample.
    spec: PreprocessSpec
    _: KW_ONLY
    #: Range of the crop's area as a fraction of the image area.
    scale: tuple[float, float] = (0.6, 1.0)
    #: Range of the crop's aspect ratio (width / height), sampled uniformly in log space so that
    #: 3/4 and 4/3 are equally likely.
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    #: Probability of a horizontal flip (0 for data where left and right differ, like text).
    hflip: float = 0.5
    #: Each colour factor is drawn from [max(0, 1 - x), 1 + x]; 0 turns that jitter off.
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    #: Zoom-out: the (cropped) image is drawn at a size factor from this range on a canvas of the fill
    #: colour, at a random place, before the inference resize: a smaller and shifted object, never a cut
    #: one. (1, 1) turns it off. Suits objects on a plain background (clip-art, product shots on white).
    zoom_out: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, PreprocessSpec):
            raise InputError("Augmenter spec", got=type(self.spec).__name__, expected="a PreprocessSpec")
        scale = _pair(self.scale, "scale")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise InputError("Augmenter scale", got=repr(self.scale), expected="0 < low <= high <= 1",
                             todo="e.g. scale=(0.6, 1.0)")
        ratio = _pair(self.ratio, "ratio")
        if not 0 < ratio[0] <= ratio[1]:
            raise InputError("Augmenter ratio", got=repr(self.ratio), expected="0 < low <= high",
                             todo="e.g. ratio=(3/4, 4/3)")
        zoom = _pair(self.zoom_out, "zoom_out")
        if not 0 < zoom[0] <= zoom[1] <= 1:
            raise InputError("Augmenter zoom_out", got=repr(self.zoom_out), expected="0 < low <= high <= 1",
                             todo="e.g. zoom_out=(0.8, 1.0); (1, 1) turns it off")
        object.__setattr__(self, "zoom_out", zoom)
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)
        _number(self.hflip, "hflip", high=1.0)
        for name in ("brightness", "contrast", "saturation"):
            _number(getattr(self, name), name, high=None)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Augment one decoded RGB image; returns ``uint8[H, W, 3]`` sized by the spec."""
        if not isinstance(rng, np.random.Generator):
            raise InputError("Augmenter rng", got=type(rng).__name__, expected="numpy.random.Generator",
                             todo="pass np.random.default_rng(seed)")
        if not isinstance(img, Image.Image) or img.mode != "RGB":
            got = f"PIL image in mode {img.mode}" if isinstance(img, Image.Image) else type(img).__name__
            raise InputError("Augmenter image", got=got, expected="a PIL image in mode RGB",
                             todo="decode images with edgexfer.runtime.preprocess.decode_image")
        crop = img.crop(self._crop_box(img.width, img.height, rng))
        if rng.random() < self.hflip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.zoom_out != (1.0, 1.0):
            crop = self._zoom_out(crop, rng)
        out = resize_to_spec(crop, self.spec)
        # Colour jitter runs on the resized pixels: brightness, contrast and saturation are blends that
        # commute with the resize up to rounding, and a 224x224 image is far cheaper than a 12 MP crop.
        # Only the image area is jittered, so letterbox bars keep the exact fill colour inference uses.
        left, top, right, bottom = content_box(crop.width, crop.height, self.spec)
        region = Image.fromarray(out[top:bottom, left:right])
        for enhancer, amount in (
            (ImageEnhance.Brightness, self.brightness),
            (ImageEnhance.Contrast, self.contrast),
            (ImageEnhance.Color, self.saturation),
        ):
            if amount > 0:
                region = enhancer(region).enhance(float(rng.uniform(max(0.0, 1.0 - amount), 1.0 + amount)))
        out[top:bottom, left:right] = np.asarray(region)
        return out

    def _zoom_out(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """``img`` pasted at a random place on a larger canvas of the fill colour (no resampling here:
        the one resampling pass stays in ``resize_to_spec``)."""
        factor = float(rng.uniform(self.zoom_out[0], self.zoom_out[1]))
        if factor >= 1.0:
            return img
        width, height = max(img.width, round(img.width / factor)), max(img.height, round(img.height / factor))
        canvas = Image.new("RGB", (width, height), self.spec.fill)
        canvas.paste(img, (int(rng.integers(0, width - img.width + 1)), int(rng.integers(0, height - img.height + 1))))
        return canvas

    def _crop_box(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A random (left, top, right, bottom) box with area and aspect in range, or the whole image."""
        area = width * height
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(_CROP_TRIES):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_low, log_high))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            # An extreme aspect on a narrow image may not fit; draw again rather than distort.
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = int(rng.integers(0, width - crop_w + 1))
                top = int(rng.integers(0, height - crop_h + 1))
                return left, top, left + crop_w, top + crop_h
        return 0, 0, width, height


def _pair(value: object, name: str) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InputError(f"Augmenter {name}", got=repr(value), expected="a (low, high) pair of numbers")
    low, high = (_number(item, name, high=None) for item in value)
    return low, high


def _number(value: object, name: str, *, high: float | None) -> float:
    """Validate a finite, non-negative number (at most ``high``) and return it as float."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
    if bad or not math.isfinite(float(value)) or float(value) < 0 or (high is not None and float(value) > high):
        bound = "a finite number >= 0" + (f" and <= {high}" if high is not None else "")
        raise InputError(f"Augmenter {name}", got=repr(value), expected=bound)
    return float(value)
