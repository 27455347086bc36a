"""Every bad request gets its 4xx JSON error, and the next good request is answered: the server keeps serving."""
from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import struct

import numpy as np
import pytest
from PIL import Image
from service_support import demo_images, running_server

GOOD = demo_images()[5].read_bytes()
_BOMB: list[bytes] = []
_GZIP_BOMB: list[bytes] = []


def bomb() -> bytes:
    """A 64-megapixel PNG of about 60 KB: small on the wire, 64 MB once decoded (over --max-pixels 4000000)."""
    if not _BOMB:
        _BOMB.append(_png(8000, 8000))
    return _BOMB[0]


@pytest.fixture(scope="module")
def server(served_state):
    with running_server(served_state, "--max-body-mb", "1", "--max-pixels", "4000000") as srv:
        yield srv


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.json("GET", "/v1/status")[1]["model"]


def gzip_bomb() -> bytes:
    """64 MiB of zeros in about 64 KB of gzip: the server must stop inflating at --max-body-mb (1 MiB here)."""
    if not _GZIP_BOMB:
        _GZIP_BOMB.append(gzip.compress(bytes(64 << 20), 9))
    return _GZIP_BOMB[0]


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _infer(model: str, inputs: list[dict], binary: bytes = b"", extra: dict | None = None) -> tuple[str, bytes, dict]:
    head = json.dumps({"inputs": inputs, **(extra or {})}).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    return f"/v2/models/{model}/infer", head + binary, headers


