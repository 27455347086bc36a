"""``device serve`` as a client sees it: a real server process on loopback, real clients (tritonclient, urllib)."""
from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image
from service_support import cli, demo_images, new_class_images, running_server

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.preprocess import load_image


@pytest.fixture(scope="module")
def server(served_state):
    with running_server(served_state, "--max-queue-delay-ms", "5") as srv:
        yield srv


def _model(served_state) -> str:
    return json.loads(cli("device", "status", "--state", str(served_state), "--json").stdout)["bundle"]["name"]


def _device_predict(state, images) -> dict:
    return json.loads(cli("device", "predict", *map(str, images), "--state", str(state), "--json").stdout)


def _assert_same_as_device_predict(expected: dict, labels, probs: np.ndarray, classes: list[str]) -> None:
    for row, label, res in zip(probs, labels, expected["results"]):
        assert (label.decode() if isinstance(label, bytes) else label) == res["label"]
        for top in res["top_k"]:  # device predict --json rounds to 6 decimals
            assert abs(float(row[classes.index(top["label"])]) - top["probability"]) <= 1e-6


def test_tritonclient_bytes_and_uint8_inputs_answer_as_device_predict(server, served_state):
    tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is the test client")
    images = demo_images()[::32][:6]
    expected = _device_predict(served_state, images)
    name = _model(served_state)
    client = tritonclient.InferenceServerClient(server.hostport)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    meta = client.get_model_metadata(name)
    spec = Bundle.open(served_state / "bundles" / expected_backbone(served_state)).preprocess
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "pixels": "UINT8"}
    assert meta["inputs"][1]["shape"] == [-1, spec.height, spec.width, 3]

    data = np.array([p.read_bytes() for p in images], dtype=np.object_)
    tensor = tritonclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(data)  # binary tensor data, tritonclient's default
    result = client.infer(name, [tensor])
    classes = json.loads(result.get_response()["parameters"]["classes"])
    assert result.get_response()["model_version"] == str(expected["head"])
    _assert_same_as_device_predict(expected, result.as_numpy("label"), result.as_numpy("probabilities"), classes)

    pixels = np.stack([load_image(p, spec) for p in images])
    tensor = tritonclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    outputs = [tritonclient.InferRequestedOutput("probabilities"), tritonclient.InferRequestedOutput("label"),
               tritonclient.InferRequestedOutput("features")]
    result = client.infer(name, [tensor], outputs=outputs)
    _assert_same_as_device_predict(expected, result.as_numpy("label"), result.as_numpy("probabilities"), classes)
    assert result.as_numpy("features").shape[0] == len(images)

    # JSON tensors (no binary extension) give the same answer
    tensor = tritonclient.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer(name, [tensor], outputs=[tritonclient.InferRequestedOutput("probabilities", binary_data=False)])
    _assert_same_as_device_predict(expected, [r["label"] for r in expected["results"]],
                                   result.as_numpy("probabilities"), classes)


def expected_backbone(state) -> str:
    return json.loads((state / "active.json").read_text())["bundle"]


def test_v1_predict_raw_and_multipart_answer_the_json_of_device_predict(server, served_state):
    image = demo_images()[40]
    expected = _device_predict(served_state, [image])
    status, raw = server.json("POST", "/v1/predict", body=image.read_bytes(),
                              headers={"Content-Type": "application/octet-stream"})
    assert status == 200 and raw["head"] == expected["head"] and raw["execution"] == expected["execution"]
    boundary = "edgexferboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, multi = server.json("POST", "/v1/predict", body=form,
                                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and multi["results"][0]["source"] == image.name
    want = expected["results"][0]
    for got in (raw["results"][0], multi["results"][0]):
        assert got["label"] == want["label"] and got["backend"] == want["backend"]
        assert got["precision"] == want["precision"]
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in want["top_k"]]
        assert max(abs(a["probability"] - b["probability"]) for a, b in zip(got["top_k"], want["top_k"])) <= 1e-6


