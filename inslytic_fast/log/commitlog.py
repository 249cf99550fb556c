"""Group-commit, append-only log: the write path behind every 202.

A 202 means the batch is in a log file and fdatasync has returned. Appends that arrive while a
sync is running share the next one (group commit); an idle lone append is written at once, at
the end of the current loop iteration (``call_soon``, not a timer), so it costs one sync.
``append`` frames and checksums the record on the loop (~1 us for a small batch); one dedicated
thread runs the ``os.writev`` and ``os.fdatasync`` of each group commit (both release the GIL),
so the loop keeps parsing while the disk works and the thread runs almost no Python: each line
of Python there is a GIL hand-off with the loop.

On-disk layout (shared with storage.py, which rolls sealed segments to Parquet, and query.py,
which reads the log tail without locks)::

    <data_dir>/log/<worker>-<seq:020d>.log     segments; seq grows with creation time
    <data_dir>/quarantine/                     bytes cut off a segment, kept for forensics

Record framing (little endian)::

    magic b"IFL1" | u32 payload length | u32 crc32(payload) | payload

The payload is one JSON line (it ends in b"\\n"), so stripping the 12-byte headers leaves
NDJSON that DuckDB reads directly::

    {"p":"<project>","r":<received_at_us>,"b":"<event-id prefix>","e":<events JSON array>}

with ``"k":"<Idempotency-Key>"`` before ``"e"`` when the batch came with one.

Event ids are UUIDv7: each batch gets a UUIDv7 whose last 3 hex digits are 0 (``b`` is the 33
leading characters); event ``i`` is ``b || printf('%03x', i)`` (computed in SQL when the log is
read), so no per-event Python work is needed. rand_a counts batches within a millisecond (RFC
9562 section 6.2, method 1), the low 12 bits of rand_b count events within the batch.

A segment is *sealed* once a newer segment of the same worker exists: the writer creates the
next segment durably only after the previous one is completely written and synced, and it never
writes to an older one again. Only sealed segments are rolled.

fsync failure policy (PostgreSQL "fsyncgate"): a failed write or sync fails every batch of that
sync and every batch queued behind it, and the log refuses appends until a repair (started at
once, retried by ``tick``) has cut the damaged segment back to its last durable offset, synced
that, and opened a new segment durably. Nothing is ever retried and then acknowledged.

Recovery: ``open`` removes a torn tail from the newest segment, cutting at the last valid
record and never earlier; damage in the middle of a segment (a flipped bit) costs only the
damaged record, the valid records after it are kept (``scan_segment`` resynchronises).
Removed bytes are copied to ``quarantine/`` first.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..config import option
from ..observe.logs import RepeatedFailure
from ..observe.metrics import LATENCY_BUCKETS, Histogram
from ..runtime.durable import fsync_dir, make_dirs_durable, write_file_durably

log = logging.getLogger("inslytic_fast.commitlog")

# -- Framing -------------------------------------------------------------------------------

RECORD_MAGIC = b"IFL1"
RECORD_HEADER = struct.Struct("<4sII")
HEADER_SIZE = RECORD_HEADER.size
RECORD_END = b"}\n"  # closes the JSON object the envelope head opened, and the NDJSON line
# Buffers per writev call: Linux's UIO_MAXIOV (what sysconf("SC_IOV_MAX") reports there).
IOV_MAX = 1024
# Records whose events are at most this long are copied into one buffer when framed (cheaper
# than three writev parts); longer ones are written from the caller's bytes without a copy.
COPY_RECORD_MAX_BYTES = 16 * 1024
# A record is one HTTP request body plus ~120 bytes of envelope. Ingest bodies are capped far
# below this (1,000 events per request); the bound keeps a corrupt length field from making a
# reader allocate gigabytes, and is what DuckDB's read_json ``maximum_object_size`` is set to.
MAX_RECORD_BYTES = 64 * 1024 * 1024

# Event ids append the event's index to the batch's id prefix as 3 hex digits (rand_b's low
# 12 bits); the API caps a request at 1,000 events.
MAX_EVENTS_PER_BATCH = 0x1000

SEGMENT_SUFFIX = ".log"
SALVAGE_SUFFIX = ".salvage"  # a segment being rewritten by recovery; never read
LOG_DIRNAME = "log"
QUARANTINE_DIRNAME = "quarantine"
_SEGMENT_RE = re.compile(r"^([A-Za-z0-9_]+)-(\d{20})\.log$")
_WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")

# One getrandom() per 512 milliseconds that saw batches: a syscall per batch was 12% of the event
# loop's time with 1-event requests (py-spy --native, bench/results/2026-11-26-vm-profiles.txt).
RANDOM_POOL_BYTES = 7 * 512

# -- Defaults ------------------------------------------------------------------------------

# 64 MiB segments roll in well under a second with DuckDB and keep the number of Parquet files
# per partition low; 30 s bounds how long events wait in the log before they reach Parquet.
DEFAULT_SEGMENT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_MAX_AGE_S = 30.0
# Built directly (tests, bench harnesses), a log takes serve's defaults: the config table's.
DEFAULT_MAX_UNROLLED_BYTES: int = option("max_unrolled_bytes").default
# Overload has two marks. Above the hard mark (max_unrolled_bytes) ingest is refused on its
# headers (503 + Retry-After, the body never read). From BACKPRESSURE_FROM_SHARE of it upwards
# the server slows clients down instead: each ingest request is held (its connection not read)
# for a delay rising linearly from 0 to MAX_BACKPRESSURE_DELAY_S at the hard mark, which gives
# the roller the CPU that serving would have used. 2 s is well inside SDK request timeouts
# (Segment's analytics-node and PostHog's clients: 10 s).
BACKPRESSURE_FROM_SHARE = 0.125
MAX_BACKPRESSURE_DELAY_S = 2.0
DEFAULT_MIN_FREE_BYTES: int = option("min_free_bytes").default

# Group commit window: while producers are concurrent (the last sync carried more than one
# batch), a sync that would carry fewer than FULL_SYNC_BATCHES batches (and under
# FULL_SYNC_BYTES) starts no sooner than COMMIT_WINDOW_S after the previous one started, so it
# gathers company. A sync costs ~100-200 us of CPU on this project's reference VM (fdatasync
# on virtio plus the thread hand-off): without the window, 8,000 one-event requests/s from 64
# connections made ~3,000 syncs/s of 2.6 batches, used 0.8 of a core and had a p99 of 6 ms
# (131 ms at 12,000/s). A lone producer never waits, nor does a full group (64 closed-loop
# connections bring ~32 batches a sync: waiting would only idle the core). The idea of
# PostgreSQL's commit_delay + commit_siblings and MySQL's binlog_group_commit_sync_delay;
# libuv timers resolve milliseconds, so this is the smallest window a timer can express.
COMMIT_WINDOW_S = 0.001
FULL_SYNC_BATCHES = 16
FULL_SYNC_BYTES = 1024 * 1024
# When a sync finishes and the next group already carries this much, it starts at once: a loop
# iteration of large batches lasts milliseconds, and waiting for its end cost 100-event
# requests ~5% (305-325k -> 324-332k events/s). Smaller groups start at the end of the
# iteration so the requests parsed in it join: with 1-event requests from 64 connections,
# starting at once gave 29-32k req/s, waiting for the iteration 33-37k.
SYNC_AT_ONCE_BYTES = 256 * 1024

# Retry-After hints (seconds) per refusal reason: overload clears as soon as the roller catches
# up (it polls every second); a full disk needs an operator or retention, so back off longer.
RETRY_AFTER_OVERLOADED = 1
RETRY_AFTER_DISK_FULL = 30
RETRY_AFTER_IO_ERROR = 5
RETRY_AFTER_SHUTTING_DOWN = 1


class LogUnavailable(Exception):
    """The log refuses (or failed) this append; the client should retry after ``retry_after``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# -- Pure helpers shared with storage.py and query.py ----------------------------------------


