"""edgexfer.data (ImageFolder scan, split, decode) and edgexfer.augment, on real files."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgexfer.data import (
    IMAGE_EXTENSIONS,
    ImageFiles,
    describe_skipped,
    hash_files,
    scan_image_folder,
    stratified_split,
    stream_pixels,
)
from edgexfer.runtime.augment import Augmenter
from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.preprocess import PreprocessSpec, resize_to_spec

DEMO = Path(__file__).resolve().parents[2] / "data" / "clipart8-demo"


def _image(path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Two classes, plus everything a real folder collects: notes, hidden files, odd extensions."""
    root = tmp_path / "data"
    _image(root / "cats" / "b.jpg")
    _image(root / "cats" / "a.PNG")
    _image(root / "cats" / "more" / "c.jpeg")  # sub-folders of a class count
    _image(root / "dogs" / "x.bmp")
    _image(root / "dogs" / "y.webp")
    (root / "cats" / "notes.txt").write_text("not a picture")
    (root / "dogs" / ".DS_Store").write_bytes(b"\0\0")
    _image(root / "dogs" / ".hidden" / "z.jpg")
    _image(root / ".cache" / "w.jpg")  # hidden folder: not a class
    (root / "ATTRIBUTION.md").write_text("# credits")
    return root


# --- scan_image_folder ------------------------------------------------------------------------------


def test_scan_lists_classes_paths_labels_and_ignored(tree):
    folder = scan_image_folder(tree)
    assert folder.root == tree
    assert folder.classes == ("cats", "dogs")
    relative = [p.relative_to(tree).as_posix() for p in folder.paths]
    assert relative == ["cats/a.PNG", "cats/b.jpg", "cats/more/c.jpeg", "dogs/x.bmp", "dogs/y.webp"]
    assert folder.labels == (0, 0, 0, 1, 1)
    # Only the non-image file inside a class folder is reported; root files and hidden files are silent.
    assert folder.ignored == ((tree / "cats" / "notes.txt", "not an image file extension"),)


def test_image_extensions_cover_the_usual_formats():
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"):
        assert ext in IMAGE_EXTENSIONS


