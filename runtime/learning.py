"""Field learning: labelled samples into the feature cache, one committed batch at a time.

``Device.learn`` (``edgexfer device learn``, the service's ``POST /v1/label``) streams its inputs: files,
bytes, literal texts, directories (walked for the files the bundle's modality takes) and ``--from-list``
files. Nothing holds more than one batch, whatever the number of inputs. Each batch:

1. is read and hashed (:meth:`~edgexfer.runtime.modalities.base.Modality.identify`: an image's bytes and
   header, not its pixels);
2. opens one write transaction in which the per-class capacity admits its arrivals
   (:mod:`edgexfer.runtime.cache_capacity`): a sample it turns away is never decoded nor run through the
   backbone;
3. decodes the admitted samples whose features are missing, runs the backbone on them and stores their
   features, then commits: a sample is confirmed with its features or not at all. A sample that fails
   to decode is reported and the batch is admitted again without it, so it never counts as an arrival.

An interrupted call (Ctrl-C, a kill, a power cut) keeps the batches it committed; running it again finds
them by sha256 and runs the backbone only on the rest. The write lock is held while one batch runs
through the backbone (tens to hundreds of milliseconds), far below the busy timeout other writers wait.
Augmented views (``augment=K``) of a batch's samples are made after its commit, each view key committed
on its own: a crash in between leaves a sample with fewer views, never a view without its sample.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgexfer.runtime.augment import AUGMENT_SETTINGS, view_key
from edgexfer.runtime.backends.base import EngineRunner
from edgexfer.runtime.cache import FeatureCache, SampleRecord
from edgexfer.runtime.errors import EdgexferError, InputError
from edgexfer.runtime.modalities.base import Modality, Sample, source_name
from edgexfer.runtime.state import crash_point

#: reads one input: (item, its name in reports) -> a Sample, or raises InputError
Reader = Callable[[Any, str], Sample]
#: one input of a learn call: its name in reports, the item (a path, bytes, a text) and how to read it
Input = tuple[str, Any, Reader]


@dataclass(frozen=True)
class LearnReport:
    """What one ``learn`` call did. ``added + already_known + dropped`` are the distinct good inputs."""

    label: str
    added: int  #: samples stored with their features now (the backbone ran on each)
    already_known: int  #: samples the cache had with their features (reused, none recomputed)
    backbone_runs: int  #: inputs that went through the backbone (views included)
    errors: list[dict[str, str]] = field(default_factory=list)
    augment: int = 0  #: augmented views asked for per image
    views_added: int = 0  #: views computed now (views cached already are not recomputed)
    dropped: int = 0  #: arrivals the per-class capacity turned away (never decoded nor run through the backbone)
    evicted: int = 0  #: samples stored before (earlier calls or batches) that the capacity replaced
    capacity: int | None = None  #: the per-class capacity in force (None: no limit)
    batches: int = 0  #: batches committed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Tally:
    """The running counts of a learn call (a :class:`LearnReport` once done)."""

    added: int = 0
    already_known: int = 0
    backbone_runs: int = 0
    views_added: int = 0
    dropped: int = 0
    evicted: int = 0
    batches: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)

    def report(self, label: str, augment: int, capacity: int | None) -> LearnReport:
        counts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "errors"}
        return LearnReport(label=label, errors=list(self.errors), augment=augment, capacity=capacity, **counts)


class _Undecodable(Exception):
    """An admitted sample failed to decode: the batch's transaction is rolled back and admitted again without it."""


# ------------------------------------------------------------------------------------------------ inputs
def learn_inputs(modality: Modality, items: Iterable[Any], texts: Iterable[str] = (),
                 text_sources: Iterable[str] | None = None) -> Iterator[Input]:
    """The inputs of a learn call, lazily: ``items`` (a directory is walked, sorted and recursive, for the files
    the modality takes; hidden names are skipped), then the literal ``texts`` named by ``text_sources``."""
    for index, item in enumerate(items):
        if isinstance(item, (str, os.PathLike)) and os.path.isdir(item):
            yield from _walk(modality, Path(item))
        else:
            yield source_name(item, index), item, modality.identify
    names = iter(text_sources) if text_sources is not None else None
    for index, text in enumerate(texts):
        name = next(names, None) if names is not None else None
        yield name or f"text[{index}]", text, modality.literal


