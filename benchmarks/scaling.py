"""Scaling study: wall time and peak RSS of every step of the pipeline against the number of images N.

For each N (small ~256x256 JPEGs and 3-MP photos 2048x1536, generated once by ``scaling_images.py`` into
``--workdir``), the real command line runs each step in its own process:

  train_cold   ``edgexfer train`` (frozen, the default) with an empty feature cache
  train_warm   the same again on the now filled cache (a new run directory)
  export       ``edgexfer export`` of the warm run
  install      ``edgexfer device install`` of that bundle on a fresh state (what learn needs)
  learn        ``edgexfer device learn`` of all N images, one label per call: all its files in one call through
               ``--from-list`` where learn has it, else (or with ``--call-size K``) calls of at most K files
  retrain      ``edgexfer device retrain``
  predict      ``edgexfer device predict`` of all N images, calls of at most ``--call-size`` (2,000) files

Peak RSS is the child's own ``ru_maxrss``: every command runs under a small ``python -c`` wrapper that waits
for that one child and reads ``getrusage(RUSAGE_CHILDREN)`` (a child forked straight from this process
could report this process's own high-water mark: Linux keeps the larger of the two across exec). For learn
and predict the figure is the largest of the calls, the time their sum. Results (JSON, PNG, Markdown) go to
``--out-dir`` as ``scaling-<date>[-quick].*``, rewritten after every N so a long run keeps what it measured.

    python benchmarks/scaling.py --sizes 500,2000,8000 --photo-sizes 200          # moderate
    python benchmarks/scaling.py --sizes 500,2000,8000,20000 --photo-sizes 200,800 # the full study
    python benchmarks/scaling.py --quick --workdir /tmp/sc --out-dir /tmp/sc/out   # smoke test (~1 min)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from scaling_images import CLASSES, class_counts, ensure_images  # noqa: E402
from scaling_report import summarise, write_markdown, write_plot  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: image kinds: (width, height) and the id that seeds their generation
KINDS = {"small": ((256, 256), 0), "photo": ((2048, 1536), 1)}
STEPS = ("train_cold", "train_warm", "export", "install", "learn", "retrain", "predict")
#: what each step needs to have succeeded first (run even when not asked for)
NEEDS = {"train_warm": "train_cold", "export": "train_cold", "install": "export", "learn": "install",
         "retrain": "learn", "predict": "install"}
DEFAULT_STEPS = "train_cold,train_warm,export,learn,retrain,predict"
#: files per call when they go on the command line (2,000 paths of ~80 bytes: well inside ARG_MAX)
MAX_ARGV_FILES = 2000

#: runs one command with stdout/stderr into files and prints its wall time and its own rusage (not ours)
WRAPPER = r"""
import json, resource, subprocess, sys, time
out, err, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.perf_counter()
with open(out, "wb") as o, open(err, "wb") as e:
    rc = subprocess.call(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
seconds = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc, "seconds": seconds, "peak_rss_kb": ru.ru_maxrss, "user_s": ru.ru_utime,
                  "sys_s": ru.ru_stime}))
