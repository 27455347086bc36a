"""What a person reads: ``bench.md`` (tables) and the plots, made from a report's JSON form; and writing
every output of a run (bench.json, bench.md, plots/)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.bench.environment import cpu_line
from edgexfer.bench.plan import LAYERS, OFFLINE_LAYER, TORCH_BACKEND
from edgexfer.bench.report import find_rows
from edgexfer.bench.text import render_text_table
from edgexfer.runtime.optional import require


def format_compare(rows: list[dict[str, Any]]) -> str:
    """The --compare table: new/old ratios of p50, p99 and throughput per result row."""
    lines = ["| scenario | backend/precision | layer | batch | p50 new/old | p99 new/old | throughput new/old |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "both":
            lines.append(f"| {r['scenario']} | {r['backend']}/{r['precision']} | {r['layer']} | {r['batch']} | "
                         f"{r['status']} | | |")
            continue
        cells = [f"{r[k]:.3f}" if k in r else "–" for k in ("p50_ms_ratio", "p99_ms_ratio", "throughput_sps_ratio")]
        lines.append(f"| {r['scenario']} | {r['backend']}/{r['precision']} | {r['layer']} | {r['batch']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ms(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else "–"


# long: bench.md is written top to bottom in reading order, and one function keeps
# that order visible.
def render_markdown(report: dict[str, Any]) -> str:
    """bench.md: the headline table first (engine + head SingleStream, best Offline), then the details."""
    b, s, env = report["bundle"], report["settings"], report["environment"]
    results = report["results"]
    lines = [f"# edgexfer bench: {b['name']} ({b['arch']})", "",
             f"Measured {report['created_utc']} on {cpu_line(env)}", "",
             f"backbone sha256 `{b['backbone_sha256'][:16]}…` · head {b['head_kind']}, "
             f"{b['classes']} classes · samples: {s['samples']['count']} ({s['samples']['source']})", "",
             f"{env.get('cores_usable')} usable of {env.get('logical_cores')} cores · "
             f"threads: {s['threads'] or 'engine default'} · governor: {env.get('governor') or 'n/a'} · "
             f"load average at start: {env.get('load_average_1_5_15')}", "",
             f"LoadGen: min duration {s['min_duration_s']} s, min queries {s['min_queries']}"
             f"{' (MLPerf minimums)' if s['mlperf_minimums'] else ' (short defaults, not MLPerf-grade)'}, "
             f"seed {s['seed']}, {s['warmup_calls']} warm-up calls before each test.", ""]
    text_table = render_text_table(report)  # a text bundle's headline: latency and throughput per sequence length
    lines += text_table or [
        "## Backends side by side", "",
        "SingleStream latency of the classifier (engine + head, batch 1), ms; best Offline throughput.", "",
        "| backend | precision | computes in | p50 | p90 | p99 | throughput (samples/s) | at batch |",
        "|---|---|---|---:|---:|---:|---:|---:|"]
    pairs = list(dict.fromkeys((e["backend"], e["precision"]) for e in report["engines"]))
    computes = {(e["backend"], e["precision"]): (e.get("execution") or {}).get("inference_precision", "–")
                for e in report["engines"]}
    for backend, precision in [] if text_table else pairs:
        ss = find_rows(results, scenario="single-stream", backend=backend, precision=precision, layer="engine_head")
        off = find_rows(results, scenario="offline", backend=backend, precision=precision)
        top = max(off, key=lambda r: r.get("throughput_sps") or 0) if off else None
        r = ss[0] if ss else {}
        lines.append(f"| {backend} | {precision} | {computes[(backend, precision)]} | {_ms(r.get('p50_ms'))} | "
                     f"{_ms(r.get('p90_ms'))} | {_ms(r.get('p99_ms'))} | {_ms(top and top.get('throughput_sps'))} | "
                     f"{top['batch'] if top else '–'} |")
    for sk in report.get("skipped", []):
        reason = str(sk["reason"]).replace("|", "\\|")  # one-line errors separate their parts with |
        lines.append(f"- {sk['backend']}/{sk['precision']}: not measured: {reason}" if text_table else
                     f"| {sk['backend']} | {sk['precision']} | not measured: {reason} | | | | | |")
    summ = report.get("summary", {})
    lines += [""]
    if "speedup_vs_pytorch_eager" in summ:
        best = summ["best_single_stream"]
        lines.append(f"Best engine (SingleStream, engine layer): {best['backend']}/{best['precision']} "
                     f"p50 {best['engine_p50_ms']:.2f} ms, {summ['speedup_vs_pytorch_eager']:.2f}x faster than "
                     f"PyTorch eager ({summ['pytorch_eager_engine_p50_ms']:.2f} ms).")
        lines.append("")
    side = report.get("side_by_side")
    if side:
        tokens = f", {side['sequence_length']} tokens" if side.get("sequence_length") else ""
        lines += [f"## Engines interleaved (engine layer, batch 1{tokens})", "",
                  f"Each of {side['rounds']} rounds calls every engine once on the same sample, in rotating order, so "
                  "load changes on the machine hit all engines alike. ms.", "",
                  "| engine | p50 | p90 | p50 relative to the fastest |", "|---|---:|---:|---:|"]
        fastest = min(side["p50_ms"].values())
        for name, v in sorted(side["p50_ms"].items(), key=lambda kv: kv[1]):
            lines.append(f"| {name} | {v:.2f} | {side['p90_ms'][name]:.2f} | {v / fastest:.2f}x |")
        if "side_by_side_speedup_vs_pytorch_eager" in summ:
            lines += ["", f"Best engine interleaved: {summ['side_by_side_best']['engine']}, "
                          f"{summ['side_by_side_speedup_vs_pytorch_eager']:.2f}x faster than PyTorch eager (p50)."]
        lines.append("")
    ss_rows = find_rows(results, scenario="single-stream")
    if ss_rows:
        lines += ["## SingleStream latency by layer (LoadGen percentiles, ms)", "",
                  "| backend | precision | layer | p50 | p90 | p95 | p99 | max | mean | std | queries | LoadGen |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in ss_rows:
            layer = r["layer"] + (f", {r['sequence_length']} tokens" if r.get("sequence_length") else "")
            lines.append(f"| {r['backend']} | {r['precision']} | {layer} | {_ms(r.get('p50_ms'))} | "
                         f"{_ms(r.get('p90_ms'))} | {_ms(r.get('p95_ms'))} | {_ms(r.get('p99_ms'))} | "
                         f"{_ms(r.get('max_ms'))} | {_ms(r.get('mean_ms'))} | {_ms(r.get('std_ms'))} | "
                         f"{r['count']} | {r.get('validity')} |")
        lines.append("")
    if report.get("head_overhead"):
        lines += ["## What the head and the wrapper add (paired, interleaved calls)", "",
                  "ms; ratio = engine + head p50 / engine p50 over interleaved calls; decomposed = the same with the "
                  "engine's own time subtracted inside each call (immune to the engine's jitter).", "",
                  "| backend | precision | pairs | engine p50 | engine + head p50 | ratio | pairwise ratio | "
                  "outside the engine p50 | decomposed ratio | head alone p50 |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for h in report["head_overhead"]:
            outside = h.get("outside_engine_p50_ms")
            lines.append(f"| {h['backend']} | {h['precision']} | {h['pairs']} | {h['engine_p50_ms']:.3f} | "
                         f"{h['engine_head_p50_ms']:.3f} | {h['ratio']:.3f} | {h['pairwise_ratio_median']:.3f} | "
                         f"{'–' if outside is None else f'{outside:.3f}'} | "
                         f"{'–' if h.get('decomposed_ratio') is None else format(h['decomposed_ratio'], '.4f')} | "
                         f"{h['head_only_p50_ms'] * 1e3:.1f} µs |")
        lines.append("")
    off_rows = find_rows(results, scenario="offline")
    if off_rows and not text_table:  # a text bundle's throughput is in its headline table, per length
        batches = sorted({r["batch"] for r in off_rows})
        lines += [f"## Offline throughput (samples/s, layer {OFFLINE_LAYER}) by batch size", "",
                  "| backend | precision | " + " | ".join(f"b={x}" for x in batches) + " |",
                  "|---|---|" + "---:|" * len(batches)]
        for backend, precision in pairs:
            cells = []
            for x in batches:
                rr = find_rows(off_rows, backend=backend, precision=precision, batch=x)
                cells.append(_ms(rr[0].get("throughput_sps")) if rr else "–")
            lines.append(f"| {backend} | {precision} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Setup costs (not in the percentiles)", "", "| backend | precision | load/compile s | first inference ms |"
              " threads |", "|---|---|---:|---:|---|"]
    for e in report["engines"]:
        lines.append(f"| {e['backend']} | {e['precision']} | {e['load_seconds']:.3f} | {e['first_inference_ms']:.1f} | "
                     f"{e['threads']} |")
    invalid = [r for r in results if r.get("validity") not in (None, "VALID")]
    lines += ["", "## Notes", ""]
    if invalid:
        lines.append(f"- {len(invalid)} LoadGen test(s) are INVALID by MLPerf rules (usually too short for early "
                     "stopping at p99 or the offline minimums); the figures are measured, the MLPerf validity is "
                     "recorded per row in bench.json.")
    lines.append("- Percentiles are LoadGen's; std and the CDF plot come from the SUT's own per-query timing.")
    lines.append("- Timings on a shared or busy machine are noisy: compare ratios measured in one run.")
    torch_engine = next((e for e in report["engines"] if e["backend"] == TORCH_BACKEND), None)
    if torch_engine is not None:
        lines.append(f"- PyTorch eager ran with {torch_engine['threads']} OpenMP thread(s); when other processes hold "
                     "the cores it degrades far more than the engines' thread pools. `--threads 1` compares "
                     "like for like.")
    if env.get("jetson"):
        j = env["jetson"]
        lines.append(f"- Jetson: {j.get('model')}; nvpmodel: {(j.get('nvpmodel') or {}).get('output', 'n/a')}")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines += [f"- Versions: {versions}", ""]
    if report.get("compare"):
        lines += ["## Compared with " + str(report["compare"]["old_path"]), "",
                  "Ratios new/old: latency below 1 and throughput above 1 mean faster now.", "",
                  format_compare(report["compare"]["rows"]), ""]
    lines += ["Plots: `plots/latency_cdf.png`, `plots/throughput_vs_batch.png`.", ""]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], out: Path) -> list[str]:
    """Latency CDF per backend/precision (one panel per layer) and throughput against batch size."""
    require("matplotlib", "bench plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    ss = find_rows(report["results"], scenario="single-stream")
    layers = [layer for layer in LAYERS if find_rows(ss, layer=layer)]
    if ss:
        fig, axes = plt.subplots(1, len(layers), figsize=(5.4 * len(layers), 5.0), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            for r in find_rows(ss, layer=layer):
                lat = np.sort(np.asarray(r["latencies_ms"]))
                if lat.size:
                    tokens = f" L={r['sequence_length']}" if r.get("sequence_length") else ""
                    ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post",
                            label=f"{r['backend']}/{r['precision']}{tokens} (p50 {r['p50_ms']:.1f} ms)")
            ax.set_title(f"SingleStream latency CDF: {layer}")
            ax.set_xlabel("latency per query (ms)")
            ax.set_ylabel("fraction of queries")
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        fig.tight_layout()
        fig.savefig(out / "plots" / "latency_cdf.png", dpi=110)
        plt.close(fig)
        written.append("plots/latency_cdf.png")
    off = find_rows(report["results"], scenario="offline")
    if off:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for backend, precision, length in dict.fromkeys((r["backend"], r["precision"], r.get("sequence_length"))
                                                        for r in off):
            rows = sorted(find_rows(off, backend=backend, precision=precision, sequence_length=length),
                          key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["throughput_sps"] or 0 for r in rows], marker="o",
                    label=f"{backend}/{precision}" + (f" L={length}" if length else ""))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["batch"] for r in off}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples / s (LoadGen Offline)")
        ax.set_ylim(bottom=0)
        layer = "engine" if off[0].get("sequence_length") else OFFLINE_LAYER
        ax.set_title(f"Offline throughput ({layer}) vs batch size")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "plots" / "throughput_vs_batch.png", dpi=110)
        plt.close(fig)
        written.append("plots/throughput_vs_batch.png")
    return written


def write_outputs(report: dict[str, Any], out: Path, plots: bool = True) -> None:
    """bench.json, bench.md and (``plots``) the plots in ``out``; their names go into ``report['outputs']``."""
    out.mkdir(parents=True, exist_ok=True)
    report["outputs"] = ["bench.json", "bench.md"] + (write_plots(report, out) if plots else [])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "bench.md").write_text(render_markdown(report))

