"""Text preprocessing and text data (issue 15), torch-free: the tokenizer of runtime/text.py with the real
all-MiniLM-L6-v2 tokenizer.json, the text data reader (folder of .txt, CSV, JSONL) on real fortunes texts,
and the manifest's modality and text input spec (old image manifests parse unchanged)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgexfer.runtime.errors import BundleError, DataError, InputError
from edgexfer.runtime.manifest import Manifest, TextInputSpec
from edgexfer.runtime.text import TextSpec, TextTokenizer, decode_text, normalize_text, text_sha256
from edgexfer.runtime.textdata import is_text_dataset, read_text_dataset

REPO = Path(__file__).resolve().parents[2]
FORTUNES = REPO.parent / "shared" / "datasets" / "fortunes7"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_json) -> TextTokenizer:
    return TextTokenizer.from_file(tokenizer_json)


# ------------------------------------------------------------------------------------------ tokenizer
def test_tokens_are_berts_wordpieces_with_cls_sep_and_padding_to_the_longest(tokenizer):
    batch = tokenizer.encode(["A man is eating food.", "Hi"])
    # bert-base-uncased ids: [CLS] a man is eating food . [SEP]
    assert batch.input_ids.tolist()[0] == [101, 1037, 2158, 2003, 5983, 2833, 1012, 102]
    assert batch.input_ids.tolist()[1] == [101, 7632, 102, 0, 0, 0, 0, 0]
    assert batch.attention_mask.tolist() == [[1] * 8, [1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch.input_ids.dtype == np.int64 and batch.attention_mask.dtype == np.int64
    assert batch.truncated == 0 and set(batch.feed()) == {"input_ids", "attention_mask"}


def test_long_texts_are_cut_to_max_length_ending_in_sep_and_counted(tokenizer_json):
    tok = TextTokenizer.from_file(tokenizer_json, max_length=16)
    batch = tok.encode(["word " * 100, "short text", "more words " * 20])
    assert batch.input_ids.shape == (3, 16)
    assert batch.truncated == 2
    assert batch.input_ids[0, -1] == 102 and batch.input_ids[0, 0] == 101
    assert tok.truncated(["word " * 100, "short text"]) == [True, False]


def test_the_files_own_settings_do_not_decide_length(tokenizer):
    # tokenizer.json says: truncate at 128 and pad every text to 128; the manifest's 256 decides here
    batch = tokenizer.encode(["word " * 200])
    assert batch.input_ids.shape == (1, 202) and batch.truncated == 0
    assert tokenizer.encode(["word " * 300]).input_ids.shape == (1, 256)


def test_the_cache_key_covers_the_tokenizer_file_and_max_length(tokenizer_json, tmp_path):
    a = TextTokenizer.from_file(tokenizer_json)
    assert a.key() == TextSpec(a.sha256, 256).key()
    assert TextTokenizer.from_file(tokenizer_json, max_length=128).key() != a.key()
    other = tmp_path / "tokenizer.json"
    obj = json.loads(tokenizer_json.read_text())
    obj["normalizer"]["lowercase"] = False  # a different tokenizer: cased
    other.write_text(json.dumps(obj))
    b = TextTokenizer.from_file(other)
    assert b.key() != a.key()
    assert b.encode(["Man"]).input_ids.tolist() != a.encode(["Man"]).input_ids.tolist()


def test_a_tokenizer_that_differs_from_the_manifest_is_refused(tokenizer_json):
    with pytest.raises(BundleError, match="tokenizer.json differs from the manifest"):
        TextTokenizer.from_file(tokenizer_json, sha256="0" * 64)
    with pytest.raises(InputError, match="max_length"):
        TextTokenizer.from_file(tokenizer_json, max_length=1000)


def test_a_sample_is_its_normalised_text():
    assert normalize_text("\ufeff  Hello\r\nworld \n") == "Hello\nworld"
    assert text_sha256("Hello\n") == text_sha256("  Hello") != text_sha256("hello")
    assert decode_text(b"\xef\xbb\xbfHello\n") == "Hello"  # a byte-order mark is not text
    with pytest.raises(InputError, match=r"not UTF-8 .*line 2"):
        decode_text(b"fine\ncaf\xe9\n", "latin1.txt")
    with pytest.raises(InputError, match="empty text"):
        decode_text(b" \n\t\n")


# ------------------------------------------------------------------------------------------ data reader
def _fortunes(root: Path, classes=("art", "pets", "science"), n: int = 4) -> Path:
    if not FORTUNES.is_dir():
        pytest.skip(f"the shared fortunes7 data set is not at {FORTUNES}")
    for c in classes:
        (root / c).mkdir(parents=True)
        for p in sorted((FORTUNES / c).glob("*.txt"))[:n]:
            shutil.copy(p, root / c / p.name)
    return root


def test_a_folder_of_texts_is_read_with_bad_files_reported_and_skipped(tmp_path):
    root = _fortunes(tmp_path / "data")
    art0 = sorted((root / "art").iterdir())[0]
    (root / "art" / "empty.txt").write_text("  \n")
    (root / "art" / "latin1.txt").write_bytes("Café au lait".encode("latin-1"))
    (root / "art" / "copy.txt").write_text(art0.read_text() + "\n\n")  # the same sample, other whitespace
    (root / "pets" / "conflict.txt").write_bytes(art0.read_bytes())  # the same text under two classes
    (root / "pets" / "notes.md").write_text("not a sample")
    (root / "README.txt").write_text("files in the root are not data")
    ds = read_text_dataset(root)
    assert ds.form == "folder" and ds.classes == ("art", "pets", "science")
    assert len(ds.samples) == 4 + 4 + 4 - 1  # art0 is dropped with its conflicting copy
    reasons = {Path(src).name: why for src, why in ds.skipped}
    assert "empty text" in reasons["empty.txt"]
    assert "not UTF-8" in reasons["latin1.txt"]
    assert "same text filed under classes art, pets" in reasons["conflict.txt"]
    assert "same text filed under classes art, pets" in reasons[art0.name]
    assert "same text filed under classes" in reasons["copy.txt"]
    assert reasons["notes.md"] == "not a .txt file"
    assert len(set(ds.shas)) == len(ds.samples) and ds.shas[0] == text_sha256(ds.texts[0])
    assert is_text_dataset(root)
    (root / "pets" / "photo.JPG").write_bytes(b"")  # an image in a class folder: an image tree with stray notes
    assert not is_text_dataset(root)


def test_a_duplicate_within_one_class_is_one_sample(tmp_path):
    root = _fortunes(tmp_path / "data", n=3)
    first = sorted((root / "pets").iterdir())[0]
    (root / "pets" / "zz_copy.txt").write_text(first.read_text().replace("\n", "\r\n"))
    ds = read_text_dataset(root)
    assert len(ds.samples) == 9
    assert dict(ds.skipped)[str(root / "pets" / "zz_copy.txt")] == f"duplicate of {first}"


@pytest.mark.parametrize("layout, message", [
    ({"art": ["a text"], "pets": []}, "class folder(s) without a usable text"),
    ({"art": ["a text"], "pets": ["", "   "]}, "pets (2 .txt file(s), 2 unusable)"),
    ({"art": ["a text", "another"]}, "a classifier needs at least 2 classes"),
])
def test_an_empty_or_single_class_is_a_one_line_error(tmp_path, layout, message):
    for cls, texts in layout.items():
        (tmp_path / cls).mkdir()
        for i, text in enumerate(texts):
            (tmp_path / cls / f"{i}.txt").write_text(text)
    with pytest.raises(DataError) as err:
        read_text_dataset(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_csv_and_jsonl_give_the_same_samples_as_the_folder(tmp_path):
    root = _fortunes(tmp_path / "data")
    folder = read_text_dataset(root)
    rows = [(s.text, folder.classes[s.label]) for s in folder.samples]
    import csv

    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text", "label"])
        for i, (text, label) in enumerate(rows):
            writer.writerow([i, text, label])  # quoted newlines and commas survive
        writer.writerow([99, "", "art"])
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t, "label": c}) for t, c in rows)
                                         + "\n{not json\n" + json.dumps({"text": "no label"}) + "\n")
    for name, bad in (("data.csv", ["empty text"]), ("data.jsonl", ["not JSON", '"text" and "label"'])):
        table = read_text_dataset(tmp_path / name)
        assert table.classes == folder.classes
        assert sorted(zip(table.shas, table.labels)) == sorted(zip(folder.shas, folder.labels))
        assert len(table.skipped) == len(bad) and all(b in r for b, (_, r) in zip(bad, table.skipped))
        assert ":line " in table.skipped[0][0]


def test_a_table_without_text_and_label_columns_or_with_one_label_is_refused(tmp_path):
    (tmp_path / "a.csv").write_text("sentence,topic\nhello,art\n")
    with pytest.raises(DataError, match="columns named text and label"):
        read_text_dataset(tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text('{"text": "one", "label": "art"}\n{"text": "two", "label": "art"}\n')
    with pytest.raises(DataError, match="at least 2 classes"):
        read_text_dataset(tmp_path / "b.jsonl")
    (tmp_path / "c.csv").write_bytes("text,label\ncafé,art\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8 .line 2"):
        read_text_dataset(tmp_path / "c.csv")
    (tmp_path / "x.tsv").write_text("text\tlabel\n")
    with pytest.raises(DataError, match="a .csv"):
        read_text_dataset(tmp_path / "x.tsv")


# ------------------------------------------------------------------------------------------ manifest
IMAGE_MANIFEST = {
    "schema": "edgexfer.bundle/1", "name": "clipart8", "created_utc": "2026-11-25T10:00:00Z",
    "backbone": {"arch": "efficientnet_lite0", "sha256": "a" * 64, "feature_dim": 1280,
                 "input": {"layout": "NHWC", "dtype": "uint8", "size": [224, 224], "resize": "letterbox",
                           "fill": [255, 255, 255], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
    "head": {"kind": "linear", "classes": ["a", "b"], "version": 1, "backbone_sha256": "a" * 64, "metrics": {}},
    "files": {"backbone.onnx": {"sha256": "a" * 64, "bytes": 10}},
    "engines": [], "tools": {},
}


def _text_manifest() -> dict:
    obj = json.loads(json.dumps(IMAGE_MANIFEST))
    obj["backbone"] = {"arch": "minilm_l6", "modality": "text", "sha256": "a" * 64, "feature_dim": 384,
                       "input": {"tokenizer": "tokenizer.json", "tokenizer_sha256": "b" * 64, "max_length": 256}}
    obj["files"]["tokenizer.json"] = {"sha256": "b" * 64, "bytes": 5}
    return obj


def test_an_old_image_manifest_parses_unchanged_and_is_written_back_the_same():
    m = Manifest.from_json(json.dumps(IMAGE_MANIFEST))
    assert m.backbone.modality == "image"
    assert json.loads(m.to_json()) == IMAGE_MANIFEST  # no new field: older devices read it too


def test_a_text_manifest_records_the_tokenizer_and_max_length():
    m = Manifest.from_json(json.dumps(_text_manifest()))
    assert m.backbone.modality == "text"
    assert m.backbone.input == TextInputSpec("tokenizer.json", "b" * 64, 256)
    assert json.loads(m.to_json()) == _text_manifest()


@pytest.mark.parametrize("change, field", [
    (lambda o: o["backbone"].update(modality="smell"), "manifest.backbone.modality"),
    (lambda o: o["backbone"]["input"].update(max_length=4096), "manifest.backbone.input.max_length"),
    (lambda o: o["backbone"]["input"].pop("tokenizer_sha256"), "manifest.backbone.input.tokenizer_sha256"),
    (lambda o: o["backbone"]["input"].update(size=[224, 224]), "manifest.backbone.input"),
    (lambda o: o["files"].pop("tokenizer.json"), "manifest.backbone.input.tokenizer"),
    (lambda o: o["files"]["tokenizer.json"].update(sha256="c" * 64), "manifest.backbone.input.tokenizer"),
    (lambda o: o["backbone"]["input"].update(tokenizer="../tokenizer.json"), "manifest.backbone.input.tokenizer"),
])
def test_a_bad_text_manifest_names_the_field(change, field):
    obj = _text_manifest()
    change(obj)
    with pytest.raises(BundleError) as err:
        Manifest.from_json(json.dumps(obj))
    assert field in str(err.value)
