"""Persistent feature cache: samples, labels and backbone features in one SQLite file.

One cache serves both sides. On the host, a second training run over the same images extracts
nothing, because the features are already here. On the device, field learning stores the features
of new local samples and retrains only the head from them.

Features are keyed by ``(sample sha256, backbone sha256, preprocess)``: the backbone's identity is
the sha256 of its ``backbone.onnx`` and ``preprocess`` names the preprocessing that fed it. So the
features of two backbones, or of two preprocessings, can never be mixed.

Durability: each write is one short ``BEGIN IMMEDIATE`` transaction in WAL mode with
``synchronous=FULL``, so data is durable once a write method returns, even if the process is killed
or the power fails right after.

Concurrency: only one process writes at a time. Other writers wait up to 30 s. Readers never wait
for a writer and see only committed data.

The schema is stored in ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`).
"""
from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import numpy as np

from edgexfer.runtime.errors import CacheError, InputError

#: Layout version kept in ``PRAGMA user_version``. A file with a higher number is refused.
SCHEMA_VERSION = 1
#: The default for ``per_class_capacity``: samples kept per label on a device.
DEFAULT_PER_CLASS_CAPACITY = 500
#: How long a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT_S = 30.0

# Less free space than this, at the moment an SQLite call failed, means the disk is full.
_DISK_FULL_BYTES = 1 << 20
# Stay well below SQLite's host-parameter limit (999 in builds older than 3.32) in `IN (...)` lists.
_SQL_CHUNK = 500
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# float16 halves the file size. Its relative error (about 5e-4) is far smaller than what a head can
# resolve. Little-endian is written explicitly so a file can be copied between machines.
_VEC_DTYPE = np.dtype("<f2")

# Plain SQL that SQLite 3.22 understands (Ubuntu 18.04 / JetPack 4), so no UPSERT, STRICT or RETURNING.
_SCHEMA = (
    """CREATE TABLE samples (
        sha256      TEXT PRIMARY KEY NOT NULL,
        label       TEXT NULL,
        source      TEXT NOT NULL,
        created_utc TEXT NOT NULL,
        image       BLOB NULL
    )""",
    # (label, sha256) serves both "samples of a label" and the sha-ordered reservoir slots.
    "CREATE INDEX samples_by_label ON samples(label, sha256)",
    """CREATE TABLE features (
        sample_sha256   TEXT NOT NULL REFERENCES samples(sha256) ON DELETE CASCADE,
        backbone_sha256 TEXT NOT NULL,
        preprocess      TEXT NOT NULL,
        dim             INTEGER NOT NULL CHECK (dim > 0),
        vec             BLOB NOT NULL CHECK (length(vec) = 2 * dim),
        PRIMARY KEY (sample_sha256, backbone_sha256, preprocess)
    )""",
    # The primary key starts with the sample, and this index serves the per-backbone queries.
    "CREATE INDEX features_by_backbone ON features(backbone_sha256, preprocess)",
    """CREATE TABLE label_stats (
        label TEXT PRIMARY KEY NOT NULL,
        seen  INTEGER NOT NULL CHECK (seen >= 0)
    )""",
)


@dataclass(frozen=True)
class SampleRecord:
    """One sample to add with :meth:`FeatureCache.add_samples`. It is validated when it is built.

    Attributes:
        sha256: the content address, ``FeatureCache.content_sha256(image file bytes)``, as 64
            lowercase hex characters.
        label: the class name, or ``None`` if the sample has no label yet. Re-adding a sample with
            ``None`` keeps the label it already has. The empty string is not a label.
        source: where the sample came from (a file path on the host, a camera name on a device).
            It is stored for people who inspect the cache.
        image: the encoded image bytes. They are stored only if the cache keeps images, and they must
            hash to ``sha256``, so an image can never sit under another image's address.
    """

    sha256: str
    label: str | None
    source: str
    image: bytes | None = None

    def __post_init__(self) -> None:
        _check_sha256(self.sha256, "SampleRecord.sha256")
        if self.label is not None and (not isinstance(self.label, str) or not self.label):
            raise InputError(
                "SampleRecord.label must be a class name or None",
                got=repr(self.label)[:80],
                expected="a non-empty string, or None for an unlabelled sample",
                todo="pass the class name (or None)",
            )
        if not isinstance(self.source, str):
            raise InputError(
                "SampleRecord.source must be a string",
                got=type(self.source).__name__,
                expected="str (a file path or a device source name)",
                todo="pass str(path)",
            )
        if self.image is not None:
            if not isinstance(self.image, bytes):
                raise InputError(
                    "SampleRecord.image must be bytes",
                    got=type(self.image).__name__,
                    expected="bytes (the encoded image file) or None",
                    todo="pass bytes(data)",
                )
            actual = _sha256_hex(self.image)
            if actual != self.sha256:
                raise InputError(
                    "SampleRecord.image does not match its sha256",
                    got=f"content hash {actual[:12]}… for sha256 {self.sha256[:12]}…",
                    expected="sha256 == FeatureCache.content_sha256(image)",
                    todo="compute sha256 from the same bytes you store as image",
                )


