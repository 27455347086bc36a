"""`edgexfer train --mode auto`: seeded stratified folds, the choice rule, the budget, and a real run."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgexfer.runtime.errors import DataError, InputError
from edgexfer.selection import (
    Candidate,
    CandidateScore,
    choose,
    frozen_candidates,
    score_budgeted,
    stratified_folds,
)


def test_folds_test_every_sample_once_keep_class_shares_and_repeat_with_the_seed():
    y = np.repeat(np.arange(4), [30, 11, 7, 52])
    folds = stratified_folds(y, 5, seed=3)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested) == list(range(len(y)))
    for train, test in folds:
        assert not set(train) & set(test) and len(train) + len(test) == len(y)
        counts = np.bincount(y[test], minlength=4)
        assert np.all(np.abs(counts - np.bincount(y) / 5) <= 1)
    again = stratified_folds(y, 5, seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = stratified_folds(y, 5, seed=4)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))
    # fewer folds than the smallest class allows are used as they are; more are lowered to it
    assert len(stratified_folds(np.repeat([0, 1], [3, 9]), 5)) == 3


def test_folds_refuse_a_class_with_one_sample_in_one_line():
    with pytest.raises(DataError) as err:
        stratified_folds(np.array([0, 0, 1, 2, 2]), 5)
    assert "two training images per class" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError):
        stratified_folds(np.array([0, 0, 1, 1]), 1)


def _score(name, accs, note=""):
    return CandidateScore(Candidate(name, "frozen", "linear"), list(accs), [0.1] * len(accs), note)


def test_the_choice_keeps_the_baseline_unless_a_candidate_beats_it_credibly():
    base = _score("frozen linear C=1", [0.70, 0.72, 0.71])
    assert choose([base, _score("mlp", [0.69, 0.72, 0.70])]) is base
    assert choose([base, _score("tie", [0.72, 0.70, 0.71])]) is base
    # higher on average, but by fold-to-fold luck: one big win and two losses
    assert choose([base, _score("lucky", [0.80, 0.70, 0.70])]) is base
    better = _score("partial", [0.75, 0.76, 0.74])
    best = _score("partial2", [0.77, 0.78, 0.75])
    assert choose([base, _score("mlp", [0.69, 0.70, 0.70]), better, best]) is best
    # a candidate the budget cut short is reported, never chosen, however good its folds looked
    assert choose([base, _score("partial", [0.99], note="budget spent")]) is base


def test_the_budget_stops_an_expensive_candidate_and_marks_it_ineligible():
    y = np.repeat(np.arange(2), 10)
    folds = stratified_folds(y, 5)
    calls = []

    def run_fold(train, test, left):
        calls.append(left)
        import time
        time.sleep(0.05)
        return np.eye(2)[y[test]]  # perfect logits

    full = score_budgeted(Candidate("p", "partial", "linear"), run_fold, y, folds, budget_s=60.0)
    assert full.complete and full.fold_accuracy == [1.0] * 5
    short = score_budgeted(Candidate("p", "partial", "linear"), run_fold, y, folds, budget_s=0.12)
    assert not short.complete and "budget" in short.note and len(short.fold_accuracy) < 5
    assert score_budgeted(Candidate("p", "partial", "linear"), run_fold, y, folds, budget_s=60.0,
                          setup_seconds=61.0).note


def test_frozen_candidates_start_with_the_configured_linear_head():
    names = [c.name for c in frozen_candidates(C=0.5)]
    assert names[0] == "frozen linear C=0.5" and "frozen mlp" in names and "frozen prototype" in names
    assert len(set(names)) == len(names)


pytest.importorskip("torch")


def test_auto_mode_cross_validates_on_the_training_split_and_keeps_the_table(demo_data, tmp_path):
    from edgexfer.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", str(demo_data), "--out", str(out), "--mode", "auto", "--folds", "3",
                                       "--budget", "0", "--cache", str(tmp_path / "f.sqlite"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "chosen by cross-validation" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    sel = metrics["selection"]
    table = {c["name"]: c for c in sel["candidates"]}
    assert sel["folds"] == 3 and len(table) >= 7
    assert all(len(c["fold_accuracy"]) == 3 for c in table.values() if c["eligible"])
    chosen = table[sel["chosen"]]
    assert chosen["mean"] >= table["frozen linear C=1"]["mean"]
    assert chosen["mean"] == max(c["mean"] for c in table.values() if c["eligible"])
    assert metrics["head"] == chosen["head"] and metrics["mode"] == "auto"
    assert (out / "plots" / "selection.png").stat().st_size > 10_000
    # the validation split took no part: every fold trains and tests only on the training split
    assert sum(len(c["fold_accuracy"]) for c in [chosen]) == 3
    run = json.loads((out / "run.json").read_text())
    assert len(run["train"]) == metrics["train_count"]


def test_auto_mode_refuses_one_fold_in_one_line(demo_data, tmp_path):
    from edgexfer.cli import main

    result = CliRunner().invoke(main, ["train", str(demo_data), "--out", str(tmp_path / "r"), "--mode", "auto",
                                       "--folds", "1", "--quiet"])
    assert result.exit_code != 0
    assert "--folds | got 1 | expected an integer >= 2" in result.output
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_auto_mode_scores_the_partial_candidate_on_the_same_folds_within_the_budget(demo_data, tmp_path):
    """A short partial recipe (1 epoch, 1 view) takes part; a budget too small for it leaves it ineligible."""
    from host_support import subset as copy_subset

    from edgexfer.train import TrainConfig, train

    subset = copy_subset(demo_data, tmp_path / "data", classes=3, per_class=12)
    common = dict(data_dir=subset, mode="auto", folds=3, epochs=1, views=1, cache=tmp_path / "f.sqlite",
                  progress=False)
    result = train(TrainConfig(out=tmp_path / "run", budget=600, **common))
    sel = result.metrics["selection"]
    partial = [c for c in sel["candidates"] if c["mode"] == "partial"]
    assert len(partial) == 1 and partial[0]["eligible"], partial
    assert len(partial[0]["fold_accuracy"]) == 3 and partial[0]["params"]["epochs"] == 1
    assert "gain_over_frozen_linear" in partial[0]
    if sel["chosen"] == partial[0]["name"]:
        assert (tmp_path / "run" / "backbone.safetensors").is_file()

    short = train(TrainConfig(out=tmp_path / "short", budget=0.01, **common)).metrics["selection"]
    cut = [c for c in short["candidates"] if c["mode"] == "partial"][0]
    assert not cut["eligible"] and "budget" in cut["note"] and short["chosen"] != cut["name"]
