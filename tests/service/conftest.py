"""Service tests need the ``serve`` extra; they run in the host venv and in the torch-free device venv."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="device serve needs the serve extra (pip install 'edgexfer[serve]')")


def _installed(tmp_path_factory, bundle: Path, name: str) -> Path:
    from edgexfer.runtime.device import Device

    state = tmp_path_factory.mktemp(name) / "state"
    with Device(state) as dev:
        dev.install(bundle)
    return state


@pytest.fixture(scope="module")
def served_state(tmp_path_factory, device_bundle) -> Path:
    """A device state with the test bundle installed (one per test module)."""
    return _installed(tmp_path_factory, device_bundle, "serve")


@pytest.fixture(scope="module")
def text_state(tmp_path_factory, device_text_bundle) -> Path:
    """A device state with the text test bundle installed (one per test module)."""
    return _installed(tmp_path_factory, device_text_bundle, "serve-text")


@pytest.fixture(scope="module")
def audio_state(tmp_path_factory, device_audio_bundle) -> Path:
    """A device state with the audio test bundle installed (one per test module)."""
    return _installed(tmp_path_factory, device_audio_bundle, "serve-audio")
