"""Calibration and held-out validation images for a conversion, read from ``--calib DATA_DIR``.

The bundle does not know its training data (``run.json`` stays in the run directory), so every
image a conversion needs comes from an ImageFolder tree given by the user: one sub-folder per class,
named like the head's classes. Labels come from those folder names; folders the head does not know
are ignored (and reported). Images go through :mod:`edgexfer.runtime.preprocess`, exactly as at
inference time.

The tree is split once, seeded and stratified by class: ``calib_size`` images calibrate the
quantizer (and steer the int8 sensitivity search); the rest are held out and used only to validate
the finished engine, so the figures a user reads were not used to tune the engine. Calibration inputs
are read at once (``calib_size`` of them: the quantizers read them all); held-out ones are read batch
by batch while validation runs (:class:`HeldOut`), so any number of them fits in memory.

A text bundle takes text data instead (a folder of ``.txt`` files per class, or a CSV/JSONL file of
``text,label``, read by :mod:`edgexfer.runtime.textdata`), split the same way and tokenized by the
bundle's own tokenizer (:mod:`edgexfer.runtime.text`): the engine inputs are then one
:class:`~edgexfer.runtime.text.TokenBatch`, padded to its longest text; :func:`take` gives rows of
either kind, each text batch trimmed to its own longest text.
"""
from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgexfer.runtime.bundle import Bundle
from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.imagefolder import class_files, class_folders
from edgexfer.runtime.modalities import modality_of
from edgexfer.runtime.preprocess import PreprocessSpec, load_image
from edgexfer.runtime.text import TextTokenizer, TokenBatch

#: what an engine reads: uint8 pixels [N, H, W, 3], or the token ids and mask of N texts
EngineInputs = np.ndarray | TokenBatch

#: at least this share of the images (and at least MIN_HOLDOUT images) is always held out
MIN_HOLDOUT_FRACTION = 0.2
MIN_HOLDOUT = 8


def take(inputs: EngineInputs, index: slice | np.ndarray | list[int]) -> EngineInputs:
    """Some rows of engine inputs: pixel rows, or texts' token rows trimmed to their own longest text."""
    return inputs.rows(index) if isinstance(inputs, TokenBatch) else inputs[index]


def inputs_digest(inputs: EngineInputs) -> str:
    """sha256 naming exactly these engine inputs (keys of in-process caches)."""
    if isinstance(inputs, TokenBatch):
        h = hashlib.sha256(b"tokens")
        for array in (inputs.input_ids, inputs.attention_mask):
            h.update(repr(array.shape).encode())
            h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return h.hexdigest()
    return hashlib.sha256(np.ascontiguousarray(inputs).tobytes()).hexdigest()


def single_feeds(inputs: EngineInputs, input_name: str) -> list[dict[str, np.ndarray]]:
    """One feed (input name -> array) per row: what calibration readers hand to the model, one sample each.

    ``input_name`` names a single-input model's input (from the model: ``image`` for an image backbone); a
    token batch carries its own names."""
    if isinstance(inputs, TokenBatch):
        return [inputs.rows(slice(i, i + 1)).feed() for i in range(len(inputs))]
    return [{input_name: inputs[i:i + 1]} for i in range(len(inputs))]


@dataclass(frozen=True)
class LabelledImages:
    """Engine inputs with their class index in the head's class list: preprocessed ``uint8[N, H, W, 3]``
    pixels, or (text bundles) the :class:`~edgexfer.runtime.text.TokenBatch` of N texts."""

    pixels: EngineInputs
    labels: np.ndarray
    paths: tuple[str, ...]  #: files (texts: their source, e.g. ``file.csv:line 3``)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, count: int) -> LabelledImages:
        """The first ``count`` images (the split already interleaves classes, so this stays balanced)."""
        return LabelledImages(take(self.pixels, slice(0, count)), self.labels[:count], self.paths[:count])