def segment_name(worker_id: str, seq: int) -> str:
    return f"{worker_id}-{seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> tuple[str, int] | None:
    """(worker_id, seq) for a segment file name, None for anything else."""
    match = _SEGMENT_RE.match(name)
    if match is None:
        return None
    return match.group(1), int(match.group(2))


def list_segments(log_dir: Path) -> dict[str, list[Path]]:
    """Segments per worker, oldest first. The last one of each worker is the active one."""
    by_worker: dict[str, list[tuple[int, Path]]] = {}
    try:
        entries = list(os.scandir(log_dir))
    except FileNotFoundError:
        return {}
    for entry in entries:
        parsed = parse_segment_name(entry.name)
        if parsed is not None:
            by_worker.setdefault(parsed[0], []).append((parsed[1], Path(entry.path)))
    return {w: [p for _, p in sorted(segs)] for w, segs in by_worker.items()}


def sealed_segments(log_dir: Path) -> list[Path]:
    """Every segment that has a newer segment of the same worker, oldest first."""
    sealed: list[Path] = []
    for segs in list_segments(log_dir).values():
        sealed.extend(segs[:-1])
    return sorted(sealed, key=lambda p: p.name)


def frame_record(payload: bytes) -> bytes:
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _record_end(view: memoryview, offset: int, size: int) -> int:
    """End offset of the valid record starting at ``offset``, or -1."""
    if offset + HEADER_SIZE > size:
        return -1
    magic, length, crc = RECORD_HEADER.unpack_from(view, offset)
    end = offset + HEADER_SIZE + length
    if magic != RECORD_MAGIC or length == 0 or length > MAX_RECORD_BYTES or end > size:
        return -1
    payload = view[offset + HEADER_SIZE : end]
    if zlib.crc32(payload) != crc or payload[-1] != 0x0A:
        return -1
    return end


