"""The web page of ``device serve`` in a real browser (the system's headless Chromium through Selenium).

One walk through the field loop as a user does it: classify an upload, see it in the review queue,
label it with a class button, retrain (accepted: head 1 -> 2), see the head history, roll back.
Everything asserted is what the page shows. With ``EDGEXFER_SCREENSHOT=PATH`` the test also saves a
screenshot of the page after the retrain (docs/img/service-page.png was made so).
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
from service_support import DEMO, REPO, Server, new_class_images, running_server

webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (the dev extra)")

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 30.0

# low-confidence demo images (well under the 0.99 review threshold for the demo head), by true class
FIRST = DEMO / "music" / "a_man_singing_01.jpg"
QUEUED = [DEMO / "tools" / "axe_peterm_.jpg", DEMO / "hardware" / "8port_switch_denco.jpg"]
AFTER = DEMO / "beverages" / "bottled_drink.jpg"
#: a confident answer (not queued at the default threshold); the issue saw it answered "hardware 90.4 %"
CONFIDENT = DEMO / "vehicles" / "autos_01.jpg"
#: learned with their true labels before the retrain: enough for the holdout gate to accept the new head
LEARNED_CLASSES = ("beverages", "music")
LEARNED_PER_CLASS = 10
#: a spoken word for the audio bundle's page (spoken14's "stop", in the bundle's classes)
SPOKEN = REPO / "data" / "spoken-demo" / "stop" / "stop_000.wav"


@pytest.fixture(scope="module")
def browser():
    if not all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER)):
        pytest.skip(f"the page test needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
                    "apt-get install chromium chromium-driver (.ci/run does so as root)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # a fake microphone (a beep), allowed without asking: the audio page's Record button
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,1000",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def forget_earlier_pages(browser) -> None:
    """Leave the page of an earlier test (it would go on asking its stopped server every 2 s, and log each
    refused connection while this test's server starts) and drop what it logged (its 401s)."""
    browser.get("about:blank")
    browser.get_log("browser")


def page_probes(browser, *also: str):
    """``(shown, until)``: the text of an element by id, and a wait for a condition whose failure says what the
    page showed (#answer, #error and the ids in ``also``)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)

    def shown(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text.strip()

    def until(condition, what: str) -> None:
        try:
            wait.until(lambda _: condition())
        except Exception:
            seen = ", ".join(f"#{i} {shown(i)!r}" for i in also)
            raise AssertionError(f"the page never showed {what}: #answer shows {shown('answer')!r}, "
                                 f"#error {shown('error')!r}" + (f", {seen}" if seen else "")) from None

    return shown, until


def learn(server: Server, path: Path, label: str, token: str | None = None) -> None:
    """POST /v1/label with an uploaded image (multipart), as ``curl -F file=@IMG -F label=CLASS`` does."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\n{label}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, doc = server.json("POST", "/v1/label", body=body, headers=headers)
    assert status == 200, doc


def judged_sentence(report: dict) -> str:
    """The one sentence the page shows for a retrain report: the evaluation that decided the gate, and its count."""
    gate, held, loo = report["gate"], report["holdout_count"], report["loo_count"]
    if gate == "none":
        return (f"not tested: no held-out sample and no few-shot sample to judge it on; accepted on its training "
                f"data ({report['train_count']} samples)")
    what = {"holdout": f"the holdout of {held} samples", "leave-one-out": f"leave-one-out on {loo} few-shot samples",
            "holdout+leave-one-out": f"{held + loo} samples ({held} held out + {loo} by leave-one-out)"}[gate]
    return (f"judged by {what}: the new head {100 * report['holdout_accuracy_new']:.1f} % right, the old one "
            f"{100 * report['holdout_accuracy_old']:.1f} % (allowed loss {100 * report['tolerance']:.1f} %)")


def test_page_field_loop(browser, served_state, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)

    def shown(element_id: str) -> str:
        """The text a user sees in #element_id (empty while it is hidden)."""
        return browser.find_element(By.ID, element_id).text.strip()

    def until_text(element_id: str, expected: str) -> None:
        try:
            wait.until(lambda _: shown(element_id) == expected)
        except Exception:
            raise AssertionError(f"#{element_id} shows {shown(element_id)!r}, expected {expected!r}; "
                                 f"#error shows {shown('error')!r}") from None

    def until_true(condition, what: str) -> None:
        try:
            wait.until(lambda _: condition())
        except Exception:
            raise AssertionError(f"the page never showed {what}: it shows {browser.find_element(By.TAG_NAME, 'body').text!r}") from None

    def upload(path: Path, head: str) -> str:
        """Classify ``path`` with the page's file input; the label the page answers (by head ``head``)."""
        before = shown("answer")
        browser.find_element(By.ID, "upload").send_keys(str(path))
        wait.until(lambda _: shown("answer") and shown("answer") != before)
        until_text("answer-head", head)
        return shown("answer-label")

    # read in one script: the page redraws these lists when they change
    def review_ids() -> list[int]:
        return [int(i) for i in browser.execute_script(
            "return [...document.querySelectorAll('#review .review-item')].map((e) => e.dataset.id)")]

    def head_rows() -> list[str]:
        """The head history as shown: 'VERSION STATUS ...' per row, newest first."""
        return browser.execute_script("return [...document.querySelectorAll('#heads tbody tr')].map((r) => r.innerText)")

    def active_head_row() -> str:
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#heads tbody tr.active')].map((r) => r.dataset.version)")
        return rows[0] if len(rows) == 1 else f"{len(rows)} active rows"

    with running_server(served_state, "--review-threshold", "0.99") as server:
        status, st = server.json("GET", "/v1/status")
        assert status == 200
        classes = st["head"]["classes"]
        assert set(LEARNED_CLASSES) <= set(classes) and "tools" in classes

        browser.get(server.url + "/")
        # the status card, from GET /v1/status
        until_text("head-version", "1")
        assert shown("bundle-name") == st["bundle"]["name"] == "clipart8-demo"
        assert shown("arch") == st["bundle"]["arch"]
        assert shown("head-kind") == st["head"]["kind"]
        assert shown("classes") == ", ".join(classes)
        assert shown("backend") == st["backend"]
        assert shown("inference-precision") == st["execution"]["inference_precision"]
        assert not browser.find_element(By.ID, "token-box").is_displayed()  # loopback: no token needed
        assert not browser.find_element(By.ID, "record").is_displayed()  # images are not recorded (record_s null)
        assert not browser.find_element(By.ID, "retrain-report").is_displayed()  # no retrain yet
        assert not browser.find_element(By.ID, "error").is_displayed()

        # classify an upload: the answer is the service's (same label as the API gives), by head 1
        label = upload(FIRST, "1")
        assert label in classes
        topk = browser.find_elements(By.CSS_SELECTOR, "#answer-topk li")
        assert len(topk) == 3 and topk[0].text.startswith(label)
        queued = shown("answer-queued")
        assert "queued for review as #" in queued, f"the upload was not queued: {shown('answer')!r}"
        first_id = int(queued.rsplit("#", 1)[1])
        _, review = server.json("GET", "/v1/review")
        entry = next(e for e in review["entries"] if e["id"] == first_id)
        assert entry["label"] == label and entry["head"] == 1
        assert shown("answer-prob") == f"{100 * entry['probability']:.1f} %"
        until_true(lambda: shown("latency-p50").endswith(" ms") and shown("latency-p99").endswith(" ms"),
                   "the latency of the prediction")

        # ... and it is in the review queue, as a thumbnail that loaded, with one button per class
        wait.until(lambda _: first_id in review_ids())
        item = browser.find_element(By.CSS_SELECTOR, f'#review .review-item[data-id="{first_id}"]')
        thumb = item.find_element(By.CSS_SELECTOR, "img.thumb")
        wait.until(lambda _: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", thumb))
        buttons = [b.text for b in item.find_elements(By.CSS_SELECTOR, "button.label-btn")]
        assert buttons == classes

        # a label the service refuses: its error is shown, and the entry stays queued
        item.find_element(By.CSS_SELECTOR, "input.new-class").send_keys("bad/name")
        item.find_element(By.CSS_SELECTOR, "button.new-class-btn").click()
        until_true(lambda: browser.find_element(By.ID, "error").is_displayed(), "the refused label's error")
        assert "/v1/label" in shown("error") and "400" in shown("error") and "class name" in shown("error")
        assert first_id in review_ids()
        browser.find_element(By.ID, "error-close").click()
        assert not browser.find_element(By.ID, "error").is_displayed()

        # label it with its true class by its class button: it leaves the queue and becomes a sample
        true_class = FIRST.parent.name
        item = browser.find_element(By.CSS_SELECTOR, f'#review .review-item[data-id="{first_id}"]')
        item.find_element(By.CSS_SELECTOR, f'button.label-btn[data-label="{true_class}"]').click()
        until_true(lambda: first_id not in review_ids(), f"#{first_id} gone from the queue")
        until_true(lambda: f"{true_class} 1" in shown("samples"), f"#samples shows {true_class} 1")
        assert not browser.find_element(By.ID, "error").is_displayed(), shown("error")

        # two more uploads for the queue
        for path in QUEUED:
            upload(path, "1")
        wait.until(lambda _: len(review_ids()) >= 2)

        # enough labelled samples for an accepted retrain (as `curl -F file=@IMG -F label=CLASS /v1/label`)
        for cls in LEARNED_CLASSES:
            for path in sorted((DEMO / cls).glob("*.jpg"))[:LEARNED_PER_CLASS]:
                learn(server, path, cls)
        until_true(lambda: all(f"{c} {LEARNED_PER_CLASS}" in shown("samples") for c in LEARNED_CLASSES),
                   "the learned samples")
        until_true(lambda: shown("review-count") == str(len(review_ids())), "the review queue's size")

        # retrain from the page: the report, then the new head everywhere
        browser.find_element(By.ID, "retrain").click()
        wait.until(lambda _: browser.find_element(By.ID, "retrain-report").is_displayed())
        assert shown("report-accepted") == "yes", shown("retrain-report")
        assert shown("report-version") == "2"
        _, job = server.json("GET", "/v1/retrain")
        assert shown("report-judged") == judged_sentence(job["report"]), job["report"]
        until_text("head-version", "2")
        until_text("status-head", "2")
        until_true(lambda: len(head_rows()) == 2, "two heads in the history")
        assert active_head_row() == "2"
        rows = head_rows()
        assert rows[0].split()[:2] == ["2", "active"] and rows[1].split()[0] == "1", rows

        # the next answer comes from head 2
        upload(AFTER, "2")
        assert not browser.find_element(By.ID, "error").is_displayed(), shown("error")
        after_id = int(shown("answer-queued").rsplit("#", 1)[1])
        screenshot = os.environ.get("EDGEXFER_SCREENSHOT")
        if screenshot:
            wait.until(lambda _: all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", t)
                                     for t in browser.find_elements(By.CSS_SELECTOR, "#review img.thumb")))
            # the status's queue size is counted every few seconds: wait until it agrees with the list
            until_true(lambda: shown("review-count") == str(len(review_ids())), "the review queue's size")
            for _ in range(3):  # the whole page: the window's height less its viewport's, plus the page's
                inner, full = browser.execute_script(
                    "return [window.innerHeight, document.documentElement.scrollHeight]")
                if inner >= full:
                    break
                browser.set_window_size(1300, browser.get_window_size()["height"] + full - inner)
            saved = tmp_path / "page.png"
            assert browser.save_screenshot(str(saved))
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved, screenshot)

        # the answer card labels a queued answer by its review id: it leaves the queue
        wait.until(lambda _: after_id in review_ids())
        browser.find_element(By.CSS_SELECTOR, f'#answer-buttons button[data-label="{AFTER.parent.name}"]').click()
        until_true(lambda: shown("answer-learned").startswith(f"learned as {AFTER.parent.name}"), "the label learned")
        until_true(lambda: after_id not in review_ids(), f"#{after_id} gone from the queue")

        # roll back from the page: the first click only asks, the second rolls back
        browser.find_element(By.ID, "rollback").click()
        until_text("rollback", "Really roll back to head 1?")
        assert server.json("GET", "/v1/status")[1]["head"]["version"] == 2  # nothing happened yet
        browser.find_element(By.ID, "rollback").click()
        until_text("head-version", "1")
        until_true(lambda: active_head_row() == "1", "head 1 active in the history")
        rows = head_rows()
        assert len(rows) == 2 and "active" not in rows[0] and rows[1].split()[:2] == ["1", "active"], rows
        assert not browser.find_element(By.ID, "error").is_displayed(), shown("error")
        assert server.alive()
        # no script error on the way (the refused label's 400 is the only failed request)
        logged = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert [m for m in logged if "/v1/label - Failed to load resource" not in m] == [], logged


