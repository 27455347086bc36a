"""Host-side helper of scripts/check_arm64.sh (runs on the host's Python, never under emulation).

    requirements ORT_VERSION OV_VERSION   the device side's arm64 requirements, one a line, from pyproject.toml
    golden FILE LABEL [--max-diff X] [--ran P]
                                          print the golden check of a ``device install --json``; fail when the
                                          feature difference is over X or the engine did not compute in P
    predict FILE [LABEL N]                print a ``device predict --json`` result; fail when fewer than N
                                          answers are LABEL
    serve-wait LOG PID SECONDS            wait for ``device serve``'s "listening on URL" line, print URL
    serve-predict URL IMAGE               POST IMAGE's bytes to URL/v1/predict, print and check the answer
    wav-44k IN OUT                        IN (a WAV clip) again as 44.1 kHz stereo 24-bit PCM, the rate and layout
                                          of a phone or PC recording: a device must resample it (soxr) and mix it
    free-port                             a free TCP port on loopback
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

try:
    import tomllib
except ImportError:  # a 3.10 host
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
#: the extras a device installs (the Makefile's device venv: onnxruntime, updates, serve, camera, text, audio)
#: plus openvino
DEVICE_EXTRAS = ("onnxruntime", "openvino", "updates", "serve", "camera", "text", "audio")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def requirements(ort: str, ov: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in DEVICE_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    pins = {"onnxruntime": f"onnxruntime=={ort}", "openvino": f"openvino=={ov}"}
    out: dict[str, str] = {}
    for req in reqs:
        name = _name(req)
        # cryptography signs on the host; a device verifies with securesystemslib alone, but the
        # updates extra names it and its abi3 arm64 wheel exists: kept, as a device installs it
        out.setdefault(name, pins.get(name, req))
    return list(out.values())


def _plural(modality: str | None) -> str:
    """What the golden samples are called ("images", "texts", "audio clips"): the modality's plug-in says."""
    from edgexfer.runtime.modalities import DEFAULT_MODALITY, modality_named

    return modality_named(modality or DEFAULT_MODALITY).plural


def golden(path: str, label: str, max_diff: float | None, ran: str | None) -> int:
    report = json.loads(Path(path).read_text())
    g, engine = report["golden"], report["engine"]
    ex = g.get("execution") or {}
    diff = float(g["max_abs_feature_diff"])
    tolerance = ", ".join(f"{k} {v:g}" for k, v in g["tolerance"].items())
    unit = _plural(g.get("modality"))
    print(f"  golden {label}: computed in {ex.get('inference_precision')}, {g['images']} {unit}, "
          f"max feature diff {diff:.3g}, mean cosine {g['mean_cosine']:.6f}, top-1 agreement {g['top1_agreement']:.3f} "
          f"(install tolerance: {tolerance}); isa {ex.get('isa')}; engine {engine['source']}"
          f"{' built' if engine.get('built') else ''}, install {report.get('seconds', 0):.1f} s")
    if max_diff is not None and not diff <= max_diff:
        print(f"  FAIL: {label} max feature diff {diff:.3g} > {max_diff:g}", file=sys.stderr)
        return 1
    if ran is not None and ex.get("inference_precision") != ran:
        print(f"  FAIL: {label} computed in {ex.get('inference_precision')}, expected {ran}", file=sys.stderr)
        return 1
    return 0


def predict(path: str, label: str | None = None, at_least: int = 0) -> int:
    """Print a ``device predict --json``; fail when fewer than ``at_least`` answers are ``label``."""
    report = json.loads(Path(path).read_text())
    rows = report.get("results") or []
    ex = report.get("execution") or {}
    for row in rows:
        print(f"  {Path(row['source']).name}: {row['label']} ({row['probability']:.2f}) "
              f"[head {report.get('head')}, {row.get('backend')}/{row.get('precision')} ran {ex.get('inference_precision')}]")
    if not rows:
        print("  FAIL: no predictions in the output", file=sys.stderr)
        return 1
    if label is not None:
        hits = sum(row["label"] == label for row in rows)
        print(f"  {hits} of {len(rows)} answered '{label}'")
        if hits < at_least:
            print(f"  FAIL: fewer than {at_least} answered '{label}'", file=sys.stderr)
            return 1
    return 0


def serve_wait(log: str, pid: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        text = Path(log).read_text(errors="replace") if Path(log).exists() else ""
        m = re.search(r"listening on (http://\S+)", text)
        if m:
            print(m.group(1))
            return 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"  FAIL: device serve exited before listening:\n{text}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"  FAIL: device serve did not print 'listening on' within {seconds:g} s", file=sys.stderr)
    return 1


def serve_predict(url: str, image: str) -> int:
    body = Path(image).read_bytes()
    req = urllib.request.Request(url.rstrip("/") + "/v1/predict", data=body, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as resp:
        status, payload = resp.status, json.loads(resp.read())
    print(f"  POST /v1/predict ({len(body)} bytes): HTTP {status} in {time.monotonic() - t0:.2f} s: "
          f"{json.dumps(payload)[:300]}")
    return 0 if status == 200 else 1


def wav_44k(src: str, dst: str) -> int:
    """``src`` as 44.1 kHz stereo 24-bit PCM (resampled with soxr, the left channel 6 dB below the right)."""
    import numpy as np
    import soundfile
    import soxr

    wave, rate = soundfile.read(src, dtype="float32", always_2d=True)
    mono = soxr.resample(wave.mean(axis=1), rate, 44100, quality="HQ")
    soundfile.write(dst, np.stack([0.5 * mono, mono], axis=1), 44100, subtype="PCM_24")
    info = soundfile.info(dst)
    print(f"  {Path(dst).name}: {info.samplerate} Hz, {info.channels} channels, {info.subtype}, "
          f"{info.duration:.2f} s (from {Path(src).name}, {rate} Hz)")
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


def main(argv: list[str]) -> int:
    cmd, args = argv[0], argv[1:]
    if cmd == "requirements":
        print("\n".join(requirements(*args)))
        return 0
    if cmd == "golden":
        path, label, rest = args[0], args[1], args[2:]
        opts = dict(zip(rest[::2], rest[1::2]))
        max_diff = float(opts["--max-diff"]) if "--max-diff" in opts else None
        return golden(path, label, max_diff, opts.get("--ran"))
    if cmd == "predict":
        return predict(args[0], *(args[1:2]), *(int(a) for a in args[2:3]))
    if cmd == "serve-wait":
        return serve_wait(args[0], int(args[1]), float(args[2]))
    if cmd == "serve-predict":
        return serve_predict(args[0], args[1])
    if cmd == "wav-44k":
        return wav_44k(args[0], args[1])
    if cmd == "free-port":
        return free_port()
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
