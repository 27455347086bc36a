"""The one and only image preprocessing of edgexfer: file bytes -> ``uint8[H, W, 3]`` RGB pixels.

The host (training, export, golden files, evaluation) and the device (predict, learn) both call this
module, so the backbone sees byte-identical tensors on both sides. Cast, scaling and mean/std
normalisation are *not* done here: they live inside ``backbone.onnx`` (see docs/architecture.md).

Pipeline: read bytes -> refuse oversized images before decoding -> decode fully -> EXIF orientation ->
composite any alpha onto the fill colour -> RGB -> resize by the spec's policy (``letterbox`` or
``resize_shorter_then_center_crop``).

Bit-identical output needs the same Pillow build (it bundles libjpeg-turbo, libpng, ...) on both sides;
the resampling itself is integer arithmetic in Pillow and does not depend on the CPU.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.names import RESIZE_POLICIES

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "RESIZE_POLICIES",
    "PreprocessSpec",
    "check_array",
    "content_box",
    "decode_image",
    "load_image",
    "resize_to_spec",
    "stack",
]

#: Resize policies a spec (and a manifest's ``backbone.input.resize``) may name.

#: Images with more pixels than this are refused before decoding (a 40 MP photo decodes to ~120 MB).
DEFAULT_MAX_PIXELS = 40_000_000

# Bump whenever any output byte of this module can change for the same input and spec: cached features
# are keyed by PreprocessSpec.key(), so a new version makes old cache entries miss instead of lie.
_VERSION = "pp1"

# Modes whose pixels carry their own alpha channel (premultiplied "La"/"RGBa" included).
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})

_EXPECTED_FILE = "a complete image file Pillow can decode (JPEG, PNG, BMP, GIF, WebP, TIFF)"


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the backbone's ``uint8[H, W, 3]`` input; stored in the bundle manifest."""

    #: Output size as (height, width), the order of the array axes.
    size: tuple[int, int] = (224, 224)
    #: "letterbox" keeps the whole image and pads with ``fill``; "resize_shorter_then_center_crop"
    #: fills the frame and cuts the overflow of the longer side.
    resize: str = "letterbox"
    #: RGB colour of letterbox bars and of transparent pixels (alpha is composited onto it).
    fill: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        # Lists (from JSON) are accepted and stored as tuples so specs compare and hash by value.
        object.__setattr__(self, "size", _int_tuple(self.size, 2, "size", low=1, high=None))
        object.__setattr__(self, "fill", _int_tuple(self.fill, 3, "fill", low=0, high=255))
        if not isinstance(self.resize, str) or self.resize not in RESIZE_POLICIES:
            raise InputError(
                "preprocess spec field 'resize'",
                got=repr(self.resize),
                expected=f"one of {', '.join(RESIZE_POLICIES)}",
                todo="fix the resize policy in the manifest or the command line",
            )

    @property
    def height(self) -> int:
        """Output height in pixels."""
        return self.size[0]

    @property
    def width(self) -> int:
        """Output width in pixels."""
        return self.size[1]

    def key(self) -> str:
        """Stable text naming exactly this preprocessing, e.g. ``pp1:letterbox:224x224:fill=255,255,255``.

        Used as a cache key for features. ``fill`` is part of it for both policies because alpha is
        composited onto it during decoding, not only in the letterbox bars.
        """
        height, width = self.size
        red, green, blue = self.fill
        return f"{_VERSION}:{self.resize}:{height}x{width}:fill={red},{green},{blue}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, the same keys as the manifest's ``backbone.input`` section."""
        return {"size": list(self.size), "resize": self.resize, "fill": list(self.fill)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        """Parse :meth:`to_dict` output strictly: every field is required and validated.

        Other keys are ignored on purpose, so a manifest's whole ``backbone.input`` object (which also
        holds layout, dtype, mean and std for the backbone) can be passed as it is.
        """
        if not isinstance(data, Mapping):
            raise InputError(
                "preprocess spec",
                got=type(data).__name__,
                expected="a mapping with keys size, resize, fill",
                todo="pass the manifest's backbone.input object",
            )
        missing = [name for name in ("size", "resize", "fill") if name not in data]
        if missing:
            raise InputError(
                "preprocess spec",
                got=f"missing field(s) {', '.join(missing)}",
                expected="keys size, resize, fill",
                todo="re-export the bundle or add the missing field(s)",
            )
        return cls(size=data["size"], resize=data["resize"], fill=data["fill"])


def decode_image(
    source: bytes | str | os.PathLike[str],
    *,
    fill: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode an image file (path) or its bytes into a fully loaded RGB :class:`PIL.Image.Image`.

    Refuses images over ``max_pixels`` after reading only the header, applies the EXIF orientation,
    composites transparency onto ``fill`` and converts every other mode to RGB. ``max_pixels`` can
    tighten Pillow's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) but never loosen it.
    ``name`` names the image in messages (default: its path, or its size for bytes).

    Raises:
        InputError: the file cannot be read, is empty, is not an image, is truncated or corrupt, is
            too large, or has a pixel format without a defined 8-bit RGB meaning. ``got`` holds the
            reason (callers that skip bad files report it).
    """
    fill = _int_tuple(fill, 3, "fill", low=0, high=255)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise InputError("decode_image max_pixels", got=repr(max_pixels), expected="a positive int")
    data, read_name = read_source(source)
    name = name or read_name
    if not data:
        raise InputError(f"cannot decode image {name}", got="an empty file (0 bytes)", expected=_EXPECTED_FILE,
                         todo="replace or remove the file")

    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; turning the warning into an error keeps
    # it off stderr and refuses the image like every other oversized one. (The filter is process-wide;
    # if threads race on it, the max_pixels check below still refuses with the default limit.)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # open() parses the header only: the size is known before any pixel is decoded.
            image = Image.open(io.BytesIO(data))
        except Exception as exc:  # Pillow's plugins raise many types on bad input; all mean "not usable"
            raise _decode_error(name, exc) from exc
        width, height = image.size
        if width * height > max_pixels:
            image.close()
            raise InputError(
                f"cannot decode image {name}",
                got=f"too large: {width}x{height} = {width * height:,} pixels",
                expected=f"at most {max_pixels:,} pixels",
                todo="shrink the image, or raise max_pixels if the file is trusted",
            )
        try:
            # load() decodes everything now, so a truncated file fails here rather than in a later
            # step (Pillow's LOAD_TRUNCATED_IMAGES is left False on purpose: no half-grey images).
            image.load()
            # in place: the decoder's image is this function's own, and a copy per image (most have no
            # orientation tag) is work _to_rgb's conversion does again
            ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image, fill, name)
        except InputError:
            raise
        except Exception as exc:
            raise _decode_error(name, exc) from exc
        finally:
            # The result is always a new image; release the decoder (multi-frame files keep it open).
            image.close()


def resize_to_spec(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize an RGB image by ``spec.resize`` to a new writable, contiguous ``uint8[H, W, 3]`` array.

    ``letterbox`` scales the image to fit inside (height, width) keeping its aspect ratio and centres it
    on a canvas of ``spec.fill``. ``resize_shorter_then_center_crop`` scales it so the shorter side
    fills the frame and keeps the centre. Both use Pillow BILINEAR with ``reducing_gap=None`` (one exact
    resampling pass, no JPEG draft or pre-reduction shortcuts), which is deterministic.
    """
    if not isinstance(img, Image.Image) or img.mode != "RGB":
        got = f"PIL image in mode {img.mode}" if isinstance(img, Image.Image) else type(img).__name__
        raise InputError("resize_to_spec image", got=got, expected="a PIL image in mode RGB",
                         todo="decode images with edgexfer.runtime.preprocess.decode_image")
    if not isinstance(spec, PreprocessSpec):
        raise InputError("resize_to_spec spec", got=type(spec).__name__, expected="a PreprocessSpec")
    out_h, out_w = spec.size
    src_w, src_h = img.size

    if spec.resize == "letterbox":
        left, top, right, bottom = content_box(src_w, src_h, spec)
        new_w, new_h = right - left, bottom - top
        if (new_w, new_h) != (src_w, src_h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None)
        canvas = Image.new("RGB", (out_w, out_h), spec.fill)
        canvas.paste(img, (left, top))
        return np.array(canvas, dtype=np.uint8)

    # Comparing cross products decides which side limits the scale without float division.
    width_limited = src_w * out_h >= src_h * out_w

    # Centre crop: resample only the source region that survives the crop (Pillow's ``box``), which
    # equals "scale the shorter side, then cut the centre" without an intermediate rounded size.
    if width_limited:  # relatively wider than the output: the full height is kept
        crop_w = src_h * out_w / out_h
        left = (src_w - crop_w) / 2
        box = (left, 0.0, left + crop_w, float(src_h))
    else:
        crop_h = src_w * out_h / out_w
        top = (src_h - crop_h) / 2
        box = (0.0, top, float(src_w), top + crop_h)
    resized = img.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box, reducing_gap=None)
    return np.array(resized, dtype=np.uint8)


def content_box(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int, int, int]:
    """Where a ``width`` x ``height`` image lands in the output of :func:`resize_to_spec`.

    Returns (left, top, right, bottom) in output pixels: the area outside it is letterbox fill. For
    ``resize_shorter_then_center_crop`` the image covers the whole frame.
    """
    if not isinstance(spec, PreprocessSpec):
        raise InputError("content_box spec", got=type(spec).__name__, expected="a PreprocessSpec")
    if width < 1 or height < 1:
        raise InputError("content_box image size", got=f"{width}x{height}", expected="at least 1x1 pixels")
    out_h, out_w = spec.size
    if spec.resize != "letterbox":
        return 0, 0, out_w, out_h
    # Integer arithmetic (cross products, round half up) so the box is the same on every platform.
    if width * out_h >= height * out_w:  # relatively wider than the output: the width is the limit
        new_w, new_h = out_w, max(1, (2 * height * out_w + width) // (2 * width))
    else:
        new_w, new_h = max(1, (2 * width * out_h + height) // (2 * height)), out_h
    left, top = (out_w - new_w) // 2, (out_h - new_h) // 2
    return left, top, left + new_w, top + new_h


def load_image(source: bytes | str | os.PathLike[str], spec: PreprocessSpec) -> np.ndarray:
    """Decode an image file (or bytes) and resize it: the backbone's ``uint8[H, W, 3]`` input."""
    return resize_to_spec(decode_image(source, fill=spec.fill), spec)


def check_array(arr: object, spec: PreprocessSpec) -> np.ndarray:
    """Validate an array a caller passes instead of an image file; returns it unchanged.

    The backbone takes raw RGB pixels: ``uint8`` of shape (height, width, 3) equal to ``spec.size``.
    Float arrays are refused rather than converted, because their scale (0-1 or 0-255, normalised or
    not) cannot be known here and a wrong guess gives confident wrong predictions.
    """
    height, width = spec.size
    expected_shape = f"shape ({height}, {width}, 3) uint8 (height, width, RGB) for {spec.key()}"
    todo = "pass pixels from edgexfer.runtime.preprocess.load_image, or resize to the spec first"
    if not isinstance(arr, np.ndarray):
        raise InputError("image array", got=type(arr).__name__, expected=f"numpy.ndarray of {expected_shape}",
                         todo=todo)
    if arr.dtype != np.uint8:
        got = f"dtype {arr.dtype}"
        if arr.dtype.kind in "fc" and np.isnan(arr).any():
            got += " containing NaN"
        raise InputError("image array", got=got, expected="dtype uint8 (raw 0-255 RGB pixels)", todo=todo)
    if arr.shape != (height, width, 3):
        raise InputError("image array", got=f"shape {arr.shape}", expected=expected_shape, todo=todo)
    return arr


def stack(arrays: Iterable[np.ndarray]) -> np.ndarray:
    """Stack same-shaped ``uint8[H, W, 3]`` images into one C-contiguous ``uint8[N, H, W, 3]`` batch."""
    items = list(arrays)
    if not items:
        raise InputError("image batch", got="no images", expected="at least 1 uint8[H, W, 3] array")
    first = items[0]
    for index, item in enumerate(items):
        if not isinstance(item, np.ndarray) or item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
            got = f"{item.dtype} array of shape {item.shape}" if isinstance(item, np.ndarray) else type(item).__name__
            raise InputError(f"image batch item {index}", got=got, expected="uint8 array of shape (H, W, 3)",
                             todo="pass arrays made by load_image or checked by check_array")
        if item.shape != first.shape:
            raise InputError(f"image batch item {index}", got=f"shape {item.shape}",
                             expected=f"shape {first.shape} like item 0", todo="resize every image to the same spec")
    # np.stack copies into a fresh array, so the batch is contiguous whatever the inputs' strides were.
    return np.ascontiguousarray(np.stack(items, axis=0))


def _int_tuple(value: object, length: int, field: str, *, low: int, high: int | None) -> tuple[int, ...]:
    """Validate a short sequence of ints (a size or a colour) and return it as a tuple."""
    bound = f">= {low}" if high is None else f"in {low}..{high}"
    expected = f"{length} integers {bound}"
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != length:
        raise InputError(f"preprocess field '{field}'", got=repr(value), expected=expected)
    for item in value:
        # bool is an int subclass, and numpy integers are not ints: accept the latter, refuse the former.
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise InputError(f"preprocess field '{field}'", got=repr(value), expected=expected)
        if item < low or (high is not None and item > high):
            raise InputError(f"preprocess field '{field}'", got=repr(value), expected=expected)
    return tuple(int(item) for item in value)


def read_source(source: object) -> tuple[bytes, str]:
    """Return the bytes of ``source`` and a name for messages (the path, or a byte count)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return data, f"({len(data)} bytes in memory)"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise InputError(f"cannot read image {path}", got=reason, expected="a readable image file",
                             todo="check the path and its permissions") from exc
    raise InputError("image source", got=type(source).__name__, expected="bytes, str or os.PathLike")


def _decode_error(name: str, exc: BaseException) -> InputError:
    """Wrap whatever Pillow raised into the one-line InputError with Pillow's reason as ``got``."""
    if isinstance(exc, UnidentifiedImageError):
        # Pillow's text names a BytesIO object and its memory address: useless to a reader.
        reason = "not a recognised image format (Pillow cannot identify it)"
    elif isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return InputError(f"cannot decode image {name}", got=f"too large: {exc}",
                          expected=f"at most {Image.MAX_IMAGE_PIXELS:,} pixels (Pillow's decompression-bomb limit)",
                          todo="shrink the image (max_pixels cannot raise Pillow's limit)")
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return InputError(f"cannot decode image {name}", got=reason, expected=_EXPECTED_FILE,
                      todo="replace or remove the file")


def _to_rgb(image: Image.Image, fill: tuple[int, ...], name: str) -> Image.Image:
    """Convert a decoded image of any mode to RGB, compositing transparency onto ``fill``."""
    mode = image.mode
    if mode.startswith("I;16"):
        # 16-bit samples: Pillow's convert() would clip 0..65535 to 255 (a white image); keep the top byte.
        wide = np.asarray(image).astype(np.uint16)
        return Image.fromarray((wide >> 8).astype(np.uint8)).convert("RGB")
    if mode in ("I", "F"):
        # 32-bit int/float pixels have no fixed range (0..1? 0..255? 0..65535?): refuse instead of guessing.
        raise InputError(f"cannot decode image {name}", got=f"pixel mode {mode} (32-bit samples, range unknown)",
                         expected="8-bit or 16-bit RGB, grayscale, palette or CMYK",
                         todo="save the image as 8-bit PNG or JPEG")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # convert("RGBA") also turns palette/grey/RGB colour keys ("transparency") into an alpha channel.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*fill, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, RGB: Pillow's own conversions. A fresh image is returned even for RGB, so
    # the result never shares state with the decoder.
    return image.convert("RGB")


def check_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> tuple[int, int]:
    """The (width, height) of an image file's bytes from its header alone: what :func:`decode_image` refuses
    before decoding (not an image, empty, too large) is refused here without decoding a pixel.

    Field learning hashes a batch and checks headers before the capacity decides which samples are decoded;
    a file that is truncated or corrupt after its header still fails in :func:`decode_image`.
    """
    name = name or f"({len(data)} bytes in memory)"
    if not data:
        raise InputError(f"cannot decode image {name}", got="an empty file (0 bytes)", expected=_EXPECTED_FILE,
                         todo="replace or remove the file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except Exception as exc:  # Pillow's plugins raise many types on bad input; all mean "not usable"
            raise _decode_error(name, exc) from exc
    if width * height > max_pixels:
        raise InputError(f"cannot decode image {name}", got=f"too large: {width}x{height} = {width * height:,} pixels",
                         expected=f"at most {max_pixels:,} pixels",
                         todo="shrink the image, or raise max_pixels if the file is trusted")
    return width, height
