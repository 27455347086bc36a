"""``edgexfer bench`` on a text bundle: p50 at batch 1 and throughput per engine for 32/128/256 tokens."""
from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture(scope="module")
def bench_text_bundle(tmp_path_factory, text_bundle):
    """The demo text bundle with OpenVINO fp32 and fp16 engines beside its ONNX Runtime fp32 backbone."""
    pytest.importorskip("mlperf_loadgen")
    pytest.importorskip("openvino")
    pytest.importorskip("onnx")
    from edgexfer.converters import convert

    root = tmp_path_factory.mktemp("bench-text") / "bundle"
    shutil.copytree(text_bundle, root)
    for precision in ("fp32", "fp16"):
        convert(root, "openvino", precision, progress=False)
    return root


def test_bench_gives_p50_at_128_tokens_for_every_engine(bench_text_bundle, tmp_path):
    from click.testing import CliRunner

    from edgexfer.bench import validate_report
    from edgexfer.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["bench", str(bench_text_bundle), "--out", str(out), "--min-duration", "0.05",
                                       "--min-queries", "4", "--batch", "4", "--threads", "1", "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert validate_report(report) == []
    engines = {(e["backend"], e["precision"]) for e in report["engines"]}
    assert engines == {("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "fp16")}  # no torch twin
    assert report["settings"]["samples"]["sequence_lengths"] == [32, 128, 256]
    for backend, precision in engines:
        for length in (32, 128, 256):
            ss = [r for r in report["results"] if (r["scenario"], r["backend"], r["precision"], r["sequence_length"])
                  == ("single-stream", backend, precision, length)]
            off = [r for r in report["results"] if (r["scenario"], r["backend"], r["precision"], r["sequence_length"])
                   == ("offline", backend, precision, length)]
            assert len(ss) == 1 and ss[0]["batch"] == 1 and ss[0]["p50_ms"] > 0, (backend, precision, length)
            assert len(off) == 1 and off[0]["throughput_sps"] > 0, (backend, precision, length)
    p50 = {length: min(r["p50_ms"] for r in report["results"] if r["scenario"] == "single-stream"
                       and r["sequence_length"] == length) for length in (32, 256)}
    assert p50[256] > p50[32]  # a transformer reads every token: 8x the tokens cost more
    assert report["side_by_side"]["sequence_length"] == 128 and len(report["side_by_side"]["p50_ms"]) == 3
    table = (out / "bench.md").read_text()
    assert "| backend | precision | p50 L=32 | p50 L=128 | p50 L=256 |" in table
    assert all(f"| {b} | {p} |" in table for b, p in engines)


def test_text_bench_samples_are_real_text_of_exactly_l_tokens(bench_text_bundle):
    from edgexfer.bench.text import load_token_samples
    from edgexfer.runtime.bundle import Bundle

    samples = load_token_samples(Bundle.open(bench_text_bundle), [32, 128])
    for length, tokens in samples.by_length.items():
        assert tokens.input_ids.shape == (len(samples.texts), length) and tokens.attention_mask.all()
        assert (tokens.input_ids[:, 0] == 101).all() and (tokens.input_ids[:, -1] == 102).all()  # [CLS] ... [SEP]
        assert len({tuple(row) for row in tokens.input_ids}) == len(samples.texts)  # one sample per starting text


def test_text_bench_refuses_image_options(bench_text_bundle, tmp_path):
    from edgexfer.bench import run_bench
    from edgexfer.runtime.errors import InputError

    with pytest.raises(InputError, match="--layer with a text bundle"):
        run_bench(bench_text_bundle, layers="end_to_end", out_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match="--images with a text bundle"):
        run_bench(bench_text_bundle, images=tmp_path, out_dir=tmp_path, progress=False)
