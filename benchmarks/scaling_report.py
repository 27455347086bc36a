"""Fits, acceptance checks, plot and Markdown table of ``benchmarks/scaling.py``'s results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: the issue's targets (issue 28): train under 2 GB at 20,000 small images and at 800 3-MP photos, cold and
#: warm; one learn call of 2,000 files under 1 GB
TRAIN_LIMIT_MB = 2048
TRAIN_TARGET_N = {"small": 20000, "photo": 800}
LEARN_LIMIT_MB = 1024
LEARN_TARGET_FILES = 2000
#: "flat" memory: the peak at the largest N at most this times the peak at the smallest
FLAT_RATIO = 1.25
#: "linear" time: CPU seconds grow at most like N**LINEAR_EXPONENT from the smallest to the largest N (CPU
#: seconds, not wall: on a shared machine a step gets 40-95 % of the cores, depending on the other jobs)
LINEAR_EXPONENT = 1.15
KIND_TITLES = {"small": "small images (256x256 JPEG)", "photo": "3-MP photos (2048x1536 JPEG)"}


def _points(doc: dict[str, Any], kind: str, step: str) -> list[tuple[int, float, float, float]]:
    """(N, wall seconds, peak RSS MB, CPU seconds) of every successful run of ``step`` on ``kind``."""
    pts = []
    for run in doc["runs"]:
        r = run["steps"].get(step, {})
        if run["kind"] == kind and r.get("rc") == 0:
            pts.append((run["n"], r["seconds"], r["peak_rss_mb"], r["cpu_s"]))
    return sorted(pts)


def _affine(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float | None]:
    """Least-squares y = a + b x: (a, b, r²); r² is None with two points (a line fits any two)."""
    b, a = np.polyfit(x, y, 1)
    if len(x) < 3:
        return float(a), float(b), None
    resid = y - (a + b * x)
    total = float(((y - y.mean()) ** 2).sum())
    return float(a), float(b), (1.0 - float((resid ** 2).sum()) / total) if total > 0 else 1.0


def fit(points: list[tuple[int, float, float, float]]) -> dict[str, Any]:
    """Wall time, CPU time and peak RSS against N: affine fits (fixed + per image) and log-log exponents
    between the smallest and the largest N; the verdicts ``time_linear`` (CPU) and ``memory_flat``."""
    n = np.array([p[0] for p in points], dtype=float)
    t, m, c = (np.array([p[k] for p in points], dtype=float) for k in (1, 2, 3))
    out: dict[str, Any] = {"n": [int(v) for v in n], "seconds": t.tolist(), "peak_rss_mb": m.tolist(),
                           "cpu_s": c.tolist()}
    if len(points) < 2:
        return out
    ta, tb, tr2 = _affine(n, t)
    ca, cb, _ = _affine(n, c)
    ma, mb, _ = _affine(n, m)
    span = np.log(n[-1] / n[0])
    out.update({
        "time_fixed_s": round(ta, 2), "time_ms_per_image": round(tb * 1e3, 3),
        "time_r2": None if tr2 is None else round(tr2, 4),
        "time_exponent": round(float(np.log(t[-1] / t[0]) / span), 3),
        "cpu_fixed_s": round(ca, 2), "cpu_ms_per_image": round(cb * 1e3, 3),
        "cpu_exponent": round(float(np.log(max(c[-1], 1e-3) / max(c[0], 1e-3)) / span), 3),
        "rss_fixed_mb": round(ma, 1), "rss_mb_per_1k_images": round(mb * 1e3, 2),
        "rss_exponent": round(float(np.log(m[-1] / m[0]) / span), 3),
        "rss_ratio_max_min": round(float(m[-1] / m[0]), 3),
    })
    out["time_linear"] = bool(out["cpu_exponent"] <= LINEAR_EXPONENT)
    out["memory_flat"] = bool(out["rss_ratio_max_min"] <= FLAT_RATIO)
    return out


def acceptance(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's memory targets, checked at the largest N measured (``at_target`` says whether it is theirs)."""
    checks = []
    kinds = sorted({run["kind"] for run in doc["runs"]})
    for kind in kinds:
        for step in ("train_cold", "train_warm"):
            pts = _points(doc, kind, step)
            if pts:
                n, _, peak, _ = pts[-1]
                checks.append({"check": f"{step} peak RSS < {TRAIN_LIMIT_MB} MB ({kind})", "n": n, "value_mb": peak,
                               "passed": peak < TRAIN_LIMIT_MB, "at_target": n >= TRAIN_TARGET_N[kind]})
    calls = [(c["files"], c["peak_rss_mb"], run["kind"]) for run in doc["runs"]
             for c in run["steps"].get("learn", {}).get("calls", []) if c.get("rc") == 0]
    if calls:
        files, peak, kind = max(calls, key=lambda c: (c[0], c[1]))
        checks.append({"check": f"one learn call peak RSS < {LEARN_LIMIT_MB} MB", "files": files, "kind": kind,
                       "value_mb": peak, "passed": peak < LEARN_LIMIT_MB, "at_target": files >= LEARN_TARGET_FILES})
        worst = max(calls, key=lambda c: c[1])
        if worst[1] != peak:
            checks.append({"check": f"every learn call peak RSS < {LEARN_LIMIT_MB} MB (the largest peak)",
                           "files": worst[0], "kind": worst[2], "value_mb": worst[1],
                           "passed": worst[1] < LEARN_LIMIT_MB, "at_target": True})
    return checks


