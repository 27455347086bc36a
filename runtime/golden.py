"""Golden check of a bundle on this machine: its golden images through the chosen engine and head.

``edgexfer device install`` runs it with the engine it built or picked, before the bundle is activated;
``python -m edgexfer.runtime.golden BUNDLE_DIR`` runs it on a bundle alone (its recorded engines). The
features and the top-1 labels must match the reference outputs recorded at export (ONNX Runtime, fp32)
within the precision's tolerance.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.backends.base import EngineRunner, open_backend
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
    with open_backend(name, bundle.engine_file(name, precision), precision=precision) as engine:
        figures = compare_golden(bundle, engine, name, precision)
    figures["seconds"] = round(time.perf_counter() - started, 3)
    return figures


def compare_golden(bundle: Bundle, engine: EngineRunner, backend: str, precision: str) -> dict[str, Any]:
    """Run the golden images through ``engine`` and the bundle's head; compare with the reference outputs."""
    golden = bundle.golden()
    features = engine.run(golden["images"])
    logits = bundle.head().logits(features)
    feature_diff = float(np.max(np.abs(features - golden["features"])))
    agreement = float(np.mean(logits.argmax(1) == golden["logits"].argmax(1)))
    max_diff, min_agreement = TOLERANCES[precision]
    failures = []
    if not feature_diff <= max_diff:
        failures.append(f"features: max diff = {feature_diff:.3g} (atol {max_diff:g})")
    if agreement < min_agreement:
        failures.append(f"top-1 agreement = {agreement:.3f} (minimum {min_agreement:g})")
    if failures:
        raise ValidationError(f"golden check of {bundle.root} on {backend}/{precision} failed", failures,
                              todo="rebuild the engine for this device or re-export the bundle")
    return {"backend": backend, "precision": precision, "images": int(len(features)),
            "max_abs_feature_diff": feature_diff, "top1_agreement": agreement}


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
