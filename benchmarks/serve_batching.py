"""Does dynamic batching in ``edgexfer device serve`` ever lose? Batched vs unbatched at two loads, two engines.

For each engine (``--engines``, default ONNX Runtime fp32 and OpenVINO int8 of the test bundle; the OpenVINO
int8 engine is made with ``edgexfer convert`` from ``data/clipart8-demo`` when the bundle has none), two real
``device serve`` processes on copies of one installed state: **batched** (``--max-batch 8
--max-queue-delay-ms 3``: the batcher chooses each batch's size from measured costs, runtime/service/batching.py)
and **unbatched** (``--max-batch 1``). 16 closed-loop clients (benchmarks/serve_load.py's: keep-alive
HTTP/1.1, alternating ``/v1/predict`` and ``/v2/.../infer``, one demo JPEG per request) at two loads:

* **quiet**: nothing started by the study (other jobs of the machine are recorded as the load average);
* **hog**: ``--hog`` busy-loop processes (default 2, one per core of a 2-core device) that the study starts
  before the load's slices and stops after them.

The study runs ``--rounds`` rounds of two load blocks (quiet then hog, then hog then quiet, ...). In a block,
engine by engine: ``--block-warmup`` unmeasured seconds of the batched server (the batcher learns the new
load), then ``--pairs`` pairs of slices, batched and unbatched back to back (their order flipped every pair),
each ``--slice-seconds`` measured after ``--warmup`` unmeasured seconds, so drift of the machine hits both alike.
The ratio batched / unbatched is given pooled (requests / seconds over all slices) and as the median of the
slice pairs (each pair measured back to back). Acceptance (issue 23): >= 0.95x under the hog, >= 1.4x quiet;
0 failed requests (exit status 1 otherwise).

Usage (the whole study with its defaults, ~4 minutes on 2 cores; the OpenVINO int8 conversion adds ~45 s once):
    python benchmarks/serve_batching.py --rounds 2 --pairs 3 --slice-seconds 3 --hog 2
Writes benchmarks/results/serve_batching.json and .md (CPU model, ISA flags, load averages, date).
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_load import Payloads, Server, cli, demo_images, drive, pooled, summarize  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "clipart8-demo"
#: where the study keeps the test bundle with its OpenVINO int8 engine between runs (conversion: ~45 s)
CONVERTED = REPO / "build" / "serve-batching-bundle"


def bundle_with(bundle: Path, engines: list[tuple[str, str]]) -> Path:
    """A bundle that has every engine asked for: ``bundle`` itself, or a converted copy kept in build/."""
    def missing(b: Path) -> list[tuple[str, str]]:
        have = {(e["backend"], e["precision"]) for e in json.loads((b / "manifest.json").read_text()).get("engines", [])}
        # the bundle's own backbone.onnx is its ONNX Runtime fp32 engine
        return [e for e in engines if e not in have and e != ("onnxruntime", "fp32")]

    if not missing(bundle):
        return bundle
    source_sha = json.loads((bundle / "manifest.json").read_text())["backbone"]["sha256"]
    if CONVERTED.exists():
        kept = json.loads((CONVERTED / "manifest.json").read_text())["backbone"]["sha256"]
        if kept != source_sha:
            shutil.rmtree(CONVERTED)
    if not CONVERTED.exists():
        shutil.copytree(bundle, CONVERTED)
    for backend, precision in missing(CONVERTED):
        print(f"converting {CONVERTED} to {backend} {precision} (calibration: {DEMO})", file=sys.stderr, flush=True)
        cli("convert", str(CONVERTED), "--to", backend, "--precision", precision, "--calib", str(DEMO),
            "--calib-size", "100", "--quiet", "--json")
    return CONVERTED


class Hog:
    """``n`` busy-loop processes (a CPU hog), started and stopped by the study."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


def batching_state(server: Server) -> dict:
    return server.json("GET", "/v1/status").get("batching", {})


