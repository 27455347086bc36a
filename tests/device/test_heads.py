"""Head evaluation, validation and the strict safetensors file format."""
from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import safetensors.numpy

from edgexfer.runtime.errors import HeadError, InputError
from edgexfer.runtime.heads import HEAD_FORMAT, HEAD_KINDS, Head

D, H, CLASSES = 12, 7, ("cat", "dog", "fox")


def make_head(kind: str, seed: int = 0, temperature: float | None = None) -> Head:
    rng = np.random.default_rng(seed)
    c = len(CLASSES)

    def r(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    if kind == "linear":
        tensors = {"W": r(c, D), "b": r(c)}
    elif kind == "mlp":
        tensors = {"W1": r(H, D), "b1": r(H), "W2": r(c, H), "b2": r(c)}
    else:
        P = r(c, D)
        tensors = {"P": P / np.linalg.norm(P, axis=1, keepdims=True), "scale": np.array(16.0, np.float32)}
    return Head(kind, CLASSES, tensors, temperature)


def write_raw(path: os.PathLike[str], tensors: dict[str, np.ndarray], metadata: dict[str, str] | None) -> None:
    """Write a safetensors file directly, bypassing Head.save, to forge broken heads."""
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)


def good_metadata(kind: str = "linear", classes: tuple[str, ...] = CLASSES) -> dict[str, str]:
    return {"format": HEAD_FORMAT, "kind": kind, "classes": json.dumps(list(classes)), "temperature": "null"}


def assert_one_line_error(exc: pytest.ExceptionInfo[HeadError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    assert len(message.split(" | ")) >= 3, message  # what | got | expected | what to do
    return message


# ------------------------------------------------------------------------------- evaluation
def test_linear_logits_are_affine_in_the_features() -> None:
    head = make_head("linear")
    f = np.random.default_rng(1).standard_normal((5, D)).astype(np.float32)
    expected = f.astype(np.float64) @ head.tensors["W"].T.astype(np.float64) + head.tensors["b"]
    out = head.logits(f)
    assert out.dtype == np.float32 and out.shape == (5, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_mlp_logits_use_a_relu_hidden_layer() -> None:
    head = make_head("mlp")
    t = {k: v.astype(np.float64) for k, v in head.tensors.items()}
    f = np.random.default_rng(2).standard_normal((4, D))
    hidden = np.maximum(f @ t["W1"].T + t["b1"], 0)
    np.testing.assert_allclose(head.logits(f), hidden @ t["W2"].T + t["b2"], rtol=1e-5, atol=1e-5)


def test_prototype_logits_are_scaled_cosine_and_ignore_feature_length() -> None:
    head = make_head("prototype")
    f = np.random.default_rng(3).standard_normal((6, D)).astype(np.float32)
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ head.tensors["P"].T
    np.testing.assert_allclose(head.logits(f), 16.0 * cos, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.logits(7.5 * f), head.logits(f), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(head.logits(np.zeros((1, D), np.float32))))


def test_probabilities_are_a_stable_softmax_with_temperature() -> None:
    head = make_head("linear", temperature=2.5)
    f = np.random.default_rng(4).standard_normal((8, D)).astype(np.float32)
    z = head.logits(f).astype(np.float64) / 2.5
    expected = np.exp(z - z.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    p = head.probabilities(f)
    assert p.dtype == np.float32
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-6)
    # Logits in the thousands would overflow a naive exp().
    huge = head.probabilities(f * 1e4)
    assert np.all(np.isfinite(huge))
    np.testing.assert_allclose(huge.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "features",
    [np.zeros(D, np.float32), np.zeros((2, D + 1), np.float32), np.zeros((2, D), np.int64), [[0.0] * D]],
    ids=["1-D", "wrong-D", "int", "list"],
)
def test_logits_refuse_unusable_features(features: object) -> None:
    with pytest.raises(InputError) as exc:
        make_head("linear").logits(features)  # type: ignore[arg-type]
    assert " | " in str(exc.value)


def test_shape_properties() -> None:
    for kind in HEAD_KINDS:
        head = make_head(kind)
        assert (head.feature_dim, head.num_classes) == (D, 3)


# ------------------------------------------------------------------------------- validation
def _replace(head: Head, **tensors: np.ndarray | None) -> dict[str, np.ndarray]:
    out = dict(head.tensors)
    for name, value in tensors.items():
        if value is None:
            out.pop(name)
        else:
            out[name] = value
    return out


@pytest.mark.parametrize(
    ("kind", "change", "named"),
    [
        ("linear", {"b": None}, "'b'"),
        ("linear", {"extra": np.zeros(3, np.float32)}, "'extra'"),
        ("linear", {"W": np.zeros((3, D), np.float64)}, "'W'"),
        ("linear", {"b": np.zeros(4, np.float32)}, "'b'"),
        ("linear", {"W": np.full((3, D), np.nan, np.float32)}, "'W'"),
        ("mlp", {"W2": np.zeros((3, H + 1), np.float32)}, "'W2'"),
        ("mlp", {"b1": np.zeros(H + 1, np.float32)}, "'b1'"),
        ("prototype", {"P": np.ones((3, D), np.float32)}, "'P'"),
        ("prototype", {"scale": np.array([1.0, 2.0], np.float32)}, "'scale'"),
        ("prototype", {"scale": np.array(-1.0, np.float32)}, "'scale'"),
    ],
)
def test_construction_refuses_bad_tensors_and_names_them(kind: str, change: dict, named: str) -> None:
    base = make_head(kind)
    with pytest.raises(HeadError) as exc:
        Head(kind, CLASSES, _replace(base, **change))
    assert named in assert_one_line_error(exc)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"kind": "conv"}, "'kind'"),
        ({"classes": ("cat", "cat", "fox")}, "'classes'"),
        ({"classes": ("cat", "", "fox")}, "'classes[1]'"),
        ({"temperature": 0.0}, "'temperature'"),
        ({"temperature": float("nan")}, "'temperature'"),
    ],
)
def test_construction_refuses_bad_fields_and_names_them(fields: dict, named: str) -> None:
    base = make_head("linear")
    args = {"kind": "linear", "classes": CLASSES, "tensors": dict(base.tensors), "temperature": None} | fields
    with pytest.raises(HeadError) as exc:
        Head(**args)
    assert named in assert_one_line_error(exc)


