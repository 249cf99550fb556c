"""The commit log's writer: the group-commit append path behind every 202.

A 202 means the batch is in a log file and fdatasync has returned. Appends that arrive while a
sync is running share the next one (group commit); an idle lone append is written at once, at
the end of the current loop iteration (``call_soon``, not a timer), so it costs one sync.
``append`` frames and checksums the record on the loop, so the sync thread (sync_thread.py)
runs only the ``os.writev`` and ``os.fdatasync`` of each group commit while the loop keeps
parsing. When the next sync starts, and which stage the pipeline is in, is decided by the
sans-IO scheduler in group_commit.py; this module realises its decisions on the loop.

fsync failure policy (PostgreSQL "fsyncgate"): a failed write or sync fails every batch of that
sync and every batch queued behind it, and the log refuses appends until a repair (started at
once, retried by ``tick``) has cut the damaged segment back to its last durable offset, synced
that, and opened a new segment durably. Nothing is ever retried and then acknowledged.

The record format, and everything a reader needs, is in format.py; readers never import this.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..observe.logs import RepeatedFailure
from ..observe.metrics import LATENCY_BUCKETS, Histogram
from . import sync_thread
from .admission import (
    DEFAULT_MAX_UNROLLED_BYTES,
    DEFAULT_MIN_FREE_BYTES,
    LogRoom,
    LogUnavailable,
    recovering_from,
    shutting_down,
    write_failed,
)
from .batch_ids import BatchIds
from .format import (
    HEADER_SIZE,
    LOG_DIRNAME,
    MAX_EVENTS_PER_BATCH,
    MAX_RECORD_BYTES,
    RECORD_END,
    RECORD_HEADER,
    RECORD_MAGIC,
    WORKER_ID_RE,
)
from .group_commit import IDLE, START_NOW, START_WINDOW, UNSOUND, WINDOW, GroupCommit
from .sync_thread import JOB_REPAIR, ActiveSegment, SyncThread, Waiter

log = logging.getLogger("inslytic_fast.commitlog")

# Records whose events are at most this long are copied into one buffer when framed (cheaper
# than three writev parts); longer ones are written from the caller's bytes without a copy.
COPY_RECORD_MAX_BYTES = 16 * 1024

# 64 MiB segments roll in well under a second with DuckDB and keep the number of Parquet files
# per partition low; 30 s bounds how long events wait in the log before they reach Parquet.
DEFAULT_SEGMENT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_MAX_AGE_S = 30.0


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


class CommitLog:
    """One worker's append-only log. ``append`` is called on the event loop thread only."""

    __slots__ = (
        "data_dir",
        "log_dir",
        "worker_id",
        "_fsync",
        "_segment_max_bytes",
        "_segment_max_age_s",
        "_clock",
        "stats",
        "sync_latency",
        "_space_failure",
        "_repair_failure",
        "_write_failure",
        "_loop",
        "_sync_thread",
        "_segment",
        "_sync",
        "_window_timer",
        "_pending",
        "_pending_bytes",
        "_pending_waiters",
        "_rotate_due",
        "_closing",
        "_idle_waiters",
        "_room",
        "_project_json",
        "_batch_ids",
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
        if not WORKER_ID_RE.match(worker_id):
            raise ValueError(f"worker_id must match {WORKER_ID_RE.pattern}: {worker_id!r}")
        self.data_dir = Path(data_dir)
        self.log_dir = self.data_dir / LOG_DIRNAME
        self.worker_id = worker_id
        self._fsync = durability == "fsync"
        self._segment_max_bytes = segment_max_bytes
        self._segment_max_age_s = segment_max_age_s
        self._clock = clock
        self.stats = LogStats()
        self.sync_latency = Histogram(LATENCY_BUCKETS)  # per group commit, not per request
        self._space_failure = RepeatedFailure(log, "commit log: free space check")
        self._repair_failure = RepeatedFailure(log, "commit log: repair")
        # One episode from a failed write until a write succeeds: a disk that stays full fails
        # every append between repairs, and must not log (or leave a segment) for each.
        self._write_failure = RepeatedFailure(log, "commit log: write/sync")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync_thread: SyncThread | None = None
        self._segment = ActiveSegment(self.data_dir, self.log_dir, worker_id, clock)
        self._sync = GroupCommit()
        self._window_timer: asyncio.TimerHandle | None = None  # while the sync is WINDOW
        # The waiting group: framed records as writev parts in append order, their size, their
        # batches, and whether the next sync rotates first (tick found the segment too old).
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_waiters: list[Waiter] = []
        self._rotate_due = False
        self._closing = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._room = LogRoom(self.log_dir, worker_id, max_unrolled_bytes, min_free_bytes)
        self._project_json: dict[str, bytes] = {}
        self._batch_ids = BatchIds()

    @property
    def durability(self) -> str:
        return "fsync" if self._fsync else "none"

    @property
    def segment_path(self) -> Path | None:
        return self._segment.path

    @property
    def group_commit(self) -> GroupCommit:
        """The scheduler's stage and failure, for tests and status pages (read only)."""
        return self._sync

    # -- Lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Recover the tail, seal what was there, open a new segment durably. Before serving."""
        self._segment.open()
        self._room.measure(self._segment.path, self._segment.size)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the running loop and start the sync thread."""
        if self._segment.fd < 0:
            raise RuntimeError("CommitLog.open() must run before start()")
        self._loop = loop
        self._sync_thread = SyncThread(
            self._segment, fsync=self._fsync, loop=loop, on_done=self._on_job_done
        )

    async def close(self) -> None:
        """Refuse new appends, finish in-flight and queued syncs (callbacks fire), seal."""
        self._closing = True
        closing_repair_tried = False
        if self._sync_thread is None or self._loop is None:
            self._close_and_seal()
            return
        while True:
            if self._sync.busy:
                fut = self._loop.create_future()
                self._idle_waiters.append(fut)
                await fut
            elif self._pending_waiters and self._sync.failure is None:
                self._start_sync()
            elif self._sync.state is UNSOUND and not closing_repair_tried:
                closing_repair_tried = True
                self._start_repair()
            else:
                break
        self._sync_thread.stop()
        await asyncio.get_running_loop().run_in_executor(None, self._sync_thread.join)
        self._sync_thread = None
        self._close_and_seal()

    def _close_and_seal(self) -> None:
        """Final sync and close; then, if the segment holds records and every byte of it is on
        disk, create its (empty) successor: a segment with a successor is sealed, so the roll
        on the way out converts it, instead of the next start."""
        segment = self._segment
        if segment.fd < 0:
            return
        synced = False
        if self._sync.failure is None:
            try:
                sync_thread.fdatasync(segment.fd)
                synced = True
            except OSError as exc:
                log.error("commit log: final sync of %s failed: %s", segment.path, exc)
        segment.close()
        if not synced or segment.size == 0:
            return
        try:
            segment.seal()
        except OSError as exc:  # harmless: the next start seals it instead
            log.warning("commit log: could not seal %s: %s", segment.path, exc)

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
        if self._sync.failure is not None or self._closing or pending_bytes > self._room.headroom:
            self.stats.refused += 1
            refusal = self.unavailable()  # the same tests, in the order that names the cause
            assert refusal is not None
            raise refusal

        project_json = self._project_json.get(project)
        if project_json is None:
            project_json = self._project_json[project] = orjson.dumps(project)
        received_us = int(self._clock() * 1_000_000)
        head = b'{"p":%b,"r":%d,"b":"%b","e":' % (
            project_json,
            received_us,
            self._batch_ids.prefix(received_us // 1000),
        )
        if idempotency_key is not None:
            head = head[:-4] + b'"k":%b,"e":' % orjson.dumps(idempotency_key.decode("ascii"))
        if count > MAX_EVENTS_PER_BATCH:
            raise ValueError(f"batch of {count} events exceeds MAX_EVENTS_PER_BATCH")
        # format.frame_record's framing, inline (the hot path). Framed here, so the sync thread
        # runs no per-record Python (each line of Python there is a GIL hand-off with the loop).
        # Small records are joined into one buffer (one copy); large ones go to writev as they
        # are, the checksum chained over parts.
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
        pending_bytes += HEADER_SIZE + length
        self._pending_bytes = pending_bytes
        self._pending_waiters.append((on_done, count))
        self.stats.appends += 1
        sync = self._sync
        if sync.state is IDLE:
            self._schedule_sync()
        elif sync.state is WINDOW and sync.is_full(len(self._pending_waiters), pending_bytes):
            # The window's company has arrived: start at the end of this iteration instead.
            self._cancel_window_timer()
            sync.full_group_arrived()
            assert self._loop is not None
            self._loop.call_soon(self._start_sync)

    def refusal(self) -> str | None:
        """Why append would refuse right now, or None (for /ready)."""
        unavailable = self.unavailable()
        return None if unavailable is None else str(unavailable)

    def unavailable(self) -> LogUnavailable | None:
        """What append would raise right now, or None; counts nothing. The server also asks
        this on a request's headers, to refuse before reading a body it could not store."""
        if self._closing:
            return shutting_down()
        if self._sync.failure is not None:
            return recovering_from(self._sync.failure)
        return self._room.refusal(self._pending_bytes)

    def backpressure_delay(self) -> float:
        """Seconds to hold an ingest request before handling it (admission.py)."""
        return self._room.backpressure_delay(self._pending_bytes)

    # -- Group commit (loop thread): realises the scheduler's decisions ---------------------

    def _schedule_sync(self, *, after_sync: bool = False) -> None:
        """Start the next group commit: for a lone producer or a full group at the end of this
        loop iteration (not a timer, so requests that arrived together share it too), or now
        (a sync just finished, and its successor already carries SYNC_AT_ONCE_BYTES);
        otherwise once COMMIT_WINDOW_S has passed since the last one started."""
        sync = self._sync
        now = time.monotonic()
        start = sync.plan(now, len(self._pending_waiters), self._pending_bytes, after_sync)
        if start is START_NOW:
            self._start_sync()
            return
        sync.scheduled(start)
        loop = self._loop
        assert loop is not None, "start() attaches the loop before any append"
        if start is START_WINDOW:
            self._window_timer = loop.call_later(sync.window_left(now), self._start_sync)
        else:
            loop.call_soon(self._start_sync)

    def _cancel_window_timer(self) -> None:
        if self._window_timer is not None:
            self._window_timer.cancel()
            self._window_timer = None

    def _start_sync(self) -> None:
        self._window_timer = None
        sync = self._sync
        if not self._pending_waiters and not self._rotate_due:
            sync.nothing_to_start()
            self._wake_idle_waiters()
            return
        parts = self._pending
        waiters = self._pending_waiters
        size = self._pending_bytes
        self._pending = []
        self._pending_bytes = 0
        self._pending_waiters = []
        rotate = self._rotate_due or self._segment.size >= self._segment_max_bytes
        self._rotate_due = False
        sync.started(time.monotonic(), len(waiters))
        assert self._sync_thread is not None
        self._sync_thread.write(parts, size, waiters, rotate)

    def _on_job_done(
        self,
        kind: int,
        written: int,
        waiters: list[Waiter],
        error: BaseException | None,
        latency: float,
    ) -> None:
        stats = self.stats
        stats.rotations = self._segment.rotations
        sync = self._sync
        if kind == JOB_REPAIR:
            if error is None:
                sync.repaired()
                self._repair_failure.succeeded()
            else:
                sync.repair_failed()
                self._repair_failure.failed(
                    "commit log %s: repair failed, still refusing: %s", self.worker_id, error
                )
            self._wake_idle_waiters()
            return
        if error is None:
            sync.synced()
            stats.syncs += 1
            stats.bytes += written
            stats.last_sync_latency_s = latency
            self.sync_latency.observe(latency)
            if latency > stats.max_sync_latency_s:
                stats.max_sync_latency_s = latency
            if self._write_failure.count:
                self._write_failure.succeeded()
            self._room.written(written)
            # The next group first: the disk works while these answers are written.
            if self._pending_waiters or self._rotate_due:
                self._schedule_sync(after_sync=True)
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
        sync.failed(error)
        self._write_failure.failed(
            "commit log %s: write/sync failed, refusing appends: %s", self.worker_id, error
        )
        if getattr(error, "errno", None) == errno.ENOSPC:
            self._room.disk_full()
        failure = write_failed(error)
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
        assert self._sync_thread is not None
        self._sync_thread.repair()

    def _start_repair(self) -> None:
        """Retry a failed repair (tick, or close on the way out)."""
        self._sync.repair_started()
        assert self._sync_thread is not None
        self._sync_thread.repair()

    @staticmethod
    def _fire(
        on_done: Callable[[BaseException | None], None], result: BaseException | None
    ) -> None:
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

    # -- Once a second (loop thread) ------------------------------------------------------

    def tick(self) -> None:
        """Once a second on the loop: free space, unrolled bytes, rotation by age, repair.

        Runs whether or not a sync is in flight: under sustained load one always is, and the
        refresh is what lets appends through again once the roller has caught up.
        """
        sync = self._sync
        if self._segment.fd < 0 and sync.failure is None:
            return  # not open, or closed
        try:
            self._room.measure(self._segment.path, self._segment.size)
        except OSError as exc:
            self._space_failure.failed("commit log: cannot check free space: %s", exc)
        else:
            self._space_failure.succeeded()
        if sync.failure is not None:
            if sync.state is UNSOUND:
                self._start_repair()  # the last attempt failed; try again
            return
        # Segment fields are written by the sync thread; reading them here is a racy but safe
        # snapshot (single attribute loads), good enough for a once-a-second age check.
        age = self._clock() - self._segment.opened_at
        if self._segment.size > 0 and age >= self._segment_max_age_s:
            self._rotate_due = True
            if sync.state is IDLE:
                self._start_sync()