class FeatureCache:
    """Samples, labels and float16 features in one SQLite file (``STATE/features.sqlite``).

    Args:
        path: the SQLite file. Its parent directory is created if needed.
        keep_images: store the image bytes of samples. With them, features can be recomputed
            after a backbone change (:meth:`samples_without_features`). The host usually passes
            ``False`` because its images stay on disk (see ``SampleRecord.source``).
        per_class_capacity: the maximum number of labelled samples kept per label. The default is
            500 (:data:`DEFAULT_PER_CLASS_CAPACITY`), which bounds a device's storage.
            ``None`` keeps every sample: use it on the host, where every training image must stay
            cached so that a second run extracts nothing. Unlabelled samples are never limited.
        seed: makes the reservoir sampling deterministic (see :meth:`add_samples`).

    Opening runs ``PRAGMA quick_check``, which reads the whole file, so it takes time in proportion to its size.
    A file that is damaged, is not an SQLite database, belongs to another program or has a newer
    schema raises :class:`CacheError` and is left untouched.

    Each instance holds one SQLite connection and must be used by the thread that created it.
    Open one instance per thread or process, and the file is shared safely. Use it as a context
    manager, or call :meth:`close`.

    Errors: :class:`InputError` for bad arguments (a malformed sha256, a NaN vector, a wrong shape),
    :class:`CacheError` for problems with the file or its contents (an unknown sample, a lock held
    for too long, a damaged file, a closed cache).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        keep_images: bool = True,
        per_class_capacity: int | None = DEFAULT_PER_CLASS_CAPACITY,
        seed: int = 0,
    ) -> None:
        if per_class_capacity is not None and (
            isinstance(per_class_capacity, bool) or not isinstance(per_class_capacity, int) or per_class_capacity < 1
        ):
            raise InputError(
                "per_class_capacity must be a positive integer or None",
                got=repr(per_class_capacity),
                expected="an int >= 1, or None for no limit",
                todo=f"use the default ({DEFAULT_PER_CLASS_CAPACITY}) on a device and None on the host",
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError("seed must be an integer", got=repr(seed), expected="int", todo="pass e.g. seed=0")
        self._path = Path(path)
        self._keep_images = bool(keep_images)
        self._capacity = per_class_capacity
        self._seed = seed
        self._conn: sqlite3.Connection | None = None
        self._nested_write = False
        self._open()

    # ------------------------------------------------------------------ lifecycle

    @property
    def path(self) -> Path:
        """The SQLite file of this cache."""
        return self._path

    def close(self) -> None:
        """Close the connection. Closing an already closed cache does nothing."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"FeatureCache({str(self._path)!r}, per_class_capacity={self._capacity}, {state})"

    def _open(self) -> None:
        path = self._path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(
                "cannot create the feature cache directory",
                got=f"{path.parent}: {exc.strerror or exc}",
                expected="a writable directory",
                todo="check the path and its permissions (--state DIR)",
            ) from exc
        if path.is_dir():
            raise CacheError(
                "feature cache path is a directory",
                got=str(path),
                expected="an SQLite file path such as STATE/features.sqlite",
                todo="pass the file's path, not its directory",
            )
        try:
            # isolation_level=None: the module opens no transactions of its own. Each one is
            # opened explicitly below, so a write always takes the lock up front (BEGIN IMMEDIATE).
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._sqlite_error("open", exc) from exc
        self._conn = conn
        try:
            self._configure(conn)
            self._ensure_schema(conn)
        except BaseException:
            self.close()
            raise

    def _configure(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # Check the file before any statement that could write to it (journal_mode changes the
            # header). A damaged file, or one that is not ours, must be left exactly as it is.
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.OperationalError as exc:  # cannot open or lock the file: permissions, locks
            raise self._sqlite_error("open", exc) from exc
        except sqlite3.DatabaseError as exc:
            not_sqlite = "not a database" in str(exc)
            raise CacheError(
                "feature cache file is not an SQLite database" if not_sqlite else "feature cache file is damaged",
                got=f"{self._path}: {exc}",
                expected="an edgexfer features.sqlite file",
                todo="move the file aside (it was not modified), then open again to start an empty cache",
            ) from exc
        result = "; ".join(str(row[0]) for row in rows)
        if result != "ok":
            raise CacheError(
                "feature cache file is damaged",
                got=f"quick_check: {result[:200]} ({self._path})",
                expected="quick_check = ok",
                todo="move the file aside (it was not modified) and open again; features can be recomputed",
            )
        try:
            self._check_identity(conn)
            mode = self._switch_to_wal(conn)
            if str(mode).lower() != "wal":
                # Without WAL, readers block the writer and the reverse. Refuse instead of silently
                # running in another mode.
                raise CacheError(
                    "feature cache cannot use write-ahead logging",
                    got=f"journal_mode {mode} ({self._path})",
                    expected="journal_mode wal",
                    todo="put the state directory on a local filesystem (WAL does not work over NFS/SMB)",
                )
            # FULL syncs the WAL on every commit: once a write method returns, its data survives a power cut.
            conn.execute("PRAGMA synchronous = FULL")
            # Foreign keys are enforced per connection. They are needed so that deleting a sample deletes its features.
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise self._sqlite_error("open", exc) from exc

    @staticmethod
    def _switch_to_wal(conn: sqlite3.Connection) -> str:
        """``PRAGMA journal_mode = WAL``, retried while another process holds the lock it needs.

        Switching needs an exclusive lock, and when two processes open a new file at the same moment
        SQLite may answer "database is locked" at once instead of calling the busy handler (it does so
        to avoid a deadlock), so the busy timeout alone does not cover it.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        pause = 0.005
        while True:
            try:
                return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def _check_identity(self, conn: sqlite3.Connection) -> int:
        """Return the schema version. Refuse a newer schema or another program's database."""
        if conn.in_transaction:
            return self._read_identity(conn)
        # The version and the table list are read in one snapshot. Otherwise another process could
        # create the schema between the two reads, and its fresh tables would look foreign.
        conn.execute("BEGIN")
        try:
            return self._read_identity(conn)
        finally:
            self._rollback(conn)  # read only: nothing to keep

    def _read_identity(self, conn: sqlite3.Connection) -> int:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise CacheError(
                "feature cache was written by a newer edgexfer",
                got=f"schema_version {version} ({self._path})",
                expected=f"schema_version <= {SCHEMA_VERSION}",
                todo="upgrade edgexfer on this machine, or use another cache path",
            )
        if version == 0:
            names = [
                str(row[0])
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                )
            ]
            if names:
                raise CacheError(
                    "file is an SQLite database of another program",
                    got=f"{self._path} with tables {', '.join(sorted(names))[:120]}",
                    expected="an edgexfer feature cache (or no file)",
                    todo="choose another path for the feature cache; this file was not modified",
                )
        return version

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if self._check_identity(conn) == SCHEMA_VERSION:
            return
        # Create the schema under the write lock and check again inside it. Two processes may open a
        # new file at the same moment, and only one of them must create the tables.
        with self._write("create"):
            if self._check_identity(conn) == SCHEMA_VERSION:
                return
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ transactions

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CacheError(
                "feature cache is closed",
                got=str(self._path),
                expected="an open FeatureCache",
                todo="use the cache inside its 'with' block, or open a new FeatureCache",
            )
        return self._conn

    @contextmanager
    def _write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction. The lock is taken up front, and the data is durable on exit.

        BEGIN IMMEDIATE takes the write lock at once, waiting up to the busy timeout. A deferred
        transaction that later tries to write can fail with "database is locked" without waiting
        at all.
        """
        with self._transaction(action, "BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[FeatureCache]:
        """Group several writes (e.g. ``add_samples`` then ``put_features``) into one atomic commit.

        Field learning uses it so that a sample is confirmed together with its features or not at
        all: after a crash or a full disk there is never a confirmed sample without its features.
        """
        with self._write("transaction"):
            yield self

    @contextmanager
    def _read(self, action: str) -> Iterator[sqlite3.Connection]:
        """One read transaction, so that a read of several statements sees a single committed state."""
        with self._transaction(action, "BEGIN") as conn:
            yield conn

    @contextmanager
    def _transaction(self, action: str, begin: str) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT, rolled back on any error; inside transaction() it joins the open one."""
        conn = self._connection()
        if self._nested_write:
            # inside transaction(): the outer block commits or rolls back everything at once, and
            # reads see that transaction's own writes
            yield conn
            return
        try:
            conn.execute(begin)
        except sqlite3.Error as exc:
            raise self._sqlite_error(action, exc) from exc
        try:
            self._nested_write = begin == "BEGIN IMMEDIATE"
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, sqlite3.Error):
                raise self._sqlite_error(action, exc) from exc
            raise
        finally:
            self._nested_write = False

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                # The error that brought us here is the one worth reporting. SQLite rolls back an
                # unfinished transaction by itself when the connection closes.
                pass

    def _sqlite_error(self, action: str, exc: sqlite3.Error) -> CacheError:
        text = str(exc)
        if isinstance(exc, sqlite3.ProgrammingError) and "thread" in text:
            todo = "open one FeatureCache per thread (an SQLite connection belongs to the thread that opened it)"
        elif "locked" in text or "busy" in text:
            todo = (
                f"another process held the cache's write lock for over {BUSY_TIMEOUT_S:.0f} s: "
                "find it (e.g. lsof on the file) and retry"
            )
        elif "full" in text or self._disk_full():
            # A full disk is not always SQLITE_FULL: when even the -shm file cannot grow, SQLite says
            # "disk I/O error" (SQLITE_IOERR_SHMSIZE), and the advice below would be the wrong one.
            todo = "free disk space in the state directory and retry"
        elif "unable to open" in text or "readonly" in text:
            todo = "check that the file and its directory exist and are writable by this user"
        else:
            todo = "run FeatureCache.integrity_check(); if it is not ok, move the file aside (features can be recomputed)"
        return CacheError(
            f"feature cache {action} failed",
            got=f"{type(exc).__name__}: {text} ({self._path})",
            expected="a healthy, writable SQLite file",
            todo=todo,
        )

    def _disk_full(self) -> bool:
        """Whether the file system of the cache has (almost) no room left for this user."""
        try:
            stat = os.statvfs(self._path.parent)
        except (OSError, AttributeError):  # statvfs is POSIX only
            return False
        return stat.f_bavail * stat.f_frsize < _DISK_FULL_BYTES

    # ------------------------------------------------------------------ samples

    @staticmethod
    def content_sha256(data: bytes) -> str:
        """The content address of a sample: the sha256 of its image file's bytes, as 64 lowercase hex characters."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InputError(
                "content_sha256 needs the image file's bytes",
                got=type(data).__name__,
                expected="bytes",
                todo="read the file with Path.read_bytes()",
            )
        return _sha256_hex(data)

    def add_samples(self, items: Sequence[SampleRecord]) -> list[str]:
        """Add or update samples, then apply the per-label capacity, all in one transaction.

        Re-adding a sample updates its single row. Its ``created_utc`` stays and its ``source`` is
        replaced. A non-None label replaces the old one, and ``None`` keeps the old one. An image
        already stored is kept, and a new one is stored only if the cache keeps images.

        Capacity: a sample "arrives" at a label when it is added with that label for the first time,
        whether it is new or relabelled. Re-adding it with the same label is not an arrival, so
        re-running over the same data changes nothing. Each label counts its arrivals (``seen``).
        Once the label holds ``per_class_capacity`` (K) samples, reservoir sampling (Algorithm R)
        applies. The arrival number ``seen`` replaces a uniformly chosen member with probability
        K/seen, and otherwise the new sample is dropped, features included. So every sample that
        ever arrived is kept with the same probability. The draws come from a hash of
        ``(seed, label, seen)``, which makes the result depend only on the seed and the order of
        arrivals, not on how they were split into calls or processes. If K was lowered since a
        label's last arrival, that label is first reduced to K at random. Labels that receive no
        arrival are left as they are.

        Pass batches of a few hundred samples, since each call holds the write lock for its duration.

        Returns:
            the sha256 of the given samples that are in the cache after the call, in input order
            without duplicates. Samples that the capacity policy dropped are left out.
        """
        if isinstance(items, SampleRecord):
            raise InputError(
                "add_samples takes a list of SampleRecord",
                got="one SampleRecord",
                expected="a list or tuple of SampleRecord",
                todo="wrap a single record in a list: [record]",
            )
        records = list(items)
        for record in records:
            if not isinstance(record, SampleRecord):
                raise InputError(
                    "add_samples takes SampleRecord items",
                    got=type(record).__name__,
                    expected="SampleRecord(sha256, label, source, image=None)",
                    todo="wrap each sample in SampleRecord",
                )
        if not records:
            return []
        now = _utc_now()
        with self._write("add_samples") as conn:
            for record in records:
                row = conn.execute("SELECT label FROM samples WHERE sha256 = ?", (record.sha256,)).fetchone()
                image = record.image if self._keep_images else None
                if row is None:
                    label = record.label
                    conn.execute(
                        "INSERT INTO samples (sha256, label, source, created_utc, image) VALUES (?, ?, ?, ?, ?)",
                        (record.sha256, label, record.source, now, image),
                    )
                    arrives = label is not None
                else:
                    old_label = row[0]
                    label = record.label if record.label is not None else old_label
                    conn.execute(
                        "UPDATE samples SET label = ?, source = ?, image = COALESCE(?, image) WHERE sha256 = ?",
                        (label, record.source, image, record.sha256),
                    )
                    arrives = label is not None and label != old_label
                if arrives:
                    self._admit(conn, record.sha256, label)
            present = self._present(conn, "samples", "sha256", [r.sha256 for r in records])
        return [sha for sha in dict.fromkeys(r.sha256 for r in records) if sha in present]

    def _admit(self, conn: sqlite3.Connection, sha: str, label: str) -> None:
        """Count one arrival of ``sha`` at ``label`` and apply the reservoir (``sha`` already carries the label)."""
        row = conn.execute("SELECT seen FROM label_stats WHERE label = ?", (label,)).fetchone()
        members = conn.execute(
            "SELECT COUNT(*) FROM samples WHERE label = ? AND sha256 != ?", (label, sha)
        ).fetchone()[0]
        # `seen` counts every arrival, kept or not, so it is never below members + 1. Taking max()
        # repairs a cache whose statistics were lost without biasing the draw toward new samples.
        seen = max((int(row[0]) if row else 0) + 1, members + 1)
        conn.execute("INSERT OR REPLACE INTO label_stats (label, seen) VALUES (?, ?)", (label, seen))
        capacity = self._capacity
        if capacity is None:
            return
        while members > capacity:  # the capacity was lowered since this label last grew
            self._evict(conn, label, sha, self._draw("trim", label, seen, members, below=members))
            members -= 1
        if members < capacity:
            return
        slot = self._draw("arrival", label, seen, below=seen)
        if slot < capacity:
            self._evict(conn, label, sha, slot)
        else:
            conn.execute("DELETE FROM samples WHERE sha256 = ?", (sha,))

    def _evict(self, conn: sqlite3.Connection, label: str, keep_sha: str, slot: int) -> None:
        """Delete the label's member number ``slot`` in sha order, never ``keep_sha``. Its features go too (cascade)."""
        row = conn.execute(
            "SELECT sha256 FROM samples WHERE label = ? AND sha256 != ? ORDER BY sha256 LIMIT 1 OFFSET ?",
            (label, keep_sha, slot),
        ).fetchone()
        conn.execute("DELETE FROM samples WHERE sha256 = ?", (row[0],))

    def _draw(self, *key: object, below: int) -> int:
        """A deterministic uniform integer in ``[0, below)`` for ``key``.

        A hash is used instead of a stateful RNG so the same arrivals give the same result across
        restarts and processes. It is also stable across numpy versions. The modulo bias is below
        ``below / 2**64``.
        """
        text = "\x1f".join(str(part) for part in (self._seed, *key))
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little") % below

    def counts(self) -> dict[str, int]:
        """The number of samples per label, sorted by label. Unlabelled samples are not included."""
        with self._read("counts") as conn:
            rows = conn.execute(
                "SELECT label, COUNT(*) FROM samples WHERE label IS NOT NULL GROUP BY label ORDER BY label"
            ).fetchall()
        return {str(label): int(n) for label, n in rows}

    def image(self, sha256: str) -> bytes | None:
        """The stored image bytes of a sample. ``None`` if no image was kept or the sample is not in the cache."""
        _check_sha256(sha256, "sample sha256")
        with self._read("image") as conn:
            row = conn.execute("SELECT image FROM samples WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    # ------------------------------------------------------------------ features

    def put_features(self, backbone_sha256: str, preprocess: str, items: Mapping[str, np.ndarray]) -> None:
        """Store one feature vector per sample for this backbone and preprocessing, all or nothing.

        Every vector must be 1-D, floating point, finite and within float16 range (±65504). All must
        have the same length, equal to any vectors already stored under this key. A sample that is
        not in the cache raises :class:`CacheError`. Existing vectors under the same key are
        replaced. Vectors are stored as little-endian float16.
        """
        _check_sha256(backbone_sha256, "backbone_sha256")
        _check_preprocess(preprocess)
        if not isinstance(items, Mapping):
            raise InputError(
                "put_features takes a mapping sample sha256 -> vector",
                got=type(items).__name__,
                expected="dict[str, np.ndarray]",
                todo="pass {sha: vector, ...}",
            )
        blobs: dict[str, bytes] = {}
        dim: int | None = None
        for sha, vector in items.items():
            _check_sha256(sha, "sample sha256")
            packed = _pack_vector(sha, vector)
            if dim is None:
                dim = packed.size
            elif packed.size != dim:
                raise InputError(
                    "feature vectors in one put_features call differ in length",
                    got=f"{packed.size} for {sha[:12]}…",
                    expected=f"{dim}, like the others",
                    todo="pass the features of one backbone only",
                )
            blobs[sha] = packed.tobytes()
        if dim is None:
            return
        with self._write("put_features") as conn:
            row = conn.execute(
                "SELECT dim FROM features WHERE backbone_sha256 = ? AND preprocess = ? LIMIT 1",
                (backbone_sha256, preprocess),
            ).fetchone()
            if row is not None and int(row[0]) != dim:
                raise InputError(
                    "feature length differs from the one cached for this backbone",
                    got=f"{dim} (backbone {backbone_sha256[:12]}…)",
                    expected=f"{int(row[0])}",
                    todo="check that backbone_sha256 is the sha256 of the backbone that made these features",
                )
            known = self._present(conn, "samples", "sha256", list(blobs))
            unknown = [sha for sha in blobs if sha not in known]
            if unknown:
                shown = ", ".join(sha[:12] + "…" for sha in unknown[:3])
                raise CacheError(
                    "put_features for samples that are not in the cache",
                    got=f"{len(unknown)} unknown ({shown}); nothing was written",
                    expected="every sample added with add_samples first",
                    todo="call add_samples for them first (the capacity policy may have dropped some: use its return value)",
                )
            # INSERT OR REPLACE instead of UPSERT keeps SQLite 3.22 support. Nothing references
            # `features`, so the delete-and-insert of REPLACE has no side effect.
            conn.executemany(
                "INSERT OR REPLACE INTO features (sample_sha256, backbone_sha256, preprocess, dim, vec) "
                "VALUES (?, ?, ?, ?, ?)",
                [(sha, backbone_sha256, preprocess, dim, blob) for sha, blob in blobs.items()],
            )

    def get_features(self, backbone_sha256: str, preprocess: str, shas: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached float32 vectors of the given samples for this key, in input order. Samples without one are left out."""
        _check_sha256(backbone_sha256, "backbone_sha256")
        _check_preprocess(preprocess)
        wanted = _unique_shas(shas)
        found: dict[str, np.ndarray] = {}
        with self._read("get_features") as conn:
            for chunk in _chunks(wanted):
                rows = conn.execute(
                    "SELECT sample_sha256, dim, vec FROM features WHERE backbone_sha256 = ? AND preprocess = ? "
                    f"AND sample_sha256 IN ({_placeholders(chunk)})",
                    (backbone_sha256, preprocess, *chunk),
                ).fetchall()
                for sha, dim, blob in rows:
                    found[sha] = self._unpack(sha, dim, blob)
        return {sha: found[sha] for sha in wanted if sha in found}

    def missing(self, backbone_sha256: str, preprocess: str, shas: Sequence[str]) -> list[str]:
        """The given samples that have no features for this key, in input order without duplicates.

        These are the samples that still need feature extraction. The check does not require the
        samples to be in the cache.
        """
        _check_sha256(backbone_sha256, "backbone_sha256")
        _check_preprocess(preprocess)
        wanted = _unique_shas(shas)
        with self._read("missing") as conn:
            present: set[str] = set()
            for chunk in _chunks(wanted):
                present.update(
                    row[0]
                    for row in conn.execute(
                        "SELECT sample_sha256 FROM features WHERE backbone_sha256 = ? AND preprocess = ? "
                        f"AND sample_sha256 IN ({_placeholders(chunk)})",
                        (backbone_sha256, preprocess, *chunk),
                    )
                )
        return [sha for sha in wanted if sha not in present]

    def labelled(self, backbone_sha256: str, preprocess: str) -> tuple[list[str], np.ndarray, list[str]]:
        """The training set for a head: all labelled samples that have features for this key.

        Returns:
            ``(shas, features, labels)``. ``shas`` is sorted so that results are deterministic,
            ``features`` is float32 ``[N, D]`` and ``labels[i]`` belongs to ``shas[i]``. With no
            sample, ``features`` has shape ``(0, 0)``. Features of other backbones or
            preprocessings are never included.
        """
        _check_sha256(backbone_sha256, "backbone_sha256")
        _check_preprocess(preprocess)
        with self._read("labelled") as conn:
            rows = conn.execute(
                "SELECT s.sha256, s.label, f.dim, f.vec FROM samples AS s "
                "JOIN features AS f ON f.sample_sha256 = s.sha256 "
                "WHERE f.backbone_sha256 = ? AND f.preprocess = ? AND s.label IS NOT NULL "
                "ORDER BY s.sha256",
                (backbone_sha256, preprocess),
            ).fetchall()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32), []
        dims = {int(row[2]) for row in rows}
        if len(dims) != 1:
            raise CacheError(
                "cached features of one backbone differ in length",
                got=f"lengths {sorted(dims)} (backbone {backbone_sha256[:12]}…)",
                expected="one feature length per backbone",
                todo="drop these features (drop_other_backbones) and extract them again",
            )
        dim = dims.pop()
        # One join plus one conversion instead of N small arrays. put_features guarantees the
        # blob sizes (and a CHECK constraint in the table does too).
        packed = np.frombuffer(b"".join(row[3] for row in rows), dtype=_VEC_DTYPE)
        features = packed.reshape(len(rows), dim).astype(np.float32)
        return [str(row[0]) for row in rows], features, [str(row[1]) for row in rows]

    def features_count(self, backbone_sha256: str | None = None) -> int:
        """The number of cached feature vectors, for all backbones or only for ``backbone_sha256``."""
        if backbone_sha256 is not None:
            _check_sha256(backbone_sha256, "backbone_sha256")
        with self._read("features_count") as conn:
            if backbone_sha256 is None:
                row = conn.execute("SELECT COUNT(*) FROM features").fetchone()
            else:
                row = conn.execute(
                    "SELECT COUNT(*) FROM features WHERE backbone_sha256 = ?", (backbone_sha256,)
                ).fetchone()
        return int(row[0])

    def samples_without_features(self, backbone_sha256: str, preprocess: str) -> list[str]:
        """All samples, labelled or not, with no features for this key, sorted by sha256.

        After a backbone change, recompute their features from :meth:`image` on a device, or from
        the source file on the host.
        """
        _check_sha256(backbone_sha256, "backbone_sha256")
        _check_preprocess(preprocess)
        with self._read("samples_without_features") as conn:
            rows = conn.execute(
                "SELECT s.sha256 FROM samples AS s WHERE NOT EXISTS ("
                "SELECT 1 FROM features AS f WHERE f.sample_sha256 = s.sha256 "
                "AND f.backbone_sha256 = ? AND f.preprocess = ?) ORDER BY s.sha256",
                (backbone_sha256, preprocess),
            ).fetchall()
        return [str(row[0]) for row in rows]

    def drop_other_backbones(self, keep_backbone_sha256: str) -> int:
        """Delete the features of every backbone except ``keep_backbone_sha256``, and return how many were deleted.

        Samples and labels are kept. SQLite reuses the freed pages, so the file does not shrink.
        """
        _check_sha256(keep_backbone_sha256, "keep_backbone_sha256")
        with self._write("drop_other_backbones") as conn:
            cursor = conn.execute("DELETE FROM features WHERE backbone_sha256 != ?", (keep_backbone_sha256,))
            return int(cursor.rowcount)

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check`` over the whole file. The result is ``"ok"`` or the problems joined by ``"; "``."""
        conn = self._connection()
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.Error as exc:
            raise self._sqlite_error("integrity_check", exc) from exc
        return "; ".join(str(row[0]) for row in rows)

    # ------------------------------------------------------------------ internals

    def _present(self, conn: sqlite3.Connection, table: str, column: str, shas: Sequence[str]) -> set[str]:
        """The subset of ``shas`` that appears in ``table.column``. The names are constants from this module."""
        found: set[str] = set()
        unique = list(dict.fromkeys(shas))
        for chunk in _chunks(unique):
            found.update(
                row[0]
                for row in conn.execute(
                    f"SELECT {column} FROM {table} WHERE {column} IN ({_placeholders(chunk)})", tuple(chunk)
                )
            )
        return found

    def _unpack(self, sha: str, dim: int, blob: bytes) -> np.ndarray:
        if len(blob) != 2 * int(dim):
            raise CacheError(
                "cached feature vector has the wrong size",
                got=f"{len(blob)} bytes for dim {dim} (sample {sha[:12]}…)",
                expected=f"{2 * int(dim)} bytes",
                todo="run integrity_check(); drop and recompute the features",
            )
        return np.frombuffer(blob, dtype=_VEC_DTYPE).astype(np.float32)


def _sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _utc_now() -> str:
    """The current time in ISO 8601 UTC with milliseconds, e.g. ``2026-11-25T10:00:00.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _check_sha256(value: object, what: str) -> str:
    if not isinstance(value, str) or _SHA256_RE.fullmatch(value) is None:
        raise InputError(
            f"{what} is not a sha256 hex digest",
            got=repr(value)[:80],
            expected="64 lowercase hex characters",
            todo="use FeatureCache.content_sha256(data) for samples and the manifest's backbone.sha256 for backbones",
        )
    return value


def _check_preprocess(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(
            "preprocess must identify the preprocessing",
            got=repr(value)[:80],
            expected="a non-empty string, e.g. the manifest's backbone.input as canonical JSON",
            todo="pass the same preprocess string when writing and reading features",
        )
    return value


def _unique_shas(shas: Sequence[str]) -> list[str]:
    # A str is itself a Sequence, and iterating it would look up 64 one-character "shas".
    if isinstance(shas, (str, bytes)):
        raise InputError(
            "expected a list of sample sha256 strings",
            got=f"one {type(shas).__name__}",
            expected="a list or tuple of sha256 strings",
            todo="wrap a single sha in a list: [sha]",
        )
    unique = list(dict.fromkeys(shas))
    for sha in unique:
        _check_sha256(sha, "sample sha256")
    return unique


def _pack_vector(sha: str, vector: object) -> np.ndarray:
    """Validate one feature vector and return it as little-endian float16."""
    array = np.asarray(vector)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
        raise InputError(
            "feature vector must be a non-empty 1-D float array",
            got=f"shape {array.shape} dtype {array.dtype} (sample {sha[:12]}…)",
            expected="shape (D,) with a float dtype",
            todo="pass one pooled feature vector per sample, e.g. features[i]",
        )
    if not np.all(np.isfinite(array)):
        raise InputError(
            "feature vector contains NaN or infinity",
            got=f"{int(np.count_nonzero(~np.isfinite(array)))} non-finite values (sample {sha[:12]}…)",
            expected="finite values",
            todo="check the backbone engine's output for this image; nothing was written",
        )
    with np.errstate(over="ignore"):  # overflow to inf is detected and reported just below
        packed = array.astype(_VEC_DTYPE)
    if not np.all(np.isfinite(packed)):
        raise InputError(
            "feature vector exceeds the float16 range of the cache",
            got=f"max |value| {float(np.max(np.abs(array))):.4g} (sample {sha[:12]}…)",
            expected="|value| <= 65504",
            todo="check the backbone output; pooled features of a sane backbone are far smaller",
        )
    return packed


def _chunks(items: Sequence[str], size: int = _SQL_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _placeholders(chunk: Sequence[str]) -> str:
    return ", ".join("?" * len(chunk))
