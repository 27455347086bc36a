"""The feature cache's per-class capacity: reservoir sampling over the arrivals at each label.

A sample *arrives* at a label when it is added with that label for the first time, whether it is new
or relabelled. Re-adding it with the same label is not an arrival, so re-running over the same data
changes nothing. Each label counts its arrivals (``label_stats.seen``). Once the label holds
``capacity`` (K) samples, reservoir sampling (Algorithm R) applies: arrival number ``seen`` replaces
a uniformly chosen member with probability K/seen, and otherwise the new sample is dropped, features
included. So every sample that ever arrived is kept with the same probability.

The draws come from a hash of ``(seed, label, seen)``, which makes the result depend only on the seed
and the order of arrivals, not on how they were split into calls, batches or processes. If K was
lowered since a label's last arrival, that label is first reduced to K at random. Labels that receive
no arrival are left as they are.

Field learning (:mod:`edgexfer.runtime.learning`) admits a batch's arrivals before the backbone runs, in
the transaction that then stores their features: an arrival the reservoir turns away is never decoded
nor run through the backbone.
"""
from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass

from edgexfer.runtime.errors import InputError

#: The default for ``per_class_capacity``: samples kept per label on a device.
DEFAULT_PER_CLASS_CAPACITY = 500


@dataclass(frozen=True)
class ClassReservoir:
    """The capacity policy of one cache: at most ``capacity`` samples per label (``None``: no limit).

    Validated when it is built, so a bad argument fails before the cache file is opened.
    """

    capacity: int | None
    seed: int = 0

    def __post_init__(self) -> None:
        capacity = self.capacity
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise InputError(
                "per_class_capacity must be a positive integer or None",
                got=repr(capacity),
                expected="an int >= 1, or None for no limit",
                todo=f"use the default ({DEFAULT_PER_CLASS_CAPACITY}) on a device and None on the host",
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError("seed must be an integer", got=repr(self.seed), expected="int", todo="pass e.g. seed=0")

    def admit(self, conn: sqlite3.Connection, sha: str, label: str) -> tuple[bool, int]:
        """Count one arrival of ``sha`` at ``label`` and apply the reservoir (``sha`` already carries the label).

        Returns whether ``sha`` was kept and how many other members were evicted for it. Runs inside the
        caller's write transaction, so the arrival and its outcome commit together. Constant time: the
        label's member count is ``label_stats.members`` (kept by triggers, :mod:`~edgexfer.runtime.cache_sqlite`),
        not a count of its samples; an eviction walks at most ``capacity`` index entries.
        """
        row = conn.execute("SELECT seen, members FROM label_stats WHERE label = ?", (label,)).fetchone()
        # the triggers counted `sha` (it carries the label already): the other members are one fewer
        seen_before, others = (int(row[0]), int(row[1]) - 1) if row else (0, 0)
        # `seen` counts every arrival, kept or not, so it is never below others + 1. Taking max()
        # repairs a cache whose statistics were lost without biasing the draw toward new samples.
        seen = max(seen_before + 1, others + 1)
        conn.execute("UPDATE label_stats SET seen = ? WHERE label = ?", (seen, label))
        capacity = self.capacity
        if capacity is None:
            return True, 0
        evicted = 0
        while others > capacity:  # the capacity was lowered since this label last grew
            self._evict(conn, label, sha, self._draw("trim", label, seen, others, below=others))
            others -= 1
            evicted += 1
        if others < capacity:
            return True, evicted
        slot = self._draw("arrival", label, seen, below=seen)
        if slot < capacity:
            self._evict(conn, label, sha, slot)
            return True, evicted + 1
        conn.execute("DELETE FROM samples WHERE sha256 = ?", (sha,))
        return False, evicted

    @staticmethod
    def _evict(conn: sqlite3.Connection, label: str, keep_sha: str, slot: int) -> None:
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
        text = "\x1f".join(str(part) for part in (self.seed, *key))
        digest = hashlib.sha256(text.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little") % below
