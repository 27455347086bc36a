"""Text on the host (issue 15): train (frozen, partial, auto) on a folder of .txt files or a CSV/JSONL file,
export a text bundle, eval and predict with it; acceptance 1 against scikit-learn's TF-IDF + logistic
regression on fortunes7.

Real components: the MiniLM weights package, its tokenizer.json, torch, the ONNX export, ONNX Runtime and
the SQLite feature cache; real texts from Debian's fortunes.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgexfer.cli import main
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.fsutil import file_sha256

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[2]
FORTUNES7 = REPO.parent / "shared" / "datasets" / "fortunes7"


def _tiny(root: Path, per_class: int = 6, classes=("art", "pets", "science")) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True)
        for p in sorted((REPO / "data" / "fortunes-demo" / c).glob("*.txt"))[:per_class]:
            shutil.copy(p, root / c / p.name)
    return root


def _train(data: Path, out: Path, cache: Path, **kw):
    from edgexfer.train import TrainConfig, train

    return train(TrainConfig(data_dir=data, out=out, cache=cache, progress=False, **kw))


def test_frozen_training_reads_bad_texts_truncates_long_ones_and_extracts_each_text_once(tmp_path):
    data = _tiny(tmp_path / "data")
    (data / "art" / "empty.txt").write_text("\n \n")
    (data / "pets" / "latin1.txt").write_bytes("Mon chien mange la pâtée".encode("latin-1"))
    (data / "science" / "long.txt").write_text("The experiment measured the energy of particles. " * 60)
    (data / "science" / "zz_copy.txt").write_text((data / "science" / "long.txt").read_text() + "\n")
    first = _train(data, tmp_path / "run", tmp_path / "f.sqlite")
    m = first.metrics
    assert m["modality"] == "text" and m["backbone"] == "minilm_l6" and m["truncated"] == 1
    assert m["backbone_images_run"] == 19 and m["features_from_cache"] == 0  # 3 x 6 + the long one
    reasons = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"empty.txt", "latin1.txt", "zz_copy.txt"}
    assert "not UTF-8" in reasons["latin1.txt"] and "duplicate of" in reasons["zz_copy.txt"]
    assert file_sha256(tmp_path / "run" / "tokenizer.json") == json.loads(
        (tmp_path / "run" / "run.json").read_text())["preprocess"]["tokenizer_sha256"]

    # the same texts as a CSV file: one sample each (identity = the text), so the cache has every feature
    with open(tmp_path / "data.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        run = json.loads((tmp_path / "run" / "run.json").read_text())
        for t in sorted(run["train"] + run["val"], key=lambda t: t["source"]):  # the folder's order
            writer.writerow([t["text"], run["classes"][t["label"]]])
    second = _train(tmp_path / "data.csv", tmp_path / "run-csv", tmp_path / "f.sqlite")
    assert second.metrics["backbone_images_run"] == 0 and second.metrics["features_from_cache"] == 19
    assert second.val_accuracy == first.val_accuracy  # same samples in the same order: the same split


def test_partial_fine_tunes_the_last_layers_and_exports_a_bundle_that_matches_torch(tmp_path):
    data = _tiny(tmp_path / "data")
    result = _train(data, tmp_path / "run", tmp_path / "f.sqlite", mode="partial", unfreeze="2", epochs=2,
                    backbone_lr=1e-4)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["backbone"]["fine_tuned"] and result.metrics["recipe"]["unfreeze"] == 2
    assert result.metrics["recipe"]["backbone_lr"] == 1e-4 < result.metrics["recipe"]["head_lr"]
    assert len(result.metrics["history"]) == 2
    frozen = _train(data, tmp_path / "frozen", tmp_path / "f.sqlite")
    assert file_sha256(tmp_path / "run" / "backbone.onnx") != file_sha256(frozen.run_dir / "backbone.onnx")
    from edgexfer.export import export

    parity = export(tmp_path / "run", tmp_path / "bundle", progress=False).parity
    assert parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0
    assert Bundle.open(tmp_path / "bundle").manifest.backbone.sha256 == file_sha256(tmp_path / "run" / "backbone.onnx")

    # a device that learned texts with the frozen bundle recomputes their features for the tuned backbone
    from edgexfer.runtime.device import Device

    export(frozen.run_dir, tmp_path / "frozen-bundle", progress=False)
    with Device(tmp_path / "state") as dev:
        dev.install(tmp_path / "frozen-bundle")
        assert dev.learn([], "science", texts=["Atoms and molecules.", "The theory of relativity."]).added == 2
        installed = dev.install(tmp_path / "bundle")
        assert installed["recomputed_features"] == 2
        assert dev.predict_texts(["Electrons orbit the nucleus of an atom."])[0].label in run["classes"]


def test_auto_cross_validates_frozen_heads_and_the_partial_candidate(tmp_path):
    data = _tiny(tmp_path / "data", per_class=8)
    result = _train(data, tmp_path / "run", tmp_path / "f.sqlite", mode="auto", folds=2, budget=300, epochs=1)
    selection = result.metrics["selection"]
    names = [c["name"] for c in selection["candidates"]]
    assert names[0] == "frozen linear C=1" and "partial last 2 layers" in names
    partial = next(c for c in selection["candidates"] if c["name"] == "partial last 2 layers")
    assert len(partial["fold_accuracy"]) == 2  # scored on both folds within the budget
    assert selection["chosen"] in names


def test_wrong_backbone_for_the_data_and_image_only_options_are_one_line_errors(tmp_path, demo_data):
    data = _tiny(tmp_path / "data", per_class=2)
    for kw, message in (({"backbone": "efficientnet_lite0"}, "backbone efficientnet_lite0 reads images"),
                        ({"views": 2, "mode": "partial"}, "--views with text data"),
                        ({"unfreeze": "all", "mode": "partial"}, "--unfreeze all with a text backbone")):
        with pytest.raises(InputError, match=message):
            _train(data, tmp_path / "run", tmp_path / "f.sqlite", **kw)
    with pytest.raises(InputError, match="backbone minilm_l6 reads texts"):
        _train(demo_data, tmp_path / "run", tmp_path / "f.sqlite", backbone="minilm_l6")


def test_the_text_bundle_ships_its_tokenizer_and_golden_texts(text_bundle):
    bundle = Bundle.open(text_bundle)
    m = bundle.manifest
    assert m.backbone.modality == "text" and m.backbone.input.max_length == 256
    assert m.files["tokenizer.json"].sha256 == m.backbone.input.tokenizer_sha256
    golden = bundle.golden()
    assert len(golden["texts"]) == 8 and golden["input_ids"].dtype == np.int64
    assert (golden["input_ids"][:, 0] == 101).all()  # [CLS]
    assert bundle.tokenizer().encode([str(t) for t in golden["texts"]]).input_ids.tolist() == golden["input_ids"].tolist()


def test_eval_reads_a_text_folder_or_a_csv_the_same(text_bundle, text_demo_data, tmp_path):
    runner = CliRunner()
    folder = runner.invoke(main, ["eval", str(text_bundle), str(text_demo_data), "--json", "--quiet"])
    assert folder.exit_code == 0, folder.output
    rows = [(p.read_text(), p.parent.name) for p in sorted(text_demo_data.glob("*/*.txt"))]
    with open(tmp_path / "demo.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("text", "label"), *rows, ("", "art")])
    table = runner.invoke(main, ["eval", str(text_bundle), str(tmp_path / "demo.csv"), "--json", "--quiet"])
    assert table.exit_code == 0, table.output
    a, b = json.loads(folder.output), json.loads(table.output)
    assert a["accuracy"] == b["accuracy"] >= 0.9  # 60 texts, 48 of them trained on
    assert sum(a["confusion_matrix"][i][i] for i in range(4)) == round(a["accuracy"] * 60)
    assert len(b["skipped"]) == 1 and "empty text" in b["skipped"][0]["reason"]


def test_predict_reads_files_texts_and_stdin_lines(text_bundle, text_demo_data, tmp_path, demo_data):
    runner = CliRunner()
    pets = sorted((text_demo_data / "pets").glob("*.txt"))[0]
    image = sorted((demo_data / "fruit").iterdir())[0]
    out = runner.invoke(main, ["predict", str(text_bundle), str(pets), str(image), "-", "--json",
                               "--text", "Congress voted on the new tax law and the president signed it."],
                        input="Painting and sculpture in the museum of modern art.\n")
    assert out.exit_code == 1  # the image is not a text: reported, the others still labelled
    results = json.loads(out.output)["results"]
    assert [r.get("label") for r in results] == ["pets", None, "politics", "art"]
    assert "not UTF-8" in results[1]["error"]


@pytest.mark.skipif(not FORTUNES7.is_dir(), reason=f"the shared fortunes7 data set is not at {FORTUNES7}")
def test_acceptance_1_minilm_beats_tfidf_logistic_regression_by_20_points(tmp_path):
    """Issue 15, acceptance 1: fortunes7, seeded 80/20 split: frozen minilm_l6 + linear head against scikit-learn's
    TF-IDF (word 1-2-grams) + logistic regression on the same split. Measured: 0.789 against 0.479."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    # features are cached across test runs (like make test-device's image cache): ~35 s once, seconds after
    cache = REPO / "build" / "text-test-cache.sqlite"
    cache.parent.mkdir(exist_ok=True)
    result = _train(FORTUNES7, tmp_path / "run", cache, seed=0, val_fraction=0.2)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert len(run["train"]) == 760 and len(run["val"]) == 190
    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    x_train = vectorizer.fit_transform([t["text"] for t in run["train"]])
    peer = LogisticRegression(max_iter=2000).fit(x_train, [t["label"] for t in run["train"]])
    predicted = peer.predict(vectorizer.transform([t["text"] for t in run["val"]]))
    tfidf = float(np.mean(predicted == np.array([t["label"] for t in run["val"]])))
    print(f"fortunes7 validation accuracy: minilm_l6 frozen + linear {result.val_accuracy:.3f}, "
          f"TF-IDF 1-2-grams + logistic regression {tfidf:.3f}")
    assert result.val_accuracy >= tfidf + 0.20, (result.val_accuracy, tfidf)
