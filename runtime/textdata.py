"""Text data sets: the one reader that training, evaluation, calibration and the device read texts with.

Two forms, one set of rules:

* a folder per class of ``.txt`` files, one sample per file (``root/<class>/<name>.txt``, sub-folders of a
  class folder searched, hidden files and files directly in ``root`` never data, other files listed as
  ignored), like an ImageFolder tree (:mod:`edgexfer.runtime.imagefolder`);
* a ``.csv`` file with a header naming the columns ``text`` and ``label`` (other columns ignored), or a
  ``.jsonl`` file of ``{"text": ..., "label": ...}`` objects, one per line.

The rules, as for images: an empty, whitespace-only or non-UTF-8 sample is reported and skipped; a text
filed twice under one class is one sample (the first copy); a text filed under two classes is a label
conflict and every copy is dropped (it would leak across the split and teach both labels); a class left
without samples, or fewer than 2 classes, is a one-line :class:`DataError`. Texts longer than the
backbone's maximum length are kept (the tokenizer truncates them) and counted in the report by whoever
tokenizes (:meth:`edgexfer.runtime.text.TextTokenizer.truncated`).

A sample's identity (the feature cache's key) is :func:`edgexfer.runtime.text.text_sha256`.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgexfer.runtime.errors import DataError, InputError
from edgexfer.runtime.imagefolder import IMAGE_EXTENSIONS, class_folders
from edgexfer.runtime.text import check_text, decode_text, text_sha256

__all__ = [
    "TEXT_EXTENSIONS",
    "TABLE_EXTENSIONS",
    "TextDataset",
    "TextSample",
    "is_text_dataset",
    "read_text_dataset",
    "read_text_files",
]

#: one sample per file
TEXT_EXTENSIONS: frozenset[str] = frozenset({".txt"})
#: a table of samples: ``text,label``
TABLE_EXTENSIONS: frozenset[str] = frozenset({".csv", ".jsonl"})

_CSV_FIELD_LIMIT = 10_000_000  # the csv module's default (128 KB) would refuse long texts with a confusing error


@dataclass(frozen=True)
class TextSample:
    text: str  #: the normalised text (edgexfer.runtime.text.normalize_text)
    label: int  #: index into TextDataset.classes
    source: str  #: the file, or ``file.csv:line 12`` / ``file.jsonl:line 3``
    sha256: str  #: the feature cache's identity of the text


@dataclass(frozen=True)
class TextDataset:
    """A read text data set: samples (duplicates removed) and what was left out, with the reason."""

    root: Path  #: the folder or file that was read
    form: str  #: "folder", "csv" or "jsonl"
    classes: tuple[str, ...]  #: sorted class names; label i is classes[i]
    samples: tuple[TextSample, ...]  #: grouped by class (folder form) or in file order (table forms)
    skipped: tuple[tuple[str, str], ...]  #: (source, reason) of every sample or file left out

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    @property
    def shas(self) -> list[str]:
        return [s.sha256 for s in self.samples]

    @property
    def sources(self) -> list[str]:
        return [s.source for s in self.samples]


def is_text_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is text data: a .csv/.jsonl file, or class folders with .txt files and no image file.

    An image tree with a stray notes.txt in a class folder stays an image tree.
    """
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() in TABLE_EXTENSIONS
    if not path.is_dir():
        return False
    texts = 0
    for name in class_folders(path):
        found, others = _class_files(path / name)
        if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in others):
            return False
        texts += len(found)
    return texts > 0


def read_text_dataset(path: str | os.PathLike[str]) -> TextDataset:
    """Read a text data set in either form (see the module docstring); never raises for one bad sample.

    Raises:
        DataError: the path is missing, a table lacks the ``text``/``label`` columns, a class folder has
            no usable text, or fewer than 2 classes remain.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("text data", got=f"{path} does not exist",
                        expected="a folder per class of .txt files, or a .csv/.jsonl file of text,label",
                        todo="check the path")
    if path.is_dir():
        return _read_folder(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_EXTENSIONS:
        raise DataError("text data file", got=f"{path.name} ({suffix or 'no extension'})",
                        expected="a .csv (columns text,label) or .jsonl ({\"text\": ..., \"label\": ...}) file",
                        todo="or pass a folder with one sub-folder of .txt files per class")
    rows, skipped = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    labels = sorted({label for _, label, _ in rows})
    _check_classes(labels, path, "label(s)")
    index = {name: i for i, name in enumerate(labels)}
    samples, dropped = _unique([(text, index[label], source) for text, label, source in rows], labels)
    _check_left(samples, labels, path)
    return TextDataset(root=path, form=suffix[1:], classes=tuple(labels), samples=tuple(samples),
                       skipped=tuple(skipped + dropped))


def read_text_files(paths: Iterable[str | os.PathLike[str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Texts of files given one by one (predict, learn): ``[(source, text)]`` and ``[(source, reason)]``."""
    good: list[tuple[str, str]] = []
    bad: list[tuple[str, str]] = []
    for path in paths:
        source = str(path)
        try:
            good.append((source, decode_text(Path(path).read_bytes(), source)))
        except OSError as exc:
            bad.append((source, f"cannot read file: {exc.strerror or exc}"))
        except InputError as exc:
            bad.append((source, str(exc.got)))
    return good, bad


# ------------------------------------------------------------------------------------------ folder form
def _class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """``.txt`` files and other non-hidden files under one class folder, each list sorted by path."""
    texts: list[Path] = []
    others: list[Path] = []
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = Path(directory, name)
            (texts if file.suffix.lower() in TEXT_EXTENSIONS else others).append(file)
    return sorted(texts), sorted(others)


