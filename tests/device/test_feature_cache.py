"""The feature cache on real SQLite files: round trips, never mixing backbones, the capacity
reservoir, refusing bad input and bad files, two processes at once, and surviving SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from edgexfer.runtime.cache import SCHEMA_VERSION, FeatureCache, SampleRecord
from edgexfer.runtime.cache_session import session_path, write_clean_record
from edgexfer.runtime.errors import CacheError, InputError

BACKBONE = FeatureCache.content_sha256(b"backbone A")
OTHER_BACKBONE = FeatureCache.content_sha256(b"backbone B")
PRE = "letterbox/224x224/fill=255,255,255"
DIM = 1280


def sample(i: int, label: str | None = "cat", *, prefix: str = "img") -> SampleRecord:
    data = f"{prefix}-{i}".encode()
    return SampleRecord(FeatureCache.content_sha256(data), label, f"{prefix}/{i}.jpg", data)


def relu6_features(n: int, seed: int = 0) -> np.ndarray:
    """Values in [0, 6], like EfficientNet-Lite's pooled ReLU6 features."""
    return np.random.default_rng(seed).uniform(0.0, 6.0, size=(n, DIM)).astype(np.float32)


def raw_query(path: Path, sql: str) -> list[tuple]:
    """Look at the file with plain sqlite3, the way a person debugging a device would."""
    with closing(sqlite3.connect(path)) as raw:
        return raw.execute(sql).fetchall()


def raw_write(path: Path, sql: str) -> None:
    """Change the file with plain sqlite3, as a person in the sqlite3 shell would (committed)."""
    with closing(sqlite3.connect(path)) as raw:
        raw.execute(sql)
        raw.commit()


