"""ImageFolder trees (``root/<class>/<image files>``): the one scan that training, evaluation and the
converters' calibration read class folders and image files with.

Hidden files and folders (names starting with ".") are never data; files directly in ``root`` (a README,
an ATTRIBUTION.md) are not either; sub-folders of a class folder are searched (sorted). Only file names
are read here: decoding is :mod:`edgexfer.runtime.preprocess`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgexfer.runtime.errors import DataError

#: File name endings taken as images (compared lower-cased, so ``.JPG`` counts too).
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

_NOT_IMAGE = "not an image file extension"


@dataclass(frozen=True)
class ImageFolder:
    """A scanned ImageFolder tree: one sub-directory per class, image files inside (at any depth)."""

    #: The directory that was scanned, as given.
    root: Path
    #: Class names: the non-hidden sub-directories of ``root``, sorted; label i is ``classes[i]``.
    classes: tuple[str, ...]
    #: Image files, grouped by class and sorted by path within a class.
    paths: tuple[Path, ...]
    #: Class index of each entry of ``paths``.
    labels: tuple[int, ...]
    #: Files inside class folders that were left out, with the reason.
    ignored: tuple[tuple[Path, str], ...]


def scan_image_folder(root: str | os.PathLike[str]) -> ImageFolder:
    """Scan an ImageFolder tree (``root/<class>/<image files>``) into paths and labels.

    Hidden files and folders (names starting with ".") and files directly in ``root`` (a README or
    ATTRIBUTION.md) are skipped silently; other non-image files inside class folders are listed in
    ``ignored``. Sub-folders of a class folder are searched too (sorted, hidden ones skipped).

    Raises:
        DataError: ``root`` is missing or not a directory, has fewer than 2 class folders, or some
            class folder holds no image file (all such classes are named).
    """
    root = Path(root)
    if not root.exists():
        raise DataError("data directory", got=f"{root} does not exist", expected="an ImageFolder tree",
                        todo="check the path (one sub-folder per class, images inside)")
    if not root.is_dir():
        raise DataError("data directory", got=f"{root} is not a directory", expected="an ImageFolder tree",
                        todo="pass the folder that holds one sub-folder per class")

    classes = tuple(class_folders(root))
    if len(classes) < 2:
        found = ", ".join(classes) if classes else "none"
        raise DataError("a classifier needs at least 2 classes",
                        got=f"{len(classes)} class folder(s) in {root} ({found})",
                        expected="at least 2 sub-folders, one per class",
                        todo="add a sub-folder of images for every class")

    paths: list[Path] = []
    labels: list[int] = []
    ignored: list[tuple[Path, str]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        images, others = class_files(root / name)
        if not images:
            empty.append(f"{name}" + (f" ({len(others)} non-image file(s))" if others else ""))
        paths.extend(images)
        labels.extend([label] * len(images))
        ignored.extend((path, _NOT_IMAGE) for path in others)
    if empty:
        raise DataError(f"class folder(s) without image files in {root}",
                        got=f"empty: {', '.join(empty)}",
                        expected=f"at least 1 image ({', '.join(sorted(IMAGE_EXTENSIONS))}) per class",
                        todo="add images to those folders or remove them")
    return ImageFolder(root=root, classes=classes, paths=tuple(paths), labels=tuple(labels),
                       ignored=tuple(ignored))


def class_folders(root: Path) -> list[str]:
    """The non-hidden sub-folders of ``root``, sorted: the class names of an ImageFolder tree."""
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not _hidden(entry.name))


def _hidden(name: str) -> bool:
    """Dot-files and dot-folders (.DS_Store, .git, .ipynb_checkpoints) are never data."""
    return name.startswith(".")


def class_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """Image files and other non-hidden files under one class folder, each list sorted by path."""
    images: list[Path] = []
    others: list[Path] = []
    for directory, subdirs, files in os.walk(folder):
        # Pruning in place keeps os.walk out of hidden folders; sorting makes the walk order fixed.
        subdirs[:] = sorted(name for name in subdirs if not _hidden(name))
        for name in sorted(files):
            if _hidden(name):
                continue
            path = Path(directory, name)
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    # os.walk lists a folder's files before its sub-folders'; a plain sort gives one path order.
    return sorted(images), sorted(others)
