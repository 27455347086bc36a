"""The bundle the bench tests measure, and one tiny run that several tests read."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def bench_bundle(request) -> Path:
    """$EDGEXFER_TEST_BUNDLE, else the repository's build/test-bundle, else the demo bundle built with torch."""
    env = os.environ.get("EDGEXFER_TEST_BUNDLE")
    if env:
        return Path(env)
    built = REPO / "build" / "test-bundle"
    if (built / "manifest.json").is_file():
        return built
    return request.getfixturevalue("device_bundle")


@pytest.fixture(scope="session")
def tiny_report(bench_bundle, tmp_path_factory):
    """``edgexfer bench`` on the bundle's ONNX Runtime engine: every layer, both scenarios, tiny durations."""
    pytest.importorskip("mlperf_loadgen")
    pytest.importorskip("onnxruntime")
    from edgexfer.bench import run_bench

    out = tmp_path_factory.mktemp("bench") / "out"
    report = run_bench(bench_bundle, backends="onnxruntime", precisions="fp32",
                       scenarios="single-stream,offline", batches="1,2", min_duration_s=0.05, min_queries=3,
                       threads=1, out_dir=out, progress=False, layers="all", torch_reference=False)
    return report, out
