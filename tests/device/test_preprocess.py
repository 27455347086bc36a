"""edgexfer.runtime.preprocess: the one preprocessing shared by host and device.

Every test builds real image files with Pillow and goes through the public functions, so what is
checked is what a user sees: pixel content, shapes and the one-line errors.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from image_support import png_declaring
from PIL import Image, ImageFile

from edgexfer.runtime.errors import InputError
from edgexfer.runtime.preprocess import (
    PreprocessSpec,
    check_array,
    content_box,
    decode_image,
    load_image,
    resize_to_spec,
    stack,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)
WHITE = (255, 255, 255)
CROP = PreprocessSpec(resize="resize_shorter_then_center_crop")


def _solid(size: tuple[int, int], color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def _noise_jpeg(path: Path, size: tuple[int, int] = (256, 256)) -> bytes:
    """A JPEG of random pixels: large enough that half of it is clearly missing data."""
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path.read_bytes()


def _mean(region: np.ndarray) -> np.ndarray:
    return region.reshape(-1, 3).mean(axis=0)


# --- PreprocessSpec ---------------------------------------------------------------------------------


def test_spec_defaults_key_and_round_trip_through_json():
    spec = PreprocessSpec()
    assert spec.size == (224, 224) and spec.resize == "letterbox" and spec.fill == WHITE
    assert spec.key() == "pp1:letterbox:224x224:fill=255,255,255"
    assert CROP.key() == "pp1:resize_shorter_then_center_crop:224x224:fill=255,255,255"
    other = PreprocessSpec(size=(240, 320), fill=(0, 0, 0))
    assert other.key() == "pp1:letterbox:240x320:fill=0,0,0"
    for original in (spec, CROP, other):
        parsed = PreprocessSpec.from_dict(json.loads(json.dumps(original.to_dict())))
        assert parsed == original and parsed.key() == original.key() and hash(parsed) == hash(original)


def test_spec_from_dict_accepts_the_manifest_input_section_and_names_missing_fields():
    section = {"layout": "NHWC", "dtype": "uint8", "size": [224, 224], "resize": "letterbox",
               "fill": [255, 255, 255], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert PreprocessSpec.from_dict(section) == PreprocessSpec()
    with pytest.raises(InputError, match="missing field.*resize"):
        PreprocessSpec.from_dict({"size": [224, 224], "fill": [255, 255, 255]})


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"size": (0, 224)}, "size"),
        ({"size": (224,)}, "size"),
        ({"size": (224.0, 224)}, "size"),
        ({"size": (True, 224)}, "size"),
        ({"resize": "stretch"}, "resize"),
        ({"fill": (256, 0, 0)}, "fill"),
        ({"fill": (-1, 0, 0)}, "fill"),
        ({"fill": "white"}, "fill"),
    ],
)
def test_spec_rejects_bad_fields_with_one_line_input_error(kwargs, field):
    with pytest.raises(InputError, match=field) as info:
        PreprocessSpec(**kwargs)
    assert "\n" not in str(info.value) and " | got " in str(info.value)


# --- decode_image -----------------------------------------------------------------------------------


def test_exif_orientation_6_gives_portrait_content(tmp_path):
    # Stored landscape 60x30: red left half, blue right half. Orientation 6 means "rotate 90 degrees
    # clockwise to display", which brings the left half to the top.
    stored = _solid((60, 30), BLUE)
    stored.paste(_solid((30, 30), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", quality=95, exif=exif.tobytes())

    img = decode_image(path)
    assert img.mode == "RGB" and img.size == (30, 60)  # (width, height): portrait
    pixels = np.asarray(img).astype(int)
    top, bottom = _mean(pixels[5:25, 5:25]), _mean(pixels[35:55, 5:25])
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_transparent_rgba_pixels_become_the_fill_colour(tmp_path):
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # fully transparent black
    rgba.paste(Image.new("RGBA", (20, 20), (*RED, 255)), (20, 0))  # opaque red right half
    path = tmp_path / "alpha.png"
    rgba.save(path)

    white = np.asarray(decode_image(path))
    assert (white[:, :20] == WHITE).all() and (white[:, 20:] == RED).all()
    green = np.asarray(decode_image(path, fill=GREEN))
    assert (green[:, :20] == GREEN).all() and (green[:, 20:] == RED).all()


def test_half_transparent_pixels_blend_with_the_fill(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 128)).save(path)
    value = np.asarray(decode_image(path))[0, 0]
    assert np.all(np.abs(value.astype(int) - 127) <= 1), value


def test_palette_and_grey_alpha_modes_are_composited(tmp_path):
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0, *BLUE] + [0] * (256 * 3 - 6))
    palette.paste(1, (5, 0, 10, 10))  # right half index 1 = blue, left half index 0
    gif = tmp_path / "p.gif"
    palette.save(gif, transparency=0)
    pixels = np.asarray(decode_image(gif))
    assert (pixels[:, :5] == WHITE).all() and (pixels[:, 5:] == BLUE).all()

    grey_alpha = Image.new("LA", (6, 6), (50, 0))
    la = tmp_path / "la.png"
    grey_alpha.save(la)
    assert (np.asarray(decode_image(la, fill=GREEN)) == GREEN).all()


def test_other_modes_become_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (5, 5), 77).save(grey)
    assert (np.asarray(decode_image(grey)) == 77).all()

    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=95)  # pure red in CMYK
    img = decode_image(cmyk)
    assert img.mode == "RGB"
    assert _mean(np.asarray(img).astype(int))[0] > 200

    # 16-bit grey: the top byte is kept (Pillow's own convert would clip everything above 255 to white).
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 0x4000, dtype=np.uint16)).save(deep)
    assert (np.asarray(decode_image(deep)) == 0x40).all()


def test_decoding_is_deterministic_and_bytes_equal_path(tmp_path):
    path = tmp_path / "noise.jpg"
    data = _noise_jpeg(path, size=(300, 170))
    spec = PreprocessSpec()
    first, second = load_image(path, spec), load_image(path, spec)
    assert first.tobytes() == second.tobytes()
    assert load_image(data, spec).tobytes() == first.tobytes()
    assert load_image(str(path), CROP).tobytes() == load_image(path, CROP).tobytes()


def test_truncated_jpeg_is_refused(tmp_path):
    path = tmp_path / "full.jpg"
    data = _noise_jpeg(path)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated") as info:
        decode_image(cut)
    assert str(cut) in str(info.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize(
    "content",
    [b"this is a text file, not a picture\n", np.random.default_rng(7).bytes(4096), b""],
    ids=["text", "random-bytes", "empty"],
)
def test_non_images_are_refused_with_the_path(tmp_path, content):
    path = tmp_path / "fake.jpg"
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        decode_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_missing_file_and_bad_source_type():
    with pytest.raises(InputError, match="No such file"):
        decode_image("/nonexistent/edgexfer/image.jpg")
    with pytest.raises(InputError, match="bytes, str or os.PathLike"):
        decode_image(12345)  # type: ignore[arg-type]


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    # A real 3000x3000 PNG that compresses to a few kB: over the (lowered) limit.
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000), 0).save(path)
    assert path.stat().st_size < 100_000

    # Decoding pixels would call load(); make that fail loudly to prove the refusal happens before it.
    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(InputError, match="too large: 3000x3000") as info:
        decode_image(path, max_pixels=1_000_000)
    assert "at most 1,000,000 pixels" in str(info.value)


def test_header_declaring_a_huge_image_is_refused(recwarn):
    # 20000 x 20000 = 400 MP: far beyond Pillow's hard limit, refused while reading the header.
    with pytest.raises(InputError, match="too large"):
        decode_image(png_declaring(20000, 20000))
    # 90 MP sits in Pillow's warning band; a higher max_pixels does not loosen Pillow's own limit and
    # no DecompressionBombWarning leaks out.
    with pytest.raises(InputError, match="too large"):
        decode_image(png_declaring(10000, 9000), max_pixels=10**9)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


# --- resize_to_spec ---------------------------------------------------------------------------------


def test_letterbox_of_wide_red_image_has_white_bars_top_and_bottom():
    out = resize_to_spec(_solid((100, 50), RED), PreprocessSpec())
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    # 100x50 scales to 224x112, centred: rows 56..167 are the image.
    assert (out[:56] == WHITE).all() and (out[168:] == WHITE).all()
    assert (out[56:168] == RED).all()


def test_letterbox_of_tall_image_has_bars_left_and_right_and_honours_fill_and_size():
    spec = PreprocessSpec(size=(120, 160), fill=(10, 20, 30))
    out = resize_to_spec(_solid((30, 60), BLUE), spec)
    assert out.shape == (120, 160, 3)
    # 30x60 scales to 60x120, centred horizontally: columns 50..109.
    assert (out[:, :50] == (10, 20, 30)).all() and (out[:, 110:] == (10, 20, 30)).all()
    assert (out[:, 50:110] == BLUE).all()


def test_center_crop_keeps_the_middle_and_fills_the_frame():
    # Blue | red | green in quarters, halves and quarters: the centre crop of a 2:1 image is the red half.
    img = _solid((100, 50), RED)
    img.paste(_solid((25, 50), BLUE), (0, 0))
    img.paste(_solid((25, 50), GREEN), (75, 0))
    out = resize_to_spec(img, CROP)
    assert out.shape == (224, 224, 3)
    assert (out[:, 4:220] == RED).all()  # interior; the outermost columns may blend with neighbours
    assert not (out == WHITE).all(axis=2).any()  # no padding anywhere

    tall = _solid((50, 100), RED)
    tall.paste(_solid((50, 25), BLUE), (0, 0))
    tall_out = resize_to_spec(tall, PreprocessSpec(size=(64, 96), resize="resize_shorter_then_center_crop"))
    assert tall_out.shape == (64, 96, 3)
    assert (tall_out[4:60] == RED).all()


def test_content_box_says_where_the_image_lands():
    assert content_box(100, 50, PreprocessSpec()) == (0, 56, 224, 168)
    assert content_box(30, 60, PreprocessSpec(size=(120, 160))) == (50, 0, 110, 120)
    assert content_box(10000, 1, PreprocessSpec()) == (0, 111, 224, 112)  # never thinner than 1 pixel
    assert content_box(100, 50, CROP) == (0, 0, 224, 224)


def test_resize_refuses_non_rgb_images():
    with pytest.raises(InputError, match="mode RGBA"):
        resize_to_spec(Image.new("RGBA", (4, 4)), PreprocessSpec())


# --- arrays -----------------------------------------------------------------------------------------


def test_check_array_accepts_exact_uint8_and_returns_it():
    arr = np.zeros((224, 224, 3), dtype=np.uint8)
    assert check_array(arr, PreprocessSpec()) is arr


@pytest.mark.parametrize(
    "arr, expected_text",
    [
        (np.zeros((224, 224, 3), dtype=np.float32), "got dtype float32"),
        (np.full((224, 224, 3), np.nan), "got dtype float64 containing NaN"),
        (np.zeros((224, 224, 4), dtype=np.uint8), "got shape (224, 224, 4)"),
        (np.zeros((100, 100, 3), dtype=np.uint8), "got shape (100, 100, 3)"),
        (np.zeros((224, 224), dtype=np.uint8), "got shape (224, 224)"),
        ([[0, 0, 0]], "got list"),
    ],
    ids=["float", "nan", "4-channels", "wrong-size", "2-d", "list"],
)
def test_check_array_errors_state_got_and_expected(arr, expected_text):
    with pytest.raises(InputError) as info:
        check_array(arr, PreprocessSpec())
    message = str(info.value)
    assert expected_text in message and "expected" in message and "\n" not in message


def test_stack_builds_a_contiguous_batch_and_refuses_mismatches():
    base = np.arange(8 * 6 * 3, dtype=np.uint8).reshape(8, 6, 3)
    batch = stack([base, base[:, ::-1]])  # the second one is a non-contiguous view
    assert batch.shape == (2, 8, 6, 3) and batch.dtype == np.uint8 and batch.flags.c_contiguous
    assert (batch[1] == base[:, ::-1]).all()
    with pytest.raises(InputError, match="item 1"):
        stack([base, np.zeros((8, 7, 3), dtype=np.uint8)])
    with pytest.raises(InputError, match="item 0"):
        stack([base.astype(np.float32)])
    with pytest.raises(InputError, match="no images"):
        stack([])


def test_preprocess_imports_neither_torch_nor_onnx():
    code = (
        "import sys, edgexfer.runtime.preprocess\n"
        "bad = [m for m in ('torch', 'onnx') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_png_header_helper_is_a_valid_png():
    # Guards the bomb test: the crafted header must parse, so its refusal is about size, not garbage.
    with Image.open(io.BytesIO(png_declaring(7, 5))) as img:
        assert img.size == (7, 5)
