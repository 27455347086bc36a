"""A modality and a backend added from this folder alone run the whole device path.

``toy_modality.py`` (samples are ``.vec`` files of float32 values) and ``toy_backend.py`` (``tanh(x @ W + b)``
in numpy) are registered here; nothing under edgexfer/, converters/ or runtime/ names them. A device
installs a bundle of that modality on that backend (golden check included), predicts, learns a new class
from a few samples, and retrains its head through them.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgexfer.runtime.backends.registry import backend_spec, register_backend, unregister_backend
from edgexfer.runtime.bundle import Bundle, bundle_relative_files
from edgexfer.runtime.device import Device
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.head_training import HeadTrainer
from edgexfer.runtime.manifest import BackboneInfo, EngineEntry, FileEntry, HeadInfo, Manifest
from edgexfer.runtime.modalities import modality_of, register_modality, unregister_modality
from edgexfer.runtime.predictor import Prediction

DIM, FEATURES = 4, 16
#: class centres in input space; "third" is the class the device learns
CENTRES = {"low": [-1.0, -1.0, 0.0, 0.0], "high": [1.0, 1.0, 0.0, 0.0], "third": [0.0, 0.0, 1.5, -1.5]}


@pytest.fixture()
def plugins():
    register_modality("vector", "toy_modality:VectorModality")
    register_backend("numpytanh", "toy_backend:NumpyTanhSpec")
    yield
    unregister_modality("vector")
    unregister_backend("numpytanh")


def _vectors(label: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (np.array(CENTRES[label], np.float32) + 0.25 * rng.standard_normal((n, DIM))).astype(np.float32)


def _write_vecs(folder, label: str, n: int, seed: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, row in enumerate(_vectors(label, n, seed)):
        path = folder / f"{label}-{seed}-{i}.vec"
        path.write_bytes(row.astype("<f4").tobytes())
        paths.append(path)
    return paths


def _make_bundle(root):
    """A vector bundle whose head knows "low" and "high", its engine the numpytanh backend's .npz."""
    rng = np.random.default_rng(0)
    engine = root / "engines/numpytanh/fp32/backbone.npz"
    engine.parent.mkdir(parents=True)
    W, b = rng.standard_normal((DIM, FEATURES)).astype(np.float32), np.zeros(FEATURES, np.float32)
    np.savez(engine, W=W, b=b)
    X = np.concatenate([_vectors("low", 20, 1), _vectors("high", 20, 2)])
    y = np.array([0] * 20 + [1] * 20)
    features = np.tanh(X @ W + b).astype(np.float32)
    head = HeadTrainer("linear").fit(features, y, ["low", "high"])
    head.save(root / "head.safetensors")
    np.savez(root / "exemplars.npz", features=features, labels=y)
    golden = np.concatenate([_vectors("low", 4, 3), _vectors("high", 4, 4)])
    golden_features = np.tanh(golden @ W + b).astype(np.float32)
    np.savez(root / "golden.npz", vectors=golden, features=golden_features, logits=head.logits(golden_features))
    names = ["engines/numpytanh/fp32/backbone.npz", "head.safetensors", "exemplars.npz", "golden.npz"]
    files = {k: FileEntry(**v) for k, v in bundle_relative_files(root, names).items()}
    sha = files["engines/numpytanh/fp32/backbone.npz"].sha256
    from toy_modality import VectorInputSpec

    Manifest(name="vectors", created_utc="2026-12-07T00:00:00Z",
             backbone=BackboneInfo(arch="tanh-4x16", sha256=sha, feature_dim=FEATURES, input=VectorInputSpec(DIM),
                                   modality="vector"),
             head=HeadInfo(kind="linear", classes=("low", "high"), version=1, backbone_sha256=sha),
             files=files,
             engines=(EngineEntry(backend="numpytanh", precision="fp32", files=("engines/numpytanh/fp32/backbone.npz",)),),
             ).write(root / "manifest.json")
    return root


def test_a_toy_modality_and_backend_from_the_tests_folder_run_install_predict_learn_retrain(plugins, tmp_path):
    bundle_dir = _make_bundle(tmp_path / "bundle")
    bundle = Bundle.open(bundle_dir)
    assert modality_of(bundle).plural == "vectors" and json.loads((bundle_dir / "manifest.json").read_text())[
        "backbone"]["modality"] == "vector"
    assert backend_spec("numpytanh").bundle_model(bundle, "fp32") == bundle_dir / "engines/numpytanh/fp32/backbone.npz"

    known = _write_vecs(tmp_path / "known", "low", 5, 10) + _write_vecs(tmp_path / "known", "high", 5, 11)
    unseen_third = _write_vecs(tmp_path / "unseen", "third", 8, 12)
    with Device(tmp_path / "state", backend="numpytanh") as dev:
        installed = dev.install(bundle_dir)
        assert installed["engine"]["backend"] == "numpytanh"
        assert installed["golden"]["modality"] == "vector" and installed["golden"]["images"] == 8
        assert installed["golden"]["top1_agreement"] == 1.0

        results = dev.predict([*known, b"\x00\x01", tmp_path / "missing.vec"])
        assert [r.label for r in results[:10]] == ["low"] * 5 + ["high"] * 5
        assert all(isinstance(r, Prediction) and r.backend == "numpytanh" for r in results[:10])
        assert "expected 16 bytes" in results[10].error  # the modality's own one-line error
        assert results[11].error.startswith("cannot read file") and "\n" not in results[11].error
        assert {r.label for r in dev.predict(unseen_third)} <= {"low", "high"}  # before: a class it does not know

        report = dev.learn([*_write_vecs(tmp_path / "learn", "third", 6, 13), tmp_path / "missing.vec"], "third")
        assert (report.added, report.backbone_runs) == (6, 6)
        assert [e["source"] for e in report.errors] == [str(tmp_path / "missing.vec")]
        again = dev.learn(_write_vecs(tmp_path / "learn", "third", 6, 13), "third")
        assert (again.added, again.already_known, again.backbone_runs) == (0, 6, 0)  # cached by the modality's hash
        for label, seed in (("low", 14), ("high", 15)):
            dev.learn(_write_vecs(tmp_path / "learn", label, 4, seed), label)
        with pytest.raises(InputError, match="augment with a vector bundle"):
            dev.learn([], "third", augment=2)

        retrained = dev.retrain()
        assert retrained.accepted and retrained.classes == ["low", "high", "third"]
        after = dev.predict(unseen_third)
        assert sum(r.label == "third" for r in after) >= 7
        assert [r.label for r in dev.predict(known)] == ["low"] * 5 + ["high"] * 5


def test_an_unregistered_modality_is_refused_by_name(tmp_path, plugins):
    bundle_dir = _make_bundle(tmp_path / "bundle")
    unregister_modality("vector")
    with pytest.raises(Exception, match="vector"):
        Bundle.open(bundle_dir)
