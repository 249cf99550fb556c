"""Exactly-once from the client's view: a retried message or batch is answered, not stored again.

Keys: ``(project, messageId)`` of a Segment-spec message and ``(project, Idempotency-Key)`` of a
``/v1/ingest`` batch. A key is *claimed* (pending) before its events go to the commit log and
*settled* once the log answered: stored (done, with the batch's event count, so a retried
batch is answered ``202 {"accepted": N}`` exactly as the first time) or failed (released, so
the client's retry is stored). A retry that arrives while the first attempt is still being
committed is refused with Retry-After (stored-or-not is not known yet).

The table is one mmap'd file, ``<data_dir>/run/dedup.table``, shared by every worker (the
supervisor creates it, or a lone server), so a retry that lands on another worker is caught.
It is rebuilt at every start from what is stored (``rebuild``: the log tail and the Parquet
files, one query over ``events`` for the window), so restarts and crashes keep it: an event
that reached the log before a crash is found by its retry. A restarted worker runs the same
rebuild, then releases the claims its dead predecessor left pending. The serving process runs
``rebuild_at`` in a short-lived child before it listens (runtime/server.py open_dedup): the
query stack's DuckDB never stays in a serving process.

Bounds: ``DEFAULT_WINDOW_S`` in time (24 h: Segment's own dedup window) and ``slots`` in
memory, 16 bytes each (``DEFAULT_SLOTS`` = 2^21 -> 32 MiB; ``serve --dedup-slots``). Slots form
buckets of ``BUCKET_SLOTS``; a full bucket drops its oldest entry, so under sustained load the
window is ``min(24 h, slots / keyed events per second)``: the header keeps the age of the last
entry dropped that way, which ``/metrics`` shows as the effective window. README "Exactly once"
has the sizing numbers. With ``--coordinator``, inslytic_fast.cluster.dedup puts the
coordinator in front of this table for retries that land on another node.
A false duplicate needs two of the 2^21 keys to share a 64-bit fingerprint in one bucket:
probability about 2^21 * 8 / 2^64 ~ 1e-12 per key.

Locking: the table is locked (fcntl, whole file) once per batch, not per key; fcntl locks die
with their process, so a SIGKILLed worker cannot wedge the others.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

log = logging.getLogger("inslytic_fast.dedup")

MAGIC = b"IFDD0001"
HEADER = struct.Struct("<8sQ")  # magic, slot count
# Then the last eviction inside the window, shared by the workers: (when, the dropped entry's
# stored-at), both Unix seconds; its difference is the window the table really keeps.
LAST_EVICTION = struct.Struct("<QQ")
LAST_EVICTION_OFFSET = HEADER.size
HEADER_BYTES = 64  # keeps the slot arrays 8-byte aligned for memoryview.cast("Q")
BUCKET_SLOTS = 8  # two 64-byte cache lines of fingerprints per bucket
DEFAULT_SLOTS = 1 << 21
# Segment: "Segment deduplicates messages by messageId within a 24-hour window" (its docs).
DEFAULT_WINDOW_S = 24 * 3600
# A claim still pending after this is an attempt nobody will settle (a hung disk is answered
# 503 long before: the commit log's own timeouts are seconds). Backstop only; a restarted
# worker releases its predecessor's claims at once.
PENDING_STALE_S = 300
TABLE_NAME = "dedup.table"

# Statuses `claim` returns per key (a count >= 0 means "already stored, N events").
CLAIMED = -1  # new: this request owns it now and must settle or release it
IN_FLIGHT = -2  # claimed by a request still being committed

_EMPTY, _PENDING, _DONE = 0, 1, 2

# A key's first byte says what it identifies (metrics label): see message_key and batch_key.
KINDS = {ord("m"): "message", ord("k"): "batch"}

# The claimed slots ``claim`` returns, to pass to ``settle`` or ``release``.
Claims = list[tuple[int, int]]


# Called on the serving loop with a claim's final statuses and claims, once confirmed.
Confirmed = Callable[[list[int], Claims], None]


class Dedup(Protocol):
    """What the ingest path needs of deduplication: this node's table (DedupTable), or the
    table plus the cluster's coordinator (inslytic_fast.cluster.dedup.ClusterDedup).

    ``claim`` answers from this node's table at once. When ``coordinated``, the keys it
    called new are not final yet: ``confirm`` asks the cluster off the loop and calls back
    on the loop with the final answer (True), or returns False when the table's answer is
    final (nothing new, or the cluster unreachable)."""

    coordinated: bool

    def claim(self, keys: list[bytes], owner: int) -> tuple[list[int], Claims]: ...

    def confirm(
        self, keys: list[bytes], statuses: list[int], claimed: Claims, then: Confirmed
    ) -> bool: ...

    def settle(self, claimed: Claims, count: int) -> None: ...

    def release(self, claimed: Claims) -> None: ...

    def counters(self) -> dict[str, dict[str, int]]: ...

    def gauges(self) -> dict[str, float]: ...


class DedupCounters:
    """One process's dedup counters, by key kind (``KINDS``); summed over workers."""

    __slots__ = ("duplicates", "in_flight", "cross_node", "evictions", "coordinator")

    def __init__(self) -> None:
        self.duplicates = dict.fromkeys(KINDS, 0)  # found stored: answered, not stored again
        self.in_flight = dict.fromkeys(KINDS, 0)  # first attempt still committing: Retry-After
        self.cross_node = dict.fromkeys(KINDS, 0)  # of the duplicates, found by the coordinator
        self.evictions = 0  # entries dropped inside the window to make room
        # Cluster mode: failed coordinator calls, and requests checked on this node only.
        self.coordinator = {"failures": 0, "local_only": 0}

    def snapshot(self) -> dict[str, dict[str, int]]:
        def named(by_kind: dict[int, int]) -> dict[str, int]:
            return {KINDS[kind]: n for kind, n in by_kind.items()}

        return {
            "duplicates": named(self.duplicates),
            "in_flight": named(self.in_flight),
            "cross_node": named(self.cross_node),
            "table": {"evictions": self.evictions},
            "coordinator": dict(self.coordinator),
        }