def _walk(modality: Modality, root: Path) -> Iterator[Input]:
    """The files under ``root`` the modality takes, in sorted path order (a folder's names are held while it
    is walked: about 100 bytes a name). Links to folders are not followed (no loops)."""
    found = failed = False
    stack = [root]
    listings: list[tuple[Path, Iterator[tuple[str, bool]]]] = []
    while stack or listings:
        if stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as scan:
                    names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in scan if not e.name.startswith("."))
            except OSError as exc:
                failed = True
                yield str(folder), exc, _refuse
                continue
            listings.append((folder, iter(names)))
            continue
        folder, names = listings[-1]
        entry = next(names, None)
        if entry is None:
            listings.pop()
        elif entry[1]:
            stack.append(folder / entry[0])
        elif modality.takes_file(entry[0]):
            found = True
            path = str(folder / entry[0])
            yield path, path, modality.identify
    if not found and not failed:
        suffixes = ", ".join(modality.file_suffixes) or "none: give its files one by one"
        error = InputError(f"no {modality.noun} files in directory {root}", got="none found (searched recursively)",
                           expected=f"files ending in {suffixes}",
                           todo=f"check the directory, or that the installed bundle reads {modality.plural}")
        yield str(root), error, _refuse


def _refuse(item: Any, name: str) -> Sample:
    """The reader of an input that failed before it was read (its error is the item)."""
    if isinstance(item, OSError):
        raise InputError(f"cannot read directory {name}", got=item.strerror or str(item), expected="a readable directory",
                         todo="check the path and its permissions")
    raise item


def paths_from_list(list_file: str | os.PathLike[str]) -> Iterator[str]:
    """The paths of a list file (``--from-list``), one per line, read lazily; ``-`` reads stdin.

    Lines are stripped of surrounding white space; blank lines and lines starting with ``#`` are skipped.
    Relative paths are relative to the current directory (as ``tar -T`` and ``rsync --files-from`` read
    theirs). A missing or unreadable list raises :class:`InputError` at once.
    """
    if str(list_file) == "-":
        return _lines(sys.stdin)
    try:
        handle = open(list_file, encoding="utf-8", errors="surrogateescape")  # closed by _lines
    except OSError as exc:
        raise InputError(f"cannot read the list {list_file}", got=exc.strerror or str(exc),
                         expected="a text file with one path per line ('#' comments and blank lines are skipped)",
                         todo="check the --from-list path, or write the list with e.g. find DIR -name '*.jpg' > list.txt"
                         ) from None
    return _lines(handle, close=True)


def _lines(handle, close: bool = False) -> Iterator[str]:
    try:
        for line in handle:
            path = line.strip()
            if path and not path.startswith("#"):
                yield path
    finally:
        if close:
            handle.close()