def test_page_labels_any_answer_and_offers_a_new_class_at_once(browser, device_bundle, tmp_path):
    """A confident answer (not queued) is labelled from the answer card with its sample; a new class typed there
    is a button at once, before any retrain; the retrain that follows is reported by the one evaluation that
    decided it (leave-one-out on the new class's samples), never as a holdout of 0 samples."""
    from selenium.webdriver.common.by import By

    from edgexfer.runtime.device import Device

    state = tmp_path / "state"
    with Device(state) as dev:
        dev.install(device_bundle)
    shown, until = page_probes(browser)

    def answer_buttons() -> list[str]:
        return browser.execute_script(
            "return [...document.querySelectorAll('#answer-buttons button')].map((b) => b.dataset.label)")

    def upload(path: Path) -> None:
        browser.execute_script("document.getElementById('answer-label').textContent = ''")
        browser.find_element(By.ID, "upload").send_keys(str(path))
        until(lambda: shown("answer-label") != "" and shown("answer-learned") == "", f"the answer for {path.name}")

    robots = []
    for i, data in enumerate(new_class_images(3, seed=7)):
        robots.append(tmp_path / f"robot_{i}.jpg")
        robots[-1].write_bytes(data)
    with running_server(state) as server:  # the default threshold: 1.25/8, a confident answer is not queued
        classes = server.json("GET", "/v1/status")[1]["head"]["classes"]
        browser.get(server.url + "/")
        until(lambda: shown("head-version") == "1", "head 1")
        browser.execute_script("localStorage.clear()")
        browser.get_log("browser")  # what the page of an earlier test logged

        # a confident answer, right or wrong, has a button per class; its sample is learned as the class picked
        upload(CONFIDENT)
        assert shown("answer-queued") == "" and answer_buttons() == classes
        browser.find_element(By.CSS_SELECTOR, f'#answer-buttons button[data-label="{CONFIDENT.parent.name}"]').click()
        until(lambda: shown("answer-learned") == f"learned as {CONFIDENT.parent.name}", "the label learned")
        until(lambda: f"{CONFIDENT.parent.name} 1" in shown("samples"), "the sample counted")

        # a new class typed under an answer: learned, and a button at once (no retrain)
        upload(robots[0])
        browser.find_element(By.ID, "answer-new-class").send_keys("robots")
        browser.find_element(By.ID, "answer-new-class-btn").click()
        until(lambda: shown("answer-learned") == "learned as robots", "robots learned")
        until(lambda: answer_buttons() == [*classes, "robots"], "a robots button")
        upload(robots[1])
        browser.find_element(By.CSS_SELECTOR, '#answer-buttons button[data-label="robots"]').click()
        until(lambda: "robots 2" in shown("samples"), "two robots")
        assert shown("head-version") == "1"
        learn(server, robots[2], "robots")

        # the retrain judges the few-shot classes by leave-one-out: the report says that, with its count
        browser.find_element(By.ID, "retrain").click()
        until(lambda: browser.find_element(By.ID, "retrain-report").is_displayed(), "the retrain report")
        report = server.json("GET", "/v1/retrain")[1]["report"]
        assert report["gate"] == "leave-one-out" and report["holdout_count"] == 0 and report["loo_count"] == 4, report
        assert shown("report-judged") == judged_sentence(report)
        assert "on 0 samples" not in shown("retrain-report") and "holdout" not in shown("retrain-report")
        assert not browser.find_element(By.ID, "error").is_displayed(), shown("error")
        assert [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_page_token(browser, served_state, tmp_path):
    """With --token-file the page asks for the token, keeps it in localStorage and sends it on changes."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)
    token = uuid.uuid4().hex
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)

    def shown(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text.strip()

    with running_server(served_state, "--token-file", str(token_file)) as server:
        for path in sorted((DEMO / "fruit").glob("*.jpg"))[:3]:  # something to retrain on, whatever ran before
            learn(server, path, "fruit", token)
        browser.get(server.url + "/")
        browser.execute_script("localStorage.clear()")
        browser.refresh()
        wait.until(lambda _: browser.find_element(By.ID, "token-box").is_displayed())

        # no token: the service's 401 is shown, nothing started
        browser.find_element(By.ID, "retrain").click()
        wait.until(lambda _: browser.find_element(By.ID, "error").is_displayed())
        assert "/v1/retrain" in shown("error") and "401" in shown("error") and "token" in shown("error")
        browser.find_element(By.ID, "error-close").click()

        # the token, saved: the retrain runs and reports
        browser.find_element(By.ID, "token").send_keys(token)
        browser.find_element(By.ID, "token-save").click()
        browser.find_element(By.ID, "retrain").click()
        wait.until(lambda _: browser.find_element(By.ID, "retrain-report").is_displayed())
        assert shown("report-accepted") in ("yes", "no") and shown("report-judged")
        assert not browser.find_element(By.ID, "error").is_displayed(), shown("error")

        # kept across a reload
        browser.refresh()
        wait.until(lambda _: browser.find_element(By.ID, "token-box").is_displayed())
        assert browser.find_element(By.ID, "token").get_attribute("value") == token
        browser.execute_script("localStorage.clear()")


def test_page_asks_for_and_shows_texts_with_a_text_bundle(browser, text_state):
    """The form is the modality's (/v1/status bundle.form): a text box and .txt uploads, answers and queued
    samples drawn as text, never as images."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)

    def shown(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text.strip()

    sample = "the stars and the moon over a quiet sea tonight"
    with running_server(text_state, "--review-threshold", "0.99") as server:
        _, answer = server.json("POST", "/v1/predict", body=sample.encode(), headers={"Content-Type": "text/plain"})
        browser.get(server.url + "/")
        wait.until(lambda _: shown("classify-title") == "Classify a text")
        assert browser.find_element(By.ID, "text-form").is_displayed()
        assert browser.find_element(By.ID, "upload").get_attribute("accept") == ".txt,text/plain"
        assert not browser.find_element(By.ID, "record").is_displayed()

        browser.find_element(By.ID, "text-input").send_keys(sample)
        browser.find_element(By.ID, "text-submit").click()
        wait.until(lambda _: shown("answer-label"))
        assert shown("answer-label") == answer["results"][0]["label"]
        assert shown("answer-text") == sample and not browser.find_element(By.ID, "answer-image").is_displayed()
        # the queued text is drawn as its text (a <pre>), not as an <img> of /v1/review/N/image
        wait.until(lambda _: browser.execute_script(
            "return [...document.querySelectorAll('#review .review-item pre')].map((e) => e.textContent)")
            .count(sample) == 1)
        assert not browser.find_elements(By.CSS_SELECTOR, "#review .review-item img")


def test_page_shows_a_drift_banner_after_shifted_inputs_and_metrics_say_so(browser, tmp_path_factory, device_bundle,
                                                                           clipart8):
    """30 camera-degraded images through /v1/predict: the service's drift test (every 30 inputs here) finds the
    change; /v1/status, the Prometheus gauges and a banner on the page say so (issue 27)."""
    import numpy as np
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from shift_support import camera_shift, held_out

    from edgexfer.runtime.device import Device

    state = tmp_path_factory.mktemp("drift-page") / "state"
    with Device(state) as dev:  # a state of its own: the drift test reads the latest inputs of this service only
        dev.install(device_bundle)
    rng = np.random.default_rng(3)
    files = held_out(clipart8)
    shifted = [camera_shift(files[i].read_bytes(), rng) for i in rng.choice(len(files), 30, replace=False)]
    wait = WebDriverWait(browser, WAIT_S, poll_frequency=0.1)
    forget_earlier_pages(browser)
    with running_server(state, "--drift-every", "30", "--drift-window", "30") as server:
        browser.get(server.url + "/")
        wait.until(lambda _: browser.find_element(By.ID, "bundle-name").text.strip() == "clipart8-demo")
        assert not browser.find_element(By.ID, "drift").is_displayed()
        _, metrics = server.request("GET", "/metrics")[::2]
        assert b"edgexfer_drift_detected NaN" in metrics  # no verdict before the first test
        for data in shifted:
            assert server.request("POST", "/v1/predict", data, {"Content-Type": "application/octet-stream"})[0] == 200
        wait.until(lambda _: server.json("GET", "/v1/status")[1]["drift"]["last"] is not None)
        drift = server.json("GET", "/v1/status")[1]["drift"]
        assert drift["last"]["drift"] is True and drift["last"]["window"] == 30 and drift["every"] == 30, drift
        gauges = dict(line.split(" ") for line in server.request("GET", "/metrics")[2].decode().splitlines()
                      if line.startswith("edgexfer_drift_"))
        assert float(gauges["edgexfer_drift_detected"]) == 1.0 and float(gauges["edgexfer_drift_p_value"]) < 0.01
        assert float(gauges["edgexfer_drift_window_confidence"]) < 1.0
        wait.until(lambda _: browser.find_element(By.ID, "drift").is_displayed())
        banner = browser.find_element(By.ID, "drift").text
        assert "changed since training" in banner and "latest 30 inputs" in banner, banner
        assert [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_page_plays_uploads_and_records_clips_with_an_audio_bundle(browser, audio_state):
    """An audio bundle's form (/v1/status bundle.form: shown as "audio", record_s): an uploaded WAV is answered as
    the API answers it and played back in an <audio> player, queued clips are players, and Record (Chromium's
    fake microphone) sends a 16-bit mono WAV of the clip's length to /v1/predict, answered and learned like an
    upload. No Content-Security-Policy violation (or any other error) in the console."""
    import io
    import wave

    from selenium.webdriver.common.by import By

    shown, until = page_probes(browser, "record-state")

    def loaded(css: str) -> bool:
        """Whether the player ``css`` has a blob: source whose audio the browser read (its duration known)."""
        return browser.execute_script(
            "const a = document.querySelector(arguments[0]);"
            "return !!a && a.src.startsWith('blob:') && a.readyState >= 1 && a.duration > 0", css)

    def queued_id() -> int:
        return int(shown("answer-queued").rsplit("#", 1)[1])

    with wave.open(str(SPOKEN)) as w:
        spoken_s = w.getnframes() / w.getframerate()
    forget_earlier_pages(browser)
    with running_server(audio_state, "--review-threshold", "1.0") as server:  # every answer queued
        _, st = server.json("GET", "/v1/status")
        form = st["bundle"]["form"]
        assert form["shown_as"] == "audio" and form["record_s"] == 1.0, form
        _, expected = server.json("POST", "/v1/predict", body=SPOKEN.read_bytes(),
                                  headers={"Content-Type": "audio/wav"})
        browser.get(server.url + "/")
        until(lambda: shown("classify-title") == "Classify a sound", "the audio form")
        assert browser.find_element(By.ID, "upload").get_attribute("accept") == ".wav,audio/wav"
        until(lambda: browser.find_element(By.ID, "record").is_displayed(), "the Record button")

        # an upload: the API's answer, and the clip in a player (a blob: URL the page's CSP admits)
        browser.find_element(By.ID, "upload").send_keys(str(SPOKEN))
        until(lambda: shown("answer-label") == expected["results"][0]["label"], "the upload's answer")
        assert queued_id() == expected["review_id"]
        assert browser.find_element(By.ID, "answer-audio").is_displayed()
        assert not browser.find_element(By.ID, "answer-image").is_displayed()
        until(lambda: loaded("#answer-audio"), "the upload's player loaded")
        duration = browser.execute_script("return document.getElementById('answer-audio').duration")
        assert abs(duration - spoken_s) < 0.01, (duration, spoken_s)
        # the queued clip: served as audio/wav, drawn as a player, never as an <img>
        code, headers, _ = server.request("GET", f"/v1/review/{expected['review_id']}/image")
        assert code == 200 and headers["content-type"] == "audio/wav", headers
        until(lambda: loaded(f'#review .review-item[data-id="{expected["review_id"]}"] audio'), "a queued player")
        assert not browser.find_elements(By.CSS_SELECTOR, "#review .review-item img")

        # Record: one clip of the bundle's length from the (fake) microphone, answered like an upload
        browser.find_element(By.ID, "record").click()
        until(lambda: shown("answer-label") and shown("answer-queued") and queued_id() != expected["review_id"],
              "the recording's answer")
        recorded = queued_id()
        until(lambda: loaded("#answer-audio"), "the recording's player loaded")
        code, headers, data = server.request("GET", f"/v1/review/{recorded}/image")
        assert code == 200 and headers["content-type"] == "audio/wav"
        with wave.open(io.BytesIO(data)) as w:  # what reached /v1/predict: a 16-bit mono WAV of record_s
            assert (w.getnchannels(), w.getsampwidth(), w.getcomptype()) == (1, 2, "NONE")
            assert w.getnframes() == round(form["record_s"] * w.getframerate()), (w.getnframes(), w.getframerate())
        entry = next(e for e in server.json("GET", "/v1/review")[1]["entries"] if e["id"] == recorded)
        assert entry["label"] == shown("answer-label") and entry["head"] == 1, entry
        # ... and labelled from the answer card like any sample
        browser.find_element(By.CSS_SELECTOR, '#answer-buttons button[data-label="go"]').click()
        until(lambda: shown("answer-learned") == "learned as go", "the recording learned")
        assert server.json("GET", "/v1/status")[1]["cache"]["samples_per_class"] == {"go": 1}
        assert not browser.find_element(By.ID, "error").is_displayed(), shown("error")
        assert [e["message"] for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
