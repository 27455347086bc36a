"""Small file-system helpers every part of edgexfer shares: atomic writes, fsync, file digests.

A bundle, a device state and an update all rely on one rule: a reader sees the old file or the new one,
never half of one, and what was renamed into place survives a power cut (fsync of the file, then of the
directory that holds the name).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

#: modes of a device's state (docs/architecture.md, "Device state directory"): the images and labels a
#: site took, its heads and keys are nobody else's business
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def write_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write temp file, fsync, rename over ``path``, fsync the directory.

    ``mode``: the file's permissions (e.g. :data:`PRIVATE_FILE` in a device state); default: 0666
    less the umask, like any file the process creates (bundles are meant to be shared).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if mode is None:
            # mkstemp creates 0600; bundle files are meant to be readable like any other file
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as :data:`PRIVATE_DIR`; an existing folder is left as it is."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode is masked by the umask
    return path


def make_private(root: Path) -> None:
    """Folders under ``root`` (included) to :data:`PRIVATE_DIR`, files to :data:`PRIVATE_FILE` (links untouched)."""
    os.chmod(root, PRIVATE_DIR)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), PRIVATE_DIR)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), PRIVATE_FILE)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in ``path`` durable."""
    _fsync(path)


def fsync_tree(path: Path) -> None:
    """fsync every file and folder below ``path`` (before it is renamed into place)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            _fsync(Path(root) / name)
        fsync_dir(Path(root))


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