def run_child(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_features_round_trip_in_float16_and_never_mix_backbones(tmp_path: Path) -> None:
    records = [sample(i) for i in range(20)]
    shas = [r.sha256 for r in records]
    feats = relu6_features(len(shas))
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        assert cache.add_samples(records) == shas
        assert cache.missing(BACKBONE, PRE, shas) == shas
        cache.put_features(BACKBONE, PRE, dict(zip(shas, feats, strict=True)))

        got = cache.get_features(BACKBONE, PRE, shas)
        assert list(got) == shas
        stacked = np.stack([got[s] for s in shas])
        assert stacked.dtype == np.float32
        # float16 keeps about 3 significant digits: relative error at most 2**-11
        np.testing.assert_allclose(stacked, feats, rtol=1e-3, atol=1e-6)
        assert cache.missing(BACKBONE, PRE, shas + shas[:3]) == []

        # another backbone, or another preprocessing, sees none of these features
        assert cache.get_features(OTHER_BACKBONE, PRE, shas) == {}
        assert cache.missing(OTHER_BACKBONE, PRE, shas) == shas
        assert cache.get_features(BACKBONE, "resize_shorter_then_center_crop/224", shas) == {}
        other_shas, other_x, other_labels = cache.labelled(OTHER_BACKBONE, PRE)
        assert other_shas == [] and other_x.shape == (0, 0) and other_labels == []

        labelled_shas, x, labels = cache.labelled(BACKBONE, PRE)
        assert labelled_shas == sorted(shas) and labels == ["cat"] * 20
        assert x.shape == (20, DIM) and x.dtype == np.float32
        np.testing.assert_allclose(x[labelled_shas.index(shas[7])], feats[7], rtol=1e-3, atol=1e-6)

    # half the storage of float32: two bytes per value on disk
    assert raw_query(tmp_path / "features.sqlite", "SELECT DISTINCT length(vec) FROM features") == [(2 * DIM,)]


def test_missing_keeps_order_and_drops_duplicates(tmp_path: Path) -> None:
    a, b, c = (sample(i) for i in range(3))
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        cache.add_samples([a, b, c])
        cache.put_features(BACKBONE, PRE, {b.sha256: relu6_features(1)[0]})
        assert cache.missing(BACKBONE, PRE, [c.sha256, b.sha256, a.sha256, c.sha256]) == [c.sha256, a.sha256]


def test_everything_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "features.sqlite"  # the parent directory is created
    records = [sample(i, "cat" if i % 2 else "dog") for i in range(10)]
    feats = relu6_features(10, seed=1)
    with FeatureCache(path) as cache:
        cache.add_samples(records)
        cache.put_features(BACKBONE, PRE, {r.sha256: f for r, f in zip(records, feats, strict=True)})
    with FeatureCache(path) as cache:
        assert cache.counts() == {"cat": 5, "dog": 5}
        assert cache.features_count(BACKBONE) == 10
        got = cache.get_features(BACKBONE, PRE, [records[3].sha256])
        np.testing.assert_allclose(got[records[3].sha256], feats[3], rtol=1e-3, atol=1e-6)
        assert cache.image(records[3].sha256) == b"img-3"
        assert cache.integrity_check() == "ok"


def test_re_adding_a_sample_keeps_one_row_and_updates_its_label(tmp_path: Path) -> None:
    s = sample(1, "cat")
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        cache.add_samples([s])
        cache.put_features(BACKBONE, PRE, {s.sha256: relu6_features(1)[0]})
        cache.add_samples([SampleRecord(s.sha256, "dog", "camera0")])
        assert cache.counts() == {"dog": 1}
        # a None label does not erase the label a person gave
        cache.add_samples([SampleRecord(s.sha256, None, "camera0")])
        assert cache.counts() == {"dog": 1}
        # relabelling keeps the features and the image stored earlier
        assert cache.features_count() == 1 and cache.image(s.sha256) == b"img-1"
        shas, _, labels = cache.labelled(BACKBONE, PRE)
        assert shas == [s.sha256] and labels == ["dog"]
    assert raw_query(tmp_path / "features.sqlite", "SELECT COUNT(*) FROM samples") == [(1,)]


def test_unlabelled_samples_are_kept_but_not_counted_or_trained_on(tmp_path: Path) -> None:
    labelled, unlabelled = sample(1, "cat"), sample(2, None)
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        assert cache.add_samples([labelled, unlabelled]) == [labelled.sha256, unlabelled.sha256]
        cache.put_features(BACKBONE, PRE, dict(zip([labelled.sha256, unlabelled.sha256], relu6_features(2), strict=True)))
        assert cache.counts() == {"cat": 1}
        assert cache.labelled(BACKBONE, PRE)[0] == [labelled.sha256]
        assert cache.features_count() == 2


def test_images_are_not_stored_when_keep_images_is_false(tmp_path: Path) -> None:
    s = sample(1)
    with FeatureCache(tmp_path / "features.sqlite", keep_images=False) as cache:
        cache.add_samples([s])
        assert cache.image(s.sha256) is None
        assert cache.counts() == {"cat": 1}


def test_an_image_must_match_its_sha(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not match its sha256"):
        SampleRecord(FeatureCache.content_sha256(b"one"), "cat", "x.jpg", b"another")


def kept_after_adding(path: Path, seed: int, batches: list[range], capacity: int = 10) -> set[str]:
    """Add samples 0..N-1 of one class in the given batches, reopening the cache for each batch."""
    for batch in batches:
        with FeatureCache(path, per_class_capacity=capacity, seed=seed) as cache:
            cache.add_samples([sample(i) for i in batch])
    with FeatureCache(path, per_class_capacity=capacity, seed=seed) as cache:
        assert cache.counts() == {"cat": capacity}
    return {row[0] for row in raw_query(path, "SELECT sha256 FROM samples WHERE label = 'cat'")}


def test_capacity_keeps_exactly_k_per_class_deterministically(tmp_path: Path) -> None:
    one_call = kept_after_adding(tmp_path / "a.sqlite", seed=7, batches=[range(100)])
    assert len(one_call) == 10
    # the same seed and arrival order give the same reservoir, however the arrivals were split
    # into calls and process restarts
    split = kept_after_adding(tmp_path / "b.sqlite", seed=7, batches=[range(0, 37), range(37, 90), range(90, 100)])
    assert split == one_call
    assert kept_after_adding(tmp_path / "c.sqlite", seed=8, batches=[range(100)]) != one_call
    # it is a reservoir, not "the first 10" or "the last 10"
    first, last = {sample(i).sha256 for i in range(10)}, {sample(i).sha256 for i in range(90, 100)}
    assert one_call != first and one_call != last


def test_capacity_reservoir_is_uniform_over_arrivals(tmp_path: Path) -> None:
    # Algorithm R keeps every arrival with probability K/N. Over 60 seeds, about half of the kept
    # samples come from the second half of the stream. A policy biased toward old or new samples
    # lands far from 0.5.
    late = 0
    late_shas = {sample(i).sha256 for i in range(50, 100)}
    for seed in range(60):
        with FeatureCache(tmp_path / f"{seed}.sqlite", per_class_capacity=10, seed=seed) as cache:
            kept = cache.add_samples([sample(i) for i in range(100)])
        assert len(kept) == 10
        late += len(late_shas.intersection(kept))
    assert 0.42 < late / 600 < 0.58


def test_capacity_drops_features_of_evicted_samples_and_none_disables_it(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / "k.sqlite", per_class_capacity=3, seed=0) as cache:
        for i in range(30):
            kept = cache.add_samples([sample(i)])
            if kept:
                cache.put_features(BACKBONE, PRE, {kept[0]: relu6_features(1, seed=i)[0]})
        assert cache.counts() == {"cat": 3}
        assert cache.features_count(BACKBONE) == 3
        # other labels are not affected by a full one
        assert len(cache.add_samples([sample(i, "dog") for i in range(2)])) == 2
        assert cache.counts() == {"cat": 3, "dog": 2}
    with FeatureCache(tmp_path / "none.sqlite", per_class_capacity=None) as cache:
        assert len(cache.add_samples([sample(i) for i in range(600)])) == 600
        assert cache.counts() == {"cat": 600}


def test_lowering_the_capacity_trims_a_label_on_its_next_arrival(tmp_path: Path) -> None:
    path = tmp_path / "features.sqlite"
    with FeatureCache(path, per_class_capacity=None) as cache:
        cache.add_samples([sample(i) for i in range(40)])
    with FeatureCache(path, per_class_capacity=5) as cache:
        assert cache.counts() == {"cat": 40}  # opening never deletes anything
        cache.add_samples([sample(40)])
        assert cache.counts() == {"cat": 5}


def test_unknown_sample_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    known, unknown = sample(1), sample(2)
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        cache.add_samples([known])
        with pytest.raises(CacheError, match="not in the cache") as info:
            cache.put_features(BACKBONE, PRE, dict(zip([known.sha256, unknown.sha256], relu6_features(2), strict=True)))
        assert unknown.sha256[:12] in str(info.value) and "\n" not in str(info.value)
        assert cache.features_count() == 0
        assert cache.missing(BACKBONE, PRE, [known.sha256]) == [known.sha256]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.array([0.5, np.nan, 1.0], dtype=np.float32), "NaN or infinity"),
        (np.array([0.5, np.inf, 1.0], dtype=np.float32), "NaN or infinity"),
        (np.array([0.5, 1e6, 1.0], dtype=np.float32), "float16 range"),
        (np.ones((1, 3), dtype=np.float32), "1-D float"),
        (np.ones(3, dtype=np.int64), "1-D float"),
    ],
)
def test_bad_vectors_are_refused_and_nothing_is_written(tmp_path: Path, bad: np.ndarray, message: str) -> None:
    good, other = sample(1), sample(2)
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        cache.add_samples([good, other])
        with pytest.raises(InputError, match=message):
            cache.put_features(BACKBONE, PRE, {good.sha256: np.ones(3, np.float32), other.sha256: bad})
        assert cache.features_count() == 0


