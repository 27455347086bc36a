"""KServe v2 over gRPC (``device serve --grpc-port``), model configuration, statistics and ``class_count``, as
Triton's own clients see them: a real server process on loopback, ``tritonclient.grpc`` and ``tritonclient.http``.

tritonclient (http and grpc) is a test dependency of both venvs (host and device): nothing here is skipped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from service_support import demo_images, running_server
from test_serve_text import demo_texts
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from edgexfer.runtime.device import Device
from edgexfer.runtime.preprocess import load_image
from edgexfer.runtime.service.grpc_schema import MESSAGE_CLASSES


def _grpc_address(server) -> str:
    return re.search(r"gRPC \(KServe v2\) listening on (\S+)", server.log.read_text()).group(1)


@pytest.fixture(scope="module")
def server(served_state):
    with running_server(served_state, "--grpc-port", "0", "--max-queue-delay-ms", "5") as srv:
        srv.grpc = _grpc_address(srv)
        yield srv


@pytest.fixture(scope="module")
def text_server(text_state):
    with running_server(text_state, "--grpc-port", "0") as srv:
        srv.grpc = _grpc_address(srv)
        yield srv


def _active(state: Path) -> tuple[str, int, list[str]]:
    with Device(state) as dev:
        active = dev.state.active()
        bundle = dev.state.bundle(active.bundle)
        _, head = dev.active_head(active)
        return bundle.manifest.name, active.head, list(head.classes)


def _expected_rows(predictions, classes: list[str]) -> np.ndarray:
    """``device predict``'s probabilities (all classes: top_k = the class count) as rows in class order."""
    rows = np.zeros((len(predictions), len(classes)))
    for i, pred in enumerate(predictions):
        for label, p in pred.top_k:
            rows[i, classes.index(label)] = p
    return rows


def _assert_same(result, expected, classes: list[str]) -> None:
    labels = [b.decode() for b in result.as_numpy("label")]
    assert labels == [p.label for p in expected]
    np.testing.assert_allclose(result.as_numpy("probabilities"), _expected_rows(expected, classes), atol=1e-6, rtol=0)


def test_tritonclient_grpc_images_answer_as_device_predict(server, served_state):
    name, head, classes = _active(served_state)
    images = demo_images()[::32][:6]
    with Device(served_state) as dev:
        expected = dev.predict(images, top_k=len(classes))
        spec = dev.state.bundle(dev.state.active().bundle).preprocess
    client = triton_grpc.InferenceServerClient(server.grpc)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    assert "classification" in client.get_server_metadata().extensions
    meta = client.get_model_metadata(name)
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        ("image", "BYTES", [-1]), ("pixels", "UINT8", [-1, spec.height, spec.width, 3])]
    assert meta.versions == [str(head)]
    outputs = [triton_grpc.InferRequestedOutput(n) for n in ("label", "probabilities", "features")]

    # encoded files as BYTES (raw_input_contents, as tritonclient sends them)
    tensor = triton_grpc.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=np.object_))
    result = client.infer(name, [tensor], outputs=outputs, request_id="r1")
    assert result.get_response().model_version == str(head) and result.get_response().id == "r1"
    assert json.loads(result.get_response().parameters["classes"].string_param) == classes
    _assert_same(result, expected, classes)
    assert result.as_numpy("features").shape[0] == len(images)

    # the letterboxed pixels as a UINT8 tensor, in raw_input_contents
    pixels = np.stack([load_image(p, spec) for p in images])
    tensor = triton_grpc.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    _assert_same(client.infer(name, [tensor], outputs=outputs[:2]), expected, classes)

    # the same pixels in the message's typed contents (uint_contents), through Triton's own stub
    request = service_pb2.ModelInferRequest(model_name=name)
    spec_in = request.inputs.add(name="pixels", datatype="UINT8", shape=list(pixels.shape))
    spec_in.contents.uint_contents.extend(pixels.ravel().tolist())
    request.outputs.add(name="probabilities")
    with grpc.insecure_channel(server.grpc) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    probs = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))
    np.testing.assert_allclose(probs, _expected_rows(expected, classes), atol=1e-6, rtol=0)


def test_tritonclient_grpc_text_answers_as_device_predict(text_server, text_state):
    name, _, classes = _active(text_state)
    texts = demo_texts(6)
    with Device(text_state) as dev:
        expected = dev.predict_texts(texts, top_k=len(classes))
    client = triton_grpc.InferenceServerClient(text_server.grpc)
    tensor = triton_grpc.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    _assert_same(client.infer(name, [tensor]), expected, classes)


