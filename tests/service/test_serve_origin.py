"""Browser-origin safety of ``device serve``: what a page on another site, a rebound DNS name or a reader on the
network can do (nothing), and what curl and the device's own page still can (everything they could).

Real servers on loopback, real clients (httpx; Chromium through Selenium for the attack from a page).
"""
from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from service_support import cli, demo_images, new_class_images, running_server

httpx = pytest.importorskip("httpx", reason="the origin tests use httpx (the dev extra)")

GOOD = demo_images()[5].read_bytes()
EVIL = "http://evil.example"
#: the security headers every response carries
HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer", "x-frame-options": "DENY",
           "cross-origin-resource-policy": "same-origin"}


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory, device_bundle) -> Path:
    """A device state at head 2 (a learned class, retrained), so that a rollback would change it."""
    from edgexfer.runtime.device import Device

    root = tmp_path_factory.mktemp("origin")
    images = []
    for i, blob in enumerate(new_class_images(12)):
        images.append(root / f"checkers_{i}.jpg")
        images[-1].write_bytes(blob)
    state = root / "state"
    with Device(state) as dev:
        dev.install(device_bundle)
        dev.learn(images, "checkers")
        report = dev.retrain()
    assert report.accepted and report.version == 2, report.reason
    return state


def _copy(state: Path, tmp_path: Path) -> Path:
    """A copy of ``state`` of one's own (the tests roll back)."""
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    return copy


@pytest.fixture(scope="module")
def server(two_heads, tmp_path_factory):
    with running_server(_copy(two_heads, tmp_path_factory.mktemp("served")), "--review-threshold", "1.0") as srv:
        yield srv  # every prediction is queued


def _device(client: httpx.Client) -> tuple[int, int, dict]:
    """(head, review queue length, samples per class): what an attack would change."""
    status = client.get("/v1/status").json()
    return status["head"]["version"], len(client.get("/v1/review").json()["entries"]), status["cache"]["samples_per_class"]


def _one_line_error(resp: httpx.Response) -> str:
    message = resp.json()["error"]
    assert "\n" not in message and message.count(" | ") >= 2, message
    return message