class HeldOut:
    """Labelled samples held out of calibration, read batch by batch when validation asks for them: memory
    holds one batch of engine inputs, whatever the number of samples (at 100,000 images, their pixels
    would take 15 GB). A file that no longer reads is skipped then, and listed in :attr:`skipped`."""

    def __init__(self, labels: np.ndarray, paths: tuple[str, ...], key: str, order: np.ndarray | None = None):
        self.labels, self.paths, self.key = labels, paths, key  #: key: sha256 naming the samples and preprocessing
        self.order = np.arange(len(labels)) if order is None else order  #: the order batches take them in
        self.skipped: dict[str, str] = {}  #: path -> why it could not be read

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int = 16) -> Iterator[tuple[np.ndarray, EngineInputs]]:
        """``(positions, engine inputs)`` of at most ``size`` samples at a time; positions index :attr:`labels`."""
        for start in range(0, len(self.order), size):
            positions, inputs = self.read(self.order[start:start + size])
            if len(positions):
                yield positions, inputs

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, EngineInputs]:
        """The engine inputs of the samples at ``positions`` that can be read, and their positions."""
        raise NotImplementedError


class HeldOutImages(HeldOut):
    """Held-out images: decoded and resized for the bundle, a batch at a time."""

    def __init__(self, labels: np.ndarray, paths: tuple[str, ...], key: str, spec: PreprocessSpec):
        super().__init__(labels, paths, key)
        self.spec = spec

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.spec.size
        pixels = np.empty((len(positions), h, w, 3), np.uint8)  # filled in place: no list of images, then a copy
        kept: list[int] = []
        for pos in positions:
            try:
                pixels[len(kept)] = load_image(self.paths[pos], self.spec)
            except InputError as exc:
                self.skipped[self.paths[pos]] = str(exc.got)
                continue
            kept.append(pos)
        return np.array(kept, dtype=np.int64), pixels[:len(kept)]


class HeldOutTexts(HeldOut):
    """Held-out texts: tokenized a batch at a time, texts of similar length together (a batch pads to its longest)."""

    def __init__(self, labels: np.ndarray, paths: tuple[str, ...], key: str, texts: list[str],
                 tokenizer: TextTokenizer):
        super().__init__(labels, paths, key, order=np.argsort([len(t) for t in texts], kind="stable"))
        self.texts, self.tokenizer = texts, tokenizer

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, TokenBatch]:
        return positions, self.tokenizer.encode([self.texts[i] for i in positions])


@dataclass(frozen=True)
class CalibrationSplit:
    calibration: LabelledImages
    holdout: HeldOut
    #: sha256 over the chosen files' contents and the split parameters (part of the reuse key)
    fingerprint: str
    ignored_folders: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def describe(self) -> dict:
        """The split as reports record it (after validation: held-out files that did not read are counted out)."""
        skipped = [*self.skipped, *self.holdout.skipped.items()]
        return {"calibration_images": len(self.calibration),
                "holdout_images": len(self.holdout) - len(self.holdout.skipped),
                "ignored_folders": list(self.ignored_folders),
                "skipped": [{"path": p, "reason": r} for p, r in skipped]}


def scan_calibration_files(calib_dir: str | Path, classes: tuple[str, ...]) -> tuple[list[tuple[Path, int]], list[str]]:
    """(path, class index) for every image under folders named like the head's classes; sorted."""
    root = Path(calib_dir)
    if not root.is_dir():
        raise DataError("calibration data directory", got=f"{root} is not a directory",
                        expected="an ImageFolder tree (one sub-folder per class)",
                        todo="pass --calib DATA_DIR with folders named like the bundle's classes")
    folders = class_folders(root)
    known = [name for name in folders if name in classes]
    if not known:
        raise DataError("no folder of the calibration data is a class of the bundle's head",
                        got=", ".join(folders) or "no folders", expected=f"folders named like {', '.join(classes)}",
                        todo="pass --calib with the data the head was trained for")
    files: list[tuple[Path, int]] = []
    for name in known:
        label = classes.index(name)
        files.extend((path, label) for path in class_files(root / name)[0])
    return files, [name for name in folders if name not in classes]


