"""What clients send besides plain requests: compressed bodies, and ``pixels`` letterboxed as docs/service.md says.

A real ``device serve`` on loopback; tritonclient (its ``request_compression_algorithm``) and urllib as clients.
"""
from __future__ import annotations

import gzip
import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from service_support import REPO, demo_images, running_server

IMAGES = demo_images()[::24][:6]  # 6 x 224 x 224 x 3 pixels: under --max-body-mb 1


@pytest.fixture(scope="module")
def server(served_state):
    with running_server(served_state, "--max-body-mb", "1") as srv:
        yield srv


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.json("GET", "/v1/status")[1]["model"]


def _peak_rss_kb(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_tritonclient_gzip_and_deflate_requests_answer_as_uncompressed_ones(server, model):
    tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is the test client")
    client = tritonclient.InferenceServerClient(server.hostport)
    data = np.array([p.read_bytes() for p in IMAGES[:4]], dtype=np.object_)  # under --max-body-mb 1
    answers = {}
    for algorithm in (None, "gzip", "deflate"):
        tensor = tritonclient.InferInput("image", [len(data)], "BYTES")
        tensor.set_data_from_numpy(data)
        result = client.infer(model, [tensor], request_compression_algorithm=algorithm)
        answers[algorithm] = (result.as_numpy("label").tolist(), result.as_numpy("probabilities"))
    for algorithm in ("gzip", "deflate"):
        assert answers[algorithm][0] == answers[None][0]
        np.testing.assert_allclose(answers[algorithm][1], answers[None][1], atol=1e-6)


def test_v1_predict_and_label_take_gzip_and_deflate_bodies(server):
    image = IMAGES[0].read_bytes()
    status, plain = server.json("POST", "/v1/predict", body=image)
    assert status == 200
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    for coding, body in (("gzip", gzip.compress(image)), ("deflate", zlib.compress(image)),
                         ("deflate", raw_deflate.compress(image) + raw_deflate.flush())):
        status, answer = server.json("POST", "/v1/predict", body=body, headers={"Content-Encoding": coding})
        assert status == 200, answer
        assert answer["results"][0]["top_k"] == plain["results"][0]["top_k"]
    form = (b'--b\r\nContent-Disposition: form-data; name="label"\r\n\r\nbeverages\r\n--b\r\nContent-Disposition: '
            b'form-data; name="file"; filename="x.jpg"\r\n\r\n' + image + b"\r\n--b--\r\n")
    status, report = server.json("POST", "/v1/label", body=gzip.compress(form),
                                 headers={"Content-Encoding": "gzip", "Content-Type": "multipart/form-data; boundary=b"})
    assert status == 200 and report["label"] == "beverages" and not report["errors"], report


def test_a_zip_bomb_gets_413_without_the_memory_it_would_take(server):
    """128 MiB of zeros in about 130 KB of gzip (under the 1 MiB limit as sent): inflating stops at 1 MiB."""
    bomb = gzip.compress(bytes(128 << 20), 9)
    assert len(bomb) < 1 << 20
    before = _peak_rss_kb(server.proc.pid)
    status, answer = server.json("POST", "/v1/predict", body=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed" in answer["error"], answer
    assert _peak_rss_kb(server.proc.pid) - before < 64 << 10  # KiB: far from the 128 MiB it inflates to
    status, answer = server.json("POST", "/v1/predict", body=IMAGES[0].read_bytes(), headers={"Content-Encoding": "br"})
    assert status == 415 and "gzip, deflate or identity" in answer["error"]
    assert server.json("POST", "/v1/predict", body=IMAGES[0].read_bytes())[0] == 200


def _doc_letterbox():
    """The ``letterbox`` function of docs/service.md's pixels example, run as a reader would run it."""
    text = (REPO / "docs" / "service.md").read_text()
    block = re.search(r"<!-- pixels-example.*?-->\s*```python\n(.*?)```", text, re.S)
    assert block, "docs/service.md lost its pixels example"
    namespace: dict = {}
    exec(compile(block.group(1), "docs/service.md", "exec"), namespace)  # noqa: S102 - the doc's own code
    return namespace["letterbox"]


def test_the_documented_pixels_letterbox_is_what_the_device_sees(server, model, served_state):
    """docs/service.md's numpy/Pillow letterbox gives the device's own pixels, bit for bit, and the labels of
    /v1/predict through tritonclient's pixels input; a plain resize does not give those pixels."""
    tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is the test client")
    from PIL import Image

    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.preprocess import load_image

    letterbox = _doc_letterbox()
    active = json.loads((served_state / "active.json").read_text())["bundle"]
    spec = Bundle.open(served_state / "bundles" / active).preprocess
    meta = tritonclient.InferenceServerClient(server.hostport).get_model_metadata(model)
    h, w = meta["inputs"][1]["shape"][1:3]
    assert (h, w) == spec.size and spec.resize == "letterbox"
    # the metadata tells a client the policy and the fill, not only the size
    told = meta["parameters"]["input"]
    assert told["resize"] == "letterbox" and tuple(told["size"]) == (h, w)
    batch = np.stack([letterbox(p, w, h, tuple(told["fill"])) for p in IMAGES])
    for p, row in zip(IMAGES, batch):
        assert np.array_equal(row, load_image(p, spec)), p.name
    stretched = np.asarray(Image.open(IMAGES[0]).convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
    assert not np.array_equal(stretched, batch[0])

    tensor = tritonclient.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    labels = tritonclient.InferenceServerClient(server.hostport).infer(model, [tensor]).as_numpy("label")
    expected = [server.json("POST", "/v1/predict", body=p.read_bytes())[1]["results"][0]["label"] for p in IMAGES]
    assert [b.decode() for b in labels] == expected
