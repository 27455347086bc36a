"""The exported bundle: ONNX contract, parity with PyTorch, golden images, strict manifest."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import BundleError
from edgexfer.runtime.fsutil import file_sha256
from edgexfer.runtime.manifest import Manifest

pytestmark = pytest.mark.usefixtures("demo_bundle")


def test_export_parity_report_meets_the_contract(demo_bundle):
    report = json.loads((demo_bundle.bundle / "reports" / "export.json").read_text())
    assert report["count"] >= 40  # all validation images of the demo split
    assert report["max_abs_diff"] <= 1e-4
    assert report["top1_agreement"] == 1.0
    assert report["mean_cosine"] > 0.99999


def test_backbone_onnx_is_uint8_nhwc_opset17_dynamic_batch_self_contained(demo_bundle):
    import onnx

    from edgexfer.runtime.backends.registry import open_backend

    path = demo_bundle.bundle / "backbone.onnx"
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 17
    inp = model.graph.input[0]
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [224, 224, 3]
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    # BatchNorm is folded away by the simplifier: the graph a TensorRT parser sees is small
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    rng = np.random.default_rng(0)
    with open_backend("onnxruntime", path) as engine:
        for n in (1, 3):
            out = engine.run(rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8))
            assert out.shape == (n, 1280) and out.dtype == np.float32


def test_golden_set_reproduces_with_onnxruntime(demo_bundle):
    from edgexfer.runtime.backends.registry import open_backend

    bundle = Bundle.open(demo_bundle.bundle)
    golden = bundle.golden()
    assert golden["images"].shape[0] >= 8 and golden["images"].dtype == np.uint8
    assert len(np.unique(golden["labels"])) >= 8  # spread over the classes
    with open_backend("onnxruntime", bundle.backbone_path) as engine:
        feats = engine.run(golden["images"])
    np.testing.assert_allclose(feats, golden["features"], atol=1e-5)
    np.testing.assert_allclose(bundle.head().logits(feats), golden["logits"], atol=1e-4)


def test_manifest_lists_every_file_with_sha_and_binds_head_to_backbone(demo_bundle):
    bundle = Bundle.open(demo_bundle.bundle)
    m = bundle.manifest
    assert set(m.files) >= {"backbone.onnx", "head.safetensors", "golden.npz", "reports/export.json"}
    assert m.backbone.sha256 == file_sha256(bundle.backbone_path) == m.head.backbone_sha256
    assert m.backbone.input.layout == "NHWC" and m.backbone.input.size == (224, 224)
    assert m.head.classes == ("beverages", "desserts", "fruit", "hardware", "music", "sports", "tools", "vehicles")
    assert Manifest.from_json(m.to_json()) == m


def _mutate(manifest_text: str, fn) -> str:
    obj = json.loads(manifest_text)
    fn(obj)
    return json.dumps(obj)


@pytest.mark.parametrize("change, field", [
    (lambda o: o["backbone"]["input"].update(size=[224]), "manifest.backbone.input.size"),
    (lambda o: o.update(surprise=1), "surprise"),
    (lambda o: o["head"].update(kind="svm"), "manifest.head.kind"),
    (lambda o: o["head"].update(backbone_sha256="0" * 64), "manifest.head.backbone_sha256"),
    (lambda o: o["files"].update({"../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), "'../etc/passwd'"),
    (lambda o: o.pop("backbone"), "manifest.backbone"),
    (lambda o: o.update(schema="edgexfer.bundle/9"), "manifest.schema"),
])
def test_strict_manifest_names_the_bad_field(demo_bundle, change, field):
    text = (demo_bundle.bundle / "manifest.json").read_text()
    with pytest.raises(BundleError) as err:
        Manifest.from_json(_mutate(text, change))
    assert field in str(err.value)


def test_a_flipped_byte_in_the_bundle_is_caught_before_parsing(demo_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(demo_bundle.bundle, copy)
    head = copy / "head.safetensors"
    data = bytearray(head.read_bytes())
    data[-5] ^= 0x01
    head.write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        Bundle.open(copy)
    assert "head.safetensors: sha256 differs" in str(err.value)


def test_export_holds_one_batch_of_validation_images_at_a_time(demo_run, tmp_path, monkeypatch):
    """Export reads, checks and keeps the features of its samples batch by batch: the decoded images of the
    whole validation split (3 GB at 100,000 images) are never in memory together."""
    import tracemalloc

    import torch  # noqa: F401  (imported before tracing starts: its import is not what is measured)

    from edgexfer.export import export
    from edgexfer.modalities.image import ImageReader

    # the demo run's 48 validation images in batches of 4: the bound below is a share of the decoded split, so
    # a larger split (it was 3x, 108 s under tracemalloc) adds time, not power (peak 0.42-0.44 of it at 1x and 3x)
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run.run_dir, run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    monkeypatch.setattr(ImageReader, "batch_size", 4, raising=False)
    h, w = run["preprocess"]["size"]
    every_image = len(run["val"]) * h * w * 3  # bytes of the validation split decoded at the backbone's size
    features = len(run["val"]) * run["backbone"]["feature_dim"] * 4
    tracemalloc.start()  # numpy's arrays are traced (torch's and ONNX Runtime's own buffers are not)
    try:
        export(run_dir, tmp_path / "bundle", progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # what export may hold: the features of every validation image and the parity check's float64 work on them
    # (a dozen copies), and a few batches of images; never the decoded split (which the old export stacked)
    assert peak < 12 * features + every_image / 4, \
        f"peak {peak / 2**20:.1f} MiB; the validation images take {every_image / 2**20:.1f}, features {features / 2**20:.1f}"
