"""``edgexfer bench`` on a text bundle: batch-1 latency and throughput of each engine per sequence length.

A transformer's cost grows with the tokens it reads, so one figure per engine says little: every engine is
measured at :data:`SEQUENCE_LENGTHS` (32, 128 and 256 tokens, those within the manifest's ``max_length``),
SingleStream (batch 1, LoadGen's p50/p90/p99) and Offline (throughput at each ``--batch``), and the engines
are interleaved side by side at :data:`SIDE_BY_SIDE_LENGTH` tokens. The samples are real text: the bundle's
golden texts, joined and cut by its own tokenizer to exactly L tokens (``[CLS]`` and ``[SEP]`` included,
no padding), one sample per starting text. Only the engine layer is measured: the head costs the same
microseconds as for images, and tokenization is outside the engine.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgexfer.bench.loadgen import offline, single_stream
from edgexfer.bench.measure import median_call
from edgexfer.bench.plan import WARMUP_CALLS, EngineTarget
from edgexfer.bench.report import OfflineResult, SampleInfo
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.text import TextTokenizer, TokenBatch

#: tokens per sample the bench measures (those up to the bundle's max_length)
SEQUENCE_LENGTHS = (32, 128, 256)
#: the length of the interleaved side-by-side comparison and of the summary
SIDE_BY_SIDE_LENGTH = 128
#: the only layer a text bench measures
TEXT_LAYERS = ("engine",)


@dataclass
class TokenSamples:
    """Token samples of exactly ``length`` tokens each (no padding), preloaded before any timing."""

    by_length: dict[int, TokenBatch]
    texts: list[str]  #: the texts they were cut from

    def describe(self) -> SampleInfo:
        first = next(iter(self.by_length.values()))
        return SampleInfo(count=len(first), source=f"bundle golden.npz texts ({len(self.texts)}), joined and cut to "
                                                   "exactly L tokens by the bundle's tokenizer",
                          mean_encoded_bytes=int(np.mean([len(t.encode()) for t in self.texts])), pixels_shape=[],
                          sequence_lengths=list(self.by_length))


def sequence_lengths(bundle: Bundle) -> list[int]:
    longest = int(bundle.manifest.backbone.input.max_length)
    return [n for n in SEQUENCE_LENGTHS if n <= longest] or [longest]


def load_token_samples(bundle: Bundle, lengths: list[int]) -> TokenSamples:
    """One sample per golden text, per length: the golden texts from that one on, joined, cut to L tokens."""
    texts = [str(t) for t in bundle.golden()["texts"]]
    inp = bundle.manifest.backbone.input
    by_length: dict[int, TokenBatch] = {}
    for length in lengths:
        tokenizer = TextTokenizer.from_file(bundle.root / inp.tokenizer, length, sha256=inp.tokenizer_sha256)
        long_texts = []
        for start in range(len(texts)):
            rotated = texts[start:] + texts[:start]
            text = " ".join(rotated)
            while len(text.split()) < 2 * length:  # words >= tokens/2 in English: enough to fill L tokens
                text = f"{text} {text}"
            long_texts.append(text)
        batch = tokenizer.encode(long_texts)
        if batch.input_ids.shape[1] != length or not batch.attention_mask.all():
            raise InputError("text bench samples", got=f"token shape {batch.input_ids.shape}",
                             expected=f"[{len(texts)}, {length}] without padding",
                             todo="report this as a bug with the bundle's golden texts")
        by_length[length] = batch
    return TokenSamples(by_length, texts)


def bench_text_target(target: EngineTarget, runner, samples: TokenSamples, run, single_stream_result) -> list:
    """Every scenario at every sequence length on one open engine; the results' rows carry the length."""
    settings = run.settings
    results: list = []
    for length, tokens in samples.by_length.items():
        n = len(tokens)
        rows = [tokens.rows(slice(i, i + 1)) for i in range(n)]
        if "single-stream" in settings.scenarios:
            run.say(f"{target.label} single-stream engine, {length} tokens")

            def work(i: int, rows=rows):
                return runner.run(rows[i])

            expected = median_call(functools.partial(work, 0), WARMUP_CALLS)
            measured = single_stream(work, n, run.loadgen(target, f"single-stream-engine-L{length}"), expected)
            results.append(single_stream_result(target, "engine", measured, sequence_length=length))
        if "offline" in settings.scenarios:
            from edgexfer.bench.plan import MLPERF_MIN_OFFLINE_SAMPLES

            min_samples = MLPERF_MIN_OFFLINE_SAMPLES if settings.mlperf_minimums else settings.min_queries

            def features(ids: list[int], tokens=tokens) -> np.ndarray:
                return runner.run(tokens.rows(ids))

            for b in settings.batches:
                run.say(f"{target.label} offline batch {b}, {length} tokens")
                expected_qps = b / median_call(functools.partial(features, [i % n for i in range(b)]), WARMUP_CALLS)
                measured = offline(features, n, b, run.loadgen(target, f"offline-b{b}-L{length}"), expected_qps,
                                   min_samples)
                lg = measured["loadgen"]
                done = int(lg.get("effective_samples_per_query") or 0)
                results.append(OfflineResult(
                    backend=target.backend, precision=target.precision, layer="engine", batch=b,
                    sequence_length=length, samples=done, throughput_sps=lg.get("result_samples_per_second"),
                    sut_timed_sps=done / measured["wall_s"] if measured["wall_s"] > 0 else None,
                    validity=lg.get("result_validity"), invalid_reason=lg.get("result_invalid_reason")))
    return results


