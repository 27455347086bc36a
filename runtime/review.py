"""The review queue: low-confidence inputs kept for a person to label (``device serve``, ``device watch``).

Each entry is the sample as it arrived (an encoded image, a UTF-8 text: what its modality keeps), what the
active head said about it (label, probability,
top-k, head version), where it came from and when. The queue lives in the device's SQLite file
(``STATE/features.sqlite``, table ``review``) and is bounded: adding beyond ``capacity`` drops the
oldest entries. The same sample (same sha256) is queued once. Labelling an entry hands its bytes to
:meth:`edgexfer.runtime.device.Device.learn` and removes it; nothing trains on an unlabelled entry.

Like :class:`~edgexfer.runtime.cache.FeatureCache`, one instance holds one SQLite connection and
belongs to the thread that opened it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgexfer.runtime.cache_sqlite import CacheDatabase
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.names import REVIEW_CHANCE_RATIO

__all__ = ["DEFAULT_REVIEW_CAPACITY", "REVIEW_CHANCE_RATIO", "ReviewEntry", "ReviewQueue", "review_threshold"]

#: entries kept by default (at ~50 KB per clip-art or camera JPEG, about 10 MB)
DEFAULT_REVIEW_CAPACITY = 200


def review_threshold(class_count: int, ratio: float = REVIEW_CHANCE_RATIO) -> float:
    """The default low-confidence threshold of a head of ``class_count`` classes: ``ratio`` times chance.

    A prediction is doubtful when its top class is less than ``ratio`` times as likely as a uniform guess over
    the C classes: top probability < 1.25 / C (2 classes: 0.625, 3: 0.417, 4: 0.3125, 8: 0.156). The top
    probability of C classes is never below 1/C, so one fixed threshold means something else for every C:
    0.5 queues nothing of a 2-class head short of a coin toss, and nearly everything of a 4-class head
    whose answers are right but soft (docs/service.md has the figures of the test bundles). With one class
    nothing is doubtful (0.0).
    """
    if isinstance(class_count, bool) or not isinstance(class_count, int) or class_count < 0:
        raise InputError("class count", got=repr(class_count), expected="a non-negative integer")
    if class_count < 2:
        return 0.0
    return min(1.0, ratio / class_count)


@dataclass(frozen=True)
class ReviewEntry:
    id: int
    sha256: str
    media_type: str
    label: str  #: what the head predicted
    probability: float
    top_k: list[dict[str, Any]]
    head: int
    source: str
    created_utc: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ReviewQueue:
    """The bounded queue in ``path`` (the device's ``features.sqlite``)."""

    def __init__(self, path: str | Path, capacity: int = DEFAULT_REVIEW_CAPACITY) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise InputError("review queue capacity", got=repr(capacity), expected="a positive integer",
                             todo="pass e.g. --review-capacity 200")
        self.capacity = capacity
        self._db = CacheDatabase(Path(path))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReviewQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, *, sha256: str, data: bytes, media_type: str, label: str, probability: float,
            top_k: list[dict[str, Any]], head: int, source: str) -> int | None:
        """Queue one sample (its bytes as the modality keeps them: an image file, a UTF-8 text); returns its id,
        or ``None`` if that sample is queued already. (The table's column is still named ``image``.)"""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._db.write("review add") as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO review (sha256, image, media_type, label, probability, top_k, head, source, "
                "created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sha256, data, media_type, label, float(probability), json.dumps(top_k), int(head), source, created))
            new_id = int(cur.lastrowid) if cur.rowcount else None
            # bounded: the oldest entries go first
            conn.execute("DELETE FROM review WHERE id NOT IN (SELECT id FROM review ORDER BY id DESC LIMIT ?)",
                         (self.capacity,))
        return new_id

    def id_of(self, sha256: str) -> int | None:
        """The id of the entry of the sample ``sha256``; ``None`` if it is not queued."""
        with self._db.read("review id") as conn:
            row = conn.execute("SELECT id FROM review WHERE sha256 = ?", (sha256,)).fetchone()
        return None if row is None else int(row[0])

    def entries(self, limit: int = 100) -> list[ReviewEntry]:
        """The newest ``limit`` entries, newest first, without their sample bytes."""
        with self._db.read("review list") as conn:
            rows = conn.execute(
                "SELECT id, sha256, media_type, label, probability, top_k, head, source, created_utc FROM review "
                "ORDER BY id DESC LIMIT ?", (int(limit),)).fetchall()
        return [ReviewEntry(int(r[0]), r[1], r[2], r[3], float(r[4]), json.loads(r[5]), int(r[6]), r[7], r[8])
                for r in rows]

    def count(self) -> int:
        with self._db.read("review count") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM review").fetchone()[0])

    def sample(self, entry_id: int) -> tuple[bytes, str] | None:
        """The sample's bytes and media type of an entry; ``None`` if there is no such entry."""
        with self._db.read("review sample") as conn:
            row = conn.execute("SELECT image, media_type FROM review WHERE id = ?", (int(entry_id),)).fetchone()
        return None if row is None else (bytes(row[0]), str(row[1]))

    def remove(self, entry_id: int) -> bool:
        with self._db.write("review remove") as conn:
            return conn.execute("DELETE FROM review WHERE id = ?", (int(entry_id),)).rowcount > 0
