"""Features of every clipart8 image (and K augmented views of each) from the real backbone, for the few-shot study.

Trains a frozen run on clipart8 with ``edgexfer.train.train`` and exports it (``edgexfer.export.export``):
in frozen mode the backbone is the pretrained one whatever classes the run was trained on, so one
bundle serves every old/new class split of ``benchmarks/fewshot_curves.py``; the bundle's head for a
split is refitted there from the old classes' training features, as ``train`` fits it. Features come
from the runtime engine (ONNX Runtime, fp32), as ``Device.learn`` computes them; augmented views are
made with :class:`edgexfer.runtime.augment.Augmenter` at the settings ``device learn --augment`` uses.
Usage: python benchmarks/fewshot_features.py [CLIPART8_DIR] [--views 4] [--out build/fewshot/features.npz]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=str(REPO.parent / "shared" / "datasets" / "clipart8"))
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--work", default=str(REPO / "build" / "fewshot"))
    args = ap.parse_args()
    from edgexfer.export import export
    from edgexfer.runtime.augment import AUGMENT_SETTINGS, Augmenter
    from edgexfer.runtime.backends.registry import open_backend
    from edgexfer.runtime.bundle import Bundle
    from edgexfer.runtime.preprocess import decode_image, resize_to_spec, stack
    from edgexfer.train import TrainConfig, train

    work = Path(args.work)
    bundle_dir = work / "bundle"
    if not (bundle_dir / "manifest.json").is_file():
        train(TrainConfig(data_dir=Path(args.data), out=work / "run", cache=work / "host.sqlite", progress=False))
        export(work / "run", bundle_dir, progress=False)
    bundle = Bundle.open(bundle_dir)
    spec = bundle.preprocess
    aug = Augmenter(spec, **AUGMENT_SETTINGS)
    classes = sorted(p.name for p in Path(args.data).iterdir() if p.is_dir())
    blobs, labels, names = [], [], []
    seen = set()
    for c, cls in enumerate(classes):
        for f in sorted((Path(args.data) / cls).iterdir()):
            data = f.read_bytes()
            sha = hashlib.sha256(data).hexdigest()
            if sha in seen:  # the cache keeps one sample per content, and so does the study
                continue
            seen.add(sha)
            blobs.append(data)
            labels.append(c)
            names.append(f"{cls}/{f.name}")
    feats, views = [], []
    with open_backend("onnxruntime", bundle.engine_file("onnxruntime", "fp32")) as engine:
        for start in range(0, len(blobs), 16):
            imgs = [decode_image(b, fill=spec.fill) for b in blobs[start:start + 16]]
            feats.append(engine.run(stack([resize_to_spec(im, spec) for im in imgs])))
            if args.views:
                batch = []
                for j, im in enumerate(imgs):
                    rng = np.random.default_rng([start + j, 7])
                    batch += [aug(im, rng) for _ in range(args.views)]
                views.append(engine.run(stack(batch)).reshape(len(imgs), args.views, -1))
            print(f"{start + len(imgs)}/{len(blobs)}", file=sys.stderr, flush=True)
    np.savez(work / "features.npz", X=np.concatenate(feats).astype(np.float16),
             V=np.concatenate(views).astype(np.float16) if views else np.zeros((len(blobs), 0, 1), np.float16),
             y=np.array(labels), classes=np.array(classes), names=np.array(names))


if __name__ == "__main__":
    main()
