"""benchmarks/scaling.py (issue 28, point 6): how it measures a step's peak RSS, what it concludes from the
figures, and a --quick run of its train steps."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "scaling.py"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_a_step_peak_rss_is_the_childs_own_not_this_processs(tmp_path):
    """A child started straight from a big process reports that process's high-water mark (Linux keeps it
    across exec); the study's wrapper must not: a 300 MB parent, an empty child, a 200 MB child."""
    np = pytest.importorskip("numpy")
    scaling = _load("scaling")
    ballast = np.ones(300 * 2**20, dtype=np.uint8)  # touched: 300 MB resident in this process
    empty = scaling.measure([sys.executable, "-c", "pass"], tmp_path, "empty")
    big = scaling.measure([sys.executable, "-c", "import numpy as np; a = np.ones(200 * 2**20, np.uint8)"],
                          tmp_path, "big")
    assert ballast[-1] == 1
    assert empty["rc"] == 0 and empty["seconds"] > 0
    assert empty["peak_rss_mb"] < 100, empty
    assert 200 <= big["peak_rss_mb"] < 290, big


def test_fits_call_growing_memory_not_flat_and_affine_cpu_time_linear():
    report = _load("scaling_report")
    n = [500, 2000, 8000]
    flat = report.fit([(x, 10 + 0.01 * x, 600.0 + 0.001 * x, 5 + 0.005 * x) for x in n])
    grows = report.fit([(x, 10 + 0.01 * x, 600.0 + 0.3 * x, 5 + 0.005 * x) for x in n])
    quadratic = report.fit([(x, 1e-5 * x * x, 600.0, 1e-5 * x * x) for x in n])
    assert flat["time_linear"] and flat["memory_flat"]
    assert flat["time_ms_per_image"] == pytest.approx(10.0) and flat["time_fixed_s"] == pytest.approx(10.0)
    assert not grows["memory_flat"] and grows["rss_mb_per_1k_images"] == pytest.approx(300.0)
    assert not quadratic["time_linear"]


def test_quick_study_runs_the_cli_and_writes_json_plot_and_table(tmp_path):
    """The study on 40 generated images, train cold and warm (the steps the acceptance figures rest on)."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--workdir", str(tmp_path / "work"),
                           "--out-dir", str(out), "--name", "smoke", "--steps", "train_cold,train_warm"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((out / "smoke.json").read_text())
    assert doc["cpu"]["flags"] is not None and doc["cpu"]["model"] and len(doc["load_start"]) == 3
    (run,) = doc["runs"]
    assert run["kind"] == "small" and run["n"] == 40
    # the device steps are left out to keep the suite short: their own tests cover the commands
    for name in ("train_cold", "train_warm"):
        step = run["steps"][name]
        assert step["rc"] == 0, (name, step.get("error"))
        assert step["seconds"] > 0 and step["peak_rss_mb"] > doc["wrapper_floor_mb"], (name, step)
    facts = {name: step["facts"] for name, step in run["steps"].items()}
    assert facts["train_cold"]["backbone_images_run"] == 40
    assert facts["train_warm"]["images_decoded"] == 0 and facts["train_warm"]["features_from_cache"] == 40
    assert (out / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "smoke.md").read_text()
    assert "| 40 |" in table and doc["cpu"]["model"] in table and "load (1 min)" in table