def load_calibration(bundle: Bundle, calib_dir: str | Path, calib_size: int, *, val_size: int | None = None,
                     seed: int = 0) -> CalibrationSplit:
    """Read, deduplicate, split and preprocess the images of ``calib_dir`` for ``bundle``.

    Identical files count once; a file filed under two classes is dropped (its label is unknown).
    ``val_size`` caps the number of held-out images (None: all of them).
    """
    if isinstance(calib_size, bool) or not isinstance(calib_size, int) or calib_size < 1:
        raise InputError("--calib-size", got=repr(calib_size), expected="a positive number of images",
                         todo="use e.g. 300")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 1):
        raise InputError("validation size", got=repr(val_size), expected="a positive number of images or None")
    modality = modality_of(bundle)
    if not modality.calibration_loader:
        raise DataError(f"int8 calibration of {modality.plural}", got=f"a {modality.name} bundle",
                        expected="a modality with a calibration reader", todo="convert to fp32 or fp16")
    module, _, name = modality.calibration_loader.partition(":")
    loader = getattr(importlib.import_module(module), name)
    return loader(bundle, calib_dir, calib_size, val_size=val_size, seed=seed)


def load_image_calibration(bundle: Bundle, calib_dir: str | Path, calib_size: int, *, val_size: int | None = None,
                           seed: int = 0) -> CalibrationSplit:
    """:func:`load_calibration` for an image bundle: an ImageFolder tree, read, deduplicated, split, resized."""
    classes = bundle.manifest.head.classes
    files, ignored = scan_calibration_files(calib_dir, classes)
    by_digest: dict[str, tuple[Path, set[int]]] = {}
    for path, label in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        by_digest.setdefault(digest, (path, set()))[1].add(label)
    skipped = [(str(p), "filed under two classes") for p, labels in by_digest.values() if len(labels) > 1]
    unique = sorted(((p, next(iter(labels)), d) for d, (p, labels) in by_digest.items() if len(labels) == 1),
                    key=lambda item: str(item[0]))
    order = _interleaved_order(np.array([label for _, label, _ in unique]), seed)
    total = len(order)
    holdout_min = max(MIN_HOLDOUT, math.ceil(MIN_HOLDOUT_FRACTION * total))
    n_calib = min(calib_size, total - holdout_min)
    if n_calib < 1:
        raise DataError("too few calibration images", got=f"{total} usable image(s) in {calib_dir}",
                        expected=f"more than {holdout_min} (some are always held out for validation)",
                        todo="add images to the calibration folders")
    calib_idx = order[:n_calib]
    # The held-out part is interleaved by class too, so capping it keeps every class represented.
    hold_idx = _interleaved_order(np.array([unique[i][1] for i in order[n_calib:]]), seed + 1)
    hold_idx = order[n_calib:][hold_idx]
    if val_size is not None:
        hold_idx = hold_idx[:val_size]

    spec = bundle.preprocess
    problems = list(skipped)
    # calibration images are decoded now (calib_size of them: the quantizers read them all); held-out ones
    # only when validation streams them
    pixels, labels, paths = [], [], []
    for i in calib_idx:
        path, label, _ = unique[i]
        try:
            pixels.append(load_image(path, spec))
        except InputError as exc:
            problems.append((str(path), str(exc.got)))
            continue
        labels.append(label)
        paths.append(str(path))
    h, w = spec.size
    calibration = LabelledImages(np.stack(pixels) if pixels else np.zeros((0, h, w, 3), np.uint8),
                                 np.array(labels, dtype=np.int64), tuple(paths))
    held = [unique[i] for i in hold_idx]
    held_key = hashlib.sha256(repr(([d for _, _, d in held], [int(lbl) for _, lbl, _ in held], spec.key())).encode())
    holdout = HeldOutImages(np.array([lbl for _, lbl, _ in held], dtype=np.int64), tuple(str(p) for p, _, _ in held),
                            held_key.hexdigest(), spec)
    fingerprint = hashlib.sha256(repr((
        [unique[i][2] for i in calib_idx], [int(unique[i][1]) for i in calib_idx],
        [unique[i][2] for i in hold_idx], [int(unique[i][1]) for i in hold_idx], spec.key(),
    )).encode()).hexdigest()
    return CalibrationSplit(calibration, holdout, fingerprint, tuple(ignored), tuple(problems))