def _read_folder(root: Path) -> TextDataset:
    classes = class_folders(root)
    _check_classes(classes, root, "class folder(s)")
    rows: list[tuple[str, int, str]] = []
    skipped: list[tuple[str, str]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        files, others = _class_files(root / name)
        skipped.extend((str(p), "not a .txt file") for p in others)
        good, bad = read_text_files(files)
        skipped.extend(bad)
        if not good:
            empty.append(f"{name} ({len(files)} .txt file(s), {len(bad)} unusable)" if files else f"{name} (no .txt file)")
        rows.extend((text, label, source) for source, text in good)
    if empty:
        raise DataError(f"class folder(s) without a usable text in {root}", got=f"empty: {', '.join(empty)}",
                        expected="at least 1 non-empty UTF-8 .txt file per class",
                        todo="add texts to those folders or remove them")
    samples, dropped = _unique(rows, classes)
    _check_left(samples, classes, root)
    return TextDataset(root=root, form="folder", classes=tuple(classes), samples=tuple(samples),
                       skipped=tuple(skipped + dropped))


# ------------------------------------------------------------------------------------------ table forms
def _read_table_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"text data file {path}", got=f"not UTF-8 (line {line}, offset {exc.start})",
                        expected="a UTF-8 file", todo="re-save it as UTF-8 (iconv -t UTF-8)") from None


def _read_csv(path: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    reader = csv.reader(io.StringIO(_read_table_text(path), newline=""))
    csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"text data file {path}", got="an empty file", expected="a header row text,label, then one row per sample") from None
    except csv.Error as exc:
        raise DataError(f"text data file {path}", got=f"bad CSV ({exc})", expected="CSV with a header text,label") from None
    names = [h.strip().lstrip("\ufeff").lower() for h in header]
    if "text" not in names or "label" not in names:
        raise DataError(f"text data file {path}", got=f"header {header[:6]}", expected="columns named text and label",
                        todo="add a header row: text,label")
    t_col, l_col = names.index("text"), names.index("label")
    rows: list[tuple[str, str, str]] = []
    skipped: list[tuple[str, str]] = []
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"text data file {path}", got=f"bad CSV at line {line} ({exc})",
                            expected="valid CSV (quote texts that hold commas, quotes or newlines)") from None
        source = f"{path}:line {line}"
        if not any(cell.strip() for cell in row):
            continue  # a blank line is not a sample
        if len(row) <= max(t_col, l_col):
            skipped.append((source, f"{len(row)} column(s), the header has {len(names)}"))
            continue
        _take(rows, skipped, row[t_col], row[l_col], source)
    return rows, skipped


def _read_jsonl(path: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    rows: list[tuple[str, str, str]] = []
    skipped: list[tuple[str, str]] = []
    for number, line in enumerate(_read_table_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{path}:line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append((source, f"not JSON ({exc.msg})"))
            continue
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            skipped.append((source, 'not an object with "text" and "label"'))
            continue
        text, label = obj["text"], obj["label"]
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(text, str) or not isinstance(label, str):
            skipped.append((source, "text and label must be strings"))
            continue
        _take(rows, skipped, text, label, source)
    return rows, skipped


def _take(rows: list[tuple[str, str, str]], skipped: list[tuple[str, str]], text: str, label: str, source: str) -> None:
    label = label.strip()
    if not label or "/" in label:
        skipped.append((source, f"label {label!r}: expected a non-empty class name without '/'"))
        return
    try:
        rows.append((check_text(text, source), label, source))
    except InputError as exc:
        skipped.append((source, str(exc.got)))


# ------------------------------------------------------------------------------------------ shared rules
def _check_classes(classes: Sequence[str], root: Path, what: str) -> None:
    if len(classes) < 2:
        found = ", ".join(classes) if classes else "none"
        raise DataError("a classifier needs at least 2 classes", got=f"{len(classes)} {what} in {root} ({found})",
                        expected="at least 2 classes",
                        todo="add samples of another class (a sub-folder of .txt files, or rows with another label)")


def _check_left(samples: Sequence[TextSample], classes: Sequence[str], root: Path) -> None:
    have = {s.label for s in samples}
    empty = [c for i, c in enumerate(classes) if i not in have]
    if empty:
        raise DataError("class(es) left without a sample", got=", ".join(empty) + f" in {root}",
                        expected="at least one text per class that no other class has too",
                        todo="fix the label conflicts listed above or add texts")


def _unique(rows: Sequence[tuple[str, int, str]], classes: Sequence[str]) -> tuple[list[TextSample], list[tuple[str, str]]]:
    """Identical texts are one sample: the first copy is kept; a text under two classes is dropped everywhere."""
    first: dict[str, tuple[int, str]] = {}
    labels_of: dict[str, set[int]] = {}
    for text, label, source in rows:
        sha = text_sha256(text)
        first.setdefault(sha, (label, source))
        labels_of.setdefault(sha, set()).add(label)
    samples: list[TextSample] = []
    dropped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for text, label, source in rows:
        sha = text_sha256(text)
        if len(labels_of[sha]) > 1:
            names = ", ".join(sorted(classes[i] for i in labels_of[sha]))
            dropped.append((source, f"same text filed under classes {names}"))
        elif sha in seen:
            dropped.append((source, f"duplicate of {first[sha][1]}"))
        else:
            seen.add(sha)
            samples.append(TextSample(text, label, source, sha))
    return samples, dropped