def _stats_http(server, name: str) -> dict:
    (entry,) = triton_http.InferenceServerClient(server.hostport).get_inference_statistics(name)["model_stats"]
    return entry


def _stats_grpc(server, name: str) -> dict:
    stats = triton_grpc.InferenceServerClient(server.grpc).get_inference_statistics(name, as_json=True)
    (entry,) = stats["model_stats"]
    return entry


def test_config_and_statistics_count_what_was_sent_over_both_transports(server, served_state):
    name, head, classes = _active(served_state)
    images = demo_images()[:3]
    for config in (triton_http.InferenceServerClient(server.hostport).get_model_config(name),
                   triton_grpc.InferenceServerClient(server.grpc).get_model_config(name, as_json=True)["config"]):
        assert config["name"] == name and int(config["max_batch_size"]) == 64
        assert {i["name"]: i["data_type"] for i in config["input"]} == {"image": "TYPE_STRING",
                                                                         "pixels": "TYPE_UINT8"}
        probs = next(o for o in config["output"] if o["name"] == "probabilities")
        assert probs["data_type"] == "TYPE_FP32" and [int(d) for d in probs["dims"]] == [len(classes)]
        assert int(config["dynamic_batching"]["max_queue_delay_microseconds"]) == 5000

    before = _stats_http(server, name)
    grpc_client = triton_grpc.InferenceServerClient(server.grpc)
    http_client = triton_http.InferenceServerClient(server.hostport)
    for _ in range(2):  # 2 gRPC requests of 3 images, 1 HTTP request of 3, 1 bad gRPC request
        tensor = triton_grpc.InferInput("image", [3], "BYTES")
        tensor.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=np.object_))
        grpc_client.infer(name, [tensor])
    tensor = triton_http.InferInput("image", [3], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=np.object_))
    http_client.infer(name, [tensor])
    bad = triton_grpc.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT"):
        grpc_client.infer(name, [bad])

    after, over_grpc = _stats_http(server, name), _stats_grpc(server, name)
    assert after["version"] == over_grpc["version"] == str(head)
    for key in ("inference_count", "execution_count", "last_inference"):
        assert int(over_grpc[key]) == after[key]
    assert after["inference_count"] - before["inference_count"] == 9
    assert 1 <= after["execution_count"] - before["execution_count"] <= 3
    stats, was = after["inference_stats"], before["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[key]["count"] - was[key]["count"] == 3, key
        assert int(over_grpc["inference_stats"][key]["count"]) == stats[key]["count"]
    assert stats["fail"]["count"] - was["fail"]["count"] == 1
    assert stats["success"]["ns"] > was["success"]["ns"]
    assert stats["compute_infer"]["ns"] > was["compute_infer"]["ns"]
    assert sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]


def test_class_count_gives_the_top_k_over_http_and_grpc(server, served_state):
    name, _, classes = _active(served_state)
    images = demo_images()[::40][:4]
    with Device(served_state) as dev:
        expected = dev.predict(images, top_k=3)
    want = [[f"{p:f}:{classes.index(label)}:{label}" for label, p in pred.top_k] for pred in expected]

    tensor = triton_grpc.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=np.object_))
    result = triton_grpc.InferenceServerClient(server.grpc).infer(
        name, [tensor], outputs=[triton_grpc.InferRequestedOutput("probabilities", class_count=3)])
    got_grpc = result.as_numpy("probabilities")

    tensor = triton_http.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array([p.read_bytes() for p in images], dtype=np.object_))
    result = triton_http.InferenceServerClient(server.hostport).infer(
        name, [tensor], outputs=[triton_http.InferRequestedOutput("probabilities", class_count=3, binary_data=False)])
    got_http = result.as_numpy("probabilities")

    for got in (got_grpc, got_http):
        assert got.shape == (len(images), 3)
        for row, want_row in zip(got, want):
            strings = [s.decode() if isinstance(s, bytes) else s for s in row]
            assert [s.split(":", 1)[1] for s in strings] == [w.split(":", 1)[1] for w in want_row]
            assert all(abs(float(s.split(":")[0]) - float(w.split(":")[0])) <= 1e-6
                       for s, w in zip(strings, want_row))

    tensor = triton_grpc.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([images[0].read_bytes()], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="class_count"):  # only the probabilities are ranked
        triton_grpc.InferenceServerClient(server.grpc).infer(
            name, [tensor], outputs=[triton_grpc.InferRequestedOutput("label", class_count=2)])


