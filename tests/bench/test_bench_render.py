"""bench.md (:mod:`edgexfer.bench.render`): the tables a person reads, from a tiny run's report."""
from __future__ import annotations

from edgexfer.bench import render_markdown


def test_markdown_lists_every_backend_and_precision_with_percentiles(tiny_report):
    report, out = tiny_report
    md = (out / "bench.md").read_text()
    assert "| backend | precision | computes in | p50 | p90 | p99 | throughput (samples/s) | at batch |" in md
    row = next(line for line in md.splitlines() if line.startswith("| onnxruntime | fp32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert all(c not in ("", "–") for c in cells), row
    assert cells[2] == "f32", row
    # where the figures come from: the CPU model, its ISA flags and the date, at the top
    cpu = report["environment"]["cpu"]
    header = md.split("## Backends side by side")[0]
    assert cpu["model"] in header and ", ".join(cpu["flags"]) in header, header
    assert report["created_utc"][:10] in header
    # a skipped engine's one-line reason (parts joined by " | ") stays inside its table cell
    skipped = {"backend": "openvino", "precision": "bf16", "reason": "bf16 execution | got CPU 'x' | expected avx512_bf16"}
    row = next(line for line in render_markdown({**report, "skipped": [skipped]}).splitlines()
               if line.startswith("| openvino | bf16 |"))
    assert len([c for c in row.replace("\\|", "").strip("|").split("|")]) == 8, row
