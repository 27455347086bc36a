"""The SQLite file of the feature cache: opening and checking it, its schema, its transactions.

:class:`CacheDatabase` owns the one connection of a :class:`~edgexfer.runtime.cache.FeatureCache`;
what is stored in it, and how, is :mod:`edgexfer.runtime.cache`'s business.

Durability: each write is one short ``BEGIN IMMEDIATE`` transaction in WAL mode with
``synchronous=FULL``, so data is durable once a write returns, even if the process is killed or the
power fails right after.

Concurrency: only one process writes at a time. Other writers wait up to :data:`BUSY_TIMEOUT_S`.
Readers never wait for a writer and see only committed data.

The schema is stored in ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`).

Integrity: opening runs ``PRAGMA quick_check`` (which reads the whole file) only when the file was not
closed cleanly the last time (:mod:`edgexfer.runtime.cache_session` keeps that record beside it);
``edgexfer device check-cache`` runs the full ``PRAGMA integrity_check`` on demand.
"""
from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgexfer.runtime.cache_session import CacheSession
from edgexfer.runtime.errors import CacheError

#: Layout version kept in ``PRAGMA user_version``. A file with a higher number is refused; a lower
#: one is brought up to date by :data:`_MIGRATIONS` when it is opened (2: the service's review queue;
#: 3: ``label_stats.members``, kept by triggers, so the capacity reservoir admits in constant time;
#: 4: ``recent_inputs``, the features of the latest inputs that the drift test reads, and ``field_labels``, what
#: the active head answered for each sample labelled on site).
SCHEMA_VERSION = 4
#: How long a writer waits for another process's write transaction before giving up.
BUSY_TIMEOUT_S = 30.0

