"""The review queue in the device's SQLite file: bounded, one entry per image, and old files migrate."""
from __future__ import annotations

import hashlib
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from edgexfer.runtime.cache import SCHEMA_VERSION, FeatureCache, SampleRecord
from edgexfer.runtime.errors import InputError
from edgexfer.runtime.review import ReviewQueue, review_threshold


def _add(queue: ReviewQueue, data: bytes, label: str = "cat", p: float = 0.3) -> int | None:
    return queue.add(sha256=hashlib.sha256(data).hexdigest(), data=data, media_type="image/png", label=label,
                     probability=p, top_k=[{"label": label, "probability": p}], head=1, source="test")


def test_queue_is_bounded_newest_first_and_keeps_one_entry_per_image(tmp_path: Path) -> None:
    with ReviewQueue(tmp_path / "features.sqlite", capacity=3) as queue:
        ids = [_add(queue, f"image {i}".encode()) for i in range(5)]
        assert _add(queue, b"image 4") is None  # the same image again: not queued twice
        assert queue.id_of(hashlib.sha256(b"image 4").hexdigest()) == ids[4]  # ... its entry is found
        assert queue.id_of(hashlib.sha256(b"image 0").hexdigest()) is None  # dropped
        assert queue.count() == 3
        assert [e.id for e in queue.entries()] == ids[:1:-1]  # the two oldest were dropped
        assert queue.sample(ids[0]) is None and queue.sample(ids[4]) == (b"image 4", "image/png")
        assert queue.entries()[0].top_k == [{"label": "cat", "probability": 0.3}]
        assert queue.remove(ids[4]) and not queue.remove(ids[4])
        assert queue.count() == 2


def test_the_default_threshold_is_a_ratio_to_chance() -> None:
    """1.25 / C: above chance (1/C, the lowest top probability there is) and below certainty for any C >= 2."""
    assert review_threshold(2) == 0.625 and review_threshold(4) == 0.3125 and review_threshold(8) == 0.15625
    for c in range(2, 200):
        assert 1 / c < review_threshold(c) < 1
        assert review_threshold(c) > review_threshold(c + 1)
    assert review_threshold(1) == 0.0 and review_threshold(0) == 0.0  # one class: always certain
    assert review_threshold(4, ratio=2.0) == 0.5
    with pytest.raises(InputError, match="class count"):
        review_threshold(-1)


def test_capacity_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="capacity"):
        ReviewQueue(tmp_path / "features.sqlite", capacity=0)


def test_a_schema_1_cache_gains_the_queue_and_keeps_its_samples(tmp_path: Path) -> None:
    """A device's cache written before the service existed is migrated in place when it is opened."""
    path = tmp_path / "features.sqlite"
    with FeatureCache(path) as cache:
        cache.add_samples([SampleRecord("a" * 64, "cat", "test")])
    with closing(sqlite3.connect(path)) as raw:  # back to the schema 1 layout (no queue, no member counts,
        raw.execute("DROP TABLE review")  # no recent inputs, no field labels)
        raw.execute("DROP TABLE recent_inputs")
        raw.execute("DROP TABLE field_labels")
        for trigger in ("samples_member_insert", "samples_member_delete", "samples_member_relabel"):
            raw.execute(f"DROP TRIGGER {trigger}")
        raw.execute("ALTER TABLE label_stats DROP COLUMN members")
        raw.execute("PRAGMA user_version = 1")
        raw.commit()
    with ReviewQueue(path) as queue:
        assert _add(queue, b"x") is not None
    with closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    with FeatureCache(path) as cache:
        assert cache.counts() == {"cat": 1}
    with closing(sqlite3.connect(path)) as raw:  # every migration ran: 4 added the drift test's two tables
        assert raw.execute("SELECT COUNT(*) FROM recent_inputs").fetchone() == (0,)
        assert raw.execute("SELECT COUNT(*) FROM field_labels").fetchone() == (0,)
