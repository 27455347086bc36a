"""Load study of ``edgexfer device serve`` on loopback: closed-loop clients, with and without dynamic batching,
and a run during which a retrain and a signed head update switch the active head.

Two real ``device serve`` processes (each on its own copy of one installed device state):
  * ``batching``: ``--max-batch 8 --max-queue-delay-ms 3`` (the defaults of this script),
  * ``no-batching``: ``--max-batch 1`` (every request is one engine call).
N client threads (1 and 16) each keep one HTTP/1.1 keep-alive connection and send the next request as soon
as the answer arrives (closed loop). Every client alternates request by request between ``POST /v1/predict``
(the raw JPEG) and ``POST /v2/models/{name}/infer`` (the JPEG as a BYTES tensor in the binary extension,
bodies made and answers parsed by ``tritonclient.http``). A request fails on an exception, a status other
than 200, a missing ``X-Edgexfer-Head`` or an answer without a label. Each configuration runs
``--seconds`` in all, cut into ``--slices`` slices; the slices of the four configurations alternate (A1 B1
A16 B16, then B16 A16 B1 A1, ...) so that the load of other jobs on a shared machine hits them alike. Each
slice starts with ``--warmup`` seconds that are not measured (failures there still count). The batch-size
distribution comes from the server's ``/metrics`` (``edgexfer_batch_size``), its CPU time from /proc.

The switch run: a third server (batching) on a state where 24 demo images were learned beforehand
(``edgexfer device learn``), 16 clients for ``--switch-seconds``; at 30 % of it ``POST /v1/retrain`` (the gated
retrain, in the server's background; polled with ``GET /v1/retrain`` until its report), at 65 % ``edgexfer device
update`` in another process, from a loopback TUF repository (keys, ``heads init`` and ``heads publish`` of a
rescaled bundle head, as tests/fleet do it). Every response's head version is recorded; the run must have
zero failures, the head versions must appear in the order 1, retrain's, update's, and never go back for
any client.

Usage: python benchmarks/serve_load.py [BUNDLE] [--seconds 60] [--switch-seconds 60] [--slices 4]
Writes benchmarks/results/serve_load.json (figures), serve_load_switch_timeline.json (every request of the
switch run) and serve_load.png. Exit status 1 when a request failed or a switch check did not hold.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "clipart8-demo"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ENDPOINTS = ("v1/predict", "v2/infer")


# ---------------------------------------------------------------------------------------------- helpers
def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``edgexfer ARGS`` in another process of this interpreter."""
    out = subprocess.run([sys.executable, "-m", "edgexfer.cli", *args], capture_output=True, text=True, cwd=REPO)
    if check and out.returncode != 0:
        raise SystemExit(f"edgexfer {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def demo_images() -> list[tuple[str, Path]]:
    """(class, path) of every demo image, sorted."""
    return [(p.parent.name, p) for p in sorted(DEMO.rglob("*"))
            if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png")]


class Server:
    """A real ``edgexfer device serve --port 0`` process; its URL from the line it prints."""

    def __init__(self, state: Path, label: str, *args: str, timeout: float = 90.0) -> None:
        self.label, self.args = label, list(args)
        self.log = state.parent / f"serve-{label}.log"
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgexfer.cli", "device", "serve", "--state", str(state),
                                          "--port", "0", *args], stdout=sink, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(r"listening on http://([\d.]+):(\d+)/", self.log.read_text(errors="replace"))
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"device serve {label} did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def json(self, method: str, path: str, payload: object | None = None) -> dict:
        status, raw = self.request(method, path, json.dumps(payload).encode() if payload is not None else None)
        if status >= 300:
            raise SystemExit(f"{method} {path} on {self.label}: HTTP {status}: {raw[:500]!r}")
        return json.loads(raw)

    def metrics(self) -> str:
        return self.request("GET", "/metrics")[1].decode()

    def cpu_seconds(self) -> float:
        """user + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def batch_histogram(text: str) -> dict[str, float]:
    """Cumulative ``edgexfer_batch_size`` buckets {le: count}, plus ``_sum`` and ``_count``."""
    out = {}
    for m in re.finditer(r'^edgexfer_batch_size_bucket\{le="([^"]+)"\} ([\d.e+]+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    for key in ("sum", "count"):
        m = re.search(rf"^edgexfer_batch_size_{key} ([\d.e+]+)$", text, re.M)
        out["_" + key] = float(m.group(1)) if m else 0.0
    return out


def stage_totals(text: str) -> dict[str, float]:
    """``edgexfer_stage_duration_seconds`` sum and count per stage (decode per image; engine, head per batch)."""
    out = {}
    for m in re.finditer(r'^edgexfer_stage_duration_seconds_(sum|count)\{stage="(\w+)"\} ([\d.e+-]+)$', text, re.M):
        out[f"{m.group(2)}_{m.group(1)}"] = float(m.group(3))
    return out


def stage_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per stage call between two snapshots."""
    out = {}
    for stage in ("decode", "engine", "head"):
        n = after.get(f"{stage}_count", 0.0) - before.get(f"{stage}_count", 0.0)
        if n:
            out[f"{stage}_ms"] = round((after[f"{stage}_sum"] - before.get(f"{stage}_sum", 0.0)) / n * 1000, 3)
    return out


def batch_distribution(before: dict[str, float], after: dict[str, float]) -> dict:
    """Engine calls per batch-size range between two snapshots, and the mean batch size."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    edges = sorted((float(k), k) for k in diff if not k.startswith("_") and k != "+Inf")
    dist, low, prev = {}, 1, 0.0
    for value, key in edges:
        high = int(value)
        count = diff[key] - prev
        prev = diff[key]
        if high >= low:
            dist[str(low) if low == high else f"{low}-{high}"] = int(count)
        low = high + 1
    calls = diff.get("_count", 0.0)
    return {"engine_calls": int(calls), "images": int(diff.get("_sum", 0.0)),
            "mean_batch": round(diff["_sum"] / calls, 3) if calls else None,
            "calls_by_batch_size": {k: v for k, v in dist.items() if v}}


# ---------------------------------------------------------------------------------------------- requests
def connect(host: str, port: int) -> http.client.HTTPConnection:
    """A keep-alive connection with TCP_NODELAY, as load generators (perf_analyzer) use."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


class Payloads:
    """Prepared request bodies for both endpoints, one per demo image."""

    def __init__(self, images: list[Path], model: str) -> None:
        import tritonclient.http as triton

        self.triton = triton
        self.v1: list[bytes] = [p.read_bytes() for p in images]
        self.v2: list[tuple[bytes, dict]] = []
        for data in self.v1:
            tensor = triton.InferInput("image", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([data], dtype=object), binary_data=True)
            out = triton.InferRequestedOutput("label", binary_data=True)
            body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=[out])
            headers = {"Content-Type": "application/octet-stream"}
            if json_size is not None:
                headers["Inference-Header-Content-Length"] = str(json_size)
            self.v2.append((body, headers))
        self.v2_path = f"/v2/models/{model}/infer"

    def __len__(self) -> int:
        return len(self.v1)

    def send(self, conn: http.client.HTTPConnection, endpoint: int, i: int) -> int:
        """One request; returns the head version that answered, raises on any failure."""
        if endpoint == 0:
            conn.request("POST", "/v1/predict", body=self.v1[i], headers={"Content-Type": "image/jpeg"})
        else:
            body, headers = self.v2[i]
            conn.request("POST", self.v2_path, body=body, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {raw[:300]!r}")
        head = resp.getheader("X-Edgexfer-Head")
        if head is None:
            raise RuntimeError("no X-Edgexfer-Head in the answer")
        if endpoint == 0:
            doc = json.loads(raw)
            if doc["head"] != int(head) or not doc["results"][0]["label"]:
                raise RuntimeError(f"bad answer: {raw[:300]!r}")
        else:
            length = resp.getheader("Inference-Header-Content-Length")
            result = self.triton.InferenceServerClient.parse_response_body(
                raw, header_length=int(length) if length is not None else None)
            labels = result.as_numpy("label")
            if labels is None or len(labels) != 1 or not labels[0]:
                raise RuntimeError(f"bad answer: {raw[:300]!r}")
        return int(head)


def drive(server: Server, payloads: Payloads, clients: int, seconds: float, warmup: float,
          events: list[tuple[float, callable]] | None = None) -> dict:
    """``clients`` closed-loop threads for warmup + seconds; ``events``: (seconds after the window opens, fn)
    run in this thread during the run. Returns every request and the window's bounds."""
    records: list[list[tuple]] = [[] for _ in range(clients)]
    start = time.perf_counter()
    opens, stop_at = start + warmup, start + warmup + seconds
    step = max(1, len(payloads) // max(clients, 1))

    def client(idx: int) -> None:
        conn = connect(server.host, server.port)
        i, endpoint, rec = idx * step, idx % 2, records[idx]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            try:
                head, error = payloads.send(conn, endpoint, i % len(payloads)), None
            except Exception as exc:  # any exception is a failed request; a new connection for the next one
                head, error = None, f"{type(exc).__name__}: {exc}"[:300]
                conn.close()
                try:
                    conn = connect(server.host, server.port)
                except OSError:
                    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            rec.append((t0 - start, time.perf_counter() - t0, endpoint, head, error))
            i, endpoint = i + 1, 1 - endpoint
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, opens - time.perf_counter()))
    text = server.metrics()
    snapshot = {"batch": batch_histogram(text), "stages": stage_totals(text), "cpu": server.cpu_seconds(),
                "load": os.getloadavg()[0]}
    for at, fn in sorted(events or [], key=lambda e: e[0]):
        time.sleep(max(0.0, opens + at - time.perf_counter()))
        fn(time.perf_counter() - start)
    for t in threads:
        t.join()
    text = server.metrics()
    return {"records": records, "window": (warmup, warmup + seconds), "snapshot": snapshot,
            "end": {"batch": batch_histogram(text), "stages": stage_totals(text), "cpu": server.cpu_seconds(),
                    "load": os.getloadavg()[0]}}