def _bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _cases(model: str) -> dict[str, tuple[str, str, bytes, dict, int]]:
    """name -> (method, path, body, headers, expected status)."""
    px = np.zeros((1, 224, 224, 3), np.uint8)
    c: dict[str, tuple] = {}
    c["unknown model"] = ("POST", *_infer("no-such-model", [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                             "data": [base64.b64encode(GOOD).decode()]}]), 404)
    c["unknown model metadata"] = ("GET", "/v2/models/no-such-model", b"", {}, 404)
    c["inactive model version"] = ("GET", f"/v2/models/{model}/versions/99", b"", {}, 404)
    c["request is not JSON"] = ("POST", f"/v2/models/{model}/infer", b"{inputs: nope", {}, 400)
    c["no inputs"] = ("POST", *_infer(model, []), 400)
    c["unknown input name"] = ("POST", *_infer(model, [{"name": "audio", "datatype": "BYTES", "shape": [1],
                                                        "data": ["AAAA"]}]), 400)
    c["pixels of the wrong datatype"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "FP32",
                                                                  "shape": [1, 224, 224, 3],
                                                                  "parameters": {"binary_data_size": px.size * 4}}],
                                                         px.astype(np.float32).tobytes()), 400)
    c["pixels of the wrong shape"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "UINT8",
                                                               "shape": [1, 100, 100, 3],
                                                               "parameters": {"binary_data_size": 30000}}],
                                                      bytes(30000)), 400)
    c["data shorter than its shape"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "UINT8",
                                                                 "shape": [1, 224, 224, 3], "data": [1, 2, 3]}]), 400)
    c["binary size beyond the body"] = ("POST", *_infer(model, [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                                 "parameters": {"binary_data_size": 10**6}}],
                                                        _bytes_tensor(GOOD)), 400)
    c["header length beyond the body"] = ("POST", f"/v2/models/{model}/infer", b"{}",
                                          {"Inference-Header-Content-Length": "999"}, 400)
    c["BYTES element is not base64"] = ("POST", *_infer(model, [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                                 "data": ["not base64!"]}]), 400)
    c["not an image"] = ("POST", "/v1/predict", b"this is not an image", {}, 400)
    c["decompression bomb"] = ("POST", "/v1/predict", bomb(), {}, 400)
    bombs = _bytes_tensor(GOOD, bomb())
    c["bomb through the v2 API"] = ("POST", *_infer(model, [{"name": "image", "datatype": "BYTES", "shape": [2],
                                                             "parameters": {"binary_data_size": len(bombs)}}], bombs), 400)
    c["BYTES elements fewer than the shape"] = ("POST", *_infer(model, [{"name": "image", "datatype": "BYTES",
                                                                         "shape": [2], "parameters": {
                                                                             "binary_data_size": len(GOOD) + 4}}],
                                                                _bytes_tensor(GOOD)), 400)
    c["body over the limit"] = ("POST", "/v1/predict", os.urandom(2 << 20), {}, 413)
    c["multipart without a file"] = ("POST", "/v1/predict", b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1"
                                     b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 400)
    c["label with a path for an id"] = ("POST", "/v1/label", json.dumps({"id": "../../etc/passwd", "label": "x"}).encode(),
                                        {"Content-Type": "application/json"}, 400)
    c["label of an unknown entry"] = ("POST", "/v1/label", json.dumps({"id": 424242, "label": "x"}).encode(),
                                      {"Content-Type": "application/json"}, 404)
    c["label that is not a class name"] = ("POST", "/v1/label", b"--b\r\nContent-Disposition: form-data; name=\"label\""
                                           b"\r\n\r\na/b\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                                           b"filename=\"x.jpg\"\r\n\r\n" + GOOD + b"\r\n--b--\r\n",
                                           {"Content-Type": "multipart/form-data; boundary=b"}, 400)
    c["retrain with unknown options"] = ("POST", "/v1/retrain", b'{"epochs": 9}', {"Content-Type": "application/json"},
                                         400)
    c["path traversal in the model name"] = ("GET", "/v2/models/..%2F..%2F..%2Fetc%2Fpasswd", b"", {}, 404)
    c["path traversal in a review image"] = ("GET", "/v1/review/..%2F..%2Factive.json/image", b"", {}, 404)
    c["path traversal in the page"] = ("GET", "/../../active.json", b"", {}, 404)
    c["unknown endpoint"] = ("GET", "/v3/anything", b"", {}, 404)
    c["wrong method"] = ("DELETE", "/v1/predict", b"", {}, 405)
    # answered 500 with the exception's text on 3df0584 (issue 23); the sizes, types and integer ranges
    # are now checked where the request comes in
    c["shape of 2**64 elements"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "UINT8",
                                                              "shape": [4294967296, 4294967296, 1, 1], "data": []}]), 400)
    c["outputs not a list"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "UINT8", "shape": [1],
                                                         "data": [1]}], extra={"outputs": 5}), 400)
    c["review image id beyond SQLite"] = ("GET", "/v1/review/1180591620717411303424/image", b"", {}, 404)
    c["label id beyond SQLite"] = ("POST", "/v1/label", b'{"id": 1180591620717411303424, "label": "x"}',
                                   {"Content-Type": "application/json"}, 400)
    # more of the same kind, found by reading the code and by tests/service/test_serve_fuzz.py
    c["review image id of 5000 digits"] = ("GET", "/v1/review/" + "7" * 5000 + "/image", b"", {}, 404)
    c["JSON nested 100000 deep"] = ("POST", f"/v2/models/{model}/infer", b"[" * 100000 + b"]" * 100000, {}, 400)
    c["label JSON nested 100000 deep"] = ("POST", "/v1/label", b"[" * 100000 + b"]" * 100000,
                                          {"Content-Type": "application/json"}, 400)
    c["a number of 5000 digits"] = ("POST", f"/v2/models/{model}/infer",
                                    b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": [1'
                                    + b"0" * 5000 + b"]}]}", {}, 400)
    c["an integer beyond a double"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "FP32", "shape": [1],
                                                                 "data": [10**400]}]), 400)
    c["an integer beyond INT64"] = ("POST", *_infer(model, [{"name": "x", "datatype": "INT64", "shape": [1],
                                                              "data": [2**64]}]), 400)
    c["a zero dimension beside huge ones"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "UINT8",
                                                                        "shape": [0, 2**32, 2**32, 2**32],
                                                                        "data": []}]), 400)
    c["datatype not a string"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": ["UINT8"], "shape": [1],
                                                            "data": [1]}]), 400)
    c["request id an object"] = ("POST", *_infer(model, [{"name": "pixels", "datatype": "UINT8", "shape": [1],
                                                           "data": [1]}], extra={"id": {"a": [1]}}), 400)
    c["retrain seed beyond 32 bits"] = ("POST", "/v1/retrain", b'{"seed": 100000000000000000000000000000}',
                                        {"Content-Type": "application/json"}, 400)
    c["label with a control character"] = ("POST", "/v1/label", b"--b\r\nContent-Disposition: form-data; name=\"label\""
                                           b"\r\n\r\nbell\x07\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                                           b"filename=\"x.jpg\"\r\n\r\n" + GOOD + b"\r\n--b--\r\n",
                                           {"Content-Type": "multipart/form-data; boundary=b"}, 400)
    c["label of a truncated image"] = ("POST", "/v1/label", b"--b\r\nContent-Disposition: form-data; name=\"label\""
                                       b"\r\n\r\nbeverages\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                                       b"filename=\"x.jpg\"\r\n\r\n" + GOOD[:6] + b"\r\n--b--\r\n",
                                       {"Content-Type": "multipart/form-data; boundary=b"}, 400)
    c["multipart without a boundary"] = ("POST", "/v1/predict", b"xx", {"Content-Type": "multipart/form-data"}, 400)
    c["a truncated image"] = ("POST", "/v1/predict", GOOD[: len(GOOD) // 2], {}, 400)
    # compressed bodies: a zip bomb stops at the limit, an encoding the server does not decode is 415
    c["gzip bomb"] = ("POST", "/v1/predict", gzip_bomb(), {"Content-Encoding": "gzip"}, 413)
    c["truncated gzip"] = ("POST", "/v1/predict", gzip.compress(GOOD)[:-20], {"Content-Encoding": "gzip"}, 400)
    c["unknown Content-Encoding"] = ("POST", "/v1/predict", GOOD, {"Content-Encoding": "br"}, 415)
    return c


CASES = list(_cases("m"))
#: what the error must say, for the cases where the status alone could come from another refusal
SAYS = {"unknown model": "unknown model", "pixels of the wrong datatype": "datatype", "pixels of the wrong shape":
        "shape", "decompression bomb": "pixels", "bomb through the v2 API": "image 1", "body over the limit": "too large",
        "label that is not a class name": "label", "not an image": "image", "shape of 2**64 elements": "shape",
        "outputs not a list": "outputs", "label id beyond SQLite": "review entry id", "review image id beyond SQLite":
        "no such review entry", "JSON nested 100000 deep": "not JSON", "a number of 5000 digits": "not JSON",
        "an integer beyond a double": "out of range", "an integer beyond INT64": "out of range",
        "retrain seed beyond 32 bits": "seed", "label with a control character": "label",
        "multipart without a boundary": "malformed multipart", "a truncated image": "image", "label of a truncated image": "cannot learn",
        "gzip bomb": "decompressed", "truncated gzip": "gzip", "unknown Content-Encoding": "Content-Encoding"}
#: Python's exception text in a body: a class name (ValueError, MultiPartException) or a traceback
LEAK = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception)\b|Traceback|Missing boundary|image file is truncated")


@pytest.mark.parametrize("case", CASES)
def test_bad_request_gets_its_4xx_json_error_and_the_next_good_request_succeeds(server, model, case):
    method, path, body, headers, expected = _cases(model)[case]
    status, got_headers, raw = server.request(method, path, body or None, headers)
    assert status == expected, raw[:300]
    assert got_headers["content-type"].startswith("application/json")
    message = json.loads(raw)["error"]
    assert message and "\n" not in message and " | " in message  # one line: what | got | expected | todo
    assert SAYS.get(case, "") in message
    assert not LEAK.search(message), message
    ok, answer = server.json("POST", "/v1/predict", body=GOOD)
    assert ok == 200 and answer["results"][0]["label"]
    assert server.alive()


def test_a_body_without_length_is_cut_at_the_limit(server):
    """Chunked uploads have no Content-Length to refuse early: the stream is counted and cut at the limit."""
    import http.client

    conn = http.client.HTTPConnection(server.hostport, timeout=30)
    chunks = (os.urandom(256 << 10) for _ in range(8))  # 2 MiB in chunks, limit 1 MiB
    conn.request("POST", "/v1/predict", body=chunks, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "too large" in json.loads(resp.read())["error"]
    conn.close()
    assert server.json("POST", "/v1/predict", body=GOOD)[0] == 200


def test_beyond_loopback_the_endpoints_that_change_the_device_need_the_token(served_state, tmp_path):
    """--host 0.0.0.0: without --token-file label/retrain/rollback answer 403; with it, 401 until the token is sent."""
    label = json.dumps({"id": 1, "label": "x"}).encode()
    with running_server(served_state, "--host", "0.0.0.0") as srv:
        srv.url = srv.url.replace("0.0.0.0", "127.0.0.1")
        for path in ("/v1/label", "/v1/retrain", "/v1/rollback"):
            status, body = srv.json("POST", path, body=label)
            assert status == 403 and "--token-file" in body["error"]
        assert srv.json("POST", "/v1/predict", body=GOOD)[0] == 200  # reading is open

    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    token.chmod(0o644)
    from service_support import cli

    refused = cli("device", "serve", "--state", str(served_state), "--port", "0", "--token-file", str(token),
                  check=False)
    assert refused.returncode == 1 and "readable by others" in refused.stderr
    token.chmod(0o600)
    with running_server(served_state, "--host", "0.0.0.0", "--token-file", str(token)) as srv:
        srv.url = srv.url.replace("0.0.0.0", "127.0.0.1")
        assert srv.json("POST", "/v1/label", body=label)[0] == 401
        assert srv.json("POST", "/v1/label", body=label, headers={"Authorization": "Bearer wrong-token-000000"})[0] == 401
        status, body = srv.json("POST", "/v1/label", body=label,
                                headers={"Authorization": "Bearer s3cret-token-0123456789"})
        assert status == 404 and "no such review entry" in body["error"]  # past the token check
        assert srv.json("POST", "/v1/predict", body=GOOD)[0] == 200


def test_a_fault_of_the_server_is_a_500_without_its_text_and_the_log_has_it(caplog):
    """The generic answer of endpoint.route to an exception no check caught: its id, never its text (a path, a
    value of the request, a library's internals); the traceback goes to the log under the same id."""
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx")
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from edgexfer.runtime.service.endpoint import route
    from edgexfer.runtime.service.metrics import ServiceMetrics

    async def faulty(request):
        raise OverflowError("Python int too large to convert to SQLite INTEGER at /var/lib/edgexfer/review.sqlite")

    class Core:
        metrics = ServiceMetrics()

    app = Starlette(routes=[route("/v1/faulty", faulty, ["GET"])])
    app.state.core = Core()
    with caplog.at_level("ERROR", logger="edgexfer.serve"), TestClient(app) as client:
        answer = client.get("/v1/faulty")
    message = answer.json()["error"]
    assert answer.status_code == 500 and message.startswith("internal error | got fault ")
    assert message.endswith("see the server's log") and "GET /v1/faulty" in message
    assert not LEAK.search(message) and "SQLite" not in message and "/var/lib" not in message
    incident = message.split("got fault ")[1].split()[0]
    assert any(incident in r.getMessage() and "SQLite INTEGER" in r.exc_text for r in caplog.records if r.exc_text)