def _meta(stamp: int, state: int, owner: int, count: int) -> int:
    return (stamp & 0xFFFFFFFF) << 32 | state << 24 | (owner & 0xFF) << 16 | (count & 0xFFFF)


def message_key(project: str, message_id: str) -> bytes:
    return b"m\0" + project.encode() + b"\0" + message_id.encode()


def batch_key(project: str, idempotency_key: bytes) -> bytes:
    return b"k\0" + project.encode() + b"\0" + idempotency_key


class DedupTable:
    __slots__ = ("path", "fd", "map", "slots", "window_s", "clock", "_fps", "_meta", "_mask",
                 "stats")  # fmt: skip

    coordinated = False  # this node's answer is final: ``confirm`` is never needed

    def __init__(
        self,
        path: Path,
        *,
        create: bool = False,
        slots: int = DEFAULT_SLOTS,
        window_s: int = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if slots < BUCKET_SLOTS or slots & (slots - 1):
            raise ValueError("slots must be a power of two, at least BUCKET_SLOTS")
        self.path = Path(path)
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(HEADER.pack(MAGIC, slots).ljust(HEADER_BYTES, b"\0"))
                fh.truncate(HEADER_BYTES + slots * 16)  # sparse: pages appear as used
            # Atomic (no worker maps a half-made header) but not fsynced: the table is
            # rebuilt from what is stored at every start (see the module docstring).
            os.replace(tmp, self.path)
        self.fd = os.open(self.path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, 0)
        magic, self.slots = HEADER.unpack_from(self.map, 0)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a dedup table")
        view = memoryview(self.map)
        self._fps = view[HEADER_BYTES : HEADER_BYTES + self.slots * 8].cast("Q")
        self._meta = view[HEADER_BYTES + self.slots * 8 : HEADER_BYTES + self.slots * 16].cast("Q")
        self._mask = (self.slots // BUCKET_SLOTS) - 1
        self.window_s = window_s
        self.clock = clock
        self.stats = DedupCounters()

    @property
    def evictions(self) -> int:
        return self.stats.evictions

    def close(self) -> None:
        self._fps.release()
        self._meta.release()
        self.map.close()
        os.close(self.fd)

    # -- locking ---------------------------------------------------------------------------

    def _lock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # -- the three calls of a request ------------------------------------------------------

    def locate(self, key: bytes) -> tuple[int, int]:
        """The key's bucket (its first slot) and its 64-bit fingerprint (never 0: empty)."""
        digest = hashlib.blake2b(key, digest_size=16).digest()
        base = (int.from_bytes(digest[:8], "little") & self._mask) * BUCKET_SLOTS
        return base, int.from_bytes(digest[8:], "little") or 1

    def claim(self, keys: list[bytes], owner: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Per key: a stored count (a duplicate), IN_FLIGHT, or CLAIMED; and the claimed slots
        (pass them to ``settle`` or ``release``)."""
        now = int(self.clock())
        statuses: list[int] = []
        claimed: list[tuple[int, int]] = []
        fps, meta = self._fps, self._meta
        self._lock()
        try:
            for key in keys:
                base, fp = self.locate(key)
                status = self._find(base, fp, now)
                if status is None:
                    slot = self._free_slot(base, now)
                    if slot >= 0:
                        fps[slot] = fp
                        meta[slot] = _meta(now, _PENDING, owner, 0)
                        claimed.append((slot, fp))
                    status = CLAIMED
                elif status == IN_FLIGHT:
                    self.stats.in_flight[key[0]] += 1
                else:
                    self.stats.duplicates[key[0]] += 1
                statuses.append(status)
        finally:
            self._unlock()
        return statuses, claimed

    def confirm(
        self, keys: list[bytes], statuses: list[int], claimed: Claims, then: Confirmed
    ) -> bool:
        return False  # nothing beyond this node to ask

    def settle(self, claimed: list[tuple[int, int]], count: int) -> None:
        """The claimed keys' events are stored (``count`` events in the batch)."""
        now = int(self.clock())
        fps, meta = self._fps, self._meta
        self._lock()
        try:
            for slot, fp in claimed:
                if fps[slot] == fp:
                    meta[slot] = _meta(now, _DONE, 0, min(count, 0xFFFF))
        finally:
            self._unlock()

    def release(self, claimed: list[tuple[int, int]]) -> None:
        """The claimed keys' events were not stored: a retry must be."""
        fps, meta = self._fps, self._meta
        self._lock()
        try:
            for slot, fp in claimed:
                if fps[slot] == fp and (meta[slot] >> 24) & 0xFF == _PENDING:
                    fps[slot] = 0
                    meta[slot] = 0
        finally:
            self._unlock()

    # -- rebuild and recovery --------------------------------------------------------------

    def mark_stored(self, entries: Iterable[tuple[bytes, int, int]]) -> int:
        """Record (key, count, stored_at seconds) as done, oldest first; return how many."""
        fps, meta = self._fps, self._meta
        now = int(self.clock())
        marked = 0
        self._lock()
        try:
            for key, count, stamp in entries:
                base, fp = self.locate(key)
                slot = self._slot_of(base, fp)
                if slot < 0:
                    slot = self._free_slot(base, now)
                    if slot < 0:
                        continue
                fps[slot] = fp
                meta[slot] = _meta(stamp, _DONE, 0, min(count, 0xFFFF))
                marked += 1
        finally:
            self._unlock()
        return marked

    def release_owner(self, owner: int) -> int:
        """Drop every claim ``owner`` left pending (a restarted worker's dead predecessor,
        after ``rebuild`` marked what it did store). Returns how many."""
        fps, meta = self._fps, self._meta
        released = 0
        self._lock()
        try:
            for slot in range(self.slots):
                value = meta[slot]
                if (value >> 24) & 0xFF == _PENDING and (value >> 16) & 0xFF == owner & 0xFF:
                    fps[slot] = 0
                    meta[slot] = 0
                    released += 1
        finally:
            self._unlock()
        return released

    # -- inside the lock -------------------------------------------------------------------

    def _live(self, value: int, now: int) -> bool:
        state = (value >> 24) & 0xFF
        stamp = value >> 32
        if state == _DONE:
            return now - stamp < self.window_s
        return state == _PENDING and now - stamp < PENDING_STALE_S

    # One slice-to-list per bucket, then C-level `in`/`index`: a Python loop over the eight
    # slots cost ~9 us per key (claim + settle); this ~2 us (bench in the commit message).

    def _find(self, base: int, fp: int, now: int) -> int | None:
        bucket = self._fps[base : base + BUCKET_SLOTS].tolist()
        if fp not in bucket:
            return None
        value = self._meta[base + bucket.index(fp)]
        if not self._live(value, now):
            return None
        if (value >> 24) & 0xFF == _PENDING:
            return IN_FLIGHT
        return value & 0xFFFF

    def _slot_of(self, base: int, fp: int) -> int:
        bucket = self._fps[base : base + BUCKET_SLOTS].tolist()
        return base + bucket.index(fp) if fp in bucket else -1

    def _free_slot(self, base: int, now: int) -> int:
        """A free or expired slot of the bucket, else the oldest stored entry (evicted)."""
        metas = self._meta[base : base + BUCKET_SLOTS].tolist()
        if 0 in metas:  # the common case while the table is not full
            return base + metas.index(0)
        oldest, oldest_stamp = -1, 1 << 40
        for offset, value in enumerate(metas):
            if not self._live(value, now):
                return base + offset
            if (value >> 24) & 0xFF == _DONE and value >> 32 < oldest_stamp:
                oldest, oldest_stamp = base + offset, value >> 32
        if oldest >= 0:
            self.stats.evictions += 1
            LAST_EVICTION.pack_into(self.map, LAST_EVICTION_OFFSET, now, oldest_stamp)
        return oldest  # -1: every slot is an in-flight claim; the key goes untracked

    # -- what /metrics shows ---------------------------------------------------------------

    def effective_window_s(self) -> int:
        """The window the table keeps: the age at which the latest eviction dropped an entry,
        if one was dropped within the last window, else the whole window."""
        evicted_at, stored_at = LAST_EVICTION.unpack_from(self.map, LAST_EVICTION_OFFSET)
        if evicted_at and int(self.clock()) - evicted_at < self.window_s:
            return min(self.window_s, evicted_at - stored_at)
        return self.window_s

    def counters(self) -> dict[str, dict[str, int]]:
        return self.stats.snapshot()

    def gauges(self) -> dict[str, float]:
        return {"window_seconds": self.effective_window_s(), "table_slots": self.slots}


def table_path(run_dir: Path) -> Path:
    return Path(run_dir) / TABLE_NAME


REBUILD_SQL = """
    SELECT key_kind, project, key, n, stamp FROM (
        SELECT 'm' AS key_kind, project, message_id AS key, 1 AS n,
               CAST(epoch(max(received_at)) AS BIGINT) AS stamp
        FROM events WHERE message_id IS NOT NULL AND received_at >= to_timestamp($since)
        GROUP BY project, message_id
        UNION ALL
        SELECT 'k', project, idempotency_key, count(*),
               CAST(epoch(max(received_at)) AS BIGINT)
        FROM events WHERE idempotency_key IS NOT NULL AND received_at >= to_timestamp($since)
        GROUP BY project, idempotency_key
    ) ORDER BY stamp DESC LIMIT $limit
"""
# Oldest first (a full bucket then keeps the newest), streamed: 2^21 rows as Python tuples
# would take hundreds of MB at once.
REBUILD_ORDERED_SQL = f"SELECT * FROM ({REBUILD_SQL}) ORDER BY stamp"
REBUILD_CHUNK_ROWS = 10_000


def rebuild(table: DedupTable, data_dir: Path) -> int:
    """Mark every key stored within the window (log tail and Parquet) as done; newest kept
    when more than the table holds. Returns how many keys were marked."""
    from ..storage.query import open_events  # the query stack (DuckDB views) only when rebuilding

    started = time.monotonic()
    con = open_events(data_dir)
    marked = 0
    try:
        result = con.execute(
            REBUILD_ORDERED_SQL,
            {"since": table.clock() - table.window_s, "limit": table.slots},
        )
        while rows := result.fetchmany(REBUILD_CHUNK_ROWS):
            marked += table.mark_stored(
                (
                    (message_key(project, key) if kind == "m"
                     else batch_key(project, key.encode()), count, stamp)
                    for kind, project, key, count, stamp in rows
                )
            )  # fmt: skip
    finally:
        con.close()
    log.info("dedup: %d keys from the last %d s in %.2f s", marked, table.window_s,
             time.monotonic() - started)  # fmt: skip
    return marked


def rebuild_at(path: Path, data_dir: Path) -> int:
    """``rebuild`` the table at ``path`` (another process's mapping of it: this runs in a
    child process, see the module docstring). Returns how many keys were marked."""
    table = DedupTable(path)
    try:
        return rebuild(table, data_dir)
    finally:
        table.close()