def test_scan_names_every_empty_class(tmp_path):
    _image(tmp_path / "apples" / "1.jpg")
    (tmp_path / "pears").mkdir()
    (tmp_path / "plums").mkdir()
    (tmp_path / "plums" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as info:
        scan_image_folder(tmp_path)
    message = str(info.value)
    assert "pears" in message and "plums" in message and "apples" not in message
    assert "\n" not in message


def test_scan_refuses_missing_root_file_root_and_single_class(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")
    file_root = _image(tmp_path / "one.jpg")
    with pytest.raises(DataError, match="not a directory"):
        scan_image_folder(file_root)
    _image(tmp_path / "only" / "1.jpg")
    with pytest.raises(DataError, match="at least 2 classes") as info:
        scan_image_folder(tmp_path)
    assert "1 class folder(s)" in str(info.value) and "only" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="at least 2 classes"):
        scan_image_folder(empty)


# --- hash_files, ImageFiles, stream_pixels ------------------------------------------------------------


def test_stream_pixels_skips_exactly_the_bad_files_with_reasons(tree):
    folder = scan_image_folder(tree)
    corrupt = tree / "cats" / "corrupt.jpg"
    _noise((200, 200)).save(corrupt, format="JPEG")
    corrupt.write_bytes(corrupt.read_bytes()[: corrupt.stat().st_size // 2])
    text = tree / "dogs" / "text.jpg"
    text.write_text("I am a text file with a .jpg name\n")
    paths = [*folder.paths, corrupt, text]
    files = ImageFiles(paths)
    spec = PreprocessSpec(size=(16, 20))  # (height, width)

    batches = list(stream_pixels(files, range(len(paths)), spec, batch_size=3, workers=2))

    assert [len(done) + len(bad) for done, _, bad in batches] == [3, 3, 1]  # batches of 3, in order
    done = [i for d, _, _ in batches for i in d]
    failed = dict(f for _, _, bad in batches for f in bad)
    assert done == list(range(len(folder.paths))) and sorted(failed) == [len(paths) - 2, len(paths) - 1]
    assert "truncated" in failed[len(paths) - 2]
    assert "not a recognised image format" in failed[len(paths) - 1]
    for (d, values, _) in batches:
        for i, pixels in zip(d, values):
            assert pixels.shape == (16, 20, 3) and pixels.dtype == np.uint8
            np.testing.assert_array_equal(pixels, resize_to_spec(files[i], spec))
    assert files.decoded == len(paths) + len(folder.paths)  # each once in the stream, once more above

    summary = describe_skipped([(paths[i], r) for i, r in sorted(failed.items())], total=len(paths))
    lines = summary.splitlines()
    assert lines[0] == f"skipped 2 of {len(paths)} files:"
    assert lines[1].startswith(f"  {corrupt}: ") and lines[2].startswith(f"  {text}: ")


def test_image_files_decode_on_demand_and_keep_only_the_last_image(tree):
    folder = scan_image_folder(tree)
    files = ImageFiles(folder.paths)
    assert files.decoded == 0 and len(files) == len(folder.paths)
    first = files[0]
    assert files[0] is first and files.decoded == 1  # asked twice in a row: decoded once
    assert files[1].mode == "RGB" and files[0] is not first and files.decoded == 3
    sub = files.subset([2, 1])
    assert sub.paths == (folder.paths[2], folder.paths[1])
    sub[0]
    assert files.decoded == 4  # a subset counts with its data set


def test_hash_files_reports_unreadable_paths_and_shows_progress_on_stderr(tmp_path, capsys):
    good = _image(tmp_path / "good.png")
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(3 * (1 << 20) + 7))  # read in several chunks
    result = hash_files([good, tmp_path / "gone.jpg", tmp_path, big], workers=2, progress=True)
    assert result.sha256[0] == hashlib.sha256(good.read_bytes()).hexdigest()
    assert result.sha256[3] == hashlib.sha256(big.read_bytes()).hexdigest()
    assert result.sha256[1] is None and result.sha256[2] is None
    assert [p for p, _ in result.skipped] == [tmp_path / "gone.jpg", tmp_path]
    assert all(reason.startswith("cannot read file") for _, reason in result.skipped)
    captured = capsys.readouterr()
    assert captured.out == "" and "hashing files" in captured.err


def test_describe_skipped_limits_its_listing():
    skipped = [(Path(f"img{i}.jpg"), "broken") for i in range(25)]
    text = describe_skipped(skipped, total=100, limit=3)
    assert text.splitlines() == ["skipped 25 of 100 files:", "  img0.jpg: broken", "  img1.jpg: broken",
                                 "  img2.jpg: broken", "  ... and 22 more"]
    assert describe_skipped([]) == ""


# --- stratified_split -------------------------------------------------------------------------------


def test_stratified_split_counts_per_class_and_is_deterministic():
    sizes = {0: 10, 1: 5, 2: 2, 3: 1, 4: 3, 5: 30}
    labels = np.repeat(list(sizes), list(sizes.values()))
    np.random.default_rng(3).shuffle(labels)  # classes interleaved, as in a real listing
    train, val = stratified_split(labels, val_fraction=0.2, seed=0)

    assert train.dtype == val.dtype == np.int64
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()  # sorted, no duplicates
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(len(labels)))
    # round(n * 0.2) with at least one val and one train sample for every class of >= 2 images.
    expected_val = {0: 2, 1: 1, 2: 1, 3: 0, 4: 1, 5: 6}
    assert {c: int((labels[val] == c).sum()) for c in sizes} == expected_val
    assert {c: int((labels[train] == c).sum()) for c in sizes} == {c: sizes[c] - expected_val[c] for c in sizes}

    again_train, again_val = stratified_split(list(labels), val_fraction=0.2, seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    _, other_val = stratified_split(labels, val_fraction=0.2, seed=1)
    assert not np.array_equal(val, other_val)


def test_stratified_split_refuses_bad_fraction_and_labels():
    for fraction in (0, 1, -0.1, 1.5, True):
        with pytest.raises(InputError, match="validation fraction"):
            stratified_split([0, 0, 1, 1], val_fraction=fraction)
    with pytest.raises(InputError, match="labels"):
        stratified_split([0.5, 1.0])
    with pytest.raises(InputError, match="labels"):
        stratified_split([[0, 1], [1, 0]])


# --- Augmenter ---------------------------------------------------------------------------------------


def test_augmenter_output_shape_dtype_and_seeded_determinism():
    spec = PreprocessSpec(size=(96, 128))
    augment = Augmenter(spec)
    img = _noise((200, 150), seed=5)
    out = augment(img, np.random.default_rng(42))
    assert out.shape == (96, 128, 3) and out.dtype == np.uint8
    assert out.tobytes() == augment(img, np.random.default_rng(42)).tobytes()
    assert out.tobytes() != augment(img, np.random.default_rng(43)).tobytes()


def test_augmenter_without_randomness_equals_inference_preprocessing():
    spec = PreprocessSpec()
    img = _noise((120, 80), seed=6)
    aspect = img.width / img.height
    identity = Augmenter(spec, scale=(1.0, 1.0), ratio=(aspect, aspect), hflip=0.0,
                         brightness=0.0, contrast=0.0, saturation=0.0)
    reference = resize_to_spec(img, spec)
    assert np.array_equal(identity(img, np.random.default_rng(0)), reference)

    mirrored = Augmenter(spec, scale=(1.0, 1.0), ratio=(aspect, aspect), hflip=1.0,
                         brightness=0.0, contrast=0.0, saturation=0.0)
    flipped = resize_to_spec(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), spec)
    assert np.array_equal(mirrored(img, np.random.default_rng(0)), flipped)


def test_augmenter_keeps_letterbox_bars_at_the_fill_colour():
    # Jitter touches only the image area, so bars stay exactly the fill colour inference pads with.
    spec = PreprocessSpec(size=(64, 64), fill=(0, 0, 255))
    augment = Augmenter(spec, scale=(1.0, 1.0), ratio=(2.0, 2.0), brightness=0.5, contrast=0.5, saturation=0.5)
    out = augment(Image.new("RGB", (100, 50), (120, 120, 120)), np.random.default_rng(1))
    assert (out[:16] == (0, 0, 255)).all() and (out[48:] == (0, 0, 255)).all()
    jittered = out[16:48]
    assert (jittered == jittered[0, 0]).all() and not (jittered[0, 0] == (120, 120, 120)).all()


def test_augmenter_refuses_bad_settings_and_inputs():
    spec = PreprocessSpec()
    for kwargs in ({"scale": (0.0, 1.0)}, {"scale": (0.9, 0.5)}, {"scale": (0.5, 1.5)}, {"ratio": (0, 1)},
                   {"hflip": 1.5}, {"brightness": -0.1}, {"contrast": float("nan")}):
        with pytest.raises(InputError):
            Augmenter(spec, **kwargs)
    augment = Augmenter(spec)
    with pytest.raises(InputError, match="Generator"):
        augment(Image.new("RGB", (10, 10)), 0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="mode L"):
        augment(Image.new("L", (10, 10)), np.random.default_rng(0))


# --- the demo data set ------------------------------------------------------------------------------


def test_demo_data_scans_and_decodes_completely():
    folder = scan_image_folder(DEMO)
    assert len(folder.classes) == 8 and len(folder.paths) == 240
    assert folder.classes == tuple(sorted(folder.classes))
    assert np.bincount(folder.labels).tolist() == [30] * 8
    assert folder.ignored == ()  # ATTRIBUTION.md sits at the root: ignored silently
    assert all(path.name != "ATTRIBUTION.md" for path in folder.paths)

    result = hash_files(folder.paths, progress=False)
    assert result.skipped == []
    files = ImageFiles(folder.paths)
    assert all(files[i].mode == "RGB" for i in range(len(files)))
    # Digests are those of the file bytes (the demo set has a few byte-identical copies, so they are
    # not all distinct).
    assert all(isinstance(digest, str) and len(digest) == 64 for digest in result.sha256)
    assert result.sha256[7] == hashlib.sha256(folder.paths[7].read_bytes()).hexdigest()

    train, val = stratified_split(folder.labels, val_fraction=0.2, seed=0)
    assert len(train) == 192 and len(val) == 48
    assert np.bincount(np.asarray(folder.labels)[val]).tolist() == [6] * 8
