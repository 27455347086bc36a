"""``edgexfer device serve``, ``device watch`` and ``device listen``: the device as a service (docs/service.md,
docs/audio.md)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgexfer.cli_options import device_engine_options, state_option
from edgexfer.runtime.names import REVIEW_CHANCE_RATIO

#: what --review-threshold does when left out (the rule: edgexfer.runtime.review.review_threshold)
_AUTO_THRESHOLD = (f"Default: {REVIEW_CHANCE_RATIO:g} times chance, {REVIEW_CHANCE_RATIO:g}/C for a head of C classes "
                   f"(4 classes: {REVIEW_CHANCE_RATIO / 4:.4g}, 8: {REVIEW_CHANCE_RATIO / 8:.4g}), so it follows the classes a retrain adds.")


@click.command(name="serve")
@state_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Beyond loopback, label/retrain/rollback need --token-file.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve KServe v2 over gRPC (Triton's GRPCInferenceService) on this port; 0 picks a free one.")
@device_engine_options
@click.option("--max-batch", type=click.IntRange(1, 64), default=8, show_default=True,
              help="Dynamic batching: most images per engine call (1: no batching).")
@click.option("--max-queue-delay-ms", type=click.FloatRange(0, 1000), default=2.0, show_default=True,
              help="Dynamic batching: how long a request waits for others to join its batch.")
@click.option("--review-threshold", type=click.FloatRange(0, 1), default=None,
              help="Predictions below this top probability go to the review queue (0: none). " + _AUTO_THRESHOLD)
@click.option("--review-capacity", type=click.IntRange(1), default=200, show_default=True,
              help="Review queue size; the oldest entries go first.")
@click.option("--max-body-mb", type=click.FloatRange(0.01), default=32.0, show_default=True,
              help="Largest request body (413 above).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Largest decoded image (decompression bombs get a 400).")
@click.option("--token-file", type=click.Path(path_type=Path), default=None,
              help="File with the token that label/retrain/rollback need (mode 0600); beyond loopback the "
                   "review queue, heads and status need it too.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests for this host name (repeatable). IP addresses, localhost and this "
                   "machine's name are always answered; other names get a 421 (DNS rebinding).")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Serve HTTPS with this PEM certificate (chain); needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The PEM private key of --tls-cert.")
@click.option("--access-log", is_flag=True, help="Log every request (uvicorn's access log).")
@click.option("--drift-every", type=click.IntRange(0), default=50, show_default=True,
              help="Test the latest inputs for drift again after this many (0: never; device drift tests on demand).")
@click.option("--drift-window", type=click.IntRange(2), default=30, show_default=True,
              help="How many of the latest inputs the drift test compares with the training exemplars.")
def device_serve(state, host, port, grpc_port, backend, precision, max_batch, max_queue_delay_ms, review_threshold,
                 review_capacity, max_body_mb, max_pixels, token_file, allow_hosts, tls_cert, tls_key, access_log,
                 drift_every, drift_window):
    """Serve the device over HTTP: Open Inference Protocol (KServe v2), /v1/predict, /metrics, a web page at /
    (and KServe v2 over gRPC with --grpc-port)."""
    from edgexfer.runtime.service.core import ServiceConfig
    from edgexfer.runtime.service.server import serve

    config = ServiceConfig(backend=backend, precision=precision, max_batch=max_batch,
                           max_queue_delay_ms=max_queue_delay_ms, review_threshold=review_threshold,
                           review_capacity=review_capacity, max_body_bytes=int(max_body_mb * (1 << 20)),
                           max_pixels=max_pixels, drift_every=drift_every, drift_window=drift_window)
    serve(state, host=host, port=port, config=config, token_file=token_file, access_log=access_log,
          allow_hosts=allow_hosts, tls_cert=tls_cert, tls_key=tls_key, grpc_port=grpc_port)


@click.command(name="watch")
@click.argument("source")
@state_option
@click.option("--fps", type=click.FloatRange(0, 1000), default=2.0, show_default=True,
              help="Frames classified per second at most (file: by frame timestamps; live: wall clock; 0: every frame).")
@click.option("--max-frames", type=click.IntRange(1), default=None, help="Stop after this many classified frames.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the JSON lines to this file instead of stdout.")
@click.option("--review-threshold", type=click.FloatRange(0, 1), default=None,
              help="Frames below this top probability go to the review queue (0: none). " + _AUTO_THRESHOLD)
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--retries", type=click.IntRange(0), default=5, show_default=True,
              help="Live source: failed reads in a row (1 s apart, reopening every second one) before giving up.")
@device_engine_options
def device_watch(source, state, fps, max_frames, out, review_threshold, top_k, retries, backend, precision):
    """Classify frames of a video file, an RTSP/HTTP stream, /dev/videoN (or N) or a GStreamer pipeline.

    One JSON line per classified frame on stdout (or --out); a summary line on stderr at the end.
    SIGINT/SIGTERM stop cleanly. GStreamer pipelines (containing '!') need an OpenCV built with
    GStreamer (JetPack's), not the PyPI wheel.
    """

    from edgexfer.runtime.watch import watch

    w = watch(source, state, fps=fps, max_frames=max_frames, review_threshold=review_threshold, backend=backend,
              precision=precision, top_k=top_k, retries=retries)

    _json_lines(w, out, lambda: w.summary.stopped != "error" or w.summary.frames_read)


def _json_lines(run: Any, out: Path | None, summarise: Callable[[], Any]) -> None:
    """Stream ``run``'s results (``device watch``, ``device listen``) as JSON lines to stdout or ``out``;
    SIGINT/SIGTERM stop the run cleanly, and its summary goes to stderr unless it failed before any input."""
    import json
    import signal
    import sys

    def on_signal(signum, frame):  # noqa: ARG001
        run.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    sink = open(out, "a", encoding="utf-8") if out is not None else sys.stdout  # noqa: SIM115
    try:
        for result in run:
            sink.write(json.dumps(result.to_dict()) + "\n")
            sink.flush()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if out is not None:
            sink.close()
        if summarise():
            click.echo(run.summary.line(), err=True)


@click.command(name="listen")
@state_option
@click.option("--file", "file", type=click.Path(path_type=Path), default=None,
              help="A WAV recording to listen to (any rate and channels: mixed to mono and resampled). "
                   "Without it: the microphone (PortAudio through the sounddevice package).")
@click.option("--mic", default=None, help="Microphone: a PortAudio device name or index (python -m sounddevice).")
@click.option("--window", type=click.FloatRange(0.05, 60), default=None,
              help="Seconds per window. Default: the bundle's clip length.")
@click.option("--shift", type=click.FloatRange(0, 30), default=0.15, show_default=True,
              help="Seconds: each sound event is heard in windows centred on it and this much before and after "
                   "it (their probabilities averaged); 0: one window.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Mean top probability of a sound event's windows a detection needs; below it, the event is "
                   "uncertain and may go to the review queue.")
@click.option("--gate-db", type=click.FloatRange(0, 120), default=10.0, show_default=True,
              help="dB above its noise floor (the quieter 30 %% of the 1.5 s before or after it, the louder side) "
                   "a 10 ms frame must reach to be part of a sound event; only sound events are classified.")
@click.option("--peak-db", type=click.FloatRange(0, 120), default=14.0, show_default=True,
              help="dB above its floor a sound event's loudest frame must reach (a steady noise's flicker does not).")
@click.option("--ignore", "ignore", multiple=True, metavar="LABEL",
              help="Never report this label (a 'background' class the device learned); repeatable.")
@click.option("--review-max", type=click.IntRange(0), default=20, show_default=True,
              help="Uncertain events queued for review (their centred window) per run at most (0: none).")
@click.option("--review-gap", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds between two windows queued for review at least.")
@click.option("--seconds", "max_seconds", type=click.FloatRange(0.01), default=None,
              help="Stop after this much audio.")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Append the JSON lines to this file instead of stdout.")
@device_engine_options
def device_listen(state, file, mic, window, shift, threshold, gate_db, peak_db, ignore, review_max, review_gap,
                  max_seconds, out, backend, precision):
    """Spot the bundle's words and sounds in a WAV recording (--file) or the microphone.

    Sound events (stretches louder than the local noise floor, --gate-db) are classified in windows centred on
    them; quiet and steady noise are not. One JSON line per detection on stdout (or --out): label, confidence,
    time (s), start, end, windows; a summary line on stderr at the end. SIGINT/SIGTERM stop cleanly
    (docs/audio.md).
    """

    from edgexfer.runtime.listen import listen

    mic_id = int(mic) if mic is not None and mic.isdigit() else mic
    run = listen(state, file, mic=mic_id, window=window, shift=shift, threshold=threshold, gate_db=gate_db,
                 peak_db=peak_db, ignore=tuple(ignore), review_max=review_max, review_gap=review_gap,
                 max_seconds=max_seconds, backend=backend, precision=precision)

    _json_lines(run, out, lambda: run.summary.stopped != "error" or run.summary.seconds_heard)
