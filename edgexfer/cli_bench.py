"""``edgexfer bench``: the click command. Registered in :mod:`edgexfer.cli` with ``main.add_command(bench)``.

Heavy modules (LoadGen, engines, matplotlib, torch) are imported inside the command only, so ``--help``
and every other command work without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgexfer.cli_options import json_option, quiet_option
from edgexfer.runtime.backends.registry import BACKENDS
from edgexfer.runtime.precision import PRECISIONS

_DEFAULT_BATCHES = "1,2,4,8,16"


@click.command(name="bench")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--backend", "backends", default="all", show_default=True,
              help=f"all, or a comma-separated list of {', '.join(BACKENDS)}, pytorch-eager.")
@click.option("--precision", "precisions", default="all", show_default=True,
              help=f"all, or a comma-separated list of {', '.join(PRECISIONS)}. With all, an engine this CPU "
                   "cannot compute in (bf16 without avx512_bf16/amx_bf16) is skipped with the reason; named, "
                   "it is an error.")
@click.option("--scenario", "scenarios", default="single-stream,offline", show_default=True,
              help="LoadGen scenarios: single-stream (latency), offline (throughput).")
@click.option("--batch", "batches", default=_DEFAULT_BATCHES, show_default=True,
              help="Batch sizes of the Offline throughput sweep.")
@click.option("--layer", "layers", default="all", show_default=True,
              help="all, or a comma-separated list of engine, engine_head, end_to_end.")
@click.option("--min-duration", "min_duration", type=float, default=2.0, show_default=True,
              help="LoadGen minimum duration per test, seconds (short default; --mlperf for 600 s).")
@click.option("--min-queries", "min_queries", type=int, default=64, show_default=True,
              help="LoadGen minimum query count (SingleStream) / sample count (Offline).")
@click.option("--mlperf", is_flag=True,
              help="MLPerf Inference minimums: 600 s, 1024 queries, 24576 offline samples (overrides the two above).")
@click.option("--threads", type=int, default=None, help="Engine threads (default: each engine's own default).")
@click.option("--images", type=click.Path(path_type=Path), default=None,
              help="Folder of images for the samples (default: the bundle's golden images, JPEG-encoded).")
@click.option("--no-torch", is_flag=True, help="Leave out the PyTorch eager reference.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path("bench-out"), show_default=True,
              help="Directory for bench.json, bench.md, plots/ and LoadGen logs.")
@click.option("--compare", type=click.Path(path_type=Path), default=None,
              help="An earlier bench.json: print new/old ratios.")
@json_option
@quiet_option
def bench(bundle_dir, backends, precisions, scenarios, batches, layers, min_duration, min_queries, mlperf, threads,
          images, no_torch, out, compare, as_json, quiet):
    """Latency and throughput of every engine in a bundle, side by side (MLPerf LoadGen)."""
    from edgexfer.bench import render_markdown, run_bench

    report = run_bench(bundle_dir, backends=backends, precisions=precisions, scenarios=scenarios, batches=batches,
                       min_duration_s=min_duration, min_queries=min_queries, threads=threads, out_dir=out,
                       compare=compare, progress=not quiet, layers=layers, images=images,
                       torch_reference=False if no_torch else None, mlperf=mlperf)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(render_markdown(report))  # includes the --compare ratios when given
    click.echo(f"written: {', '.join(str(Path(out) / name) for name in report['outputs'])}", err=True)