def ratio_summary(batched: list[dict], unbatched: list[dict], a: dict, b: dict) -> dict:
    pairs = [x["throughput_req_s"] / y["throughput_req_s"] for x, y in zip(batched, unbatched)
             if y["throughput_req_s"]]
    return {"pooled": round(a["throughput_req_s"] / b["throughput_req_s"], 3),
            "median_of_slice_pairs": round(float(np.median(pairs)), 3) if pairs else None,
            "slice_pairs": [round(p, 3) for p in pairs]}


# long: one sequence of blocks, slices and servers whose cleanup must cover every exit
def run(args: argparse.Namespace) -> dict:
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.cpu import cpu_features

    engines = [tuple(e.split("/")) for e in args.engines.split(",")]
    bundle = bundle_with(Path(args.bundle).resolve(), engines)
    name = Bundle.open(bundle).manifest.name
    work = Path(tempfile.mkdtemp(prefix="serve-batching-"))
    configs = {"batched": ["--max-batch", str(args.max_batch), "--max-queue-delay-ms", str(args.max_queue_delay_ms)],
               "unbatched": ["--max-batch", "1"]}
    servers: dict[tuple[str, str], Server] = {}
    slices: dict[str, list[dict]] = {}
    loads = {"quiet": [], "hog": []}
    started = time.perf_counter()
    hog = None
    try:
        for backend, precision in engines:
            engine = f"{backend}/{precision}"
            template = work / engine.replace("/", "-") / "template" / "state"
            cli("device", "install", str(bundle), "--state", str(template), "--backend", backend,
                "--precision", precision, "--json")
            for config, extra in configs.items():
                state = template.parent.parent / config / "state"
                shutil.copytree(template, state, symlinks=True)
                servers[(engine, config)] = Server(state, f"{engine.replace('/', '-')}-{config}", "--backend", backend,
                                                   "--precision", precision, *extra)
        payloads = Payloads([p for _, p in demo_images()], name)
        executions = {}
        for (engine, _config), server in servers.items():  # warm: first calls, both endpoints
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            for k in range(8):
                payloads.send(conn, k % 2, k)
            conn.request("POST", "/v1/predict", body=payloads.v1[0])
            executions[engine] = json.loads(conn.getresponse().read())["execution"]
            conn.close()
        for r in range(args.rounds):
            for load in (("quiet", "hog") if r % 2 == 0 else ("hog", "quiet")):
                hog = Hog(args.hog) if load == "hog" else None
                try:
                    for engine in [f"{b}/{p}" for b, p in engines]:
                        # the batcher learns the new load before the block's pairs are measured
                        drive(servers[(engine, "batched")], payloads, args.clients, 0.0, args.block_warmup)
                        for k in range(args.pairs):
                            flip = (r + k) % 2 == 1
                            for config in (("unbatched", "batched") if flip else ("batched", "unbatched")):
                                key = f"{load}, {engine}, {config}"
                                summary = summarize(drive(servers[(engine, config)], payloads, args.clients,
                                                          args.slice_seconds, args.warmup))
                                summary["batching"] = batching_state(servers[(engine, config)])
                                loads[load].extend(summary["load_average_1m"])
                                slices.setdefault(key, []).append(summary)
                                print(f"round {r + 1}/{args.rounds} pair {k + 1} {key:36s} "
                                      f"{summary['throughput_req_s']:7.1f} req/s p99 {summary['p99_ms']:7.1f} ms  "
                                      f"mean batch {summary['batches']['mean_batch']}  "
                                      f"best {summary['batching'].get('best_batch')}  failed {summary['failed']}  "
                                      f"load {summary['load_average_1m']}", file=sys.stderr, flush=True)
                finally:
                    if hog is not None:
                        hog.stop()
                        hog = None
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    configurations = {k: pooled(v) for k, v in slices.items()}
    for v in slices.values():
        for x in v:
            x.pop("_latencies_ms", None)
    ratios = {}
    for load in ("quiet", "hog"):
        for backend, precision in engines:
            engine = f"{backend}/{precision}"
            a, b = f"{load}, {engine}, batched", f"{load}, {engine}, unbatched"
            ratios[f"{load}, {engine}"] = ratio_summary(slices[a], slices[b], configurations[a], configurations[b])
    cpu = cpu_features()
    failed = sum(c["failed"] for c in configurations.values())
    return {
        "date": datetime.date.today().isoformat(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": cpu.model, "isa_flags": list(cpu.flags), "cpu_description": cpu.describe(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": {k: [round(min(v), 2), round(max(v), 2)] for k, v in loads.items() if v},
        "bundle": str(bundle), "bundle_name": name, "execution": executions,
        "method": {"clients": args.clients, "rounds": args.rounds, "pairs_per_block": args.pairs,
                   "slice_s": args.slice_seconds, "warmup_per_slice_s": args.warmup,
                   "block_warmup_s": args.block_warmup, "hog_processes": args.hog,
                   "server_args": configs, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
        "configurations": configurations, "ratios": ratios, "slices": slices,
        "acceptance": {"hog": ">= 0.95x", "quiet": ">= 1.4x",
                       "met": {k: (v["pooled"] >= (0.95 if k.startswith("hog") else 1.4)) for k, v in ratios.items()}},
        "failed_requests_total": failed, "wall_seconds": round(time.perf_counter() - started, 1),
    }


def markdown(result: dict) -> str:
    lines = [f"# device serve: batched vs unbatched, {result['method']['clients']} clients ({result['utc']})", "",
             f"CPU: {result['cpu_description']}, {result['cpu_count']} CPUs. Bundle {result['bundle_name']}. "
             f"Load average (1 min) during the slices: quiet {result['load_average_1m'].get('quiet')}, "
             f"hog ({result['method']['hog_processes']} busy loops) {result['load_average_1m'].get('hog')}. "
             f"`{result['method']['command']}`", "",
             "| load | engine | batched req/s | unbatched req/s | ratio (pooled) | ratio (median of slice pairs) "
             "| mean batch | batched p99 ms | unbatched p99 ms | failed |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, r in result["ratios"].items():
        load, engine = key.split(", ")
        a = result["configurations"][f"{key}, batched"]
        b = result["configurations"][f"{key}, unbatched"]
        lines.append(f"| {load} | {engine} | {a['throughput_req_s']:.1f} | {b['throughput_req_s']:.1f} | "
                     f"**{r['pooled']:.2f}x** | {r['median_of_slice_pairs']:.2f}x | {a['mean_batch']} | {a['p99_ms']:.0f} | "
                     f"{b['p99_ms']:.0f} | {a['failed'] + b['failed']} |")
    met = ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["acceptance"]["met"].items())
    lines += ["", f"Acceptance (batched / unbatched, pooled): hog >= 0.95x, quiet >= 1.4x: {met}. "
              f"Failed requests: {result['failed_requests_total']}.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", nargs="?", default=str(REPO / "build" / "test-bundle"))
    ap.add_argument("--engines", default="onnxruntime/fp32,openvino/int8", help="backend/precision, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the two load blocks (quiet, hog; then hog, quiet)")
    ap.add_argument("--pairs", type=int, default=3, help="batched/unbatched slice pairs per engine in a load block")
    ap.add_argument("--slice-seconds", type=float, default=3.0, help="measured seconds of one slice")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds at the start of every slice")
    ap.add_argument("--block-warmup", type=float, default=4.0,
                    help="unmeasured seconds of the batched server at the start of a load block (it learns the load)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--hog", type=int, default=2, help="busy-loop processes of the loaded runs")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue-delay-ms", type=float, default=3.0)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_batching.json"))
    args = ap.parse_args()
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {out}, {out.with_suffix('.md')} in {result['wall_seconds']} s")
    if result["failed_requests_total"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
