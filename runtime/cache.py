"""Persistent feature cache: samples, labels and backbone features in one SQLite file.

One cache serves both sides. On the host, a second training run over the same images extracts
nothing, because the features are already here. On the device, field learning stores the features
of new local samples and retrains only the head from them.

Features are keyed by ``(sample sha256, backbone sha256, preprocess)``: the backbone's identity is
the sha256 of its ``backbone.onnx`` and ``preprocess`` names the preprocessing that fed it. So the
features of two backbones, or of two preprocessings, can never be mixed.

This module is the cache's public face (:class:`FeatureCache`, :class:`SampleRecord`) and what it
stores: samples and float16 feature vectors. The SQLite file itself (schema, WAL, locking,
durability and concurrency) is :mod:`edgexfer.runtime.cache_sqlite`; the per-class capacity (a
reservoir over each label's arrivals) is :mod:`edgexfer.runtime.cache_capacity`.
"""
from __future__ import annotations

import hashlib
import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import numpy as np

from edgexfer.runtime.cache_capacity import DEFAULT_PER_CLASS_CAPACITY, ClassReservoir
from edgexfer.runtime.cache_sqlite import BUSY_TIMEOUT_S, SCHEMA_VERSION, CacheDatabase, rows_in
from edgexfer.runtime.errors import CacheError, InputError

