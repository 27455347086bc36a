"""Engines built or picked on the device (``state/engines/<key>/``), and the golden gate of install.

The OpenVINO tests compile a real IR into OpenVINO's model cache; they run where openvino is installed
(the host venv) and skip in the torch-free ONNX-Runtime-only device venv. TensorRT needs a GPU: the
``gpu`` test builds a real plan from the bundle's TensorRT kit and skips elsewhere with its reason.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgexfer.runtime.backends.tensorrt import tensorrt_key
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.device import Device
from edgexfer.runtime.engine_store import EngineKey, EngineStore, engine_store_key
from edgexfer.runtime.errors import MissingDependencyError, ValidationError
from edgexfer.runtime.optional import is_installed
from edgexfer.runtime.state import DeviceState

PARTS = {"backend": "tensorrt", "engine_version": "10.3.0", "device": "Orin sm8.7", "precision": "int8",
         "backbone_sha256": "ab" * 32, "source_sha256": "cd" * 32}


@pytest.mark.parametrize("part,other", [("backend", "openvino"), ("engine_version", "8.6.2"),
                                        ("device", "Xavier sm7.2"), ("precision", "fp16"),
                                        ("backbone_sha256", "ef" * 32), ("source_sha256", "01" * 32)])
def test_cache_key_changes_with_every_part_and_is_a_safe_directory_name(part, other):
    key = engine_store_key(**PARTS)
    assert key == engine_store_key(**PARTS)
    assert engine_store_key(**{**PARTS, part: other}) != key
    assert key.startswith("tensorrt-10.3.0-sm87-int8-") and "/" not in key and " " not in key


def _bundle_with_ov(openvino_bundle) -> Bundle:
    return Bundle.open(openvino_bundle, verify=True)


def test_install_compiles_openvino_once_into_the_engine_store_and_reuses_it(openvino_bundle, tmp_path):
    state = tmp_path / "state"
    with Device(state, backend="openvino") as dev:
        first = dev.install(openvino_bundle)
    engine = first["engine"]
    assert engine["backend"] == "openvino" and engine["built"] is True and engine["key"].startswith("openvino-")
    entry = state / "engines" / engine["key"]
    # one compiled model per input shape the install ran: batch 1 (static, the latency path) and, for the
    # golden check's batch, the dynamic-batch model; each a real compiled model, not an empty marker
    blobs = sorted(entry.glob("*.blob"))
    assert 1 <= len(blobs) <= 2 and all(b.stat().st_size > 1_000_000 for b in blobs), blobs
    recorded = json.loads((entry / "engine_key.json").read_text())
    assert recorded["key"] == engine["key"] and recorded["backbone_sha256"] == first["bundle"]
    assert first["golden"]["max_abs_feature_diff"] <= 1e-3 and first["golden"]["top1_agreement"] == 1.0
    stamps = [b.stat().st_mtime_ns for b in blobs]

    with Device(state, backend="openvino") as dev:  # a new process would do the same: nothing changed
        second = dev.install(openvino_bundle)
        assert dev.engine().details["cache_dir"] == str(entry)  # predict loads the compiled blob
        status = dev.status()
    assert second["engine"]["built"] is False and second["engine"]["key"] == engine["key"]
    assert [b.stat().st_mtime_ns for b in sorted(entry.glob("*.blob"))] == stamps
    assert [e["key"] for e in status["engines"]] == [engine["key"]]
    assert not [p for p in (state / "engines").iterdir() if p.name.startswith(".")]


def test_a_changed_engine_source_gets_a_new_cache_entry(openvino_bundle, tmp_path, reseal):
    """Same backbone, another IR (a bundle converted again): the old compiled blob must not be used."""
    state = tmp_path / "state"
    with Device(state, backend="openvino") as dev:
        old_key = dev.install(openvino_bundle)["engine"]["key"]
    changed = tmp_path / "changed"
    shutil.copytree(openvino_bundle, changed)
    xml = "engines/openvino/fp32/backbone.xml"
    reseal(changed, xml, (changed / xml).read_bytes() + b"\n<!-- converted again -->\n")
    with Device(state, backend="openvino") as dev:
        new = dev.install(changed)["engine"]
    assert new["built"] is True and new["key"] != old_key
    assert {p.name for p in (state / "engines").iterdir()} == {old_key, new["key"]}


def test_engine_build_killed_before_rename_leaves_no_entry_and_next_install_builds(openvino_bundle, tmp_path):
    state = tmp_path / "state"
    env = {**os.environ, "EDGEXFER_CRASH_AT": "engine-built"}
    proc = subprocess.run([sys.executable, "-m", "edgexfer.cli", "device", "install", str(openvino_bundle),
                           "--state", str(state), "--backend", "openvino", "--json"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert not (state / "active.json").exists()  # nothing was activated
    assert [p.name[:5] for p in (state / "engines").iterdir()] == [".tmp-"]  # only the half-built entry
    assert EngineStore(state / "engines").entries() == []
    with Device(state, backend="openvino") as dev:
        report = dev.install(openvino_bundle)
    assert report["engine"]["built"] is True and DeviceState(state).active().bundle == report["bundle"]
    assert [p.name for p in (state / "engines").iterdir()] == [report["engine"]["key"]]


def test_install_with_failing_golden_check_keeps_the_previous_pair(device_bundle, tmp_path, reseal):
    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(device_bundle)
    active_before = (state / "active.json").read_bytes()
    heads_before = DeviceState(state).head_versions()
    # a bundle whose golden reference no longer matches what the engine computes
    bad = tmp_path / "bad-bundle"
    shutil.copytree(device_bundle, bad)
    golden = dict(np.load(bad / "golden.npz"))
    golden["features"] = golden["features"] + 0.5
    buf = io.BytesIO()
    np.savez(buf, **golden)
    reseal(bad, "golden.npz", buf.getvalue())
    with Device(state) as dev, pytest.raises(ValidationError, match="golden check") as err:
        dev.install(bad)
    assert "features (golden, 8 images): max |diff|" in str(err.value) and "\n" not in str(err.value)
    assert (state / "active.json").read_bytes() == active_before
    assert DeviceState(state).head_versions() == heads_before


@pytest.mark.skipif(is_installed("tensorrt"), reason="checks the error on a device without TensorRT")
def test_tensorrt_requested_without_tensorrt_is_one_line_and_changes_nothing(device_bundle, tmp_path):
    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(device_bundle)
    before = (state / "active.json").read_bytes()
    with Device(state, backend="tensorrt") as dev, pytest.raises(MissingDependencyError) as err:
        dev.install(device_bundle)
    assert "edgexfer[tensorrt]" in str(err.value) and "\n" not in str(err.value)
    assert (state / "active.json").read_bytes() == before and not (state / "engines").exists()


def test_cache_lookup_ignores_an_entry_whose_key_file_disagrees(tmp_path):
    cache = EngineStore(tmp_path / "engines")
    key = EngineKey("openvino", "2026.4", "CPU test", "fp32", "ab" * 32)
    entry, info = cache.build(key, lambda out: {"wrote": (out / "model.blob").write_bytes(b"x" * 10)})
    assert info["built"] and info["wrote"] == 10 and cache.lookup(key) == entry
    (entry / "engine_key.json").write_text(json.dumps({"key": "something-else"}))
    assert cache.lookup(key) is None
    _, again = cache.build(key, lambda out: {"wrote": (out / "model.blob").write_bytes(b"y" * 10)})
    assert again["built"] and (entry / "model.blob").read_bytes() == b"y" * 10


@pytest.mark.gpu
def test_device_install_builds_the_tensorrt_plan_once_from_the_kit(device_bundle, clipart8, tmp_path):
    if not is_installed("tensorrt") or tensorrt_key("fp16", "x") is None:
        pytest.skip("needs TensorRT and a CUDA GPU (key, cache, kit lookup and errors are tested above)")
    from click.testing import CliRunner

    from edgexfer.cli import main
    from edgexfer.converters import convert

    bundle = tmp_path / "bundle"
    shutil.copytree(device_bundle, bundle)
    convert(bundle, "tensorrt", "fp16", calib=clipart8, calib_size=64, val_size=160, progress=False)
    state = tmp_path / "state"
    runner = CliRunner()
    args = ["device", "install", str(bundle), "--state", str(state), "--backend", "tensorrt", "--precision", "fp16",
            "--json"]
    first = json.loads(runner.invoke(main, args, catch_exceptions=False).stdout)
    assert first["engine"]["built"] is True and (state / "engines" / first["engine"]["key"] / "backbone.plan").is_file()
    assert first["golden"]["top1_agreement"] >= 0.875
    second = json.loads(runner.invoke(main, args, catch_exceptions=False).stdout)
    assert second["engine"]["built"] is False and second["engine"]["key"] == first["engine"]["key"]
    with Device(state, backend="tensorrt", precision="fp16") as dev:
        assert dev.engine().details["engine_key"] == first["engine"]["key"]


def test_install_prunes_engines_that_can_never_load_again(device_bundle, tmp_path):
    """After an engine upgrade (JetPack, OpenVINO) the old entries are dead weight on a small eMMC."""
    from edgexfer.runtime.device import _engine_versions

    state = tmp_path / "state"
    with Device(state) as dev:
        sha = dev.install(device_bundle)["bundle"]
    cache = EngineStore(state / "engines")
    versions = _engine_versions()
    entries = {
        "other-backbone": EngineKey("onnxruntime", "1", "CPU", "fp32", "0" * 64),
        "kept-not-installed-engine": EngineKey("someengine", "1", "CPU", "fp32", sha),
    }
    if versions:  # an engine that builds device entries is installed: its entries of another version are stale
        backend, version = next(iter(versions.items()))
        entries["old-version"] = EngineKey(backend, version + ".old", "dev", "fp32", sha)
        entries["current"] = EngineKey(backend, version, "dev", "fp32", sha)
    for key in entries.values():
        cache.build(key, lambda out: {"wrote": (out / "engine.bin").write_bytes(b"e")})
    with Device(state) as dev:
        pruned = dev.install(device_bundle)["pruned_engines"]
    left = {e["key"] for e in cache.entries()}
    assert entries["other-backbone"].key in pruned and entries["other-backbone"].key not in left
    assert entries["kept-not-installed-engine"].key in left
    if versions:
        assert entries["old-version"].key in pruned and entries["current"].key in left


def test_a_state_moved_to_another_kind_of_cpu_builds_and_golden_checks_its_engine_again(openvino_bundle, tmp_path):
    """The engine store is keyed by ISA flags: another kind of CPU gets its own engine, validated there."""
    state = tmp_path / "state"
    with Device(state, backend="openvino") as dev:
        first = dev.install(openvino_bundle)
    assert first["golden"]["revalidated_on_other_isa"] is False  # same CPU as the conversion
    code = ("import json, sys\nfrom edgexfer.runtime.device import Device\n"
            "with Device(sys.argv[1], backend='openvino') as dev:\n    r = dev.install(sys.argv[2])\n"
            "print(json.dumps({'key': r['engine']['key'], 'built': r['engine']['built'], 'golden': r['golden']}))")
    from edgexfer.runtime.cpu import cpu_features

    if not cpu_features().flags:
        pytest.skip("this CPU has none of the ISA flags edgexfer reads: nothing to hide")
    hidden = cpu_features().flags[-1]
    # the same state directory on a CPU without its newest flag (edgexfer's view; a name would not change the key)
    env = {**os.environ, "EDGEXFER_HIDE_CPU_FLAGS": hidden}
    out = subprocess.run([sys.executable, "-c", code, str(state), str(openvino_bundle)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    second = json.loads(out.stdout.strip().splitlines()[-1])
    assert second["key"] != first["engine"]["key"] and second["built"] is True
    assert hidden not in second["golden"]["execution"]["isa"].split(":")[1].split("+") and second["golden"]["revalidated_on_other_isa"] is True
    assert second["golden"]["validated_isa"] == first["golden"]["execution"]["isa"]
    assert sorted(p.name for p in (state / "engines").iterdir()) == sorted([first["engine"]["key"], second["key"]])