def load_text_calibration(bundle: Bundle, calib: str | Path, calib_size: int, *, val_size: int | None = None,
                          seed: int = 0) -> CalibrationSplit:
    """:func:`load_calibration` for a text bundle: labelled texts (folder of .txt, CSV or JSONL), split the
    same way (seeded, interleaved by class, at least 20 % held out), tokenized by the bundle's tokenizer."""
    from edgexfer.runtime.textdata import read_text_dataset

    classes = bundle.manifest.head.classes
    data = read_text_dataset(calib)  # duplicates and label conflicts already removed, bad samples reported
    known = [name for name in data.classes if name in classes]
    if not known:
        raise DataError("no class of the calibration texts is a class of the bundle's head",
                        got=", ".join(data.classes), expected=f"classes named like {', '.join(classes)}",
                        todo="pass --calib with the texts the head was trained for")
    samples = sorted((s for s in data.samples if data.classes[s.label] in classes), key=lambda s: s.sha256)
    labels = np.array([classes.index(data.classes[s.label]) for s in samples], dtype=np.int64)
    order = _interleaved_order(labels, seed)
    total = len(order)
    holdout_min = max(MIN_HOLDOUT, math.ceil(MIN_HOLDOUT_FRACTION * total))
    n_calib = min(calib_size, total - holdout_min)
    if n_calib < 1:
        raise DataError("too few calibration texts", got=f"{total} usable text(s) in {calib}",
                        expected=f"more than {holdout_min} (some are always held out for validation)",
                        todo="add labelled texts")
    calib_idx = order[:n_calib]
    hold_idx = order[n_calib:][_interleaved_order(labels[order[n_calib:]], seed + 1)]
    if val_size is not None:
        hold_idx = hold_idx[:val_size]
    tokenizer = bundle.tokenizer()
    texts = [samples[i].text for i in calib_idx]
    tokens = tokenizer.encode(texts) if texts else TokenBatch(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64), 0)
    calibration = LabelledImages(tokens, labels[calib_idx], tuple(samples[i].source for i in calib_idx))
    held_key = hashlib.sha256(repr(([samples[i].sha256 for i in hold_idx], [int(labels[i]) for i in hold_idx],
                                    tokenizer.key())).encode()).hexdigest()
    holdout = HeldOutTexts(labels[hold_idx], tuple(samples[i].source for i in hold_idx), held_key,
                           [samples[i].text for i in hold_idx], tokenizer)
    fingerprint = hashlib.sha256(repr((
        [samples[i].sha256 for i in calib_idx], [int(labels[i]) for i in calib_idx],
        [samples[i].sha256 for i in hold_idx], [int(labels[i]) for i in hold_idx], tokenizer.key(),
    )).encode()).hexdigest()
    ignored = tuple(name for name in data.classes if name not in classes)
    return CalibrationSplit(calibration, holdout, fingerprint, ignored, tuple(data.skipped))


class HeldOutAudio(HeldOut):
    """Held-out clips: read, mixed to mono, resampled and fitted to the bundle's clip, a batch at a time."""

    def __init__(self, labels: np.ndarray, paths: tuple[str, ...], key: str, spec):
        super().__init__(labels, paths, key)
        self.spec = spec

    def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from edgexfer.runtime.audio import decode_wav

        waves = np.empty((len(positions), self.spec.clip_samples), np.float32)
        kept: list[int] = []
        for pos in positions:
            try:
                waves[len(kept)] = decode_wav(Path(self.paths[pos]).read_bytes(), self.spec, self.paths[pos])
            except (InputError, OSError) as exc:
                self.skipped[self.paths[pos]] = str(getattr(exc, "got", None) or exc)
                continue
            kept.append(pos)
        return np.array(kept, dtype=np.int64), waves[:len(kept)]


