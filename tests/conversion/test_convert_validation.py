"""What a user notices around conversion: broken engines refused, engines reused, readable errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgexfer.runtime.errors import DataError, ValidationError


def _snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def broken_normalisation(monkeypatch):
    """An OpenVINO converter that forgets the mean/std normalisation (scales pixels to [0, 1] only)."""
    onnx = pytest.importorskip("onnx")
    ov = pytest.importorskip("openvino")
    from onnx import numpy_helper

    import edgexfer.converters.to_openvino as to_openvino
    from edgexfer.converters.engine_build import EngineBuild
    from edgexfer.runtime.backends.registry import open_backend

    def convert_openvino(bundle, out_dir, precision, split, tolerance, workdir=None, *, progress=True, int8_target="any"):
        model = onnx.load(str(bundle.backbone_path))
        weights = {i.name: i for i in model.graph.initializer}
        mul = next(n for n in model.graph.node if n.op_type == "Mul")  # x * 1/(255 std)
        add = next(n for n in model.graph.node if n.op_type == "Add")  # ... - mean/std
        for name, value in ((mul.input[1], 1 / 255), (add.input[1], 0.0)):
            old = numpy_helper.to_array(weights[name])
            weights[name].CopyFrom(numpy_helper.from_array(np.full_like(old, value), name))
        broken = out_dir / "broken.onnx"
        onnx.save(model, str(broken))
        xml = out_dir / "backbone.xml"
        ov.save_model(ov.convert_model(str(broken)), str(xml))
        broken.unlink()
        return EngineBuild([xml, xml.with_suffix(".bin")], lambda: open_backend("openvino", xml, precision=precision),
                           validated_with="openvino")

    monkeypatch.setattr(to_openvino, "convert_openvino", convert_openvino)


def test_broken_normalisation_is_refused_per_output_and_bundle_is_unchanged(
        broken_normalisation, conversion_bundle, clipart8, tmp_path):
    from edgexfer.converters import convert

    root = tmp_path / "bundle"
    shutil.copytree(conversion_bundle, root)
    before = _snapshot(root)
    with pytest.raises(ValidationError) as err:
        convert(root, "openvino", "fp16", calib=clipart8, calib_size=32, val_size=48, progress=False)
    lines = err.value.failures
    # one line per output and image set, each naming what broke
    assert len(lines) == len({line.split(":")[0] for line in lines})
    assert any(line.startswith("- features (golden, 8 images): mean cosine") for line in lines)
    assert any(line.startswith("- logits (held-out, 48 images):") and "top-1 agreement" in line for line in lines)
    message = str(err.value)
    assert message.startswith("openvino fp16 engine does not match the fp32 reference | got - features")
    assert "\n" not in message and "bundle is unchanged" in message
    assert _snapshot(root) == before  # no poor engine, no report, same manifest


def test_broken_conversion_exits_non_zero_on_the_command_line(broken_normalisation, conversion_bundle, clipart8,
                                                               tmp_path):
    from click.testing import CliRunner

    from edgexfer.cli import main

    root = tmp_path / "bundle"
    shutil.copytree(conversion_bundle, root)
    result = CliRunner().invoke(main, ["convert", str(root), "--to", "openvino", "--precision", "fp16",
                                       "--calib", str(clipart8), "--calib-size", "32", "--val-size", "48",
                                       "--quiet"])
    assert result.exit_code == 1
    assert "does not match the fp32 reference" in result.output and "- features (golden" in result.output


def test_same_inputs_reuse_the_engine_and_force_rebuilds(converted, conversion_bundle, clipart8):
    from edgexfer.converters import convert

    first = converted("openvino", "fp16")
    xml = conversion_bundle / "engines/openvino/fp16/backbone.xml"
    stamp = xml.stat().st_mtime_ns
    again = convert(conversion_bundle, "openvino", "fp16", calib=clipart8, calib_size=64, val_size=160, progress=False)
    assert again.reused and again.report["inputs_key"] == first.report["inputs_key"]
    assert xml.stat().st_mtime_ns == stamp
    other = convert(conversion_bundle, "openvino", "fp16", calib=clipart8, calib_size=64, val_size=24, progress=False)
    assert not other.reused  # other held-out images: converted and validated again
    forced = convert(conversion_bundle, "openvino", "fp16", calib=clipart8, calib_size=64, val_size=24,
                     force=True, progress=False)
    assert not forced.reused and xml.stat().st_mtime_ns != stamp


def test_int8_without_calibration_images_is_a_one_line_error(conversion_bundle):
    from edgexfer.converters import convert

    with pytest.raises(DataError, match=r"int8 needs calibration images \| got no --calib .* pass --calib DATA_DIR"):
        convert(conversion_bundle, "onnxruntime", "int8", progress=False)


def test_calibration_folders_must_name_head_classes(conversion_bundle, tmp_path):
    from PIL import Image

    from edgexfer.converters import convert

    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (32, 32), "red").save(tmp_path / name / "a.png")
    with pytest.raises(DataError, match="no folder of the calibration data is a class"):
        convert(conversion_bundle, "openvino", "int8", calib=tmp_path, progress=False)


def test_engine_table_lists_every_engine(converted, conversion_bundle):
    from edgexfer.converters import engine_table

    converted("openvino", "fp32")
    converted("onnxruntime", "int8")
    table = engine_table(conversion_bundle)
    rows = {(r["backend"], r["precision"]): r for r in table["engines"]}
    assert {("openvino", "fp32"), ("onnxruntime", "int8")} <= set(rows)
    row = rows[("onnxruntime", "int8")]
    assert row["size_bytes"] > 0 and row["load_seconds"] > 0 and row["batch1_ms"] > 0 and row["accuracy"] is not None
    md = (conversion_bundle / "reports/engines.md").read_text()
    assert "| openvino fp32 | engine |" in md and "| onnxruntime int8 | engine |" in md
    assert json.loads((conversion_bundle / "reports/engines.json").read_text())["engines"]


def test_held_out_images_are_read_a_batch_at_a_time(conversion_bundle, clipart8):
    """Validation streams the held-out images: loading the split and reading every batch never holds more
    than a few batches of pixels, however many images are held out (the old split decoded them all at once)."""
    import tracemalloc

    from edgexfer.converters.calibration import load_calibration
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.imagefolder import class_files, class_folders
    from edgexfer.runtime.preprocess import load_image

    bundle = Bundle.open(conversion_bundle)
    h, w = bundle.preprocess.size
    load_image(class_files(clipart8 / class_folders(clipart8)[0])[0][0], bundle.preprocess)  # the decoders' imports
    tracemalloc.start()
    try:
        split = load_calibration(bundle, clipart8, 8, val_size=200)
        loaded = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    every_image = len(split.holdout) * h * w * 3
    assert loaded < every_image / 4, f"loading took {loaded / 2**20:.1f} MiB; the held-out images take " \
                                     f"{every_image / 2**20:.1f}"
    tracemalloc.start()
    try:
        seen = []
        for positions, pixels in split.holdout.batches(8):
            assert len(pixels) == len(positions) <= 8 and pixels.shape[1:] == (h, w, 3)
            seen.extend(positions.tolist())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sorted(seen) == list(range(len(split.holdout))) and len(seen) == 200
    assert peak < every_image / 4, f"reading took {peak / 2**20:.1f} MiB; the held-out images take {every_image / 2**20:.1f}"