"""


def _sizes(text: str) -> list[int]:
    return [int(v) for v in text.replace(" ", "").split(",") if v and int(v) > 0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--sizes", default=None, help="numbers of small (256x256) images (default 500,2000,8000,20000)")
    ap.add_argument("--photo-sizes", default=None, help="numbers of 3-MP photos (default 200,800; '' for none)")
    ap.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma list of {', '.join(STEPS)} (default: all but "
                    "install, which runs anyway when a later step needs it)")
    ap.add_argument("--workers", type=int, default=None, help="train --workers, and image generation processes")
    ap.add_argument("--call-size", type=int, default=None,
                    help="files per learn and predict call (default: learn one call per label through --from-list "
                         f"where learn has it, else {MAX_ARGV_FILES}; predict {MAX_ARGV_FILES})")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgexfer-scaling"),
                    help="images are generated here once and reused; runs, caches and states per N under runs/")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--name", default=None, help="file name stem of the results (default scaling-<date>[-quick])")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    ap.add_argument("--keep", action="store_true", help="keep each N's run directories (default: removed)")
    ap.add_argument("--resume", action="store_true",
                    help="add to the results of the same --name: sizes whose steps all succeeded there are skipped "
                         "(an interrupted study goes on where it stopped)")
    ap.add_argument("--quick", action="store_true", help="a tiny run for a smoke test: 40 small images, no photos")
    args = ap.parse_args(argv)
    quick = args.quick
    args.sizes = _sizes(args.sizes if args.sizes is not None else ("40" if quick else "500,2000,8000,20000"))
    args.photo_sizes = _sizes(args.photo_sizes if args.photo_sizes is not None else ("" if quick else "200,800"))
    args.steps = [s for s in args.steps.replace(" ", "").split(",") if s]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        ap.error(f"unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}")
    if args.call_size is not None and args.call_size < 1:
        ap.error("--call-size must be >= 1")
    args.name = args.name or f"scaling-{time.strftime('%Y-%m-%d')}" + ("-quick" if quick else "")
    return args


def needed_steps(requested: list[str]) -> list[str]:
    """The requested steps and everything they need, in pipeline order."""
    need = set(requested)
    for step in requested:
        while step in NEEDS:
            step = NEEDS[step]
            need.add(step)
    return [s for s in STEPS if s in need]


def cli_command() -> list[str]:
    """The installed ``edgexfer`` console script beside this interpreter, else the same entry point."""
    script = Path(sys.executable).with_name("edgexfer")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from edgexfer.cli import main; sys.exit(main())"]


def measure(cmd: list[str], logs: Path, name: str) -> dict[str, Any]:
    """Run ``cmd`` in its own process under WRAPPER: wall seconds, peak RSS (MB), CPU seconds, load, rc,
    and the command's stdout parsed as JSON when it is JSON."""
    logs.mkdir(parents=True, exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    load_before = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", WRAPPER, str(out), str(err), *cmd],
                          capture_output=True, text=True, check=True)
    m = json.loads(done.stdout.strip().splitlines()[-1])
    record = {"seconds": round(m["seconds"], 3), "peak_rss_mb": round(m["peak_rss_kb"] / 1024, 1),
              "cpu_s": round(m["user_s"] + m["sys_s"], 2), "rc": m["rc"],
              "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    try:
        record["output"] = json.loads(out.read_text())
    except (json.JSONDecodeError, OSError):
        record["output"] = None
    if m["rc"] != 0:
        record["error"] = err.read_text(errors="replace").strip()[-800:]
    return record


def learn_takes_list(cli: list[str]) -> bool:
    """Whether this edgexfer's ``device learn`` reads paths from a file (``--from-list``)."""
    done = subprocess.run([*cli, "device", "learn", "--help"], capture_output=True, text=True)
    return "--from-list" in done.stdout


def make_set(root: Path, images: dict[str, list[Path]], n: int) -> dict[str, list[Path]]:
    """An ImageFolder tree of the first ``n`` generated images (hard links, else copies)."""
    files = {}
    for name, count in class_counts(n).items():
        folder = root / name
        folder.mkdir(parents=True)
        files[name] = []
        for src in images[name][:count]:
            dst = folder / src.name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
            files[name].append(dst)
    return files


def call_sizes(asked: int | None, from_list: bool) -> tuple[int | None, int]:
    """Files per learn call (None: all of a label's in one) and per predict call."""
    if asked is not None:
        return asked, asked if asked <= MAX_ARGV_FILES else MAX_ARGV_FILES
    return (None if from_list else MAX_ARGV_FILES), MAX_ARGV_FILES


def _chunks(items: list[Path], size: int | None) -> list[list[Path]]:
    size = size or max(len(items), 1)
    return [items[i:i + size] for i in range(0, len(items), size)]


def run_calls(calls: list[tuple[list[str], int]], logs: Path, name: str) -> dict[str, Any]:
    """Several commands as one step: summed time, largest peak RSS, every call's own figures."""
    records = []
    for i, (cmd, files) in enumerate(calls):
        r = measure(cmd, logs, f"{name}-{i}")
        r["files"] = files
        records.append(r)
        if r["rc"] != 0:
            break
    step = {"seconds": round(sum(r["seconds"] for r in records), 3),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in records),
            "cpu_s": round(sum(r["cpu_s"] for r in records), 2),
            "rc": next((r["rc"] for r in records if r["rc"] != 0), 0),
            "load_before": records[0]["load_before"], "load_after": records[-1]["load_after"],
            "calls": [{k: r[k] for k in ("files", "seconds", "peak_rss_mb", "rc")} for r in records],
            "outputs": [r["output"] for r in records]}
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        step["error"] = errors[0]
    return step