def scan_records(data: bytes | bytearray | memoryview) -> tuple[list[memoryview], int]:
    """Payloads of the valid record prefix of ``data`` and the offset where it ends.

    Scanning stops at the first record that is incomplete (a tail still being written, or torn
    by a crash) or corrupt (bad magic, absurd length, checksum mismatch, not one JSON line).
    """
    view = memoryview(data)
    size = len(view)
    payloads: list[memoryview] = []
    offset = 0
    while (end := _record_end(view, offset, size)) > 0:
        payloads.append(view[offset + HEADER_SIZE : end])
        offset = end
    return payloads, offset


@dataclass(slots=True)
class SegmentScan:
    payloads: list[memoryview]  # of every valid record, in file order
    records: list[tuple[int, int]]  # (start, end) of every valid framed record
    damaged: list[tuple[int, int]]  # byte ranges that are not valid records

    def only_tail_damaged(self, size: int) -> bool:
        return len(self.damaged) == 1 and self.damaged[0][1] == size


def scan_segment(data: bytes | bytearray) -> SegmentScan:
    """Every valid record of a segment, resynchronising after a damaged stretch.

    A torn tail damages only the end; a flipped bit in the middle of a segment must not cost
    the acknowledged records after it. Resynchronising cannot be fooled by event data: a
    header's length field (<= MAX_RECORD_BYTES) has a high byte below 0x20, which JSON text
    never contains raw, and the CRC must match as well.
    """
    view = memoryview(data)
    size = len(view)
    scan = SegmentScan([], [], [])
    offset = 0
    while offset < size:
        end = _record_end(view, offset, size)
        if end > 0:
            scan.payloads.append(view[offset + HEADER_SIZE : end])
            scan.records.append((offset, end))
            offset = end
            continue
        resume = data.find(RECORD_MAGIC, offset + 1)
        while resume != -1 and _record_end(view, resume, size) < 0:
            resume = data.find(RECORD_MAGIC, resume + 1)
        if resume == -1:
            scan.damaged.append((offset, size))
            break
        scan.damaged.append((offset, resume))
        offset = resume
    return scan


