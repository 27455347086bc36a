"""``device serve`` with an audio bundle (issue 26, acceptance 4): the v2 input ``audio`` (BYTES: WAV files) through
tritonclient gives ``device predict``'s answers (1e-6), ``/v1/predict`` takes a WAV body, a non-WAV body is a 400."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from service_support import cli, running_server

pytest.importorskip("soundfile")


@pytest.fixture(scope="module")
def audio_server(audio_state):
    with running_server(audio_state, "--max-queue-delay-ms", "5") as srv:
        yield srv


def _clips(spoken14: Path) -> list[Path]:
    return [sorted((spoken14 / "test" / w).glob("*.wav"))[0] for w in ("yes", "no", "stop", "zero")]


def _device_predict(state: Path, files: list[Path]) -> dict:
    return json.loads(cli("device", "predict", *map(str, files), "--state", str(state), "--json").stdout)


def test_tritonclient_audio_input_answers_as_device_predict(audio_server, audio_state, spoken14):
    tritonclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is the test client")
    files = _clips(spoken14)
    expected = _device_predict(audio_state, files)
    name = json.loads(cli("device", "status", "--state", str(audio_state), "--json").stdout)["bundle"]["name"]
    client = tritonclient.InferenceServerClient(audio_server.hostport)
    meta = client.get_model_metadata(name)
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("audio", "BYTES")]
    assert meta["parameters"]["modality"] == "audio"
    for binary in (True,):  # WAV bytes are not UTF-8: tritonclient sends them only as binary tensor data
        tensor = tritonclient.InferInput("audio", [len(files)], "BYTES")
        tensor.set_data_from_numpy(np.array([f.read_bytes() for f in files], dtype=np.object_), binary_data=binary)
        outputs = [tritonclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities", "features")]
        result = client.infer(name, [tensor], outputs=outputs)
        classes = json.loads(result.get_response()["parameters"]["classes"])
        labels, probs = result.as_numpy("label"), result.as_numpy("probabilities")
        assert result.as_numpy("features").shape == (len(files), 192)
        for label, row, res in zip(labels, probs, expected["results"]):
            assert (label.decode() if isinstance(label, bytes) else label) == res["label"]
            for top in res["top_k"]:  # device predict --json rounds to 6 decimals
                assert abs(float(row[classes.index(top["label"])]) - top["probability"]) <= 1e-6


def test_v1_predict_takes_a_wav_body_and_refuses_other_bytes(audio_server, audio_state, spoken14):
    clip = _clips(spoken14)[1]
    want = _device_predict(audio_state, [clip])["results"][0]
    status, got = audio_server.json("POST", "/v1/predict", body=clip.read_bytes(), headers={"Content-Type": "audio/wav"})
    assert status == 200 and got["results"][0]["label"] == want["label"]
    assert max(abs(a["probability"] - b["probability"])
               for a, b in zip(got["results"][0]["top_k"], want["top_k"])) <= 1e-6
    status, bad = audio_server.json("POST", "/v1/predict", body=b"ID3\x03 not a wav", headers={"Content-Type": "audio/wav"})
    assert status == 400 and "not a WAV" in bad["error"] and "\n" not in bad["error"]
    assert audio_server.proc.poll() is None