def summarise(doc: dict[str, Any]) -> dict[str, Any]:
    kinds = sorted({run["kind"] for run in doc["runs"]}, key=["small", "photo"].index)
    fits = {kind: {step: fit(_points(doc, kind, step)) for step in doc["steps"] if _points(doc, kind, step)}
            for kind in kinds}
    return {"fits": fits, "acceptance": acceptance(doc)}


def describe(doc: dict[str, Any]) -> tuple[str, str]:
    """CPU (model and ISA flags), then load and date: the lines every figure carries."""
    cpu = doc["cpu"]
    return (f"{cpu['model']} ({cpu['machine']}: {' '.join(cpu['flags'])}), {doc['cpu_count']} cores, "
            f"{doc['mem_total_gb']} GB",
            f"load (1 min) {doc['load_start'][0]} at start, {doc.get('load_end', ['?'])[0]} at end; "
            f"{doc['utc_start'][:16].replace('T', ' ')}-{doc.get('utc_end', '?')[11:16]} UTC; "
            f"edgexfer {doc['edgexfer']} @ {doc['commit']}")


def write_plot(doc: dict[str, Any], path: Path) -> Path:
    from edgexfer.plots import _pyplot

    plt = _pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    kinds = list(doc["summary"]["fits"])
    fig, axes = plt.subplots(3, max(len(kinds), 1), figsize=(6.5 * max(len(kinds), 1), 12), squeeze=False)
    for col, kind in enumerate(kinds):
        ax_t, ax_c, ax_m = axes[0][col], axes[1][col], axes[2][col]
        for step, f in doc["summary"]["fits"][kind].items():
            if step not in doc["requested"]:
                continue
            ax_t.plot(f["n"], f["seconds"], marker="o", label=step)
            ax_c.plot(f["n"], f["cpu_s"], marker="o", label=step)
            ax_m.plot(f["n"], f["peak_rss_mb"], marker="o", label=step)
        ax_m.axhline(TRAIN_LIMIT_MB, color="tab:red", ls="--", lw=1, label=f"train target {TRAIN_LIMIT_MB} MB")
        ax_m.axhline(LEARN_LIMIT_MB, color="tab:gray", ls=":", lw=1, label=f"learn-call target {LEARN_LIMIT_MB} MB")
        for ax, ylabel in ((ax_t, "wall time (s), log"), (ax_c, "CPU time, user + sys (s), log"),
                           (ax_m, "peak RSS (MB), largest call")):
            ax.set_xscale("log")
            if ax is not ax_m:
                ax.set_yscale("log")
            ax.set_xticks(doc_sizes(doc, kind))
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(f"N ({KIND_TITLES[kind].split(' (')[0]})")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
        ax_m.set_ylim(0, max(TRAIN_LIMIT_MB * 1.1, ax_m.get_ylim()[1]))
        ax_t.set_title(KIND_TITLES[kind])
    handles, labels = axes[2][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncols=5, fontsize=8)
    cpu_line, run_line = describe(doc)
    fig.suptitle(f"edgexfer scaling study, {doc['date']}: time and peak RSS per step against N\n{cpu_line}\n"
                 f"{run_line}; 2 shared cores: wall times depend on other jobs' load", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _per_call(doc: dict[str, Any], step: str) -> str:
    size = doc.get(f"{step}_call_size", doc.get("call_size"))
    how = " (--from-list)" if step == "learn" and doc.get("learn_from_list") and not size else ""
    return f"at most {size:,}" if size else f"all of a label's in one call{how}"


def doc_sizes(doc: dict[str, Any], kind: str) -> list[int]:
    return sorted({run["n"] for run in doc["runs"] if run["kind"] == kind})


def _cell(r: dict[str, Any] | None) -> str:
    if not r:
        return ""
    if "skipped" in r:
        return "skipped"
    if r["rc"] != 0:
        return f"FAILED (rc {r['rc']})"
    return f"{r['seconds']:.1f} s / {r['peak_rss_mb']:.0f} MB"


def write_markdown(doc: dict[str, Any], path: Path) -> Path:
    """One table per image kind, the fits, the learn/predict calls and the acceptance lines."""
    steps = doc["steps"]
    lines = [f"# edgexfer scaling study, {doc['date']}", "", "Machine: {}; {}.".format(*describe(doc)), "",
             f"Command: `{doc['command']}`", "",
             "Each step is its own process (the real CLI). Cells: wall time / peak RSS (the process's own "
             "`ru_maxrss`; learn and predict: time summed over their calls, RSS of the largest call; files per "
             f"call: learn {_per_call(doc, 'learn')}, predict {_per_call(doc, 'predict')}). Wrapper floor: {doc['wrapper_floor_mb']} MB. Times on "
             "a shared machine are noisy (load above); memory figures do not depend on load.", ""]
    for r in doc.get("resumed", []):
        lines += [f"Resumed {r['utc'][:16].replace('T', ' ')} UTC at {r['commit']} (load {r['load'][0]}): "
                  f"`{r['command']}`", ""]
    for kind in doc["summary"]["fits"]:
        lines += [f"## {KIND_TITLES[kind]}", "", "| N | data MB | " + " | ".join(steps) + " |",
                  "|---:|---:|" + "---:|" * len(steps)]
        for run in (r for r in doc["runs"] if r["kind"] == kind):
            lines.append(f"| {run['n']:,} | {run['data_mb']:.0f} | "
                         + " | ".join(_cell(run["steps"].get(s)) for s in steps) + " |")
        if not any("time_exponent" in f for f in doc["summary"]["fits"][kind].values()):
            lines.append("")
            continue
        lines += ["", "Fits over N (t = fixed + per image × N; exponent: log-log slope from the smallest to the "
                      f"largest N). Time linear: CPU exponent ≤ {LINEAR_EXPONENT}; memory flat: peak at the largest N "
                      f"≤ {FLAT_RATIO} × the smallest's.", "",
                  "| step | wall: fixed s | wall: ms per image | wall exponent | CPU: ms per image | CPU exponent | "
                  "RSS at N min → max (MB) | MB per 1,000 images | time linear | memory flat |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
        for step, f in doc["summary"]["fits"][kind].items():
            if "time_exponent" not in f:
                continue
            lines.append(f"| {step} | {f['time_fixed_s']} | {f['time_ms_per_image']} | {f['time_exponent']} | "
                         f"{f['cpu_ms_per_image']} | {f['cpu_exponent']} | "
                         f"{f['peak_rss_mb'][0]:.0f} → {f['peak_rss_mb'][-1]:.0f} | {f['rss_mb_per_1k_images']} | "
                         f"{'yes' if f['time_linear'] else 'NO'} | {'yes' if f['memory_flat'] else 'NO'} |")
        lines.append("")
    calls = [(run["kind"], run["n"], step, c) for run in doc["runs"] for step in ("learn", "predict")
             for c in run["steps"].get(step, {}).get("calls", [])]
    if calls:
        lines += ["## learn and predict calls (files per call → peak RSS)", "",
                  "| kind | N | step | calls | files per call | peak RSS per call (MB) | s per call |",
                  "|---|---:|---|---:|---|---|---|"]
        for kind in doc["summary"]["fits"]:
            for run in (r for r in doc["runs"] if r["kind"] == kind):
                for step in ("learn", "predict"):
                    cs = run["steps"].get(step, {}).get("calls", [])
                    if cs:
                        lines.append(f"| {kind} | {run['n']:,} | {step} | {len(cs)} | "
                                     f"{', '.join(str(c['files']) for c in cs)} | "
                                     f"{', '.join(format(c['peak_rss_mb'], '.0f') for c in cs)} | "
                                     f"{', '.join(format(c['seconds'], '.1f') for c in cs)} |")
        lines.append("")
    lines += ["## Acceptance (issue 28)", ""]
    for c in doc["summary"]["acceptance"]:
        where = f"N = {c['n']:,}" if "n" in c else f"{c['files']:,} files ({c['kind']})"
        target = "" if c["at_target"] else " (below the target size: not yet the acceptance figure)"
        lines.append(f"- {c['check']}: {c['value_mb']:.0f} MB at {where} — "
                     f"{'pass' if c['passed'] else 'FAIL'}{target}")
    path.write_text("\n".join(lines) + "\n")
    return path
