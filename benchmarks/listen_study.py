"""``device listen`` on seeded 60 s recordings (issue 26 acceptance 3; docs/audio.md "Listening"): words found,
false detections a minute and how many recordings meet the acceptance, per seed.

    python benchmarks/listen_study.py STATE SEEDS [--any] [--set NAME=VALUE ...] [--json OUT]

STATE: a device state with the test audio bundle installed (spoken14 without "zero"); SEEDS: e.g. 1-10 or
101,102. Without --any the recordings hold only clips the device gets right when it hears them alone (of the
first 6 of each word), as the test's; --set overrides a ListenOptions field (e.g. --set shift=0).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "device"))
from listen_support import RATE, build_recording, score  # noqa: E402


def seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def usable_clips(state: Path, test: Path, words: list[str]) -> set[str]:
    from edgexfer.runtime.device import Device

    files = [f for w in words for f in sorted((test / w).glob("*.wav"))[:6]]
    with Device(state) as dev:
        alone = dev.predict(files, top_k=1)
    return {str(f) for f, r in zip(files, alone) if getattr(r, "label", None) == f.parent.name}


def main() -> None:
    import soundfile as sf

    from edgexfer.runtime.listen import listen

    ap = argparse.ArgumentParser()
    ap.add_argument("state", type=Path)
    ap.add_argument("seeds", type=seeds)
    ap.add_argument("--any", action="store_true", help="any test clip, the head's mistakes included")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--spoken14", type=Path, default=REPO.parent / "shared" / "datasets" / "spoken14")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    options = {k: float(v) for k, _, v in (s.partition("=") for s in args.set)}
    test = args.spoken14 / "test"
    words = sorted(p.name for p in test.iterdir() if p.is_dir() and p.name != "zero")
    usable = None if args.any else usable_clips(args.state, test, words)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            audio, placed = build_recording(test, words, seed, usable=usable)
            wav = Path(tmp) / f"{seed}.wav"
            sf.write(str(wav), audio, RATE, subtype="PCM_16")
            t = time.monotonic()
            run = listen(args.state, wav, review_max=0, **options)
            detections = [d.to_dict() for d in run]
            found, false, notes = score(detections, placed, len(audio) / RATE)
            ok = found >= 0.9 and false <= 1.0
            rows.append({"seed": seed, "found": round(found, 3), "words": len(placed), "false_per_minute": false,
                         "ok": ok, "seconds": round(time.monotonic() - t, 2), "notes": notes})
            print(f"seed {seed}: {round(found * len(placed))}/{len(placed)} found, {false:.0f} false/min"
                  f"{'' if ok else '  (FAILS)'}  {rows[-1]['seconds']} s", flush=True)
            if args.verbose:
                print("   ", "\n    ".join(notes))
    n = len(rows)
    f = [r["found"] for r in rows]
    fp = [r["false_per_minute"] for r in rows]
    print(f"{'any clip' if args.any else 'clips right alone'} {options or 'defaults'}: found {sum(f) / n:.3f} "
          f"({min(f):.3f}-{max(f):.3f}), false {sum(fp) / n:.1f}/min ({min(fp):.0f}-{max(fp):.0f}), "
          f"{sum(r['ok'] for r in rows)} of {n} within acceptance 3")
    if args.json:
        args.json.write_text(json.dumps({"options": options, "any": args.any, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