def test_bad_grpc_requests_get_a_status_and_one_line_never_internal(server, served_state):
    name, _, _ = _active(served_state)
    with grpc.insecure_channel(server.grpc) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        huge = service_pb2.ModelInferRequest(model_name=name)
        huge.inputs.add(name="pixels", datatype="UINT8", shape=[4294967296, 4294967296, 1, 1])
        huge.raw_input_contents.append(b"\0" * 16)
        cases = [
            (service_pb2.ModelInferRequest(model_name="nope"), grpc.StatusCode.NOT_FOUND),
            (huge, grpc.StatusCode.INVALID_ARGUMENT),
            (service_pb2.ModelInferRequest(model_name=name), grpc.StatusCode.INVALID_ARGUMENT),  # no input
        ]
        for request, code in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(request)
            assert err.value.code() == code, err.value.details()
            assert "\n" not in err.value.details() and "Traceback" not in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # a method we do not serve
            stub.RepositoryIndex(service_pb2.RepositoryIndexRequest())
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert server.alive()
    assert triton_grpc.InferenceServerClient(server.grpc).is_server_live()


def _triton_descriptor(name: str):
    outer, *nested = name.split(".")
    for module in (service_pb2, model_config_pb2):
        if outer in module.DESCRIPTOR.message_types_by_name:
            found = module.DESCRIPTOR.message_types_by_name[outer]
            for part in nested:
                found = found.nested_types_by_name[part]
            return found
    raise AssertionError(f"{name} is not a message of Triton's protos")


@pytest.mark.parametrize("name", sorted(MESSAGE_CLASSES))
def test_our_messages_are_wire_compatible_with_tritons(name):
    """Every field we declare has Triton's number, type, cardinality and message type (so the bytes agree)."""
    def fields(descriptor) -> dict:
        return {f.name: (f.number, f.type, f.is_repeated if hasattr(f, "is_repeated") else f.label == 3,
                         f.message_type.full_name if f.message_type else None,
                         f.enum_type.full_name if f.enum_type else None) for f in descriptor.fields}

    ours, theirs = fields(MESSAGE_CLASSES[name].DESCRIPTOR), fields(_triton_descriptor(name))
    assert {k: theirs.get(k) for k in ours} == ours


def test_a_taken_grpc_port_stops_the_server_with_one_line(served_state):
    import socket
    import subprocess
    import sys

    from service_support import REPO

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = subprocess.run([sys.executable, "-m", "edgexfer.cli", "device", "serve", "--state", str(served_state),
                              "--port", "0", "--grpc-port", str(taken.getsockname()[1])],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode != 0
    assert "cannot listen for gRPC | got 127.0.0.1:" in out.stderr and "Traceback" not in out.stderr


def test_http_and_grpc_requests_share_engine_batches(served_state):
    """One batcher for both transports: an HTTP and a gRPC request of 4 images each, sent at once, run as one
    engine call of 8 (the batcher waits up to 1 s for a request that has arrived and is still decoding)."""
    import threading

    name, _, _ = _active(served_state)
    images = np.array([p.read_bytes() for p in demo_images()[:4]], dtype=np.object_)
    with running_server(served_state, "--grpc-port", "0", "--max-batch", "8", "--max-queue-delay-ms", "1000") as srv:
        srv.grpc = _grpc_address(srv)
        grpc_client = triton_grpc.InferenceServerClient(srv.grpc)
        http_client = triton_http.InferenceServerClient(srv.hostport)

        def over_grpc() -> None:
            tensor = triton_grpc.InferInput("image", [4], "BYTES")
            tensor.set_data_from_numpy(images)
            start.wait()
            grpc_client.infer(name, [tensor])

        def over_http() -> None:
            tensor = triton_http.InferInput("image", [4], "BYTES")
            tensor.set_data_from_numpy(images)
            start.wait()
            http_client.infer(name, [tensor])

        for _ in range(3):  # a loaded machine may start one thread late: the same pair again
            start = threading.Barrier(2)
            threads = [threading.Thread(target=over_grpc), threading.Thread(target=over_http)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            sizes = {b["batch_size"] for b in _stats_http(srv, name)["batch_stats"]}
            if 8 in sizes:
                break
        assert 8 in sizes, sizes