def test_feature_length_must_match_within_a_call_and_the_cache(tmp_path: Path) -> None:
    a, b = sample(1), sample(2)
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        cache.add_samples([a, b])
        with pytest.raises(InputError, match="differ in length"):
            cache.put_features(BACKBONE, PRE, {a.sha256: np.ones(4, np.float32), b.sha256: np.ones(5, np.float32)})
        cache.put_features(BACKBONE, PRE, {a.sha256: np.ones(4, np.float32)})
        with pytest.raises(InputError, match="differs from the one cached"):
            cache.put_features(BACKBONE, PRE, {b.sha256: np.ones(5, np.float32)})
        cache.put_features(OTHER_BACKBONE, PRE, {b.sha256: np.ones(5, np.float32)})  # another backbone is fine


def test_arguments_that_are_not_shas_are_refused(tmp_path: Path) -> None:
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        with pytest.raises(InputError, match="list of sample sha256"):
            cache.missing(BACKBONE, PRE, BACKBONE)  # one string, not a list
        with pytest.raises(InputError, match="backbone_sha256 is not a sha256"):
            cache.missing(PRE, BACKBONE, [])  # arguments swapped
        with pytest.raises(InputError, match="is not a sha256"):
            SampleRecord("photos/cat.jpg", "cat", "photos/cat.jpg")


