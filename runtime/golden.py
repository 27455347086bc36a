"""Golden check of a bundle on this machine: its golden images through the chosen engine and head.

The bundle's modality reads its golden set (``Modality.golden_feed``): images as they are; texts with their
token ids and attention masks, which the device tokenizes again with the bundle's tokenizer.json and must
get the same ids (the ``tokenizers`` library here tokenizes as the host's did) before it runs them.

``edgexfer device install`` runs it with the engine it built or picked, before the bundle is activated;
``python -m edgexfer.runtime.golden BUNDLE_DIR`` runs it on a bundle alone (its recorded engines). The
features and the logits must match the reference outputs recorded at export (ONNX Runtime, fp32)
within the tolerance of the precision that ran.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.backends.registry import open_backend
from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.compare import TOLERANCES, Output, compare, tolerance_for
from edgexfer.runtime.errors import EdgexferError
from edgexfer.runtime.modalities import modality_of


def golden_check(bundle_dir: str | Path, backend: str = "auto", precision: str = "fp32") -> dict[str, Any]:
    """Figures of the check; raises :class:`ValidationError` listing every failed criterion."""
    from edgexfer.runtime.backends.registry import choose_backend

    started = time.perf_counter()
    bundle = Bundle.open(bundle_dir, verify=True)
    name = choose_backend(bundle, backend, precision)
    with open_backend(name, bundle.engine_file(name, precision), precision=precision) as engine:
        figures = compare_golden(bundle, engine, name, precision)
    figures["seconds"] = round(time.perf_counter() - started, 3)
    return figures


def compare_golden(bundle: Bundle, engine: EngineRunner, backend: str, precision: str) -> dict[str, Any]:
    """Run the golden images through ``engine`` and the bundle's head; compare with the reference outputs.

    The tolerance is that of the precision that ran (:mod:`edgexfer.runtime.compare`). The figures
    name this CPU's ISA and the one the engine was validated on at conversion: an engine validated on
    another kind of CPU is validated again here, on this one, before it serves.
    """
    golden = bundle.golden()
    features = engine.run(golden_inputs(bundle, golden))
    result = compare([Output("features", golden["features"], features),
                      Output("logits", golden["logits"], bundle.head().logits(features), classes=True)],
                     tolerance_for(precision), "golden")
    result.raise_if_failed(f"golden check of {bundle.root} on {backend}/{precision} failed",
                           todo="rebuild the engine for this device or re-export the bundle")
    execution = engine.execution
    validated = _validated_execution(bundle, backend, precision)
    return {"backend": backend, "precision": precision, "images": int(len(features)), "modality": bundle.modality,
            "max_abs_feature_diff": result.outputs["features"]["max_abs_diff"],
            "mean_cosine": result.outputs["features"]["mean_cosine"],
            "top1_agreement": result.outputs["logits"]["top1_agreement"],
            "tolerance": result.tolerance.to_dict(), "execution": execution,
            "validated_isa": validated.get("isa"),
            "revalidated_on_other_isa": bool(validated.get("isa")) and validated.get("isa") != execution["isa"]}


def golden_inputs(bundle: Bundle, golden: dict[str, Any]) -> Any:
    """The engine input of a bundle's golden set, as its modality reads it (a text's ids are re-tokenized and compared)."""
    return modality_of(bundle).golden_feed(golden)


def _validated_execution(bundle: Bundle, backend: str, precision: str) -> dict[str, Any]:
    """What the conversion validated this engine with (recorded in the manifest), or {}."""
    for entry in bundle.manifest.engines:
        if (entry.backend, entry.precision) == (backend, precision):
            return dict(entry.info.get("execution") or {})
    return {}


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