def test_a_head_cannot_be_changed_after_validation() -> None:
    head = make_head("linear")
    with pytest.raises(ValueError):
        head.tensors["W"][0, 0] = 1.0


# ---------------------------------------------------------------------------------- on disk
@pytest.mark.parametrize("kind", sorted(HEAD_KINDS))
@pytest.mark.parametrize("temperature", [None, 1.7])
def test_save_load_roundtrip_is_exact(tmp_path, kind: str, temperature: float | None) -> None:
    head = make_head(kind, temperature=temperature)
    path = tmp_path / "head.safetensors"
    head.save(path)
    loaded = Head.load(path, feature_dim=D)
    assert (loaded.kind, loaded.classes, loaded.temperature) == (kind, CLASSES, temperature)
    assert set(loaded.tensors) == set(head.tensors)
    for name, value in head.tensors.items():
        assert loaded.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(loaded.tensors[name], value)
    f = np.random.default_rng(5).standard_normal((3, D)).astype(np.float32)
    np.testing.assert_array_equal(loaded.logits(f), head.logits(f))


def test_save_replaces_an_existing_file_and_leaves_no_temporary_files(tmp_path) -> None:
    path = tmp_path / "head.safetensors"
    make_head("linear", seed=1).save(path)
    make_head("linear", seed=2).save(path)
    assert os.listdir(tmp_path) == ["head.safetensors"]
    np.testing.assert_array_equal(Head.load(path).tensors["W"], make_head("linear", seed=2).tensors["W"])


def test_save_into_a_missing_directory_is_a_head_error(tmp_path) -> None:
    with pytest.raises(HeadError) as exc:
        make_head("linear").save(tmp_path / "missing" / "head.safetensors")
    assert_one_line_error(exc)


