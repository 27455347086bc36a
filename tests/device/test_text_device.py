"""A text bundle on the device (issue 15), torch-free: install with the golden check, predict (files, --text,
stdin lines), learn (files and --text), retrain, and acceptance 3: a new topic learned from 10 texts.

Real components: the text demo bundle (minilm_l6 backbone.onnx, tokenizer.json), ONNX Runtime, the SQLite
feature cache, real texts from Debian's fortunes (data/fortunes-demo, data/fortunes-love).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.device import Device
from edgexfer.runtime.errors import BundleError, InputError, ValidationError
from edgexfer.runtime.predictor import Prediction, SampleError
from edgexfer.runtime.text import text_sha256

REPO = Path(__file__).resolve().parents[2]
TEXT_DEMO = REPO / "data" / "fortunes-demo"
LOVE = sorted((REPO / "data" / "fortunes-love").glob("*.txt"))


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgexfer.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=180)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, device_text_bundle) -> Path:
    """One device state with the text bundle installed; tests copy it (installing copies ~90 MB)."""
    state = tmp_path_factory.mktemp("text-template") / "state"
    with Device(state) as dev:
        result = dev.install(device_text_bundle)
    assert result["golden"]["modality"] == "text" and result["golden"]["top1_agreement"] == 1.0
    return state


@pytest.fixture
def state(tmp_path, installed) -> Path:
    dest = tmp_path / "state"
    shutil.copytree(installed, dest, symlinks=True)
    return dest


def _golden_texts(bundle_dir: Path) -> tuple[list[str], list[str]]:
    bundle = Bundle.open(bundle_dir)
    golden = bundle.golden()
    return [str(t) for t in golden["texts"]], [bundle.manifest.head.classes[int(i)] for i in golden["labels"]]


def test_a_text_bundle_installs_and_its_golden_texts_tokenize_as_at_export(installed, device_text_bundle):
    bundle = Bundle.open(device_text_bundle)
    assert bundle.modality == "text" and "tokenizer.json" in bundle.manifest.files
    with Device(installed) as dev:
        status = dev.status()
    assert status["bundle"]["arch"] == "minilm_l6" and status["head"]["classes"] == ["art", "pets", "politics", "science"]


def test_a_bundle_whose_golden_ids_differ_from_the_tokenizer_is_refused(tmp_path, device_text_bundle, reseal):
    import io

    copy = tmp_path / "bundle"
    shutil.copytree(device_text_bundle, copy)
    golden = dict(np.load(copy / "golden.npz"))
    golden["input_ids"][0, 1] += 1  # another word piece: what a different tokenizers version could produce
    buf = io.BytesIO()
    np.savez(buf, **golden)
    reseal(copy, "golden.npz", buf.getvalue())
    with Device(tmp_path / "state") as dev, pytest.raises(ValidationError, match="tokenize differently here"):
        dev.install(copy)
    (copy / "tokenizer.json").write_text((copy / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNQ]"', 1))
    with Device(tmp_path / "state2") as dev, pytest.raises(BundleError, match="tokenizer.json: sha256 differs"):
        dev.install(copy)


def test_device_predict_reads_files_texts_and_stdin_lines(state, tmp_path):
    pets = sorted((TEXT_DEMO / "pets").glob("*.txt"))[0]
    (tmp_path / "latin1.txt").write_bytes("Le chat est sur le canapé".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n")
    proc = _cli("device", "predict", str(pets), str(tmp_path / "latin1.txt"), str(tmp_path / "empty.txt"), "-",
                "--text", "The senate passed the budget bill after a long debate in congress.",
                "--state", str(state), "--json",
                stdin="The telescope measured the speed of light from a distant galaxy.\n\n")
    assert proc.returncode == 1, proc.stderr  # two files were bad; the others still got labels
    results = json.loads(proc.stdout)["results"]
    assert [r["source"] for r in results] == [str(pets), str(tmp_path / "latin1.txt"), str(tmp_path / "empty.txt"),
                                              "text[0]", "stdin:line 1"]
    assert results[0]["label"] == "pets"
    assert "not UTF-8" in results[1]["error"] and "empty text" in results[2]["error"]
    assert results[3]["label"] == "politics" and results[4]["label"] == "science"


def test_device_predict_without_input_is_a_usage_error(state):
    proc = _cli("device", "predict", "--state", str(state))
    assert proc.returncode == 2 and "--text" in proc.stderr


def test_texts_given_to_an_image_bundle_are_refused_in_one_line(tmp_path, device_bundle):
    with Device(tmp_path / "state") as dev:
        dev.install(device_bundle)
        with pytest.raises(InputError, match="texts given to an image bundle"):
            dev.predict_texts(["a text"])
        with pytest.raises(InputError, match="texts given to an image bundle"):
            dev.learn([], "new", texts=["a text"])


def test_device_learn_reads_stdin_lines_and_names_a_bad_one_by_its_line(state):
    proc = _cli("device", "learn", "--label", "love", "-", "--state", str(state), "--json",
                stdin=LOVE[0].read_text().replace("\n", " ") + "\n\n" + "bad \x00 line\n")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert report["added"] == 1 and [e["source"] for e in report["errors"]] == ["stdin:line 3"]


def test_learn_stores_each_text_once_with_its_text_and_reports_bad_ones(state, tmp_path):
    first, second = LOVE[0], LOVE[1]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00broken")
    with Device(state) as dev:
        report = dev.learn([first, second, tmp_path / "bad.txt"], "love",
                           texts=[first.read_text() + "\n\n", "   "])  # the same text as a file: one sample
        assert report.added == 2 and report.backbone_runs == 2 and len(report.errors) == 2
        again = dev.learn([], "love", texts=[second.read_text()])
        assert again.added == 0 and again.already_known == 1 and again.backbone_runs == 0
        with dev.cache() as cache:
            stored = cache.image(text_sha256(first.read_text()))
        assert stored.decode("utf-8") == first.read_text().strip()  # the cache keeps the text: features can be recomputed
        with pytest.raises(InputError, match="augment"):
            dev.learn([first], "love", augment=2)


def test_learn_walks_a_directory_for_text_files_only(state, tmp_path):
    folder = tmp_path / "love"
    (folder / "more").mkdir(parents=True)
    shutil.copy(LOVE[2], folder / "b.txt")
    shutil.copy(LOVE[3], folder / "more" / "a.TXT")
    (folder / "photo.png").write_bytes(b"\x89PNG not a text")  # not the bundle's kind of file: not read
    with Device(state) as dev:
        report = dev.learn([folder], "love")
    assert (report.added, report.errors, report.batches) == (2, [], 1)


def test_acceptance_3_a_new_topic_learned_from_10_texts_is_predicted(state, device_text_bundle):
    """Issue 15, acceptance 3: `device learn --text` x 10, `device retrain`, then the new topic is predicted."""
    learn, ask = LOVE[:10], LOVE[10:]
    golden_texts, golden_labels = _golden_texts(device_text_bundle)
    with Device(state) as dev:
        before = [r.label for r in dev.predict_texts(golden_texts)]
    args = [a for p in learn for a in ("--text", p.read_text())]
    proc = _cli("device", "learn", "--label", "love", *args, "--state", str(state), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["added"] == 10
    proc = _cli("device", "retrain", "--state", str(state), "--json")
    assert proc.returncode == 0, proc.stderr
    retrain = json.loads(proc.stdout)
    assert retrain["accepted"] and "love" in retrain["classes"]
    proc = _cli("device", "predict", *map(str, ask), "--state", str(state), "--json")
    assert proc.returncode == 0, proc.stderr
    labels = [r["label"] for r in json.loads(proc.stdout)["results"]]
    assert labels.count("love") >= 7, labels  # measured: 8 of the 10 unseen love texts
    with Device(state) as dev:
        after = [r.label for r in dev.predict_texts(golden_texts)]
    # the bundle's golden texts (validation texts of its run): the old topics are still recognised
    right_before = sum(a == b for a, b in zip(before, golden_labels))
    right_after = sum(a == b for a, b in zip(after, golden_labels))
    assert right_after >= right_before - 1, (before, after, golden_labels)


def test_predictions_of_texts_match_across_files_texts_and_bytes(state):
    text_file = sorted((TEXT_DEMO / "science").glob("*.txt"))[3]
    with Device(state) as dev:
        a, b, c = dev.predict([text_file, text_file.read_bytes()]) + dev.predict_texts([text_file.read_text()])
    assert all(isinstance(r, Prediction) for r in (a, b, c))
    assert a.label == b.label == c.label and abs(a.probability - c.probability) < 1e-6
    with Device(state) as dev:
        [bad] = dev.predict([np.zeros((4, 4, 3), np.uint8)])
    assert isinstance(bad, SampleError) and "text file path" in bad.error