def test_garbage_file_is_refused_in_one_line_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "features.sqlite"
    garbage = np.random.default_rng(3).bytes(64 * 1024)
    path.write_bytes(garbage)
    with pytest.raises(CacheError) as info:
        FeatureCache(path)
    message = str(info.value)
    assert "not an SQLite database" in message and str(path) in message
    assert "\n" not in message and message.count(" | ") == 3
    assert path.read_bytes() == garbage
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.sqlite"]  # no -wal / -shm left behind


def test_newer_schema_and_foreign_databases_are_refused_untouched(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    raw_query(newer, f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(CacheError, match="newer edgexfer"):
        FeatureCache(newer)

    foreign = tmp_path / "foreign.sqlite"
    raw_query(foreign, "CREATE TABLE photos (name TEXT)")
    before = foreign.read_bytes()
    with pytest.raises(CacheError, match="another program"):
        FeatureCache(foreign)
    assert foreign.read_bytes() == before


def damage_root_page(path: Path, table: str) -> bytes:
    """Overwrite a table's root page with bytes that are no b-tree page: what a failing SD card does."""
    raw_query(path, "PRAGMA wal_checkpoint(TRUNCATE)")  # move everything into the main file
    page_size = raw_query(path, "PRAGMA page_size")[0][0]
    root = raw_query(path, f"SELECT rootpage FROM sqlite_master WHERE name = '{table}'")[0][0]
    data = bytearray(path.read_bytes())
    data[(root - 1) * page_size : root * page_size] = b"\xa5" * page_size
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("table", ["samples", "features_by_backbone"])
@pytest.mark.parametrize("after", ["an unclean shutdown", "a change by another program"])
def test_damaged_database_is_refused_on_open_and_left_untouched(tmp_path: Path, table: str, after: str) -> None:
    path = tmp_path / "features.sqlite"
    with FeatureCache(path, per_class_capacity=None) as cache:
        cache.add_samples([sample(i) for i in range(300)])
    data = damage_root_page(path, table)
    if after == "an unclean shutdown":
        session_path(path).write_bytes(b"")  # what a process leaves that was killed with the file open
    else:  # the file's mtime says it changed since the clean close, even within the clock's resolution
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        data = path.read_bytes()
    with pytest.raises(CacheError, match="feature cache file is damaged") as info:
        FeatureCache(path)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == data


@pytest.mark.parametrize("table", ["samples", "features_by_backbone"])
def test_silent_damage_is_found_by_the_check_on_demand_and_on_first_read(tmp_path: Path, table: str) -> None:
    """Damage that leaves the file's metadata as the clean close recorded it (a failing card) is not scanned
    for on open: the check on demand finds it, and reading a damaged page fails in one line naming it."""
    path = tmp_path / "features.sqlite"
    records = [sample(i) for i in range(300)]
    with FeatureCache(path, per_class_capacity=None) as cache:
        cache.add_samples(records)
        cache.put_features(BACKBONE, PRE, dict(zip([r.sha256 for r in records], relu6_features(300)[:, :8])))
    damage_root_page(path, table)
    write_clean_record(path)  # the record matches the damaged file: nothing tells it apart on open
    with FeatureCache(path) as cache:
        assert not cache.quick_checked
        assert cache.integrity_check() != "ok"
        with pytest.raises(CacheError) as info:
            cache.features_count(BACKBONE) if table == "features_by_backbone" else cache.image(records[7].sha256)
    message = str(info.value)
    assert "\n" not in message and "malformed" in message and "edgexfer device check-cache" in message


CRASHER = """
    import os, sys
    from edgexfer.runtime.cache import FeatureCache, SampleRecord
    cache = FeatureCache(sys.argv[1], per_class_capacity=None)
    cache.add_samples([SampleRecord(FeatureCache.content_sha256(b"late"), "cat", "child", b"late")])
    os._exit(0)  # no close: what a kill or a power cut leaves
"""


def test_a_cleanly_closed_cache_is_not_scanned_on_reopen_and_an_unclean_one_is(tmp_path: Path) -> None:
    path = tmp_path / "features.sqlite"
    with FeatureCache(path) as cache:
        assert not cache.quick_checked  # a new file: nothing to check
        cache.add_samples([sample(i) for i in range(20)])
    with FeatureCache(path) as cache:
        assert not cache.quick_checked
        # a second user while the first is open shares a checked file: no scan either
        with FeatureCache(path) as other:
            assert not other.quick_checked and other.counts() == {"cat": 20}
    assert session_path(path).stat().st_mode & 0o777 == 0o600  # private, like the cache

    child = run_child(CRASHER, str(path))
    assert child.wait(timeout=60) == 0, child.stderr.read()
    assert (tmp_path / "features.sqlite-wal").exists()
    with FeatureCache(path) as cache:
        assert cache.quick_checked  # the last user left without closing: scanned once
        assert cache.counts() == {"cat": 21}
    with FeatureCache(path) as cache:
        assert not cache.quick_checked  # and closed cleanly since
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - 10**9))  # another program wrote the file
    with FeatureCache(path) as cache:
        assert cache.quick_checked