class _WritesAFileWhenUnpickled:
    """Unpickling this object creates a file: proof that a loader unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_load_refuses_a_pickle_renamed_to_safetensors_without_unpickling_it(tmp_path) -> None:
    marker = tmp_path / "unpickled"
    path = tmp_path / "head.safetensors"
    path.write_bytes(pickle.dumps({"W": _WritesAFileWhenUnpickled(str(marker))}, protocol=4))
    with pytest.raises(HeadError) as exc:
        Head.load(path)
    assert "header length" in assert_one_line_error(exc)
    assert not marker.exists()


def _header_span(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return 8, 8 + n


def test_load_refuses_a_flipped_byte_in_the_header_json(tmp_path) -> None:
    path = tmp_path / "head.safetensors"
    make_head("linear").save(path)
    data = bytearray(path.read_bytes())
    begin, end = _header_span(bytes(data))
    # Flip a byte in the format tag, and separately a structural byte of the JSON.
    for position in (bytes(data).index(HEAD_FORMAT.encode(), begin, end) + 3,
                     bytes(data).index(b'"dtype"', begin, end)):
        corrupt = bytearray(data)
        corrupt[position] ^= 0x01
        path.write_bytes(bytes(corrupt))
        with pytest.raises(HeadError) as exc:
            Head.load(path)
        assert_one_line_error(exc)


def test_no_single_byte_corruption_of_the_header_escapes_as_another_exception(tmp_path) -> None:
    """Every flip of a header byte is refused with HeadError, except one that only renames a class."""
    original = make_head("mlp")
    path = tmp_path / "head.safetensors"
    original.save(path)
    data = path.read_bytes()
    _, end = _header_span(data)
    corrupt_path = tmp_path / "corrupt.safetensors"
    for position in range(end):
        for bit in (0x01, 0x80):
            corrupt = bytearray(data)
            corrupt[position] ^= bit
            corrupt_path.write_bytes(bytes(corrupt))
            try:
                loaded = Head.load(corrupt_path)
            except HeadError:
                continue
            # A letter of a class name flipped into another letter is still a valid head; the
            # bundle's sha256 is what catches that. Nothing else may get through.
            assert loaded.classes != original.classes, position
            assert loaded.kind == original.kind
            for name, value in original.tensors.items():
                np.testing.assert_array_equal(loaded.tensors[name], value)


def test_load_refuses_a_huge_header_length_and_a_truncated_file(tmp_path) -> None:
    path = tmp_path / "head.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(HeadError) as exc:
        Head.load(path)
    assert "header length" in assert_one_line_error(exc)

    make_head("linear").save(path)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(HeadError) as exc:
        Head.load(path)
    assert_one_line_error(exc)
    path.write_bytes(data[:5])
    with pytest.raises(HeadError):
        Head.load(path)


def test_load_refuses_a_zip_archive(tmp_path) -> None:
    import zipfile

    path = tmp_path / "head.safetensors"
    with zipfile.ZipFile(path, "w") as archive:  # what torch.save writes
        archive.writestr("archive/data.pkl", b"not a head")
    with pytest.raises(HeadError) as exc:
        Head.load(path)
    assert_one_line_error(exc)


def test_load_refuses_a_missing_file(tmp_path) -> None:
    with pytest.raises(HeadError) as exc:
        Head.load(tmp_path / "absent.safetensors")
    assert_one_line_error(exc)


def _linear_tensors() -> dict[str, np.ndarray]:
    return {name: np.array(value) for name, value in make_head("linear").tensors.items()}


@pytest.mark.parametrize(
    ("case", "tensors", "metadata", "named"),
    [
        ("extra tensor", _linear_tensors() | {"X": np.zeros(2, np.float32)}, good_metadata(), "'X'"),
        ("missing tensor", {"W": _linear_tensors()["W"]}, good_metadata(), "'b'"),
        ("wrong shape", _linear_tensors() | {"b": np.zeros(4, np.float32)}, good_metadata(), "'b'"),
        ("NaN weights", _linear_tensors() | {"W": np.full((3, D), np.nan, np.float32)}, good_metadata(), "'W'"),
        ("inf bias", _linear_tensors() | {"b": np.array([0, np.inf, 0], np.float32)}, good_metadata(), "'b'"),
        ("float64", _linear_tensors() | {"b": np.zeros(3, np.float64)}, good_metadata(), "'b'"),
        ("unknown kind", _linear_tensors(), good_metadata(kind="conv"), "kind"),
        ("kind does not match tensors", _linear_tensors(), good_metadata(kind="mlp"), "'W1'"),
        ("no metadata", _linear_tensors(), None, "metadata"),
        ("other format", _linear_tensors(), good_metadata() | {"format": "edgexfer.head/2"}, "format"),
        ("extra metadata", _linear_tensors(), good_metadata() | {"note": "x"}, "metadata"),
        ("classes not JSON", _linear_tensors(), good_metadata() | {"classes": "[cat"}, "JSON"),
        ("class count", _linear_tensors(), good_metadata(classes=("cat", "dog")), "'W'"),
        ("bad temperature", _linear_tensors(), good_metadata() | {"temperature": "-1"}, "'temperature'"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_load_refuses_heads_that_do_not_follow_the_contract(tmp_path, case, tensors, metadata, named) -> None:
    path = tmp_path / "head.safetensors"
    write_raw(path, tensors, metadata)
    with pytest.raises(HeadError) as exc:
        Head.load(path)
    assert named in assert_one_line_error(exc), case


def test_load_refuses_a_head_for_another_backbone(tmp_path) -> None:
    path = tmp_path / "head.safetensors"
    make_head("prototype").save(path)
    assert Head.load(path, feature_dim=D).feature_dim == D
    with pytest.raises(HeadError) as exc:
        Head.load(path, feature_dim=1280)
    message = assert_one_line_error(exc)
    assert "1280" in message and str(D) in message


def test_one_head_always_saves_to_the_same_bytes(tmp_path):
    """Devices know a head by its sha256 (re-install, refused updates): saving must be deterministic."""
    import hashlib

    head = Head("linear", ("a", "b", "c"), {"W": np.arange(12, dtype=np.float32).reshape(3, 4),
                                            "b": np.ones(3, np.float32)}, 1.5)
    digests = set()
    for i in range(12):  # safetensors' metadata order alone used to vary between saves
        head.save(tmp_path / f"h{i}.safetensors")
        digests.add(hashlib.sha256((tmp_path / f"h{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    again = Head.load(tmp_path / "h0.safetensors")
    assert again.classes == head.classes and again.temperature == 1.5
    np.testing.assert_array_equal(again.tensors["W"], head.tensors["W"])
