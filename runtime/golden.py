"""Golden check of a bundle on this machine: its golden images through the chosen engine and head.

Run before a bundle is activated (``edgexfer flash`` runs it on the target as
``python -m edgexfer.runtime.golden BUNDLE_DIR --json``): the features and the top-1 labels must match
the reference outputs recorded at export (ONNX Runtime, fp32) within the precision's tolerance.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.backends.base import open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import EdgexferError, ValidationError

#: precision -> (max |feature difference| allowed, minimum top-1 agreement with the golden logits).
#: fp32 engines compute the same graph as the reference; reduced precisions may flip a borderline image.
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-3, 1.0), "fp16": (5e-2, 0.875), "int8": (float("inf"), 0.75)}


def golden_check(bundle_dir: str | Path, backend: str = "auto", precision: str = "fp32") -> dict[str, Any]:
    """Figures of the check; raises :class:`ValidationError` listing every failed criterion."""
    from edgexfer.runtime.device import choose_backend

    started = time.perf_counter()
    bundle = Bundle.open(bundle_dir, verify=True)
    name = choose_backend(bundle, backend, precision)
    golden = bundle.golden()
    engine = open_backend(name, bundle.engine_file(name, precision), precision=precision)
    try:
        feats = engine.run(golden["images"])
    finally:
        engine.close()
    logits = bundle.head().logits(feats)
    feature_diff = float(np.max(np.abs(feats - golden["features"])))
    agreement = float(np.mean(logits.argmax(1) == golden["logits"].argmax(1)))
    max_diff, min_agreement = TOLERANCES[precision]
    failures = []
    if not feature_diff <= max_diff:
        failures.append(f"features: max diff = {feature_diff:.3g} (atol {max_diff:g})")
    if agreement < min_agreement:
        failures.append(f"top-1 agreement = {agreement:.3f} (minimum {min_agreement:g})")
    figures = {"backend": name, "precision": precision, "images": int(len(feats)), "max_abs_feature_diff": feature_diff,
               "top1_agreement": agreement, "seconds": round(time.perf_counter() - started, 3)}
    if failures:
        raise ValidationError(f"golden check of {bundle.root} on {name}/{precision} failed", failures,
                              todo="rebuild the engine for this device or re-export the bundle")
    return figures


def main(argv: list[str] | None = None) -> int:
    """``python -m edgexfer.runtime.golden BUNDLE_DIR [--backend B] [--precision P]``: one JSON line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgexfer.runtime.golden")
    parser.add_argument("bundle_dir")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--precision", default="fp32", choices=sorted(TOLERANCES))
    args = parser.parse_args(argv)
    try:
        print(json.dumps({"ok": True, **golden_check(args.bundle_dir, args.backend, args.precision)}))
        return 0
    except EdgexferError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1


if __name__ == "__main__":
    sys.exit(main())