def test_a_cross_site_post_is_refused_and_changes_nothing(server):
    """The issue's attack (a text/plain POST from any page), its variants, and the clients that must keep working."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        queued = client.post("/v1/predict", content=GOOD).json()["review_id"]
        before = _device(client)
        assert before[0] == 2
        label = json.dumps({"id": queued, "label": "checkers"})
        own = server.url  # http://127.0.0.1:PORT
        other_port = own.rsplit(":", 1)[0] + ":1"  # same site, another origin: another local web app
        attacks = {
            "Origin of another site": {"Origin": EVIL},
            "Origin of another local port": {"Origin": other_port},
            "opaque Origin": {"Origin": "null"},
            "Sec-Fetch-Site cross-site": {"Sec-Fetch-Site": "cross-site"},
            "Sec-Fetch-Site same-site": {"Sec-Fetch-Site": "same-site"},
            "cross-site, claiming our Origin": {"Origin": own, "Sec-Fetch-Site": "cross-site"},
        }
        for what, headers in attacks.items():
            for path, body in (("/v1/rollback", ""), ("/v1/retrain", "{}"), ("/v1/label", label),
                               ("/v1/predict", "a text"), ("/v2/models/clipart8-demo/infer", "{}")):
                resp = client.post(path, content=body, headers={"Content-Type": "text/plain", **headers})
                assert resp.status_code == 403, (what, path, resp.text)
                assert "another" in _one_line_error(resp), (what, path)
            # reading field data from another site (an <img> of a review image) is refused too
            resp = client.get(f"/v1/review/{queued}/image", headers=headers)
            assert resp.status_code == 403, (what, resp.text)
        # a browser too old to send Origin or Sec-Fetch-Site: its form bodies cannot change the device
        for path, body in (("/v1/rollback", ""), ("/v1/retrain", "{}"), ("/v1/label", label)):
            for kind in ("text/plain", "application/x-www-form-urlencoded"):
                resp = client.post(path, content=body, headers={"Content-Type": kind})
                assert resp.status_code == 415 and "JSON" in _one_line_error(resp), (path, kind, resp.text)
        assert _device(client) == before, "a refused request changed the device"

        # the device's own page (same origin, as Chromium sends it) and clients that are not browsers still work
        page = {"Origin": own, "Sec-Fetch-Site": "same-origin"}
        assert client.post("/v1/predict", content="x", headers={"Content-Type": "text/plain", **page}).status_code == 400
        assert client.post("/v1/predict", content=GOOD, headers=page).status_code == 200
        assert client.get(f"/v1/review/{queued}/image", headers={"Sec-Fetch-Site": "same-origin"}).content == GOOD
        assert client.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # a link to the page
        assert client.post("/v1/label", json={"id": queued, "label": "checkers"}, headers=page).status_code == 200
        resp = client.post("/v1/rollback")  # curl -X POST .../v1/rollback: no Origin, no body
        assert resp.status_code == 200 and resp.json() == {"head": 1, "previous_head": 2}, resp.text


def test_a_foreign_host_is_refused(server):
    """DNS rebinding: a request for a name that is not this device's gets a 421, whatever its path."""
    port = server.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.attacker.example", "a b",
                     f"[::1]x:{port}"):
            for method, path in (("GET", "/v1/status"), ("GET", "/"), ("POST", "/v1/rollback"),
                                 ("GET", "/v2/health/ready"), ("GET", "/no/such/path")):
                resp = client.request(method, path, headers={"Host": host})
                assert resp.status_code == 421, (host, path, resp.text)
                assert "--allow-host" in _one_line_error(resp)
                assert resp.headers["x-content-type-options"] == "nosniff"
        metrics = client.get("/metrics").text
        assert 'edgexfer_http_requests_total{code="421",endpoint="refused"} 25.0' in metrics, metrics[:3000]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost", f"app.localhost:{port}",
                     f"LOCALHOST.:{port}", f"192.168.7.7:{port}"):  # an IP literal cannot be rebound
            assert client.get("/v2/health/ready", headers={"Host": host}).status_code == 200, host


