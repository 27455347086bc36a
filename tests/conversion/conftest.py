"""One demo bundle converted step by step, shared by the conversion tests (conversions are slow).

Calibration and held-out images come from the shared clipart8 set (real clip art, labelled by
folder); the sizes are small so the whole folder runs in a few minutes on two cores.
"""
from __future__ import annotations

import shutil

import pytest

CALIB_SIZE = 64
VAL_SIZE = 160


@pytest.fixture(scope="session")
def conversion_bundle(tmp_path_factory, demo_bundle):
    """A private copy of the demo bundle that the conversion tests fill with engines."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("converted") / "bundle"
    shutil.copytree(demo_bundle.bundle, root)
    return root


@pytest.fixture(scope="session")
def converted(conversion_bundle, clipart8):
    """``converted(to, precision)``: convert once per session, return the ConvertResult."""
    from edgexfer.converters import convert

    done = {}

    def get(to: str, precision: str):
        if (to, precision) not in done:
            done[(to, precision)] = convert(conversion_bundle, to, precision, calib=clipart8, calib_size=CALIB_SIZE,
                                            val_size=VAL_SIZE, progress=False)
        return done[(to, precision)]

    return get