# The layout of schema version 2, as files written before version 3 have it.
SCHEMA_2 = (
    "CREATE TABLE samples (sha256 TEXT PRIMARY KEY NOT NULL, label TEXT NULL, source TEXT NOT NULL, "
    "created_utc TEXT NOT NULL, image BLOB NULL)",
    "CREATE INDEX samples_by_label ON samples(label, sha256)",
    "CREATE TABLE features (sample_sha256 TEXT NOT NULL REFERENCES samples(sha256) ON DELETE CASCADE, "
    "backbone_sha256 TEXT NOT NULL, preprocess TEXT NOT NULL, dim INTEGER NOT NULL CHECK (dim > 0), "
    "vec BLOB NOT NULL CHECK (length(vec) = 2 * dim), PRIMARY KEY (sample_sha256, backbone_sha256, preprocess))",
    "CREATE INDEX features_by_backbone ON features(backbone_sha256, preprocess)",
    "CREATE TABLE label_stats (label TEXT PRIMARY KEY NOT NULL, seen INTEGER NOT NULL CHECK (seen >= 0))",
    "CREATE TABLE review (id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE, image BLOB NOT NULL, "
    "media_type TEXT NOT NULL, label TEXT NOT NULL, probability REAL NOT NULL, top_k TEXT NOT NULL, "
    "head INTEGER NOT NULL, source TEXT NOT NULL, created_utc TEXT NOT NULL)",
    "PRAGMA user_version = 2",
)