__all__ = [
    "Admission",
    "BUSY_TIMEOUT_S",
    "DEFAULT_PER_CLASS_CAPACITY",
    "SCHEMA_VERSION",
    "FeatureCache",
    "SampleRecord",
]

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# float16 halves the file size. Its relative error (about 5e-4) is far smaller than what a head can
# resolve. Little-endian is written explicitly so a file can be copied between machines.
_VEC_DTYPE = np.dtype("<f2")
# The features of some samples under one key; `{placeholders}` is filled by rows_in().
_FEATURES_OF = (
    "SELECT {columns} FROM features WHERE backbone_sha256 = ? AND preprocess = ? "
    "AND sample_sha256 IN ({{placeholders}})"
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


@dataclass(frozen=True)
class Admission:
    """What :meth:`FeatureCache.admit_samples` did with the samples it was given."""

    #: given samples in the cache after the call, in input order without duplicates
    kept: list[str]
    #: given samples the per-class capacity turned away (or that a later arrival of the same call evicted)
    dropped: list[str]
    #: samples stored before the call that the capacity evicted to make room
    evicted: int = 0


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

    Opening runs ``PRAGMA quick_check``, which reads the whole file, only if the file was not closed
    cleanly the last time (a power cut, or every process that had it open was killed;
    :mod:`edgexfer.runtime.cache_session`); :attr:`quick_checked` says whether it ran.
    :meth:`integrity_check` (``edgexfer device check-cache``) checks the whole file on demand. A file that
    is damaged, is not an SQLite database, belongs to another program or has a newer schema raises
    :class:`CacheError` and is left untouched.

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
        self._reservoir = ClassReservoir(per_class_capacity, seed)  # validated before the file is touched
        self._path = Path(path)
        self._keep_images = bool(keep_images)
        self._db = CacheDatabase(self._path)

    # ------------------------------------------------------------------ lifecycle

    @property
    def path(self) -> Path:
        """The SQLite file of this cache."""
        return self._path

    @property
    def quick_checked(self) -> bool:
        """Whether opening ran ``PRAGMA quick_check`` over the whole file (it was not closed cleanly before)."""
        return self._db.quick_checked

    def close(self) -> None:
        """Close the connection. Closing an already closed cache does nothing."""
        self._db.close()

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
        state = "closed" if self._db.closed else "open"
        return f"FeatureCache({str(self._path)!r}, per_class_capacity={self._reservoir.capacity}, {state})"

    @contextmanager
    def transaction(self) -> Iterator[FeatureCache]:
        """Group several writes (e.g. ``add_samples`` then ``put_features``) into one atomic commit.

        Field learning uses it so that a sample is confirmed together with its features or not at
        all: after a crash or a full disk there is never a confirmed sample without its features.
        """
        with self._db.write("transaction"):
            yield self

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

        Capacity: each label keeps at most ``per_class_capacity`` samples, a uniform sample (a
        reservoir) of all that ever arrived at it. A sample arrives at a label when it is first added
        with that label, new or relabelled, so re-running over the same data changes nothing. An
        arrival that is not kept is dropped, features included. The draws depend only on the seed and
        the order of arrivals; :mod:`edgexfer.runtime.cache_capacity` has the details. Each arrival
        costs the same whatever the label's size.

        Pass batches of a few hundred samples, since each call holds the write lock for its duration.

        Returns:
            the sha256 of the given samples that are in the cache after the call, in input order
            without duplicates. Samples that the capacity policy dropped are left out
            (:meth:`admit_samples` also names them).
        """
        return self.admit_samples(items).kept

    def admit_samples(self, items: Sequence[SampleRecord]) -> Admission:
        """:meth:`add_samples`, and what the capacity did: the samples kept, those dropped, how many evicted."""
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
            return Admission([], [])
        now = _utc_now()
        admitted: set[str] = set()  # arrivals of this call the reservoir kept (a later one may evict them)
        evicted = 0
        with self._db.write("add_samples") as conn:
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
                    kept, removed = self._reservoir.admit(conn, record.sha256, label)
                    evicted += removed
                    if kept:
                        admitted.add(record.sha256)
            present = self._present(conn, [r.sha256 for r in records])
        given = list(dict.fromkeys(r.sha256 for r in records))
        # an arrival of this call that a later one evicted was counted as an eviction: it is a drop
        evicted -= len(admitted - present)
        return Admission([sha for sha in given if sha in present], [sha for sha in given if sha not in present],
                         evicted)

    def counts(self) -> dict[str, int]:
        """The number of samples per label, sorted by label. Unlabelled samples are not included."""
        with self._db.read("counts") as conn:
            # label_stats.members is kept exact by triggers: no scan of the samples
            rows = conn.execute("SELECT label, members FROM label_stats WHERE members > 0 ORDER BY label").fetchall()
        return {str(label): int(n) for label, n in rows}

    def image(self, sha256: str) -> bytes | None:
        """The stored image bytes of a sample. ``None`` if no image was kept or the sample is not in the cache."""
        _check_sha256(sha256, "sample sha256")
        with self._db.read("image") as conn:
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
        _check_key(backbone_sha256, preprocess)
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
        with self._db.write("put_features") as conn:
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
            known = self._present(conn, list(blobs))
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
        _check_key(backbone_sha256, preprocess)
        wanted = _unique_shas(shas)
        found: dict[str, np.ndarray] = {}
        with self._db.read("get_features") as conn:
            for sha, dim, blob in rows_in(conn, _FEATURES_OF.format(columns="sample_sha256, dim, vec"),
                                          (backbone_sha256, preprocess), wanted):
                found[sha] = self._unpack(sha, dim, blob)
        return {sha: found[sha] for sha in wanted if sha in found}

    def missing(self, backbone_sha256: str, preprocess: str, shas: Sequence[str]) -> list[str]:
        """The given samples that have no features for this key, in input order without duplicates.

        These are the samples that still need feature extraction. The check does not require the
        samples to be in the cache.
        """
        _check_key(backbone_sha256, preprocess)
        wanted = _unique_shas(shas)
        with self._db.read("missing") as conn:
            present = {row[0] for row in rows_in(conn, _FEATURES_OF.format(columns="sample_sha256"),
                                                 (backbone_sha256, preprocess), wanted)}
        return [sha for sha in wanted if sha not in present]

    def labelled(self, backbone_sha256: str, preprocess: str) -> tuple[list[str], np.ndarray, list[str]]:
        """The training set for a head: all labelled samples that have features for this key.

        Returns:
            ``(shas, features, labels)``. ``shas`` is sorted so that results are deterministic,
            ``features`` is float32 ``[N, D]`` and ``labels[i]`` belongs to ``shas[i]``. With no
            sample, ``features`` has shape ``(0, 0)``. Features of other backbones or
            preprocessings are never included.
        """
        _check_key(backbone_sha256, preprocess)
        with self._db.read("labelled") as conn:
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
        with self._db.read("features_count") as conn:
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
        _check_key(backbone_sha256, preprocess)
        with self._db.read("samples_without_features") as conn:
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
        with self._db.write("drop_other_backbones") as conn:
            cursor = conn.execute("DELETE FROM features WHERE backbone_sha256 != ?", (keep_backbone_sha256,))
            return int(cursor.rowcount)

    def integrity_check(self) -> str:
        """Check the whole file: ``PRAGMA integrity_check``, then each label's member count against its samples.

        The result is ``"ok"`` or the problems joined by ``"; "``. It reads every page, so it takes time
        in proportion to the file's size (``edgexfer device check-cache`` runs it).
        """
        return self._db.integrity_check()

    def repair_member_counts(self) -> int:
        """Count each label's members from its samples again, if something outside edgexfer changed them (the
        triggers keep them exact otherwise); returns how many labels were off."""
        return self._db.recount_members()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _present(conn: sqlite3.Connection, shas: Sequence[str]) -> set[str]:
        """The subset of ``shas`` that are samples in the cache."""
        unique = list(dict.fromkeys(shas))
        return {row[0] for row in rows_in(conn, "SELECT sha256 FROM samples WHERE sha256 IN ({placeholders})", (), unique)}

    @staticmethod
    def _unpack(sha: str, dim: int, blob: bytes) -> np.ndarray:
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


def _check_key(backbone_sha256: object, preprocess: object) -> None:
    """Check the key of a set of features: the backbone's sha256 and the preprocessing's name."""
    _check_sha256(backbone_sha256, "backbone_sha256")
    _check_preprocess(preprocess)


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