def test_every_answer_carries_the_security_headers(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        queued = client.post("/v1/predict", content=GOOD).json()["review_id"]
        answers = {path: client.get(path) for path in ("/", "/v1/status", "/v2", "/metrics", f"/v1/review/{queued}/image",
                                                       "/no/such/path")}
        answers["predict"] = client.post("/v1/predict", content=GOOD)
        for what, resp in answers.items():
            for key, value in HEADERS.items():
                assert resp.headers.get(key) == value, (what, key, resp.headers)
            policy = resp.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy, (what, policy)
        assert answers[f"/v1/review/{queued}/image"].headers["cache-control"] == "no-store"  # field data
        assert answers["/v1/status"].headers["cache-control"] == "no-store"
        # the page: its own script and style files, nothing inline, requests to itself only
        policy = dict(d.strip().split(" ", 1) for d in answers["/"].headers["content-security-policy"].split(";"))
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'", policy
        assert policy["style-src-attr"] == "'none'"
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
        assert policy["media-src"] == "'self' blob:"  # the audio player of an upload or a recording, nothing more
        for path, media in (("/static/page.js", "text/javascript"), ("/static/page.css", "text/css"),
                            ("/static/microphone.js", "text/javascript"), ("/static/recorder.js", "text/javascript")):
            resp = client.get(path)
            assert resp.status_code == 200 and resp.headers["content-type"].startswith(media), (path, resp.headers)


def test_beyond_loopback_field_data_needs_the_token(two_heads, tmp_path):
    """--host 0.0.0.0 --token-file: the review queue, its images, heads, status, the retrain report and /metrics
    (per-class counts, the drift verdict) answer 401 without the token; inference, health and metadata stay
    open. Without a token file: 403."""
    token = "field-data-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    field = ["/v1/review", "/v1/heads", "/v1/status", "/v1/retrain", "/metrics"]
    state = _copy(two_heads, tmp_path)
    with running_server(state, "--host", "0.0.0.0", "--token-file", str(token_file), "--allow-host",
                        "device.example", "--review-threshold", "1.0") as srv:
        url = srv.url.replace("0.0.0.0", "127.0.0.1")
        with httpx.Client(base_url=url, timeout=30) as client:
            bearer = {"Authorization": f"Bearer {token}"}
            queued = client.post("/v1/predict", content=GOOD).json()["review_id"]  # inference stays open
            assert isinstance(queued, int)
            for path in [*field, f"/v1/review/{queued}/image"]:
                resp = client.get(path)
                assert resp.status_code == 401 and "field data" in _one_line_error(resp), (path, resp.status_code)
                assert client.get(path, headers={"Authorization": "Bearer wrong-token-00000000"}).status_code == 401
                assert client.get(path, headers=bearer).status_code == 200, path
            assert client.get(f"/v1/review/{queued}/image", headers=bearer).content == GOOD
            assert "edgexfer_predictions_total" in client.get("/metrics", headers=bearer).text
            for path in ("/", "/v2", "/v2/health/ready"):
                assert client.get(path).status_code == 200, path
            # with the token, a change needs no JSON (the token is the proof a cross-site form cannot give)
            resp = client.post("/v1/rollback", headers={**bearer, "Content-Type": "text/plain"})
            assert resp.status_code in (200, 409), resp.text
            # an --allow-host name: answered, and its pages are same-origin (a reverse proxy that rewrites Host)
            assert client.get("/v2", headers={"Host": "Device.Example"}).status_code == 200
            proxied = {"Origin": "https://device.example", "Sec-Fetch-Site": "same-origin"}
            assert client.post("/v1/predict", content=GOOD, headers=proxied).status_code == 200
            assert client.post("/v1/predict", content=GOOD, headers={"Origin": "https://other.example"}).status_code == 403
            assert client.get("/", headers={"Host": "other.example"}).status_code == 421

    with running_server(state, "--host", "0.0.0.0") as srv, \
            httpx.Client(base_url=srv.url.replace("0.0.0.0", "127.0.0.1"), timeout=30) as client:
        for path in field:
            resp = client.get(path)
            assert resp.status_code == 403 and "--token-file" in _one_line_error(resp), path
        assert client.get("/v2/health/ready").status_code == 200


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 and its key, made here (cryptography, else the openssl CLI)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("no cryptography package and no openssl CLI to make a test certificate")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                        "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    key.chmod(0o600)
    return cert, key


def _grpc_speaks_tls_only(srv, cert: Path) -> None:
    """The gRPC port of a TLS server answers tritonclient over TLS with that certificate, and nothing in plain text."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    address = re.search(r"gRPC \(KServe v2\) listening on (\S+)", srv.log.read_text()).group(1)
    secure = grpcclient.InferenceServerClient(address.replace("127.0.0.1", "localhost"), ssl=True,
                                              root_certificates=str(cert))
    assert secure.is_server_live()
    plain = grpcclient.InferenceServerClient(address)
    with pytest.raises(InferenceServerException):
        plain.is_server_live(client_timeout=5)


def test_tls(served_state, tmp_path):
    """--tls-cert/--tls-key: HTTPS with the given certificate; a missing half or a wrong file is a one-line error."""
    cert, key = _self_signed(tmp_path)
    with running_server(served_state, "--tls-cert", str(cert), "--tls-key", str(key), "--grpc-port", "0") as srv:
        assert srv.url.startswith("https://127.0.0.1:")
        _grpc_speaks_tls_only(srv, cert)
        trust = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=srv.url, verify=trust, timeout=30) as client:
            assert client.get("/v2/health/ready").status_code == 200
            answer = client.post("/v1/predict", content=GOOD)
            assert answer.status_code == 200 and answer.json()["results"][0]["label"]
            assert client.get("/").headers["x-frame-options"] == "DENY"
        with httpx.Client(base_url=srv.url.replace("https://127.0.0.1", "https://localhost"), verify=trust) as client:
            assert client.get("/v2/health/ready").status_code == 200  # the name in the certificate
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served on that port
            httpx.get(srv.url.replace("https://", "http://") + "/v2/health/ready", timeout=10)
    half = cli("device", "serve", "--state", str(served_state), "--port", "0", "--tls-cert", str(cert), check=False)
    assert half.returncode == 1 and "--tls-key" in half.stderr and "Traceback" not in half.stderr
    wrong = cli("device", "serve", "--state", str(served_state), "--port", "0", "--tls-cert", str(key),
                "--tls-key", str(key), check=False)
    assert wrong.returncode == 1 and "TLS certificate" in wrong.stderr and "Traceback" not in wrong.stderr
    bad_name = cli("device", "serve", "--state", str(served_state), "--port", "0", "--allow-host", "http://x:1/",
                   check=False)
    assert bad_name.returncode == 1 and "--allow-host" in bad_name.stderr and "Traceback" not in bad_name.stderr


# ------------------------------------------------------------------------------------------------ in a browser
class _AttackerPage(http.server.BaseHTTPRequestHandler):
    """Another site's page: on load it tries to roll the device back (a text/plain fetch and a text/plain form
    post, both simple requests that need no permission) and to show one of its review images."""

    device = ""
    image = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        page = f"""<!doctype html><html><body>
