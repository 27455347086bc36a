"""Shared vocabularies: head kinds, resize policies and training modes, defined once, imported by everything that checks them.

Pure data that imports nothing, so the command line can offer the choices without loading numpy. The
precisions are :data:`edgexfer.runtime.precision.PRECISIONS`; the backends are
:data:`edgexfer.runtime.backends.registry.BACKENDS`; the modalities :mod:`edgexfer.runtime.modalities`.
"""
from __future__ import annotations

#: head kind -> names of the tensors it is made of, in the order they are documented (runtime/heads.py)
HEAD_KINDS: dict[str, tuple[str, ...]] = {
    "linear": ("W", "b"),
    "mlp": ("W1", "b1", "W2", "b2"),
    "prototype": ("P", "scale"),
}

#: how ``device retrain`` fits a linear head (runtime/fewshot.py): "fewshot", "frozen" (rows of classes
#: without local samples keep the active head's values), "adapt" (after the inputs changed: stay near the
#: active head, the local samples weighed as much as the exemplars; runtime/retrain.py), or "auto" (the
#: default: fewshot while the classes learned on the device have few training samples, frozen from then on)
HEAD_POLICIES: tuple[str, ...] = ("auto", "fewshot", "frozen", "adapt")
DEFAULT_HEAD_POLICY = "auto"

#: how an image is fitted to the backbone's input (runtime/preprocess.py)
RESIZE_POLICIES: tuple[str, ...] = ("letterbox", "resize_shorter_then_center_crop")

#: `edgexfer train --mode`: frozen backbone, partial fine-tuning, or a cross-validated choice
TRAIN_MODES = ("frozen", "partial", "auto")

#: ``device serve`` / ``device watch``: a prediction goes to the review queue (runtime/review.py) for a person
#: to label when its top probability is below this many times chance, 1/C for a head of C classes
#: (:func:`edgexfer.runtime.review.review_threshold`); ``--review-threshold`` sets a fixed threshold instead
REVIEW_CHANCE_RATIO = 1.25