def quarantine_bytes(data_dir: Path, source: Path, offset: int, data: bytes) -> Path | None:
    """Keep bytes cut off a segment next to the data set instead of destroying them.

    Best effort: they are not valid records, so failing to keep them (a full disk at start-up)
    must not stop recovery. Returns where they went, or None.
    """
    qdir = data_dir / QUARANTINE_DIRNAME
    target = qdir / f"{source.name}.{offset}.{time.time_ns()}.tail"
    try:
        make_dirs_durable(qdir)
        with open(target, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(qdir)
    except OSError as exc:
        log.error("could not keep %d damaged bytes of %s: %s", len(data), source.name, exc)
        return None
    return target


def _fdatasync(fd: int) -> None:
    # Looked up at call time so tests can inject faults by monkeypatching os.fdatasync.
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


def recover_segment(data_dir: Path, path: Path) -> int:
    """Remove torn or corrupt bytes from ``path``, keeping every valid record; return its size.

    A torn tail (the common case: a crash mid-write) is cut at the last valid record, never
    earlier. Damage in the middle is cut out by rewriting the segment (tmp -> fsync -> rename
    -> fsync dir), so the valid records after it survive. Removed bytes are kept in the
    quarantine directory first; a crash mid-recovery leaves the old or the new file, whole.
    """
    data = path.read_bytes()
    scan = scan_segment(data)
    if not scan.damaged:
        return len(data)
    for start, end in scan.damaged:
        target = quarantine_bytes(data_dir, path, start, data[start:end])
        log.warning(
            "commit log %s: removed %d torn/corrupt bytes at offset %d (kept in %s)",
            path.name,
            end - start,
            start,
            target,
        )
    if scan.only_tail_damaged(len(data)):
        kept = scan.damaged[0][0]
        with open(path, "r+b") as f:
            f.truncate(kept)
            f.flush()
            os.fsync(f.fileno())
        return kept
    salvaged = b"".join(data[start:end] for start, end in scan.records)
    write_file_durably(path, salvaged, tmp=path.with_name(path.name + SALVAGE_SUFFIX))
    return len(salvaged)


# -- The writer ----------------------------------------------------------------------------


@dataclass(slots=True)
class LogStats:
    """Counters per stage, counted per batch (Vector style); read by /metrics later."""

    appends: int = 0  # batches accepted into the buffer
    events: int = 0  # events in acknowledged batches
    acked: int = 0  # batches whose on_done(None) fired
    failed: int = 0  # batches whose on_done(exc) fired
    refused: int = 0  # appends that raised LogUnavailable
    syncs: int = 0  # completed write+fdatasync rounds
    sync_errors: int = 0
    bytes: int = 0  # framed bytes written
    rotations: int = 0
    last_sync_latency_s: float = 0.0
    max_sync_latency_s: float = 0.0


_STOP = object()

# Job kinds executed by the sync thread.
_JOB_WRITE = 0  # optionally rotate, then write the buffer and fdatasync
_JOB_REPAIR = 1  # cut the damaged segment back to its durable offset, open a new segment


class CommitLog:
    """One worker's append-only log. ``append`` is called on the event loop thread only."""

    __slots__ = (
        "data_dir",
        "log_dir",
        "worker_id",
        "_fsync",
        "_segment_max_bytes",
        "_segment_max_age_s",
        "_max_unrolled_bytes",
        "_min_free_bytes",
        "_clock",
        "stats",
        "sync_latency",
        "_space_failure",
        "_repair_failure",
        "_write_failure",
        "_loop",
        "_thread",
        "_jobs",
        "_pending",
        "_pending_bytes",
        "_pending_waiters",
        "_syncing",
        "_sync_scheduled",
        "_last_sync_started",
        "_last_sync_batches",
        "_sync_timer",
        "_rotate_due",
        "_unsound",
        "_closing",
        "_idle_waiters",
        "_unrolled_bytes",
        "_free_bytes",
        "_space_error",
        "_log_dir_identity",
        "_project_json",
        "_uuid_ms",
        "_uuid_seq",
        "_random_pool",
        "_random_pos",
        "_uuid_head",
        "_uuid_tail",
        # Written by the sync thread while a job is in flight; the loop reads them only when
        # idle, except tick(), which takes a racy but harmless snapshot.
        "_fd",
        "_segment_path",
        "_segment_seq",
        "_segment_size",
        "_durable_size",
        "_segment_opened_at",
    )

    def __init__(
        self,
        data_dir: Path,
        *,
        durability: str = "fsync",
        worker_id: str = "w0",
        segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES,
        segment_max_age_s: float = DEFAULT_SEGMENT_MAX_AGE_S,
        max_unrolled_bytes: int = DEFAULT_MAX_UNROLLED_BYTES,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if durability not in ("fsync", "none"):
            raise ValueError(f"durability must be 'fsync' or 'none', not {durability!r}")
        if not _WORKER_ID_RE.match(worker_id):
            raise ValueError(f"worker_id must match {_WORKER_ID_RE.pattern}: {worker_id!r}")
        self.data_dir = Path(data_dir)
        self.log_dir = self.data_dir / LOG_DIRNAME
        self.worker_id = worker_id
        self._fsync = durability == "fsync"
        self._segment_max_bytes = segment_max_bytes
        self._segment_max_age_s = segment_max_age_s
        self._max_unrolled_bytes = max_unrolled_bytes
        self._min_free_bytes = min_free_bytes
        self._clock = clock
        self.stats = LogStats()
        self.sync_latency = Histogram(LATENCY_BUCKETS)  # per group commit, not per request
        self._space_failure = RepeatedFailure(log, "commit log: free space check")
        self._repair_failure = RepeatedFailure(log, "commit log: repair")
        # One episode from a failed write until a write succeeds: a disk that stays full fails
        # every append between repairs, and must not log (or leave a segment) for each.
        self._write_failure = RepeatedFailure(log, "commit log: write/sync")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # Framed records as writev parts, in append order.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_waiters: list[tuple[Callable[[BaseException | None], None], int]] = []
        self._syncing = False
        self._sync_scheduled = False
        self._last_sync_started = 0.0
        self._last_sync_batches = 0
        self._sync_timer: asyncio.TimerHandle | None = None
        self._rotate_due = False
        self._unsound: BaseException | None = None
        self._closing = False
        self._idle_waiters: list[asyncio.Future] = []
        self._unrolled_bytes = 0
        self._free_bytes = 1 << 62
        # Why the last free-space check failed (the data dir was removed or unmounted), or None.
        self._space_error: OSError | None = None
        self._log_dir_identity: tuple[int, int] | None = None
        self._project_json: dict[str, bytes] = {}
        self._uuid_ms = 0
        self._uuid_seq = 0
        self._random_pool = b""
        self._random_pos = 0
        self._uuid_head = b""
        self._uuid_tail = b""
        self._fd = -1
        self._segment_path: Path | None = None
        self._segment_seq = 0
        self._segment_size = 0
        self._durable_size = 0
        self._segment_opened_at = 0.0

    @property
    def durability(self) -> str:
        return "fsync" if self._fsync else "none"

    @property
    def segment_path(self) -> Path | None:
        return self._segment_path

    # -- Lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Recover the tail, seal what was there, open a new segment durably. Before serving."""
        make_dirs_durable(self.log_dir)
        for stale in self.log_dir.glob(f"{self.worker_id}-*{SALVAGE_SUFFIX}"):
            stale.unlink()  # a recovery rewrite that a crash interrupted: the original is whole
        mine = list_segments(self.log_dir).get(self.worker_id, [])
        # Only the newest segment can have a torn tail: older ones were fully synced before
        # their successor was created. The roller salvages those as it reads.
        if mine and recover_segment(self.data_dir, mine[-1]) == 0:
            # The empty successor a clean close left (or a rotation a crash cut short): it
            # already seals its predecessor, so it becomes the active segment.
            fd = os.open(mine[-1], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._use_segment(fd, mine[-1], parse_segment_name(mine[-1].name)[1])
        else:
            self._segment_seq = parse_segment_name(mine[-1].name)[1] if mine else 0
            self._open_new_segment()
        self._refresh_space()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the running loop and start the sync thread."""
        if self._fd < 0:
            raise RuntimeError("CommitLog.open() must run before start()")
        self._loop = loop
        self._thread = threading.Thread(
            target=self._sync_thread_main, name=f"commitlog-{self.worker_id}", daemon=True
        )
        self._thread.start()

    async def close(self) -> None:
        """Refuse new appends, finish in-flight and queued syncs (callbacks fire), seal."""
        self._closing = True
        closing_repair_tried = False
        if self._thread is None:
            self._close_and_seal()
            return
        while True:
            if self._syncing or self._sync_scheduled:
                fut = self._loop.create_future()
                self._idle_waiters.append(fut)
                await fut
            elif self._pending_waiters and self._unsound is None:
                self._start_sync()
            elif self._unsound is not None and not closing_repair_tried:
                closing_repair_tried = True
                self._start_repair()
            else:
                break
        self._jobs.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._thread = None
        self._close_and_seal()

    def _close_and_seal(self) -> None:
        """Final sync and close; then, if the segment holds records and every byte of it is on
        disk, create its (empty) successor: a segment with a successor is sealed, so the roll
        on the way out converts it, instead of the next start."""
        if self._fd < 0:
            return
        synced = False
        if self._unsound is None:
            try:
                _fdatasync(self._fd)
                synced = True
            except OSError as exc:
                log.error("commit log: final sync of %s failed: %s", self._segment_path, exc)
        os.close(self._fd)
        self._fd = -1
        if not synced or self._segment_size == 0:
            return
        try:
            fd, _, _ = self._create_segment()
        except OSError as exc:  # harmless: the next start seals it instead
            log.warning("commit log: could not seal %s: %s", self._segment_path, exc)
            return
        os.close(fd)

    # -- Hot path (loop thread) -----------------------------------------------------------

    def append(
        self,
        project: str,
        events_json: bytes,
        count: int,
        on_done: Callable[[BaseException | None], None],
        idempotency_key: bytes | None = None,
    ) -> None:
        """Queue one batch; ``on_done`` fires on the loop once it is durable (or failed).

        ``idempotency_key`` (printable ASCII) is kept in the record as ``"k"`` (dedup.py
        rebuilds its table from it). Raises LogUnavailable at once when the log refuses
        (overloaded, disk short, unsound).
        """
        pending_bytes = self._pending_bytes
        if (
            self._unsound is not None
            or self._closing
            or self._unrolled_bytes + pending_bytes > self._max_unrolled_bytes
            or self._free_bytes - pending_bytes < self._min_free_bytes
        ):
            self.stats.refused += 1
            raise self.unavailable()  # the same tests, in the order that names the cause

        project_json = self._project_json.get(project)
        if project_json is None:
            project_json = self._project_json[project] = orjson.dumps(project)
        received_us = int(self._clock() * 1_000_000)
        head = b'{"p":%b,"r":%d,"b":"%b","e":' % (
            project_json,
            received_us,
            self._batch_id_prefix(received_us // 1000),
        )
        if idempotency_key is not None:
            head = head[:-4] + b'"k":%b,"e":' % orjson.dumps(idempotency_key.decode("ascii"))
        if count > MAX_EVENTS_PER_BATCH:
            raise ValueError(f"batch of {count} events exceeds MAX_EVENTS_PER_BATCH")
        # Framed here, so the sync thread runs no per-record Python (each line of Python there
        # is a GIL hand-off with the loop). Small records are joined into one buffer (one
        # copy, ~0.5 us); large ones go to writev as they are, the checksum chained over parts.
        if len(events_json) <= COPY_RECORD_MAX_BYTES:
            payload = head + events_json + RECORD_END
            length = len(payload)
            self._pending.append(RECORD_HEADER.pack(RECORD_MAGIC, length, zlib.crc32(payload)))
            self._pending.append(payload)
        else:
            if type(events_json) is not bytes:
                # Written later without a copy: a caller's reusable buffer must not change.
                events_json = bytes(events_json)
            length = len(head) + len(events_json) + len(RECORD_END)
            if length > MAX_RECORD_BYTES:
                raise ValueError(f"batch of {length} bytes exceeds MAX_RECORD_BYTES")
            crc = zlib.crc32(RECORD_END, zlib.crc32(events_json, zlib.crc32(head)))
            self._pending += (
                RECORD_HEADER.pack(RECORD_MAGIC, length, crc) + head,
                events_json,
                RECORD_END,
            )
        self._pending_bytes = pending_bytes + HEADER_SIZE + length
        self._pending_waiters.append((on_done, count))
        self.stats.appends += 1
        if not self._syncing and not self._sync_scheduled:
            self._schedule_sync()
        elif self._sync_timer is not None and self._group_is_full():
            # The window's company has arrived: start at the end of this iteration instead.
            self._sync_timer.cancel()
            self._sync_timer = None
            self._loop.call_soon(self._start_sync)

    def refusal(self) -> str | None:
        """Why append would refuse right now, or None (for /ready)."""
        unavailable = self.unavailable()
        return None if unavailable is None else str(unavailable)

    def unavailable(self) -> LogUnavailable | None:
        """What append would raise right now, or None; counts nothing. The server also asks
        this on a request's headers, to refuse before reading a body it could not store."""
        if self._closing:
            return LogUnavailable("shutting down", RETRY_AFTER_SHUTTING_DOWN)
        exc = self._unsound
        if exc is not None:
            disk_full = getattr(exc, "errno", None) == errno.ENOSPC
            return LogUnavailable(
                f"{'disk full' if disk_full else 'I/O error'}: the log is recovering from a "
                f"failed write/sync ({exc})",
                RETRY_AFTER_DISK_FULL if disk_full else RETRY_AFTER_IO_ERROR,
            )
        if self._unrolled_bytes + self._pending_bytes > self._max_unrolled_bytes:
            return LogUnavailable(
                "overloaded: the log is too far ahead of the Parquet roller", RETRY_AFTER_OVERLOADED
            )
        if self._free_bytes - self._pending_bytes < self._min_free_bytes:
            if self._space_error is not None:
                return LogUnavailable(self._storage_unavailable(), RETRY_AFTER_IO_ERROR)
            return LogUnavailable(
                "disk full: not enough free space for the log", RETRY_AFTER_DISK_FULL
            )
        return None

    def backpressure_delay(self) -> float:
        """Seconds to hold an ingest request before handling it: 0 below the backpressure mark,
        rising to MAX_BACKPRESSURE_DELAY_S at the hard mark (see BACKPRESSURE_FROM_SHARE)."""
        backlog = self._unrolled_bytes + self._pending_bytes
        soft = self._max_unrolled_bytes * BACKPRESSURE_FROM_SHARE
        if backlog <= soft:
            return 0.0
        share = (backlog - soft) / (self._max_unrolled_bytes - soft)
        return MAX_BACKPRESSURE_DELAY_S * min(1.0, share)

    def _storage_unavailable(self) -> str:
        exc = self._space_error
        return f"storage unavailable: cannot check {self.log_dir}: {exc.strerror or exc}"

    def _batch_id_prefix(self, now_ms: int) -> bytes:
        """33 leading hex/dash characters of a UUIDv7 whose last 3 hex digits are 0."""
        # Monotonic within this process: rand_a counts batches inside one millisecond
        # (RFC 9562 6.2 method 1); a clock step backwards keeps the last timestamp.
        if now_ms > self._uuid_ms:
            self._uuid_ms = now_ms
            self._uuid_seq = 0
        else:
            self._uuid_seq += 1
            if self._uuid_seq > 0xFFF:
                self._uuid_ms += 1
                self._uuid_seq = 0
            else:
                return b"%b%03x%b" % (self._uuid_head, self._uuid_seq, self._uuid_tail)
        # A new millisecond: new timestamp text and 50 fresh random bits from the CSPRNG (drawn
        # in bulk). Batches of the same millisecond share them and differ in the counter, which
        # keeps ids unique in this process; another worker's ids differ in the random bits.
        # Formatting only the counter per batch halves the cost of an id (1.0 -> ~0.4 us).
        pos = self._random_pos
        if pos >= len(self._random_pool):
            self._random_pool = os.urandom(RANDOM_POOL_BYTES)
            pos = 0
        self._random_pos = pos + 7
        rand = int.from_bytes(self._random_pool[pos : pos + 7]) & 0x3FFFFFFFFFFFF
        text = b"%012x" % self._uuid_ms
        # time_high-time_low | "7" + rand_a (the counter) | variant 0b10 + 14 bits | 36 bits;
        # the 3 hex digits the caller appends complete rand_b.
        self._uuid_head = text[:8] + b"-" + text[8:] + b"-7"
        self._uuid_tail = b"-%04x-%09x" % (0x8000 | (rand >> 36), rand & 0xFFFFFFFFF)
        return b"%b%03x%b" % (self._uuid_head, self._uuid_seq, self._uuid_tail)

    # -- Sync orchestration (loop thread) -------------------------------------------------

    def _schedule_sync(self, *, at_once: bool = False) -> None:
        """Start the next group commit: for a lone producer or a full group at the end of this
        loop iteration (not a timer, so requests that arrived together share it too), or now
        (``at_once``: a sync just finished, and its successor already carries
        SYNC_AT_ONCE_BYTES); otherwise once COMMIT_WINDOW_S has passed since the last one
        started."""
        if self._last_sync_batches > 1 and not self._group_is_full():
            delay = self._last_sync_started + COMMIT_WINDOW_S - time.monotonic()
            if delay > 0:
                self._sync_scheduled = True
                self._sync_timer = self._loop.call_later(delay, self._start_sync)
                return
        if at_once and self._pending_bytes >= SYNC_AT_ONCE_BYTES:
            self._start_sync()
        else:
            self._sync_scheduled = True
            self._loop.call_soon(self._start_sync)

    def _group_is_full(self) -> bool:
        """The waiting group is worth a sync of its own: no commit window for it."""
        return (
            len(self._pending_waiters) >= FULL_SYNC_BATCHES
            or self._pending_bytes >= FULL_SYNC_BYTES
        )

    def _start_sync(self) -> None:
        self._sync_scheduled = False
        self._sync_timer = None
        if self._syncing or self._unsound is not None:
            return
        if not self._pending_waiters and not self._rotate_due:
            self._wake_idle_waiters()
            return
        buf = self._pending
        waiters = self._pending_waiters
        size = self._pending_bytes
        self._pending = []
        self._pending_bytes = 0
        self._pending_waiters = []
        rotate = self._rotate_due or self._segment_size >= self._segment_max_bytes
        self._rotate_due = False
        self._syncing = True
        self._last_sync_started = time.monotonic()
        self._last_sync_batches = len(waiters)
        self._jobs.put((_JOB_WRITE, buf, size, waiters, rotate))

    def _on_job_done(self, kind: int, written: int, waiters, error, latency: float) -> None:
        self._syncing = False
        stats = self.stats
        if kind == _JOB_REPAIR:
            if error is None:
                self._unsound = None
                self._repair_failure.succeeded()
            else:
                self._repair_failure.failed(
                    "commit log %s: repair failed, still refusing: %s", self.worker_id, error
                )
            self._wake_idle_waiters()
            return
        if error is None:
            stats.syncs += 1
            stats.bytes += written
            stats.last_sync_latency_s = latency
            self.sync_latency.observe(latency)
            if latency > stats.max_sync_latency_s:
                stats.max_sync_latency_s = latency
            if self._write_failure.count:
                self._write_failure.succeeded()
            self._unrolled_bytes += written
            self._free_bytes -= written
            # The next group first: the disk works while these answers are written.
            if self._pending_waiters or self._rotate_due:
                self._schedule_sync(at_once=True)
            else:
                self._wake_idle_waiters()
            events = 0
            for on_done, count in waiters:
                events += count
                self._fire(on_done, None)
            stats.acked += len(waiters)
            stats.events += events
            return
        # fsyncgate: the kernel may already have dropped the dirty pages; never retry these.
        stats.sync_errors += 1
        self._unsound = error
        self._write_failure.failed(
            "commit log %s: write/sync failed, refusing appends: %s", self.worker_id, error
        )
        if getattr(error, "errno", None) == errno.ENOSPC:
            # Refused as "disk full" until the next tick's statvfs says there is room again:
            # at most one failing write a second while the disk stays full.
            self._free_bytes = -(1 << 62)
        failure = self._failure(error)
        queued = self._pending_waiters
        self._pending_waiters = []
        self._pending = []
        self._pending_bytes = 0
        for on_done, _ in waiters:
            self._fire(on_done, failure)
        for on_done, _ in queued:
            self._fire(on_done, failure)
        stats.failed += len(waiters) + len(queued)
        # Repair at once rather than on the next tick: the failed batch's bytes may still be
        # in the file, and a crash before the cut would bring them back as valid records.
        self._start_repair()

    def _start_repair(self) -> None:
        self._syncing = True
        self._jobs.put((_JOB_REPAIR, None, 0, None, False))

    @staticmethod
    def _failure(error: BaseException) -> LogUnavailable:
        if getattr(error, "errno", None) == errno.ENOSPC:
            exc = LogUnavailable(f"disk full: write/sync failed ({error})", RETRY_AFTER_DISK_FULL)
        else:
            exc = LogUnavailable(f"I/O error: write/sync failed ({error})", RETRY_AFTER_IO_ERROR)
        exc.__cause__ = error
        return exc

    @staticmethod
    def _fire(on_done, result) -> None:
        try:
            on_done(result)
        except Exception:
            log.exception("commit log: on_done callback raised")

    def _wake_idle_waiters(self) -> None:
        waiters = self._idle_waiters
        self._idle_waiters = []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def tick(self) -> None:
        """Once a second on the loop: free space, unrolled bytes, rotation by age, repair.

        Runs whether or not a sync is in flight: under sustained load one always is, and the
        refresh is what lets appends through again once the roller has caught up.
        """
        if self._fd < 0 and self._unsound is None:
            return  # not open, or closed
        try:
            self._refresh_space()
        except OSError as exc:
            self._space_failure.failed("commit log: cannot check free space: %s", exc)
            # Not the last figure: a data dir that was removed or unmounted has no free space
            # to speak of, and an append would go to a file nobody will ever read.
            self._space_error = exc
            self._free_bytes = -(1 << 62)
        else:
            self._space_error = None
            self._space_failure.succeeded()
        if self._unsound is not None:
            if not self._syncing:
                self._start_repair()  # the last attempt failed; try again
            return
        # Segment fields are written by the sync thread; reading them here is a racy but safe
        # snapshot (single attribute loads), good enough for a once-a-second age check.
        age = self._clock() - self._segment_opened_at
        if self._segment_size > 0 and age >= self._segment_max_age_s:
            self._rotate_due = True
            if not self._syncing and not self._sync_scheduled:
                self._start_sync()

    def _refresh_space(self) -> None:
        st_dir = os.stat(self.log_dir)
        identity = (st_dir.st_dev, st_dir.st_ino)
        if self._log_dir_identity is None:
            self._log_dir_identity = identity
        elif identity != self._log_dir_identity:
            # Our segments are in the directory that was removed: this one is someone else's.
            raise FileNotFoundError(
                errno.ENOENT, "replaced by another directory", str(self.log_dir)
            )
        st = os.statvfs(self.log_dir)
        current = self._segment_path
        # Bytes a sync in flight has already written are counted again when it completes:
        # an overestimate of at most one group commit, corrected by the next tick.
        unrolled = self._segment_size
        for path in list_segments(self.log_dir).get(self.worker_id, []):
            if path == current:
                continue
            try:
                unrolled += path.stat().st_size
            except FileNotFoundError:
                continue  # rolled between listing and stat
        self._free_bytes = st.f_bavail * st.f_frsize
        self._unrolled_bytes = unrolled

    # -- Sync thread ----------------------------------------------------------------------

    def _sync_thread_main(self) -> None:
        jobs = self._jobs
        loop = self._loop
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            kind, buf, size, waiters, rotate = job
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                if kind == _JOB_REPAIR:
                    self._repair()
                else:
                    if rotate:
                        self._rotate()
                    if buf:
                        self._write_records(buf, size)
                        if self._fsync:
                            _fdatasync(self._fd)
                        self._durable_size = self._segment_size
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the callbacks
                error = exc
                if kind == _JOB_WRITE and self._fd >= 0:
                    # Drop the unacknowledged bytes from the page cache right away; the repair
                    # job makes the cut durable.
                    try:
                        os.ftruncate(self._fd, self._durable_size)
                    except OSError:
                        pass
            latency = time.perf_counter() - started
            try:
                loop.call_soon_threadsafe(self._on_job_done, kind, size, waiters, error, latency)
            except RuntimeError:
                return  # loop closed under us: nobody is waiting any more

    def _write_records(self, parts: list[bytes], size: int) -> None:
        """writev the framed records (``size`` bytes in all), finishing short writes."""
        # One writev per IOV_MAX parts: almost always one, whose size is already known.
        chunks = [parts[i : i + IOV_MAX] for i in range(0, len(parts), IOV_MAX)]
        for chunk in chunks:
            written = os.writev(self._fd, chunk)
            self._segment_size += written
            if written < (size if len(chunks) == 1 else sum(map(len, chunk))):
                self._finish_short_write(chunk, written)

    def _finish_short_write(self, parts: list[bytes], written: int) -> None:
        # Rare: a signal or a nearly full disk. A real failure raises from os.write.
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            n = os.write(self._fd, rest)
            self._segment_size += n
            rest = rest[n:]

    def _rotate(self) -> None:
        old_fd = self._fd
        self._open_new_segment()
        os.close(old_fd)
        self.stats.rotations += 1

    def _repair(self) -> None:
        """Cut the damaged segment back to its last durable size and start a new segment."""
        if self._fd >= 0:
            os.ftruncate(self._fd, self._durable_size)
            os.fsync(self._fd)
            if self._durable_size == 0:
                # Nothing acknowledged in it: keep writing to it rather than leave an empty
                # segment behind per failed write (1,122 in 40 s on a full disk).
                self._segment_size = 0
                return
            os.close(self._fd)
            self._fd = -1
        self._segment_size = self._durable_size
        self._open_new_segment()

    def _open_new_segment(self) -> None:
        self._use_segment(*self._create_segment())

    def _create_segment(self) -> tuple[int, Path, int]:
        """The successor of the current segment, created durably: (fd, path, seq)."""
        # Sequence numbers follow the wall clock in microseconds so a name is never reused
        # after the roller deleted every older segment (Parquet files are named after it).
        seq = max(self._segment_seq + 1, time.time_ns() // 1000)
        path = self.log_dir / segment_name(self.worker_id, seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.fsync(fd)
            fsync_dir(self.log_dir)
        except BaseException:
            os.close(fd)
            raise
        return fd, path, seq

    def _use_segment(self, fd: int, path: Path, seq: int) -> None:
        self._fd = fd
        self._segment_path = path
        self._segment_seq = seq
        self._segment_size = 0
        self._durable_size = 0
        self._segment_opened_at = self._clock()


__all__ = [
    "CommitLog",
    "LogStats",
    "LogUnavailable",
    "frame_record",
    "list_segments",
    "scan_records",
    "sealed_segments",
    "segment_name",
    "parse_segment_name",
    "recover_segment",
]