# ------------------------------------------------------------------------------------------------ batches
class BatchLearner:
    """Learns a stream of inputs under one label, one committed batch at a time (see the module's docstring)."""

    def __init__(self, engine: Callable[[], EngineRunner], cache: FeatureCache, modality: Modality, backbone: str,
                 label: str, source: str, *, augment: int = 0, batch_size: int | None = None,
                 on_kept: Callable[[list[str]], None] | None = None):
        self.engine = engine  # opened on first use: a call that finds everything cached never loads the backbone
        self.cache = cache
        self.modality = modality
        self.backbone = backbone
        self.key = modality.preprocess.key()
        self.label = label
        self.source = source
        self.augment = augment
        self.batch_size = batch_size or modality.batch_size
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError("learn batch size", got=repr(batch_size), expected="a positive integer")
        self.tally = _Tally()
        #: hears the samples each committed batch kept (``Device.learn`` judges them with the active head)
        self.on_kept = on_kept

    def run(self, inputs: Iterable[Input], capacity: int | None,
            on_batch: Callable[[LearnReport], None] | None = None) -> LearnReport:
        chunk: list[Input] = []
        for entry in inputs:
            chunk.append(entry)
            if len(chunk) == self.batch_size:
                self._batch(chunk)
                chunk = []
                if on_batch is not None:
                    on_batch(self.tally.report(self.label, self.augment, capacity))
        if chunk:
            self._batch(chunk)
            if on_batch is not None:
                on_batch(self.tally.report(self.label, self.augment, capacity))
        return self.tally.report(self.label, self.augment, capacity)

    def _batch(self, chunk: list[Input]) -> None:
        samples = self._read(chunk)
        if not samples:
            return
        kept = self._commit(samples)
        crash_point("learn-committed")  # the crash tests kill field learning here: this batch is confirmed
        self.tally.batches += 1
        if self.on_kept is not None and kept:
            self.on_kept(kept)
        if self.augment and kept:
            self._add_views([samples[sha] for sha in kept])

    def _read(self, chunk: list[Input]) -> dict[str, Sample]:
        """The batch's samples by sha256 (the first copy of each); each bad input is one error."""
        samples: dict[str, Sample] = {}
        for name, item, read in chunk:
            try:
                sample = read(item, name)
                if sample.data is None:  # an array in memory: nothing the cache could keep to recompute it
                    raise InputError(f"learn takes {self.modality.noun} files or their bytes",
                                     got=type(item).__name__, expected="a path or bytes")
            except EdgexferError as exc:
                self._error(name, str(exc))
                continue
            except OSError as exc:  # a plug-in modality that let an unreadable file through
                self._error(name, f"cannot read file {name} | got {exc.strerror or exc}")
                continue
            samples.setdefault(sample.sha256, sample)
        return samples

    def _commit(self, samples: dict[str, Sample]) -> list[str]:
        """Admit, extract and store one batch in one transaction; returns the samples kept."""
        values: dict[str, Any] = {}  # decoded once, even if the batch is admitted again
        bad: set[str] = set()
        while True:
            records = [SampleRecord(sha, self.label, f"{self.source}:{s.source}", s.data)
                       for sha, s in samples.items() if sha not in bad]
            try:
                with self.cache.transaction():
                    admission = self.cache.admit_samples(records)
                    todo = self.cache.missing(self.backbone, self.key, admission.kept)
                    for sha in todo:
                        if sha not in values and sha not in bad:
                            try:
                                values[sha] = self.modality.value_of(samples[sha])
                            except EdgexferError as exc:
                                bad.add(sha)
                                self._error(samples[sha].source, str(exc))
                    if any(sha in bad for sha in todo):
                        raise _Undecodable
                    runs = self._extract(todo, values) if todo else 0
                    crash_point("learn-before-commit")  # extracted and written, not committed: nothing is kept
            except _Undecodable:
                continue
            break
        t = self.tally
        t.added += len(todo)
        t.already_known += len(admission.kept) - len(todo)
        t.dropped += len(admission.dropped)
        t.evicted += admission.evicted
        t.backbone_runs += runs
        return admission.kept

    def _extract(self, todo: list[str], values: dict[str, Any]) -> int:
        engine = self.engine()
        before = engine.stats.images
        features = engine.run(self.modality.feed([values[sha] for sha in todo]))
        self.cache.put_features(self.backbone, self.key, dict(zip(todo, features)))
        return engine.stats.images - before

    def _add_views(self, samples: list[Sample]) -> None:
        """Store the missing views ``0..augment-1`` of a committed batch's samples.

        Each sample is decoded once at full size (views crop before resizing) and let go before the next,
        so the batch holds at most ``batch x augment`` views at the backbone's input size. Each view key
        is committed on its own, after its sample.
        """
        from edgexfer.runtime.augment import Augmenter

        spec = self.modality.preprocess
        augmenter = Augmenter(spec, **AUGMENT_SETTINGS)
        shas = [s.sha256 for s in samples]
        keys = [view_key(spec.key(), view) for view in range(self.augment)]
        missing = [set(self.cache.missing(self.backbone, key, shas)) for key in keys]
        views: list[list[tuple[str, np.ndarray]]] = [[] for _ in keys]
        for sample in samples:
            todo = [view for view in range(self.augment) if sample.sha256 in missing[view]]
            if not todo:
                continue
            image = self.modality.decoded(sample.data)
            for view in todo:
                rng = np.random.default_rng([int(sample.sha256[:16], 16), view])
                views[view].append((sample.sha256, augmenter(image, rng)))
            del image
        for key, made in zip(keys, views):
            if not made:
                continue
            engine = self.engine()
            before = engine.stats.images
            features = engine.run(self.modality.feed([pixels for _, pixels in made]))
            self.tally.backbone_runs += engine.stats.images - before
            self.cache.put_features(self.backbone, key, {sha: f for (sha, _), f in zip(made, features)})
            self.tally.views_added += len(made)

    def _error(self, source: str, message: str) -> None:
        self.tally.errors.append({"source": source, "error": message})