def side_by_side_length(samples: TokenSamples) -> int:
    return SIDE_BY_SIDE_LENGTH if SIDE_BY_SIDE_LENGTH in samples.by_length else max(samples.by_length)


def first_row(samples: TokenSamples) -> TokenBatch:
    """The batch-1 input the first (setup) inference of an engine runs."""
    tokens = samples.by_length[side_by_side_length(samples)]
    return tokens.rows(slice(0, 1))


def render_text_table(report: dict[str, Any]) -> list[str]:
    """bench.md's headline for a text bundle: per engine, p50 at batch 1 and throughput per sequence length."""
    rows = [r for r in report["results"] if r.get("sequence_length") is not None]
    if not rows:
        return []
    lengths = sorted({r["sequence_length"] for r in rows})
    pairs = list(dict.fromkeys((e["backend"], e["precision"]) for e in report["engines"]))

    def cell(backend: str, precision: str, length: int) -> tuple[str, str]:
        ss = [r for r in rows if (r["scenario"], r["backend"], r["precision"], r["sequence_length"]) ==
              ("single-stream", backend, precision, length)]
        off = [r for r in rows if (r["scenario"], r["backend"], r["precision"], r["sequence_length"]) ==
               ("offline", backend, precision, length)]
        top = max(off, key=lambda r: r.get("throughput_sps") or 0) if off else None
        p50 = f"{ss[0]['p50_ms']:.2f}" if ss and ss[0].get("p50_ms") is not None else "–"
        tput = (f"{top['throughput_sps']:.1f} (b={top['batch']})" if top and top.get("throughput_sps") else "–")
        return p50, tput

    lines = ["## Text engines side by side, by sequence length", "",
             "SingleStream p50 latency of the engine at batch 1 (ms) and the best Offline throughput "
             "(texts/s, at batch b), for samples of exactly L tokens.", "",
             "| backend | precision | " + " | ".join(f"p50 L={n}" for n in lengths) + " | "
             + " | ".join(f"texts/s L={n}" for n in lengths) + " |",
             "|---|---|" + "---:|" * (2 * len(lengths))]
    for backend, precision in pairs:
        cells = [cell(backend, precision, n) for n in lengths]
        lines.append(f"| {backend} | {precision} | " + " | ".join(c[0] for c in cells) + " | "
                     + " | ".join(c[1] for c in cells) + " |")
    return [*lines, ""]
