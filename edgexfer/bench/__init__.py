"""``edgexfer bench``: MLPerf-style latency and throughput of every engine in a bundle, side by side.

Scenarios are driven by MLPerf's LoadGen (``mlperf_loadgen``): SingleStream (one query in flight, batch 1:
latency percentiles) and Offline (all samples at once, processed in batches: throughput). Three layers are
measured separately, so a person can see where time goes:

``engine``      the bare engine call, ``EngineRunner.run(uint8 batch) -> features``
``engine_head`` engine + numpy head, through the :class:`~edgexfer.runtime.predictor.Predictor` wrapper
``end_to_end``  ``Predictor.predict([encoded image bytes])``: decode, resize, engine, head, top-k

Setup costs (engine load/compile, first inference) are reported apart, never mixed into the percentiles.
Every backend x precision the bundle has is measured in one run, plus a PyTorch eager twin of the backbone
when torch is installed (host only). The engine part imports no torch.

Outputs in ``out_dir``: ``bench.json`` (schema ``edgexfer.bench/1``, documented in docs/benchmarks.md),
``bench.md``, ``plots/latency_cdf.png``, ``plots/throughput_vs_batch.png`` and LoadGen's own logs under
``loadgen/``.

Modules, in the order a run uses them:

``plan``         settings and the backend x precision targets (from the backend registry), skipped ones
``runners``      opening a target: the registry's engines, the PyTorch eager twin (an ``EngineRunner`` too)
``samples``      the preloaded sample images
``loadgen``      driving LoadGen: test settings, SingleStream, Offline, its detail log
``measure``      the bench's own timing: latency statistics, head overhead, engines interleaved
``environment``  the machine and software a figure was measured on
``report``       the report as records (``to_dict``, the schema ``validate_report`` checks), summary, compare
``schema``       records -> JSON and JSON Schema
``render``       bench.md and the plots
``run``          :func:`run_bench`: one run, start to finish
"""
from __future__ import annotations

from edgexfer.bench.environment import capture_environment, cpu_line
from edgexfer.bench.render import render_markdown
from edgexfer.bench.report import SCHEMA, validate_report
from edgexfer.bench.run import run_bench

__all__ = ["SCHEMA", "capture_environment", "cpu_line", "render_markdown", "run_bench", "validate_report"]
