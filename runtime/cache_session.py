"""Whether a feature cache file was closed cleanly: the sidecar ``<file>-session`` beside it.

Checking the whole file (``PRAGMA quick_check``) on every open costs time in proportion to its size
(about 14 s at a million images), while a process killed or a power cut is the moment a file may need
it. So each :class:`~edgexfer.runtime.cache_sqlite.CacheDatabase` holds a *session*:

* Every open connection holds a shared ``flock`` on the sidecar for its lifetime. An opener that gets
  the lock exclusively is the only one: it reads the record the last closer left. The record names the
  database file (device, inode, size, mtime and ctime in ns) as it was after that close; if the record
  is missing, unreadable, says otherwise, or a ``-wal`` file with content is left, the file was not
  closed cleanly (a power cut, an OS crash, every process using it killed, or a change by another
  program) and the opener runs ``quick_check``. It clears the record (synced: a power cut while the file
  is open must not leave a stale "clean" behind) and keeps the lock exclusive until the file is checked
  and its schema in place (:meth:`CacheSession.ready`), then shares it: nobody uses a file whose check
  after an unclean shutdown has not passed.
* An opener that cannot get the lock exclusively shares the file with a live process, which checked
  the file when it opened it (or shares it with one that did): it checks nothing.
* The closer that gets the lock exclusively after closing its connection is the last one: it writes the
  record. Concurrent closers that both see the other one skip it: the next opener checks (safe side).

A process killed while others keep the file open is not "unclean" here: SQLite rolls its transaction
back, and a kill does not damage the file. Damage that leaves the file's metadata as it was (a failing
SD card) is found on demand by ``edgexfer device check-cache`` (``PRAGMA integrity_check``), or by SQLite
when a damaged page is read (a one-line :class:`~edgexfer.runtime.errors.CacheError` naming that command).

Without ``fcntl`` (not POSIX) or a writable sidecar, every open checks the file, as before.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: every open runs quick_check
    fcntl = None  # type: ignore[assignment]

#: what a clean close writes, with the file's identity (see :func:`file_identity`)
RECORD_SCHEMA = "edgexfer.cache-session/1"


def session_path(db_path: Path) -> Path:
    """The sidecar of a cache file: ``features.sqlite`` -> ``features.sqlite-session``."""
    return db_path.with_name(db_path.name + "-session")


def file_identity(db_path: Path) -> dict[str, int] | None:
    """What changes when anything writes the file: device, inode, size, mtime and ctime (ns); None if absent."""
    try:
        st = os.stat(db_path)
    except OSError:
        return None
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def write_clean_record(db_path: Path, fd: int | None = None) -> None:
    """Record that ``db_path`` is closed cleanly as it is now (the last closer, under the exclusive lock).

    Not synced: if a power cut loses the record, the next open checks the file, which is the safe side.
    """
    record = json.dumps({"schema": RECORD_SCHEMA, "clean": True, "file": file_identity(db_path)}).encode()
    own = fd is None
    if own:
        fd = os.open(session_path(db_path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    finally:
        if own:
            os.close(fd)


class CacheSession:
    """The open-file record of one connection: :meth:`begin` before connecting, :meth:`end` after closing."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.path = session_path(db_path)
        self._fd: int | None = None
        self._created = False
        self._alone = False  # held the lock exclusively when opening

    def begin(self) -> bool:
        """Take the lock; returns whether the file must be checked (it was not closed cleanly). Call
        :meth:`ready` once the file is checked and open, or :meth:`end` (``refused=True``) if it is refused."""
        if fcntl is None:
            return True
        while True:
            try:
                fd, created = self._open_sidecar()
            except OSError:  # a read-only directory or a full disk: check every time, as before
                return True
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    alone = True
                except BlockingIOError:
                    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a lone opener checks the file
                    alone = False
                if not self._still_linked(fd):  # a refused file's opener removed it meanwhile: take the new one
                    os.close(fd)
                    continue
                self._fd, self._created, self._alone = fd, created, alone
                if not alone:
                    return False
                must_check = not self._closed_cleanly(fd)
                os.ftruncate(fd, 0)  # open now: until a clean close, the next lone opener checks
                os.fsync(fd)
                return must_check
            except BaseException:
                if self._fd is None:
                    os.close(fd)
                raise

    def ready(self) -> None:
        """The file is checked and open: share the lock with other users (a lone opener held it exclusively)."""
        if self._fd is not None and self._alone:
            fcntl.flock(self._fd, fcntl.LOCK_SH)  # not atomic: a lone opener in between would check (safe side)

    def end(self, *, refused: bool = False) -> None:
        """Release the lock; the last one out records a clean close (``refused``: the file was never opened)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if refused:
                # a file refused on open (not ours, damaged): leave nothing beside it that was not there
                if self._created and self._alone and self._last_out(fd):
                    os.unlink(self.path)
                return
            if self._last_out(fd):
                write_clean_record(self.db_path, fd)
        except OSError:
            pass  # no record: the next open checks the file, the safe side
        finally:
            os.close(fd)  # releases the lock

    # ------------------------------------------------------------------ internals
    def _open_sidecar(self) -> tuple[int, bool]:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            return os.open(self.path, os.O_RDWR), False

    def _still_linked(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    @staticmethod
    def _last_out(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _closed_cleanly(self, fd: int) -> bool:
        identity = file_identity(self.db_path)
        if identity is None or identity["size"] == 0:
            return True  # a new file: nothing to check
        try:
            record = json.loads(os.pread(fd, 4096, 0))
        except (OSError, ValueError):
            return False
        if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or record.get("clean") is not True:
            return False
        wal = file_identity(self.db_path.with_name(self.db_path.name + "-wal"))
        return record.get("file") == identity and (wal is None or wal["size"] == 0)