def load_audio_calibration(bundle: Bundle, calib_dir: str | Path, calib_size: int, *, val_size: int | None = None,
                           seed: int = 0) -> CalibrationSplit:
    """:func:`load_calibration` for an audio bundle: a folder per class of WAV files (named like the head's
    classes), deduplicated and split as images are; the calibration clips are decoded now, held-out ones a
    batch at a time (:class:`HeldOutAudio`)."""
    from edgexfer.runtime.audio import AUDIO_EXTENSIONS, decode_wav

    classes = bundle.manifest.head.classes
    root = Path(calib_dir)
    if not root.is_dir():
        raise DataError("calibration data directory", got=f"{root} is not a directory",
                        expected="a folder per class of WAV files", todo="pass --calib with the bundle's classes")
    folders = class_folders(root)
    known = [name for name in folders if name in classes]
    if not known:
        raise DataError("no folder of the calibration data is a class of the bundle's head",
                        got=", ".join(folders) or "no folders", expected=f"folders named like {', '.join(classes)}",
                        todo="pass --calib with the recordings the head was trained for")
    by_digest: dict[str, tuple[Path, set[int]]] = {}
    skipped: list[tuple[str, str]] = []
    for name in known:
        image_like, others = class_files(root / name)
        for path in sorted([*image_like, *others]):
            if path.suffix.lower() not in AUDIO_EXTENSIONS:
                skipped.append((str(path), "not a WAV file (.wav)"))
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            by_digest.setdefault(digest, (path, set()))[1].add(classes.index(name))
    skipped += [(str(p), "filed under two classes") for p, labels in by_digest.values() if len(labels) > 1]
    unique = sorted(((p, next(iter(labels)), d) for d, (p, labels) in by_digest.items() if len(labels) == 1),
                    key=lambda item: str(item[0]))
    order = _interleaved_order(np.array([label for _, label, _ in unique], dtype=np.int64), seed)
    holdout_min = max(MIN_HOLDOUT, math.ceil(MIN_HOLDOUT_FRACTION * len(order)))
    n_calib = min(calib_size, len(order) - holdout_min)
    if n_calib < 1:
        raise DataError("too few calibration clips", got=f"{len(order)} usable clip(s) in {calib_dir}",
                        expected=f"more than {holdout_min} (some are always held out for validation)",
                        todo="add recordings to the class folders")
    calib_idx = order[:n_calib]
    hold_idx = order[n_calib:][_interleaved_order(np.array([unique[i][1] for i in order[n_calib:]]), seed + 1)]
    if val_size is not None:
        hold_idx = hold_idx[:val_size]
    spec = bundle.preprocess
    waves, labels, paths = [], [], []
    for i in calib_idx:
        path, label, _ = unique[i]
        try:
            waves.append(decode_wav(path.read_bytes(), spec, str(path)))
        except InputError as exc:
            skipped.append((str(path), str(exc.got)))
            continue
        labels.append(label)
        paths.append(str(path))
    calibration = LabelledImages(np.stack(waves) if waves else np.zeros((0, spec.clip_samples), np.float32),
                                 np.array(labels, dtype=np.int64), tuple(paths))
    held = [unique[i] for i in hold_idx]
    held_key = hashlib.sha256(repr(([d for _, _, d in held], [int(lbl) for _, lbl, _ in held], spec.key())).encode())
    holdout = HeldOutAudio(np.array([lbl for _, lbl, _ in held], dtype=np.int64), tuple(str(p) for p, _, _ in held),
                           held_key.hexdigest(), spec)
    fingerprint = hashlib.sha256(repr((
        [unique[i][2] for i in calib_idx], [int(unique[i][1]) for i in calib_idx],
        [unique[i][2] for i in hold_idx], [int(unique[i][1]) for i in hold_idx], spec.key(),
    )).encode()).hexdigest()
    return CalibrationSplit(calibration, holdout, fingerprint, tuple(n for n in folders if n not in classes),
                            tuple(skipped))


def _interleaved_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices shuffled within each class (seeded per class), then taken round robin over classes.

    Any prefix of the result is close to class-balanced, so ``calib_size`` images sample every class.
    """
    per_class = [np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))
                 for c in np.unique(labels)]
    out: list[int] = []
    depth = max((len(p) for p in per_class), default=0)
    for k in range(depth):
        out.extend(int(p[k]) for p in per_class if k < len(p))
    return np.array(out, dtype=np.int64)