def members_and_counts(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """label_stats.members and the labels counted from the samples (labels with no member left out)."""
    members = dict(raw_query(path, "SELECT label, members FROM label_stats WHERE members > 0"))
    return members, dict(raw_query(path, "SELECT label, COUNT(*) FROM samples WHERE label IS NOT NULL GROUP BY label"))


def test_member_counts_stay_exact_through_inserts_relabels_deletes_and_evictions(tmp_path: Path) -> None:
    path = tmp_path / "features.sqlite"
    with closing(sqlite3.connect(path)) as raw:  # a cache of schema 2, with a label whose statistics were lost
        for statement in SCHEMA_2:
            raw.execute(statement)
        raw.executemany("INSERT INTO samples VALUES (?, ?, 'old', 'then', NULL)",
                        [(sample(i, prefix="old").sha256, "cat" if i < 7 else None) for i in range(9)])
        raw.commit()
    with FeatureCache(path, per_class_capacity=5, seed=3) as cache:  # migrated on open
        assert raw_query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] and cache.counts() == {"cat": 7}
        assert raw_query(path, "SELECT seen, members FROM label_stats") == [(7, 7)]
        steps = {
            "inserts and evictions": lambda: cache.admit_samples([sample(i) for i in range(30)]),
            "another label": lambda: cache.admit_samples([sample(i, "dog", prefix="d") for i in range(4)]),
            "relabels": lambda: cache.admit_samples([sample(i, "cat", prefix="d") for i in range(3)]),
            "unlabelled, then labelled": lambda: (cache.add_samples([sample(i, None, prefix="u") for i in range(3)]),
                                                  cache.admit_samples([sample(i, "owl", prefix="u") for i in range(3)])),
            "a lowered capacity trims": lambda: FeatureCache(path, per_class_capacity=2).add_samples([sample(99)]),
        }
        for step, act in steps.items():
            result = act()
            members, counted = members_and_counts(path)
            assert members == counted, step
            if step == "inserts and evictions":  # 7 old members: the first arrivals evict
                assert len(result.kept) + len(result.dropped) == 30 and result.evicted > 0
                assert counted["cat"] == 5
        # a person deleting rows in the sqlite3 shell: the triggers still count
        raw_write(path, "DELETE FROM samples WHERE label = 'owl' AND sha256 IN (SELECT sha256 FROM samples LIMIT 10)")
        raw_write(path, "UPDATE samples SET label = NULL WHERE label = 'dog'")
        assert members_and_counts(path)[0] == members_and_counts(path)[1]
        assert cache.counts() == members_and_counts(path)[1] and cache.integrity_check() == "ok"
        # counts changed behind the triggers' back are found by the check, and repaired
        raw_write(path, "UPDATE label_stats SET members = members + 3 WHERE label = 'cat'")
        assert "label_stats.members of 'cat'" in cache.integrity_check()
        assert cache.repair_member_counts() == 1 and cache.integrity_check() == "ok"


def test_recompute_after_a_backbone_change(tmp_path: Path) -> None:
    records = [sample(i) for i in range(4)]
    shas = [r.sha256 for r in records]
    with FeatureCache(tmp_path / "features.sqlite") as cache:
        cache.add_samples(records)
        cache.put_features(BACKBONE, PRE, dict(zip(shas, relu6_features(4), strict=True)))
        # a new backbone arrives: every sample needs its features again, from its kept image
        todo = cache.samples_without_features(OTHER_BACKBONE, PRE)
        assert todo == sorted(shas)
        assert [cache.image(s) for s in todo] == [r.image for r in sorted(records, key=lambda r: r.sha256)]
        cache.put_features(OTHER_BACKBONE, PRE, dict(zip(shas[:3], relu6_features(3)[:, :16], strict=True)))
        assert cache.samples_without_features(OTHER_BACKBONE, PRE) == [shas[3]]
        assert cache.drop_other_backbones(OTHER_BACKBONE) == 4
        assert cache.features_count(BACKBONE) == 0 and cache.features_count() == 3
        assert cache.counts() == {"cat": 4}  # samples and labels stay


def test_closed_cache_raises_a_cache_error(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "features.sqlite")
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(CacheError, match="closed"):
        cache.counts()


WRITER = """
    import sys
    import numpy as np
    from edgexfer.runtime.cache import FeatureCache, SampleRecord

    path, backbone, prefix, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with FeatureCache(path, per_class_capacity=None) as cache:
        for i in range(n):
            data = f"{prefix}-{i}".encode()
            sha = FeatureCache.content_sha256(data)
            cache.add_samples([SampleRecord(sha, prefix, "child", data)])  # one transaction
            cache.put_features(backbone, "pre", {sha: np.full(64, i % 7, np.float32)})  # another one
            print(i, sha, flush=True)
"""


