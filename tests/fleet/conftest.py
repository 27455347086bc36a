"""Fixtures for fleet tests: a signed heads repository, a loopback HTTP server, installed devices."""
from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_support import SIGNER, LoopbackServer

from edgexfer.publish import HeadsRepo, keygen
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.device import Device


@pytest.fixture(scope="session")
def bundle(device_bundle) -> Bundle:
    return Bundle.open(device_bundle, verify=True)


@pytest.fixture(scope="session")
def installed_template(tmp_path_factory, bundle) -> Path:
    """One device state with the bundle installed; tests copy it (installing copies 13 MB each time)."""
    state = tmp_path_factory.mktemp("template") / "state"
    with Device(state) as dev:
        dev.install(bundle.root)
    return state


@pytest.fixture
def make_device(tmp_path, installed_template):
    counter = iter(range(10_000))

    def make() -> Path:
        dest = tmp_path / f"device-{next(counter)}"
        shutil.copytree(installed_template, dest, symlinks=True)
        return dest

    return make


@pytest.fixture
def repo(tmp_path) -> HeadsRepo:
    pytest.importorskip("tuf", reason="needs the `updates` extra (tuf)")
    keygen(tmp_path / "offline" / "root.key")
    return HeadsRepo.init(tmp_path / "repo", tmp_path / "keys", tmp_path / "offline" / "root.key",
                          signer_backend=SIGNER)


@pytest.fixture
def server(repo) -> Iterator[LoopbackServer]:
    srv = LoopbackServer(repo.root_dir)
    yield srv
    srv.close()


@pytest.fixture(scope="session")
def three_then_six_classes(tmp_path_factory, demo_run, demo_data) -> tuple[Path, Path]:
    """(bundle trained on 3 demo classes, run dir of a head trained on 6), one frozen backbone.

    Both are real `train` runs (the second exports the same backbone.onnx, byte for byte); features
    come from the demo run's cache, so the backbone runs only for nothing new.
    """
    pytest.importorskip("torch", reason="training a run needs the host install")
    from edgexfer.export import export
    from edgexfer.train import TrainConfig, train

    root = tmp_path_factory.mktemp("incremental")
    classes = sorted(p.name for p in demo_data.iterdir() if p.is_dir())
    runs = {}
    for n in (3, 6):
        data = root / f"data{n}"
        for name in classes[:n]:
            (data / name).mkdir(parents=True)
            for image in sorted((demo_data / name).iterdir()):
                (data / name / image.name).symlink_to(image.resolve())
        runs[n] = train(TrainConfig(data_dir=data, out=root / f"run{n}", cache=demo_run.run_dir.parent / "features.sqlite",
                                    progress=False)).run_dir
    return export(runs[3], root / "bundle3", progress=False).bundle, runs[6]