def test_metrics_parse_and_hold_every_family(server):
    from prometheus_client.parser import text_string_to_metric_families

    for image in demo_images()[:3]:
        assert server.request("POST", "/v1/predict", image.read_bytes())[0] == 200
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in ("edgexfer_http_requests", "edgexfer_http_request_duration_seconds", "edgexfer_stage_duration_seconds",
                 "edgexfer_batch_size", "edgexfer_predictions", "edgexfer_low_confidence",
                 "edgexfer_low_confidence_ratio", "edgexfer_active_head_version", "edgexfer_model_info",
                 "edgexfer_cache_samples", "edgexfer_review_queue_entries"):
        assert name in families, f"{name} missing from /metrics"
    stages = {s.labels["stage"] for s in families["edgexfer_stage_duration_seconds"].samples if "stage" in s.labels}
    assert stages == {"decode", "engine", "head"}
    endpoints = {s.labels.get("endpoint") for s in families["edgexfer_http_requests"].samples}
    assert "/v1/predict" in endpoints
    predicted = sum(s.value for s in families["edgexfer_predictions"].samples if s.name.endswith("_total"))
    assert predicted >= 3
    info = [s for s in families["edgexfer_model_info"].samples][0].labels
    assert info["backend"] == "onnxruntime" and info["precision"] == "fp32" and info["execution"] == "f32"
    assert families["edgexfer_active_head_version"].samples[0].value >= 1