<img id="leak" src="{self.device}{self.image}">
<form id="f" method="POST" action="{self.device}/v1/rollback" enctype="text/plain" target="sink">
<input name="x" value="y"></form><iframe name="sink"></iframe>
<script>
fetch("{self.device}/v1/rollback", {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}},
  body: "x"}}).then(() => {{ document.title = "sent"; }}, () => {{ document.title = "sent"; }});
document.getElementById("f").submit();
</script></body></html>""".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def log_message(self, *args) -> None:
        pass


def test_a_page_from_another_site_cannot_change_the_device_in_chromium(two_heads, tmp_path):
    """The issue's attack from a real page in Chromium: the device is not rolled back and the other site shows
    no review image; the device's own page, under its Content-Security-Policy, still reads and changes it."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the dev extra)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_page import CHROMEDRIVER, CHROMIUM

    if not all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER)):
        pytest.skip(f"the browser test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    with running_server(_copy(two_heads, tmp_path), "--review-threshold", "1.0") as srv:
        queued = srv.json("POST", "/v1/predict", body=GOOD)[1]["review_id"]
        _AttackerPage.device, _AttackerPage.image = srv.url, f"/v1/review/{queued}/image"
        attacker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AttackerPage)
        threading.Thread(target=attacker.serve_forever, daemon=True).start()
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        try:
            wait = WebDriverWait(driver, 30, poll_frequency=0.1)
            # the device is http://127.0.0.1:PORT; the other site http://localhost:OTHER
            driver.get(f"http://localhost:{attacker.server_address[1]}/")
            wait.until(lambda d: d.title == "sent")
            time.sleep(1.0)  # the form's post, in its frame
            leaked = driver.execute_script("const i = document.getElementById('leak'); return i.complete && i.naturalWidth")
            assert not leaked, "the other site showed a review image"
            assert srv.json("GET", "/v1/status")[1]["head"]["version"] == 2, "another site rolled the device back"

            # the device's own page: status, the review thumbnail, and a change (the page's own fetch)
            driver.get_log("browser")  # the other site's refusals, read and dropped
            driver.get(srv.url + "/")
            wait.until(lambda d: d.find_element(By.ID, "head-version").text == "2")
            wait.until(lambda d: d.execute_script(
                "const i = document.querySelector('#review img.thumb'); return i && i.complete && i.naturalWidth"))
            status = driver.execute_async_script(
                "fetch('/v1/rollback', {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'})"
                ".then((r) => arguments[0](r.status), (e) => arguments[0](String(e)))")
            assert status == 200 and srv.json("GET", "/v1/status")[1]["head"]["version"] == 1
            logged = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not [m for m in logged if "Content Security Policy" in m], logged  # the page obeys its CSP
        finally:
            driver.quit()
            attacker.shutdown()