# SQLite's page cache per connection, in KiB (a negative cache_size): the indexes of ~100,000 samples.
_PAGE_CACHE_KIB = 16 * 1024
# Less free space than this, at the moment an SQLite call failed, means the disk is full.
_DISK_FULL_BYTES = 1 << 20
# Stay well below SQLite's host-parameter limit (999 in builds older than 3.32) in `IN (...)` lists.
_SQL_CHUNK = 500

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
        label   TEXT PRIMARY KEY NOT NULL,
        seen    INTEGER NOT NULL CHECK (seen >= 0),
        members INTEGER NOT NULL DEFAULT 0 CHECK (members >= 0)
    )""",
)
# label_stats.members is the number of samples that carry the label. Triggers keep it exact whatever
# changes a sample's label (insert, relabel, delete, an eviction, a delete by hand in the sqlite3 shell),
# so the reservoir reads one row instead of counting the label's samples on every arrival.
_MEMBER_TRIGGERS = (
    """CREATE TRIGGER samples_member_insert AFTER INSERT ON samples WHEN NEW.label IS NOT NULL BEGIN
        INSERT OR IGNORE INTO label_stats (label, seen, members) VALUES (NEW.label, 0, 0);
        UPDATE label_stats SET members = members + 1 WHERE label = NEW.label;
    END""",
    """CREATE TRIGGER samples_member_delete AFTER DELETE ON samples WHEN OLD.label IS NOT NULL BEGIN
        UPDATE label_stats SET members = members - 1 WHERE label = OLD.label;
    END""",
    """CREATE TRIGGER samples_member_relabel AFTER UPDATE OF label ON samples
        WHEN OLD.label IS NOT NEW.label BEGIN
        UPDATE label_stats SET members = members - 1 WHERE label = OLD.label;
        INSERT OR IGNORE INTO label_stats (label, seen, members) SELECT NEW.label, 0, 0 WHERE NEW.label IS NOT NULL;
        UPDATE label_stats SET members = members + 1 WHERE label = NEW.label;
    END""",
)
# Counting the members from the samples (a label whose statistics were lost gets a row with seen = its
# members, the least it can have had): the migration to version 3 and `check-cache --repair`.
_RECOUNT_MEMBERS = (
    "INSERT OR IGNORE INTO label_stats (label, seen, members) "
    "SELECT label, COUNT(*), 0 FROM samples WHERE label IS NOT NULL GROUP BY label",
    "UPDATE label_stats SET members = (SELECT COUNT(*) FROM samples WHERE samples.label = label_stats.label), "
    "seen = MAX(seen, (SELECT COUNT(*) FROM samples WHERE samples.label = label_stats.label))",
)
# Version 2 -> 3: the column, counted once, then the triggers.
_MEMBERS_MIGRATION = (
    "ALTER TABLE label_stats ADD COLUMN members INTEGER NOT NULL DEFAULT 0 CHECK (members >= 0)",
    *_RECOUNT_MEMBERS,
    *_MEMBER_TRIGGERS,
)
# The review queue of ``device serve`` and ``device watch`` (edgexfer.runtime.review): low-confidence
# inputs kept for a person to label. Not samples: nothing trains on them until they are labelled.
_REVIEW_SCHEMA = (
    """CREATE TABLE review (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        sha256      TEXT NOT NULL UNIQUE,
        image       BLOB NOT NULL,
        media_type  TEXT NOT NULL,
        label       TEXT NOT NULL,
        probability REAL NOT NULL,
        top_k       TEXT NOT NULL,
        head        INTEGER NOT NULL,
        source      TEXT NOT NULL,
        created_utc TEXT NOT NULL
    )""",
)
# The features of the latest inputs that ``device predict``, ``serve`` and ``watch`` classified
# (edgexfer.runtime.drift): a ring buffer the drift test compares with the bundle's reference. Features,
# the answer and its confidence only, never the sample.
_RECENT_SCHEMA = (
    """CREATE TABLE recent_inputs (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        backbone_sha256 TEXT NOT NULL,
        dim             INTEGER NOT NULL CHECK (dim > 0),
        vec             BLOB NOT NULL CHECK (length(vec) = 2 * dim),
        label           TEXT NOT NULL,
        probability     REAL NOT NULL,
        created_utc     TEXT NOT NULL
    )""",
    # edgexfer.runtime.field_accuracy: each sample labelled on site, judged once, by the head active then
    """CREATE TABLE field_labels (
        sample_sha256 TEXT NOT NULL,
        label         TEXT NOT NULL,
        predicted     TEXT NOT NULL,
        probability   REAL NOT NULL,
        head          INTEGER NOT NULL,
        created_utc   TEXT NOT NULL,
        PRIMARY KEY (sample_sha256, label)
    )""",
)
#: statements that bring a file of schema version ``v`` to ``v + 1``
_MIGRATIONS: dict[int, tuple[str, ...]] = {1: _REVIEW_SCHEMA, 2: _MEMBERS_MIGRATION, 3: _RECENT_SCHEMA}


class CacheDatabase:
    """One checked SQLite connection to a feature cache file, with its schema in place.

    Opening runs ``PRAGMA quick_check``, which reads the whole file, when the file was not closed cleanly
    the last time (:class:`~edgexfer.runtime.cache_session.CacheSession`; :attr:`quick_checked` says
    whether it ran). A file that is damaged, is not an SQLite database, belongs to another program or has
    a newer schema raises :class:`CacheError` and is left untouched. The connection belongs to the thread
    that opened it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._nested_write = False
        self._session = CacheSession(path)
        #: whether opening ran ``PRAGMA quick_check`` (the file was not closed cleanly before)
        self.quick_checked = False
        self._open()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the connection. Closing an already closed database does nothing."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
            self._session.end()  # after the connection: the last one out records a clean close

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        path = self.path
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
        if not path.exists():
            # created private (0600): it holds a site's images and labels. SQLite gives its -wal and
            # -shm files the database file's permissions. An empty file is an empty database to SQLite.
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            except OSError as exc:
                raise self.error("open", sqlite3.OperationalError(exc.strerror or str(exc))) from exc
        must_check = self._session.begin()
        try:
            # isolation_level=None: the module opens no transactions of its own. Each one is
            # opened explicitly below, so a write always takes the lock up front (BEGIN IMMEDIATE).
            conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            self._session.end(refused=True)
            raise self.error("open", exc) from exc
        self._conn = conn
        try:
            self._configure(conn, must_check)
            self._ensure_schema(conn)
            self._session.ready()
        except BaseException:
            self._conn = None
            conn.close()
            self._session.end(refused=True)
            raise

    def _configure(self, conn: sqlite3.Connection, must_check: bool) -> None:
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            # Check the file before any statement that could write to it (journal_mode changes the
            # header). A damaged file, or one that is not ours, must be left exactly as it is. A file
            # closed cleanly is not read through (the header is still parsed by the first statement).
            if must_check:
                rows = conn.execute("PRAGMA quick_check").fetchall()
                self.quick_checked = True
            else:
                rows = [("ok",)]
                conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:  # cannot open or lock the file: permissions, locks
            raise self.error("open", exc) from exc
        except sqlite3.DatabaseError as exc:
            not_sqlite = "not a database" in str(exc)
            raise CacheError(
                "feature cache file is not an SQLite database" if not_sqlite else "feature cache file is damaged",
                got=f"{self.path}: {exc}",
                expected="an edgexfer features.sqlite file",
                todo="move the file aside (it was not modified), then open again to start an empty cache",
            ) from exc
        result = "; ".join(str(row[0]) for row in rows)
        if result != "ok":
            raise CacheError(
                "feature cache file is damaged",
                got=f"quick_check: {result[:200]} ({self.path})",
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
                    got=f"journal_mode {mode} ({self.path})",
                    expected="journal_mode wal",
                    todo="put the state directory on a local filesystem (WAL does not work over NFS/SMB)",
                )
            # FULL syncs the WAL on every commit: once a write method returns, its data survives a power cut.
            conn.execute("PRAGMA synchronous = FULL")
            # Foreign keys are enforced per connection. They are needed so that deleting a sample deletes its features.
            conn.execute("PRAGMA foreign_keys = ON")
            # Inserts land at random places of the sha256-keyed indexes: with SQLite's default 2 MB page cache
            # their leaves stop fitting at a few thousand samples of one class and each insert reads pages
            # again (benchmarks/cache_scaling.py). The cache grows only as pages are read.
            conn.execute(f"PRAGMA cache_size = -{_PAGE_CACHE_KIB}")
        except sqlite3.Error as exc:
            raise self.error("open", exc) from exc

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
                got=f"schema_version {version} ({self.path})",
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
                    got=f"{self.path} with tables {', '.join(sorted(names))[:120]}",
                    expected="an edgexfer feature cache (or no file)",
                    todo="choose another path for the feature cache; this file was not modified",
                )
        return version

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        if self._check_identity(conn) == SCHEMA_VERSION:
            return
        # Create or migrate the schema under the write lock and check again inside it. Two processes
        # may open a file at the same moment, and only one of them must change the tables. A migration
        # is one transaction: an older file is either fully migrated or left as it was.
        with self.write("create"):
            version = self._check_identity(conn)
            if version == SCHEMA_VERSION:
                return
            if version == 0:
                for statement in _SCHEMA + _MEMBER_TRIGGERS + _REVIEW_SCHEMA + _RECENT_SCHEMA:
                    conn.execute(statement)
            else:
                for step in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[step]:
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ transactions

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CacheError(
                "feature cache is closed",
                got=str(self.path),
                expected="an open FeatureCache",
                todo="use the cache inside its 'with' block, or open a new FeatureCache",
            )
        return self._conn

    @contextmanager
    def write(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction. The lock is taken up front, and the data is durable on exit.

        BEGIN IMMEDIATE takes the write lock at once, waiting up to the busy timeout. A deferred
        transaction that later tries to write can fail with "database is locked" without waiting
        at all. Inside another ``write`` the block joins the open transaction, which commits or rolls
        back everything at once.
        """
        with self._transaction(action, "BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def read(self, action: str) -> Iterator[sqlite3.Connection]:
        """One read transaction, so that a read of several statements sees a single committed state."""
        with self._transaction(action, "BEGIN") as conn:
            yield conn

    @contextmanager
    def _transaction(self, action: str, begin: str) -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT, rolled back on any error; inside a write it joins the open one."""
        conn = self._connection()
        if self._nested_write:
            # inside write(): the outer block commits or rolls back everything at once, and
            # reads see that transaction's own writes
            yield conn
            return
        try:
            conn.execute(begin)
        except sqlite3.Error as exc:
            raise self.error(action, exc) from exc
        try:
            self._nested_write = begin == "BEGIN IMMEDIATE"
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            self._rollback(conn)
            if isinstance(exc, sqlite3.Error):
                raise self.error(action, exc) from exc
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

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check`` over the whole file, then ``label_stats.members`` against the samples.

        Returns ``"ok"`` or the problems joined by ``"; "``.
        """
        conn = self._connection()
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.OperationalError as exc:  # locked, closed, I/O: not a verdict on the file
            raise self.error("integrity_check", exc) from exc
        except sqlite3.DatabaseError as exc:  # pages so damaged that the check itself stops
            return str(exc)
        result = "; ".join(str(row[0]) for row in rows)
        if result != "ok":
            return result
        with self.read("integrity_check") as conn:
            counted = dict(conn.execute("SELECT label, COUNT(*) FROM samples WHERE label IS NOT NULL GROUP BY label"))
            stored = dict(conn.execute("SELECT label, members FROM label_stats"))
        problems = [f"label_stats.members of {label!r} is {stored.get(label, 0)}, "
                    f"{counted.get(label, 0)} sample(s) carry the label"
                    for label in sorted(set(counted) | set(stored)) if counted.get(label, 0) != stored.get(label, 0)]
        return "; ".join(problems) or "ok"

    def recount_members(self) -> int:
        """Count each label's members from its samples again (``check-cache --repair``); returns the labels fixed."""
        with self.write("recount_members") as conn:
            before = dict(conn.execute("SELECT label, members FROM label_stats"))
            for statement in _RECOUNT_MEMBERS:
                conn.execute(statement)
            after = dict(conn.execute("SELECT label, members FROM label_stats"))
        return sum(1 for label, n in after.items() if before.get(label) != n)

    # ------------------------------------------------------------------ errors

    def error(self, action: str, exc: sqlite3.Error) -> CacheError:
        """The :class:`CacheError` for an SQLite failure during ``action``, with advice that fits its cause."""
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
            todo = ("run edgexfer device check-cache (FeatureCache.integrity_check()); if it is not ok, "
                    "move the file aside (features can be recomputed)")
        return CacheError(
            f"feature cache {action} failed",
            got=f"{type(exc).__name__}: {text} ({self.path})",
            expected="a healthy, writable SQLite file",
            todo=todo,
        )

    def _disk_full(self) -> bool:
        """Whether the file system of the cache has (almost) no room left for this user."""
        try:
            stat = os.statvfs(self.path.parent)
        except (OSError, AttributeError):  # statvfs is POSIX only
            return False
        return stat.f_bavail * stat.f_frsize < _DISK_FULL_BYTES


def rows_in(conn: sqlite3.Connection, sql: str, params: Sequence[object], shas: Sequence[str]) -> Iterator[tuple]:
    """The rows of ``sql`` for ``shas``, queried in chunks that stay below SQLite's parameter limit.

    ``sql`` holds one ``IN ({placeholders})``; ``params`` are the parameters that come before it.
    Only constant SQL is formatted: every value is a parameter.
    """
    for start in range(0, len(shas), _SQL_CHUNK):
        chunk = shas[start : start + _SQL_CHUNK]
        yield from conn.execute(sql.format(placeholders=", ".join("?" * len(chunk))), (*params, *chunk))