def test_concurrent_requests_are_batched(server):
    """16 requests at once go through fewer engine calls than requests (the dynamic batcher at work)."""
    from prometheus_client.parser import text_string_to_metric_families

    def batches() -> tuple[float, float]:
        body = server.request("GET", "/metrics")[2].decode()
        fam = {f.name: f for f in text_string_to_metric_families(body)}["edgexfer_batch_size"]
        values = {s.name: s.value for s in fam.samples if not s.labels.get("le")}
        return values["edgexfer_batch_size_count"], values["edgexfer_batch_size_sum"]

    calls0, images0 = batches()
    data = [p.read_bytes() for p in demo_images()[:16]]
    barrier = threading.Barrier(16)
    codes: list[int] = []

    def one(blob: bytes) -> None:
        barrier.wait()
        codes.append(server.request("POST", "/v1/predict", blob)[0])

    threads = [threading.Thread(target=one, args=(d,)) for d in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    calls, images = batches()
    assert codes == [200] * 16
    assert images - images0 == 16
    assert calls - calls0 < 16, f"{calls - calls0} engine calls for 16 concurrent requests: no batching"


def test_the_head_follows_retrain_and_rollback_of_other_processes_without_a_failed_request(tmp_path, device_bundle):
    from edgexfer.runtime.device import Device

    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(device_bundle)
    images = demo_images()
    probe = images[0].read_bytes()
    seen: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    with running_server(state) as srv:
        def hammer() -> None:
            while not stop.is_set():
                try:
                    status, _, body = srv.request("POST", "/v1/predict", probe)
                except OSError as exc:
                    failures.append(repr(exc))
                    continue
                if status != 200:
                    failures.append(body.decode()[:200])
                else:
                    seen.append(json.loads(body)["head"])

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            new = []
            for i, blob in enumerate(new_class_images(12)):
                new.append(tmp_path / f"checkers_{i}.jpg")
                new[-1].write_bytes(blob)
            cli("device", "learn", *map(str, new), "--label", "checkers", "--state", str(state))
            report = json.loads(cli("device", "retrain", "--state", str(state), "--json").stdout)
            assert report["accepted"], report["reason"]
            deadline = time.monotonic() + 20
            while 2 not in seen and time.monotonic() < deadline:
                time.sleep(0.05)
            assert srv.json("POST", "/v1/predict", body=probe)[1]["head"] == 2
            cli("device", "rollback", "--state", str(state))
            assert srv.json("POST", "/v1/predict", body=probe)[1]["head"] == 1
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert not failures, failures[:3]
        assert seen[0] == 1 and 2 in seen and seen[-1] == 1
        # the switch is seen once and in order: 1 ... 2 ... 1
        switches = [b for a, b in zip(seen, seen[1:]) if a != b]
        assert switches == [2, 1], switches


def test_field_loop_queue_label_retrain_heads_rollback(tmp_path, device_bundle):
    from edgexfer.runtime.device import Device

    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(device_bundle)
    images = demo_images()
    with running_server(state, "--review-threshold", "1.0") as srv:  # every prediction is queued
        first = srv.json("POST", "/v1/predict", body=images[0].read_bytes())[1]
        assert isinstance(first["review_id"], int)
        # the same image again is queued once, and its answer names that entry (the page labels it by id)
        again = srv.json("POST", "/v1/predict", body=images[0].read_bytes())[1]
        assert again["review_id"] == first["review_id"]
        status, queue = srv.json("GET", "/v1/review")
        assert status == 200 and queue["entries"][0]["id"] == first["review_id"]
        assert queue["entries"][0]["head"] == 1 and queue["entries"][0]["label"] == first["results"][0]["label"]
        status, headers, thumb = srv.request("GET", f"/v1/review/{first['review_id']}/image")
        assert status == 200 and thumb == images[0].read_bytes() and headers["content-type"] == "image/jpeg"

        status, learned = srv.json("POST", "/v1/label", {"id": first["review_id"], "label": images[0].parent.name})
        assert status == 200 and learned["added"] == 1
        assert srv.json("GET", "/v1/review")[1]["entries"] == []
        assert srv.json("POST", "/v1/label", {"id": first["review_id"], "label": "x"})[0] == 404

        for i, blob in enumerate(new_class_images(12)):  # uploads of a new class (multipart)
            boundary = "b0undary"
            form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\ncheckers\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c{i}.jpg\"\r\n"
                    f"Content-Type: image/jpeg\r\n\r\n").encode() + blob + f"\r\n--{boundary}--\r\n".encode()
            status, body = srv.json("POST", "/v1/label", body=form,
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
            assert status == 200, body
        status, job = srv.json("POST", "/v1/retrain", {})
        assert status == 202 and job["state"] == "running"
        deadline = time.monotonic() + 60
        while job["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            job = srv.json("GET", "/v1/retrain")[1]
        assert job["state"] == "done" and job["report"]["accepted"], job
        assert job["report"]["holdout_count"] > 0
        assert srv.json("POST", "/v1/predict", body=images[0].read_bytes())[1]["head"] == 2
        heads = srv.json("GET", "/v1/heads")[1]["heads"]
        assert [(h["version"], h["active"]) for h in heads] == [(1, False), (2, True)]
        status, back = srv.json("POST", "/v1/rollback")
        assert status == 200 and back["head"] == 1
        assert srv.json("GET", "/v1/status")[1]["head"]["version"] == 1
        assert srv.json("POST", "/v1/predict", body=images[0].read_bytes())[1]["head"] == 1


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_label_given_on_the_page_counts_in_field_accuracy_with_the_answer_before_it(server):
    """POST /v1/label (an upload, as the page's label buttons send it): /v1/status field_accuracy counts it,
    judged by the head that answered before the label (issue 27)."""
    image = demo_images()[7]
    status, answer = server.json("POST", "/v1/predict", body=image.read_bytes(),
                                 headers={"Content-Type": "application/octet-stream"})
    assert status == 200
    guessed = answer["results"][0]["label"]
    before = server.json("GET", "/v1/status")[1]["field_accuracy"]
    boundary = "edgexferfield"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\nfield-check\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{image.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, _ = server.json("POST", "/v1/label", body=form,
                            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200
    after = server.json("GET", "/v1/status")[1]["field_accuracy"]
    assert after["n"] == before["n"] + 1 and after["per_class"]["field-check"] == {
        "n": 1, "correct": 0, "accuracy": 0.0, "ci95": [0.0, 0.7935]}, after  # a class the head never knew
    assert guessed != "field-check"