def summarize(run: dict) -> dict:
    lo, hi = run["window"]
    flat = [r for rec in run["records"] for r in rec]
    failed = [r for r in flat if r[4] is not None]
    ok = [r for r in flat if r[4] is None and r[0] >= lo and r[0] + r[1] <= hi]
    lat = np.array([r[1] for r in ok]) * 1000
    seconds = hi - lo
    by_endpoint = {}
    for e, name in enumerate(ENDPOINTS):
        le = np.array([r[1] for r in ok if r[2] == e]) * 1000
        if len(le):
            by_endpoint[name] = {"requests": int(len(le)), "p50_ms": round(float(np.percentile(le, 50)), 2),
                                 "p99_ms": round(float(np.percentile(le, 99)), 2)}
    cpu = run["end"]["cpu"] - run["snapshot"]["cpu"]
    return {
        "seconds": round(seconds, 2), "requests": int(len(ok)), "requests_all": len(flat), "failed": len(failed),
        "failures": sorted({r[4] for r in failed})[:10],
        "throughput_req_s": round(len(ok) / seconds, 2), "throughput_images_s": round(len(ok) / seconds, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
        "p90_ms": round(float(np.percentile(lat, 90)), 2) if len(lat) else None,
        "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
        "mean_ms": round(float(lat.mean()), 2) if len(lat) else None,
        "by_endpoint": by_endpoint,
        "batches": batch_distribution(run["snapshot"]["batch"], run["end"]["batch"]),
        "stage_means": stage_means(run["snapshot"]["stages"], run["end"]["stages"]),
        "server_cpu_s": round(cpu, 2), "server_cpu_ms_per_request": round(cpu / len(ok) * 1000, 2) if ok else None,
        "load_average_1m": [round(run["snapshot"]["load"], 2), round(run["end"]["load"], 2)],
        "_latencies_ms": lat,
    }


def pooled(slices: list[dict]) -> dict:
    """One configuration over all its slices: latencies pooled, throughput = requests / seconds."""
    lat = np.concatenate([s["_latencies_ms"] for s in slices])
    seconds = sum(s["seconds"] for s in slices)
    requests = sum(s["requests"] for s in slices)
    calls = sum(s["batches"]["engine_calls"] for s in slices)
    images = sum(s["batches"]["images"] for s in slices)
    dist: dict[str, int] = {}
    for s in slices:
        for k, v in s["batches"]["calls_by_batch_size"].items():
            dist[k] = dist.get(k, 0) + v
    cpu = sum(s["server_cpu_s"] for s in slices)
    return {
        "seconds": round(seconds, 2), "requests": requests, "failed": sum(s["failed"] for s in slices),
        "throughput_req_s": round(requests / seconds, 2), "throughput_images_s": round(requests / seconds, 2),
        "throughput_per_slice": [s["throughput_req_s"] for s in slices],
        "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2), "mean_ms": round(float(lat.mean()), 2),
        "mean_batch": round(images / calls, 3) if calls else None,
        "stage_ms_median_of_slices": {k: round(float(np.median([s["stage_means"][k] for s in slices
                                                                 if k in s["stage_means"]])), 3)
                                      for k in ("decode_ms", "engine_ms", "head_ms")
                                      if any(k in s["stage_means"] for s in slices)},
        "calls_by_batch_size": dict(sorted(dist.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "server_cpu_ms_per_request": round(cpu / requests * 1000, 2) if requests else None,
    }


# ---------------------------------------------------------------------------------------------- the switch run
def variant_head(bundle_dir: Path, path: Path, scale: float = 1.02) -> Path:
    """The bundle's head with its weights rescaled: same decisions, another head (tests/fleet's variant_head)."""
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.heads import Head

    head = Bundle.open(bundle_dir).head()
    Head(head.kind, head.classes, {"W": (head.tensors["W"] * scale).astype(np.float32), "b": head.tensors["b"]},
         head.temperature).save(path)
    return path


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def switch_run(args, bundle: Path, template: Path, work: Path, payloads: Payloads, server_args: list[str]) -> dict:
    state = work / "switch" / "state"
    shutil.copytree(template, state, symlinks=True)
    learned = {}
    by_class: dict[str, list[Path]] = {}
    for label, path in demo_images():
        by_class.setdefault(label, []).append(path)
    for label in args.learn_classes.split(","):
        paths = by_class[label][: args.learn_per_class]
        cli("device", "learn", "--state", str(state), "--label", label, *map(str, paths), "--json")
        learned[label] = len(paths)
    # the update repository: offline root key, online keys, one published head for group "all"
    repo, keys = work / "switch" / "repo", work / "switch" / "keys"
    cli("heads", "keygen", "--out", str(work / "switch" / "offline" / "root.key"), "--json")
    init = json.loads(cli("heads", "init", "--repo", str(repo), "--keys", str(keys), "--root-key",
                          str(work / "switch" / "offline" / "root.key"), "--json").stdout)
    head_file = variant_head(bundle, work / "switch" / "published-head.safetensors")
    published = json.loads(cli("heads", "publish", str(head_file), "--repo", str(repo), "--keys", str(keys),
                               "--group", "all", "--bundle", str(bundle), "--json").stdout)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(repo)))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    repo_url = f"http://127.0.0.1:{httpd.server_address[1]}"

    events: dict = {}

    def retrain(at: float) -> None:
        events["retrain_post_s"] = round(at, 3)
        started = time.perf_counter()
        answer = server.json("POST", "/v1/retrain", {})
        while answer.get("state") == "running":
            time.sleep(0.1)
            answer = server.json("GET", "/v1/retrain")
        events["retrain_done_s"] = round(at + time.perf_counter() - started, 3)
        events["retrain"] = answer

    def update(at: float) -> None:
        events["update_start_s"] = round(at, 3)
        started = time.perf_counter()
        out = cli("device", "update", "--state", str(state), "--repo", repo_url, "--root", init["root"], "--json",
                  check=False)
        events["update_done_s"] = round(at + time.perf_counter() - started, 3)
        try:
            report = json.loads(out.stdout)
        except json.JSONDecodeError:
            report = {"status": "error", "returncode": out.returncode, "stderr": out.stderr[-2000:]}
        events["update"] = {k: report.get(k) for k in ("status", "active_head", "previous_head", "update_version",
                                                        "reason", "seconds", "returncode", "stderr") if k in report}

    server = Server(state, "switch", *server_args)
    try:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        for k in range(4):  # the first requests right after "listening on" (and warm the engine)
            payloads.send(conn, k % 2, k)
        conn.close()
        T = args.switch_seconds
        run = drive(server, payloads, args.switch_clients, T, args.warmup,
                    events=[(T * 0.30, retrain), (T * 0.65, update)])
    finally:
        server.stop()
        httpd.shutdown()
        httpd.server_close()
    summary = summarize(run)
    summary.pop("_latencies_ms")
    warm = run["window"][0]
    flat = sorted((r for rec in run["records"] for r in rec), key=lambda r: r[0] + r[1])
    first_seen = {}  # head version -> when its first answer arrived
    for r in flat:
        if r[3] is not None and r[3] not in first_seen:
            first_seen[r[3]] = round(r[0] + r[1] - warm, 3)
    heads_in_order = list(first_seen)  # in order of first appearance
    last_seen = {}
    for r in flat:
        if r[3] is not None:
            last_seen[r[3]] = round(r[0] + r[1] - warm, 3)
    went_back = sum(1 for rec in run["records"] for a, b in zip(rec, rec[1:])
                    if a[3] is not None and b[3] is not None and b[3] < a[3])
    retrain_report = (events.get("retrain") or {}).get("report") or {}
    expected = [1, retrain_report.get("active_head"), (events.get("update") or {}).get("active_head")]
    counts = {}
    for r in flat:
        if r[3] is not None:
            counts[str(r[3])] = counts.get(str(r[3]), 0) + 1
    checks = {
        "zero_failed_requests": summary["failed"] == 0,
        "retrain_accepted": bool(retrain_report.get("accepted")),
        "update_applied": (events.get("update") or {}).get("status") == "updated",
        "heads_first_seen_in_order_1_retrain_update": heads_in_order == expected,
        "no_client_saw_an_older_head_after_a_newer": went_back == 0,
    }

    def rel(key: str) -> float | None:
        return round(events[key] - warm, 3) if key in events else None

    timeline = [{"t": round(r[0] - warm, 4), "latency_ms": round(r[1] * 1000, 2), "endpoint": ENDPOINTS[r[2]],
                 "head": r[3], "error": r[4]} for r in sorted((r for rec in run["records"] for r in rec),
                                                               key=lambda r: r[0])]
    return {
        "clients": args.switch_clients, "server_args": server_args, "learned_before": learned,
        "published_head_version_in_repository": published["head_version"], "summary": summary,
        "events_s": {"retrain_post": rel("retrain_post_s"), "retrain_done": rel("retrain_done_s"),
                     "update_start": rel("update_start_s"), "update_done": rel("update_done_s")},
        "retrain": {k: retrain_report.get(k) for k in ("accepted", "version", "active_head", "reason", "seconds",
                                                        "holdout_count", "holdout_accuracy_new",
                                                        "holdout_accuracy_old", "policy", "gate")}
        | {"state": (events.get("retrain") or {}).get("state"), "error": (events.get("retrain") or {}).get("error")},
        "update": events.get("update"),
        "heads_in_order_of_first_answer": heads_in_order, "expected_heads": expected,
        "first_answer_s_by_head": first_seen, "last_answer_s_by_head": last_seen, "answers_by_head": counts,
        "client_head_regressions": went_back, "checks": checks, "passed": all(checks.values()),
        "_timeline": timeline,
    }


# ---------------------------------------------------------------------------------------------- plot
def plot(result: dict, timeline: list[dict], path: Path) -> None:
    from edgexfer.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    configs = result["configurations"]
    names = list(configs)
    colors = ["tab:blue" if "no-batching" not in n else "tab:orange" for n in names]
    ax = axes[0][0]
    ax.bar(range(len(names)), [configs[n]["throughput_req_s"] for n in names], color=colors)
    for i, n in enumerate(names):
        ax.plot([i] * len(configs[n]["throughput_per_slice"]), configs[n]["throughput_per_slice"], "k.", ms=5)
        ax.annotate(f"{configs[n]['throughput_req_s']:.0f}", (i, configs[n]["throughput_req_s"]), ha="center",
                    va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set_ylabel("requests/s (1 image each); dots: slices")
    ax.set_title("throughput", fontsize=10)
    ax = axes[0][1]
    x = np.arange(len(names))
    for off, key, hatch in ((-0.2, "p50_ms", ""), (0.2, "p99_ms", "//")):
        ax.bar(x + off, [configs[n][key] for n in names], 0.4, color=colors, hatch=hatch, edgecolor="k",
               label=key.replace("_ms", ""))
    ax.set_xticks(x, [n.replace(", ", "\n") for n in names], fontsize=8)
    ax.set_ylabel("latency per request (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("latency: p50 (plain), p99 (hatched)", fontsize=10)
    sw = result.get("switch")
    if sw is not None:
        t = np.array([r["t"] + r["latency_ms"] / 1000 for r in timeline if r["head"] is not None])
        h = np.array([r["head"] for r in timeline if r["head"] is not None])
        lat = np.array([r["latency_ms"] for r in timeline if r["head"] is not None])
        bad = [r["t"] for r in timeline if r["error"] is not None]
        for ax in axes[1]:
            for key, style, label in (("retrain_post", "g--", "POST /v1/retrain"), ("retrain_done", "g-", "retrain done"),
                                      ("update_start", "m--", "device update starts"),
                                      ("update_done", "m-", "device update done")):
                if sw["events_s"].get(key) is not None:
                    ax.axvline(sw["events_s"][key], color=style[0], linestyle=style[1:], label=label, lw=1)
            ax.set_xlabel("seconds into the measured window (negative: warm-up)")
        ax = axes[1][0]
        ax.plot(t, h, ".", ms=2, alpha=0.5)
        if bad:
            ax.plot(bad, [0.5] * len(bad), "rx", label="failed request")
        ax.set_yticks(sorted(set(h.tolist())))
        ax.set_ylabel("head version in the answer")
        ax.set_title(f"switch run: {sw['clients']} clients, {sw['summary']['failed']} failed of "
                     f"{sw['summary']['requests_all']}; heads {sw['heads_in_order_of_first_answer']}", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
        ax = axes[1][1]
        ax.plot(t, lat, ".", ms=1.5, alpha=0.3, color="grey")
        if len(t):
            edges = np.arange(np.floor(t.min()), np.ceil(t.max()) + 1)
            idx = np.digitize(t, edges)
            mids, p50, p99 = [], [], []
            for k in np.unique(idx):
                sel = lat[idx == k]
                if len(sel) >= 5:
                    mids.append(edges[k - 1] + 0.5)
                    p50.append(np.percentile(sel, 50))
                    p99.append(np.percentile(sel, 99))
            ax.plot(mids, p50, "b-", label="p50 per second")
            ax.plot(mids, p99, "r-", label="p99 per second")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title("switch run: latency over time", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(f"edgexfer device serve on loopback, {result['bundle_name']} on {result['backend']} "
                 f"({result['execution'].get('inference_precision')}), {result['date']}\n{result['cpu_description']}, "
                 f"{result['cpu_count']} CPUs, 1-min load average {result['load_average_1m_range'][0]}-"
                 f"{result['load_average_1m_range'][1]} during the runs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", nargs="?", default=str(REPO / "build" / "test-bundle"))
    ap.add_argument("--seconds", type=float, default=60.0, help="measured seconds per configuration (all slices)")
    ap.add_argument("--slices", type=int, default=4, help="slices per configuration, alternated with the others")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of every slice")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue-delay-ms", type=float, default=3.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--switch-seconds", type=float, default=None, help="default: --seconds; 0 skips the switch run")
    ap.add_argument("--switch-clients", type=int, default=16)
    ap.add_argument("--learn-classes", default="fruit,tools")
    ap.add_argument("--learn-per-class", type=int, default=12)
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_load.json"))
    args = ap.parse_args()
    if args.switch_seconds is None:
        args.switch_seconds = args.seconds
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.cpu import cpu_features

    bundle = Path(args.bundle).resolve()
    manifest = Bundle.open(bundle).manifest
    clients = [int(c) for c in args.clients.split(",")]
    cpu = cpu_features()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()[0]]
    started = time.perf_counter()
    engine = ["--backend", args.backend, "--precision", args.precision]
    configs = {"batching": [*engine, "--max-batch", str(args.max_batch), "--max-queue-delay-ms",
                            str(args.max_queue_delay_ms)],
               "no-batching": [*engine, "--max-batch", "1"]}
    servers: dict[str, Server] = {}
    try:
        template = work / "template" / "state"
        cli("device", "install", str(bundle), "--state", str(template), "--backend", args.backend, "--precision",
            args.precision, "--json")
        for name, server_args in configs.items():
            state = work / name / "state"
            shutil.copytree(template, state, symlinks=True)
            servers[name] = Server(state, name, *server_args)
        payloads = Payloads([p for _, p in demo_images()], manifest.name)
        # warm both (first engine calls, both endpoints) and read what the engine computes in
        first = {}
        for name, server in servers.items():
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            for k in range(8):
                payloads.send(conn, k % 2, k)
            conn.request("POST", "/v1/predict", body=payloads.v1[0])
            first[name] = json.loads(conn.getresponse().read())
            conn.close()
        execution = first["batching"]["execution"]
        backend = first["batching"]["results"][0].get("backend")
        order = [(name, n) for n in clients for name in configs]
        per_slice = args.seconds / args.slices
        slices: dict[str, list[dict]] = {}
        for s in range(args.slices):
            for name, n in (order if s % 2 == 0 else order[::-1]):
                key = f"{name}, {n} client{'s' if n > 1 else ''}"
                summary = summarize(drive(servers[name], payloads, n, per_slice, args.warmup))
                loads.append(os.getloadavg()[0])
                slices.setdefault(key, []).append(summary)
                print(f"slice {s + 1}/{args.slices} {key:26s} {summary['throughput_req_s']:7.1f} req/s  "
                      f"p50 {summary['p50_ms']:7.2f} ms  p99 {summary['p99_ms']:7.2f} ms  "
                      f"mean batch {summary['batches']['mean_batch']}  {summary['stage_means']}  failed {summary['failed']}  "
                      f"load {summary['load_average_1m']}", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    configurations = {k: pooled(v) for k, v in slices.items()}
    for v in slices.values():
        for s in v:
            s.pop("_latencies_ms")
    ratios = {}
    top = max(clients)
    for n in clients:
        suffix = f"{n} client{'s' if n > 1 else ''}"
        a, b = configurations.get(f"batching, {suffix}"), configurations.get(f"no-batching, {suffix}")
        if a and b:
            ratios[f"batching / no-batching throughput, {suffix}"] = round(a["throughput_req_s"] / b["throughput_req_s"], 3)
            ratios[f"batching / no-batching p99, {suffix}"] = round(a["p99_ms"] / b["p99_ms"], 3)
    for name in configs:
        one = configurations.get(f"{name}, 1 client")
        many = configurations.get(f"{name}, {top} clients")
        if one and many and top > 1:
            ratios[f"{name}: {top} clients / 1 client throughput"] = round(many["throughput_req_s"] / one["throughput_req_s"], 3)
    switch = None
    timeline: list[dict] = []
    if args.switch_seconds > 0:
        switch = switch_run(args, bundle, template, work, payloads, configs["batching"])
        timeline = switch.pop("_timeline")
        loads.append(os.getloadavg()[0])
    failed = sum(c["failed"] for c in configurations.values()) + (switch["summary"]["failed"] if switch else 0)
    result = {
        "date": datetime.date.today().isoformat(), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu_model": cpu.model, "isa_flags": list(cpu.flags), "cpu_description": cpu.describe(),
        "cpu_count": os.cpu_count(), "load_average_1m_range": [round(min(loads), 2), round(max(loads), 2)],
        "bundle": str(bundle), "bundle_name": manifest.name, "backend": backend, "precision": args.precision,
        "execution": execution,
        "method": {"clients": clients, "seconds_per_configuration": args.seconds, "slices": args.slices,
                   "warmup_per_slice_s": args.warmup, "endpoints": "each client alternates /v1/predict (raw JPEG) "
                   "and /v2/models/{name}/infer (BYTES tensor, binary extension, tritonclient bodies)",
                   "images": f"{len(payloads)} demo JPEGs of data/clipart8-demo, one per request",
                   "client": "threads in one Python process on the same machine, http.client keep-alive",
                   "server_args": configs},
        "configurations": configurations, "ratios": ratios, "slices": slices, "switch": switch,
        "failed_requests_total": failed, "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if switch is not None:
        out.with_name(out.stem + "_switch_timeline.json").write_text(
            json.dumps({"events_s": switch["events_s"], "requests": timeline}, separators=(",", ":")) + "\n")
    plot(result, timeline, out.with_suffix(".png"))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{cpu.describe()}, {os.cpu_count()} CPUs, {result['date']}; load average {result['load_average_1m_range']}")
    print(f"{'configuration':28s} {'req/s':>8s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'batch':>6s} {'failed':>6s}")
    for k, c in configurations.items():
        print(f"{k:28s} {c['throughput_req_s']:8.1f} {c['p50_ms']:8.2f} {c['p90_ms']:8.2f} {c['p99_ms']:8.2f} "
              f"{c['mean_batch'] or 0:6.2f} {c['failed']:6d}")
    for k, v in ratios.items():
        print(f"{k}: {v}")
    if switch is not None:
        print(f"switch run: {switch['summary']['requests_all']} requests, {switch['summary']['failed']} failed; "
              f"heads in order {switch['heads_in_order_of_first_answer']} (expected {switch['expected_heads']}); "
              f"events {switch['events_s']}; checks {switch['checks']}")
    print(f"wrote {out}, {out.with_suffix('.png')}")
    if failed or (switch is not None and not switch["passed"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