class SizeRun:
    """The steps for one image kind at one N, in a fresh directory (caches and states never carry over)."""

    def __init__(self, kind: str, n: int, images: dict[str, list[Path]], args: argparse.Namespace, cli: list[str],
                 from_list: bool):
        self.kind, self.n, self.args, self.cli, self.from_list = kind, n, args, cli, from_list
        self.learn_size, self.predict_size = call_sizes(args.call_size, from_list)
        self.work = args.workdir / "runs" / args.name / f"{kind}-{n}"  # studies of other names may share workdir
        if self.work.exists():
            shutil.rmtree(self.work)
        self.files = make_set(self.work / "data", images, n)
        self.logs = self.work / "logs"
        self.cache = self.work / "features.sqlite"
        self.state = self.work / "state"

    def train(self, out: str) -> dict[str, Any]:
        cmd = [*self.cli, "train", str(self.work / "data"), "--out", str(self.work / out), "--cache", str(self.cache),
               "--json", "--quiet"]
        if self.args.workers:
            cmd += ["--workers", str(self.args.workers)]
        return measure(cmd, self.logs, out)

    def step(self, name: str) -> dict[str, Any]:
        """Run step ``name`` (its command lines) and return its figures."""
        cli, work, state = self.cli, self.work, str(self.state)
        if name == "train_cold":
            return self.train("run-cold")
        if name == "train_warm":
            return self.train("run-warm")
        if name == "export":
            run = work / ("run-warm" if (work / "run-warm" / "run.json").is_file() else "run-cold")
            return measure([*cli, "export", str(run), "--out", str(work / "bundle"), "--json", "--quiet"],
                           self.logs, "export")
        if name == "install":
            return measure([*cli, "device", "install", str(work / "bundle"), "--state", state, "--backend",
                            "onnxruntime", "--json"], self.logs, "install")
        if name == "learn":
            calls = []
            for label, paths in self.files.items():
                for chunk in _chunks(paths, self.learn_size):
                    cmd = [*cli, "device", "learn", "--label", label, "--state", state, "--backend", "onnxruntime",
                           "--json"]
                    if self.from_list:
                        listing = self.logs / f"learn-{label}-{len(calls)}.txt"
                        listing.write_text("".join(f"{p}\n" for p in chunk))
                        cmd += ["--from-list", str(listing)]
                    else:
                        cmd += [str(p) for p in chunk]
                    calls.append((cmd, len(chunk)))
            return run_calls(calls, self.logs, "learn")
        if name == "retrain":
            return measure([*cli, "device", "retrain", "--state", state, "--json"], self.logs, "retrain")
        if name == "predict":
            every = [p for paths in self.files.values() for p in paths]
            calls = [([*cli, "device", "predict", "--state", state, "--backend", "onnxruntime", "--top-k", "1",
                       "--json", *map(str, chunk)], len(chunk)) for chunk in _chunks(every, self.predict_size)]
            return run_calls(calls, self.logs, "predict")
        raise ValueError(name)

    def run(self, steps: list[str], requested: list[str]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        for name in steps:
            dep = NEEDS.get(name)
            if dep and results.get(dep, {}).get("rc") != 0:
                results[name] = {"skipped": f"{dep} did not succeed"}
                continue
            started = time.strftime("%H:%M:%S")
            r = self.step(name)
            r["facts"] = facts(name, r, self.files)
            r.pop("output", None)
            r.pop("outputs", None)
            r["requested"] = name in requested
            r["started"] = started
            results[name] = r
            status = "ok" if r["rc"] == 0 else f"FAILED rc={r['rc']}: {r.get('error', '')[-300:]}"
            print(f"[{self.kind} N={self.n}] {name:<10} {r['seconds']:8.1f} s {r['peak_rss_mb']:8.0f} MB "
                  f"(load {r['load_before']:.1f} -> {r['load_after']:.1f}) {status}", file=sys.stderr, flush=True)
        return results

    def data_bytes(self) -> int:
        return sum(p.stat().st_size for paths in self.files.values() for p in paths)


def facts(name: str, r: dict[str, Any], files: dict[str, list[Path]]) -> dict[str, Any]:
    """What the command said about its work (counts that show whether the backbone ran, what was kept)."""
    out = r.get("output")
    if name.startswith("train") and isinstance(out, dict):
        keys = ("images_decoded", "backbone_images_run", "features_from_cache", "val_accuracy", "train_count",
                "val_count", "seconds")
        return {k: out[k] for k in keys if k in out}
    if name == "export" and isinstance(out, dict):
        p = out.get("parity", {})
        return {k: p[k] for k in ("count", "max_abs_diff", "top1_agreement") if k in p}
    if name == "retrain" and isinstance(out, dict):
        return {k: out[k] for k in ("accepted", "version", "train_count", "exemplar_count", "seconds") if k in out}
    if name == "learn":  # every whole-number field of the reports, summed over the calls
        summed: dict[str, int] = {}
        for o in r.get("outputs") or []:
            for k, v in (o or {}).items():
                if isinstance(v, int) and not isinstance(v, bool) and k not in ("augment", "capacity"):
                    summed[k] = summed.get(k, 0) + v
        return summed
    if name == "predict":
        truth = {str(p): label for label, paths in files.items() for p in paths}
        results = [x for o in r.get("outputs") or [] if o for x in o.get("results", [])]
        right = sum(1 for x in results if x.get("label") is not None and truth.get(x.get("source")) == x["label"])
        return {"predicted": len(results), "accuracy": round(right / len(results), 4) if results else None}
    return {}


def environment() -> dict[str, Any]:
    from edgexfer import __version__
    from edgexfer.runtime.cpu import cpu_features

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    mem = next((line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), "0")
    return {"cpu": cpu_features().to_dict(), "cpu_count": os.cpu_count(), "mem_total_gb": round(int(mem) / 2**20, 1),
            "edgexfer": __version__, "commit": commit, "python": sys.version.split()[0]}


def write_results(doc: dict[str, Any], args: argparse.Namespace) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    doc["summary"] = summarise(doc)
    stem = args.out_dir / args.name
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_plot(doc, Path(f"{stem}.png"))
    write_markdown(doc, Path(f"{stem}.md"))


def _done(doc: dict[str, Any], steps: list[str]) -> set[tuple[str, int]]:
    """(kind, N) of the runs in ``doc`` whose ``steps`` all succeeded; failed runs are dropped from ``doc``."""
    ok = [r for r in doc["runs"] if all(r["steps"].get(s, {}).get("rc") == 0 for s in steps)]
    doc["runs"] = ok
    return {(r["kind"], r["n"]) for r in ok}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli = cli_command()
    steps = needed_steps(args.steps)
    from_list = learn_takes_list(cli)
    env = environment()
    previous = args.out_dir / f"{args.name}.json"
    if args.resume and previous.is_file():
        doc = json.loads(previous.read_text())
        done = _done(doc, steps)
        doc.setdefault("resumed", []).append({"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                              "command": " ".join(sys.argv), "commit": env["commit"],
                                              "load": [round(v, 2) for v in os.getloadavg()]})
    else:
        doc, done = new_doc(args, env, steps, from_list), set()
    for kind, sizes in (("small", args.sizes), ("photo", args.photo_sizes)):
        sizes = [n for n in sizes if (kind, n) not in done]
        if not sizes:
            continue
        (w, h), kind_id = KINDS[kind]
        started = time.perf_counter()
        per_class = max(class_counts(max(sizes)).values())
        images = ensure_images(args.workdir / "images" / f"{kind}-{w}x{h}-s{args.seed}", per_class, (w, h),
                               seed=args.seed, kind_id=kind_id, workers=args.workers or 2)
        doc["images"][kind] = {"size": [w, h], "generated_or_checked_s": round(time.perf_counter() - started, 1)}
        for n in sizes:
            run = SizeRun(kind, n, images, args, cli, from_list)
            entry = {"kind": kind, "n": n, "image_size": [w, h], "data_mb": round(run.data_bytes() / 2**20, 1),
                     "commit": env["commit"], "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "steps": run.run(steps, args.steps)}
            doc["runs"] = sorted([*doc["runs"], entry], key=lambda r: (list(KINDS).index(r["kind"]), r["n"]))
            if not args.keep:
                shutil.rmtree(run.work, ignore_errors=True)
            doc["utc_end"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            doc["load_end"] = [round(v, 2) for v in os.getloadavg()]
            write_results(doc, args)
    print(f"results: {args.out_dir / args.name}.{{json,png,md}}", file=sys.stderr)


def new_doc(args: argparse.Namespace, env: dict[str, Any], steps: list[str], from_list: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "edgexfer.scaling/1", "date": time.strftime("%Y-%m-%d"),
        "utc_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
        **env, "load_start": [round(v, 2) for v in os.getloadavg()], "steps": steps,
        "requested": args.steps, "workers": args.workers, "learn_from_list": from_list,
        "learn_call_size": call_sizes(args.call_size, from_list)[0], "predict_call_size": call_sizes(args.call_size,
                                                                                                       from_list)[1],
        "classes": list(CLASSES), "runs": [], "images": {},
    }
    doc["wrapper_floor_mb"] = measure([sys.executable, "-c", "pass"], args.workdir / "logs", "floor")["peak_rss_mb"]
    return doc


if __name__ == "__main__":
    main()
