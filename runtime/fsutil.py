"""Small file-system helpers every part of edgexfer shares: atomic writes, staged directories, fsync, digests.

A bundle, a device state and an update all rely on one rule: a reader sees the old file or the new one,
never half of one, and what was renamed into place survives a power cut (fsync of the file, then of the
directory that holds the name).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
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


class StagedDir:
    """A directory built beside its ``target``, then put in its place by one rename.

    Bundles, heads, engines and conversion results are all written this way, so that a reader (or a
    process started after a crash) sees the old directory or the complete new one, never half of one::

        with StagedDir(target) as staged:
            ...write files under staged.path, verify them...
        # here target is the new directory: fsynced, renamed into place, the rename made durable

    Leaving the block with an exception removes the staging directory and leaves ``target`` as it was.
    A process killed inside the block leaves the staging directory, under its ``.tmp-`` or given name,
    for whoever owns the parent to sweep (``DeviceState`` does, under its lock).

    ``name``: the staging directory's name beside ``target`` (default ``.tmp-<random>``); ``staging``: a
    path elsewhere on the same file system instead. ``private``: created as :data:`PRIVATE_DIR`.
    ``replace``: an existing ``target`` is removed just before the rename (not atomic: for targets that
    are rebuilt from their inputs); without it the rename fails on a non-empty ``target``, and
    :meth:`swap` keeps the old one until the new one is recorded.
    """

    def __init__(self, target: str | Path, *, name: str | None = None, staging: str | Path | None = None,
                 private: bool = False, replace: bool = False):
        self.target = Path(target)
        if staging is not None:
            self.path = Path(staging)
        else:
            self.path = self.target.with_name(name or f".tmp-{uuid.uuid4().hex}")
        self.private = private
        self.replace = replace
        self.committed = False

    def __enter__(self) -> StagedDir:
        if self.path.exists():
            shutil.rmtree(self.path)  # what an interrupted run left under the same name
        if self.private:
            private_dir(self.path)
        else:
            self.path.mkdir(parents=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None and not self.committed:
                self.commit()
        finally:
            self.discard()  # after a failure (or a failed commit): nothing of the staging directory stays

    def commit(self) -> Path:
        """fsync the staged tree, rename it to ``target`` (removing an old one with ``replace``), fsync the parent."""
        fsync_tree(self.path)
        if self.replace and (self.target.exists() or self.target.is_symlink()):
            if self.target.is_dir() and not self.target.is_symlink():
                shutil.rmtree(self.target)
            else:
                self.target.unlink()
        self.target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path, self.target)
        fsync_dir(self.target.parent)
        self.committed = True
        return self.target

    @contextlib.contextmanager
    def swap(self) -> Iterator[Path]:
        """Commit, keeping the old ``target`` as ``.<name>.old`` beside it until the block succeeds.

        For a directory that something else lists (an engine a manifest records): the block records the
        new one; if it raises, the new directory is removed and the old one put back.
        """
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            self.target.rename(old)
        try:
            yield self.commit()
        except BaseException:
            if self.target.exists():
                shutil.rmtree(self.target)
            if old is not None:
                old.rename(self.target)
            raise
        if old is not None:
            shutil.rmtree(old)

    def discard(self) -> None:
        """Remove the staging directory (nothing if it was committed)."""
        shutil.rmtree(self.path, ignore_errors=True)