def test_a_reader_and_a_writer_process_work_at_the_same_time(tmp_path: Path) -> None:
    path = tmp_path / "features.sqlite"
    with FeatureCache(path, per_class_capacity=None) as cache:
        child = run_child(WRITER, str(path), BACKBONE, "cat", "200")
        observed: list[int] = []
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:
            n = cache.counts().get("cat", 0)
            shas, x, labels = cache.labelled(BACKBONE, "pre")
            # every snapshot is consistent: features only for committed samples, all of one length
            assert len(shas) <= cache.counts().get("cat", 0)
            assert x.shape[0] == len(shas) and (len(shas) == 0 or x.shape[1] == 64)
            observed.append(n)
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0, err
        assert "locked" not in err
        assert observed == sorted(observed), "a reader saw the count go backwards"
        assert any(0 < n < 200 for n in observed), "the reader never ran while the writer was writing"
        assert cache.counts() == {"cat": 200}
        assert cache.features_count(BACKBONE) == 200
        assert len(out.splitlines()) == 200


def test_two_writer_processes_take_turns_on_a_new_file(tmp_path: Path) -> None:
    # Both processes create the file at the same moment and then write concurrently. BEGIN IMMEDIATE
    # with the busy timeout makes them wait for each other instead of failing with "locked".
    path = tmp_path / "features.sqlite"
    children = [run_child(WRITER, str(path), BACKBONE, label, "100") for label in ("cat", "dog")]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    with FeatureCache(path) as cache:
        assert cache.counts() == {"cat": 100, "dog": 100}
        assert cache.features_count(BACKBONE) == 200


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_every_confirmed_sample_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "features.sqlite"
    child = run_child(WRITER, str(path), BACKBONE, "cat", "100000")
    confirmed: list[tuple[int, str]] = []
    assert child.stdout is not None
    for line in child.stdout:
        index, sha = line.split()
        confirmed.append((int(index), sha))
        if len(confirmed) >= 50:
            break
    # kill it in the middle of its next transactions, with no chance to clean up
    os.kill(child.pid, signal.SIGKILL)
    rest, _ = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    # lines printed before the kill but not read yet were confirmed too. A line without its
    # newline was not printed completely.
    confirmed += [(int(i), s) for i, s in (ln.split() for ln in rest.splitlines(keepends=True) if ln.endswith("\n"))]
    assert len(confirmed) >= 50

    with FeatureCache(path, per_class_capacity=None) as cache:
        assert cache.integrity_check() == "ok"
        for index, sha in confirmed:
            assert cache.image(sha) == f"cat-{index}".encode()
        got = cache.get_features(BACKBONE, "pre", [sha for _, sha in confirmed])
        assert len(got) == len(confirmed)
        assert cache.counts()["cat"] >= len(confirmed)
        # the cache still takes writes after the crash
        assert cache.add_samples([sample(1, "dog")]) == [sample(1, "dog").sha256]


def test_check_cache_command_checks_on_demand_and_repairs_member_counts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgexfer.cli import main

    state = tmp_path / "state"
    path = state / "features.sqlite"
    with FeatureCache(path, per_class_capacity=None) as cache:
        cache.add_samples([sample(i) for i in range(300)])
    args = ["device", "check-cache", "--state", str(state), "--json"]
    runner = CliRunner()
    healthy = runner.invoke(main, args)
    assert healthy.exit_code == 0 and json.loads(healthy.stdout)["result"] == "ok", healthy.output

    raw_write(path, "UPDATE label_stats SET members = 1 WHERE label = 'cat'")
    off = runner.invoke(main, args)
    assert off.exit_code == 1 and "check-cache --repair" in off.stderr
    repaired = runner.invoke(main, [*args, "--repair"])
    assert repaired.exit_code == 0 and json.loads(repaired.stdout)["repaired"] == 1, repaired.output

    damage_root_page(path, "samples")
    write_clean_record(path)  # silent damage: only the check on demand sees it
    damaged = runner.invoke(main, args)
    assert damaged.exit_code == 1 and not json.loads(damaged.stdout)["ok"]
    assert "move" in damaged.stderr and "\n" not in damaged.stderr.strip()
