"""The roller: sealed log segments -> hive-partitioned ZSTD Parquet, then compaction and retention.

One pass rolls every sealed segment, oldest first. A segment is read in place and converted per
(project, arrival day) (roll_input.py), in pieces of at most ROLL_PIECE_BYTES, one DuckDB COPY
and one file each (events_sql.py), into the layout of layout.py.

Exactly once, whatever step a roll dies at: outputs are named after their segment, written to
staging, fsynced, renamed into place (a replay overwrites the same names) and their directories
fsynced; only then is the segment deleted. Readers ignore a ``<segment>.*.parquet`` file while
its segment is still in the log, so a half-published roll is read from the log and never twice.
Compaction (compaction.py) keeps the same promise with an intent file.

Only one roller works on a data directory at a time (``.roller.lock``, flock per pass);
readers take no lock. A roll skips events already past ``retention_days``. A record DuckDB
cannot convert (ingest validation makes that "cannot happen") is quarantined rather than
allowed to wedge the roller.

Every step goes through ``self._step(name)`` so tests can inject a fault between each pair.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb

from ..log.format import (
    LOG_DIRNAME,
    list_segments,
    quarantine_bytes,
    scan_segment,
    sealed_segments,
)
from ..runtime.durable import fsync_dir, fsync_file, make_dirs_durable
from ..runtime.process import resident_bytes
from .compaction import (
    DEFAULT_COMPACT_MIN_FILES,
    DEFAULT_COMPACT_SMALL_FILE_BYTES,
    DEFAULT_COMPACT_TARGET_BYTES,
    choose_inputs,
    compact_partition,
    finish_compactions,
)
from .events_sql import connect_duckdb, copy_events_sql
from .layout import (
    DUCKDB_TEMP_DIRNAME,
    EVENTS_DIRNAME,
    ROLLER_LOCK_NAME,
    STAGING_DIRNAME,
    TRASH_DIRNAME,
    drop_dir,
    partition_dir,
    partition_dirs,
    roller_lock,
    source_segment,
    wipe_scratch,
)
from .purges import (
    Purge,
    apply_purges_locked,
    read_purges,
    remove_expired_purges,
)
from .retention import expired_partitions, retention_cutoff
from .roll_input import (
    Line,
    group_by_partition,
    longest_event_line,
    map_segment,
    ndjson_in_memory,
    page_releaser,
    pieces,
    split_unreadable,
)

log = logging.getLogger("inslytic_fast.storage")

# The roller polls once a second (the commit log's tick granularity); compaction and retention
# are far less urgent.
DEFAULT_ROLL_INTERVAL_S = 1.0
DEFAULT_COMPACT_INTERVAL_S = 60.0
DEFAULT_RETENTION_INTERVAL_S = 3600.0
# A failing pass (disk full, a bad file) is retried with exponential backoff up to this.
MAX_RETRY_DELAY_S = 30.0
# One DuckDB thread by default: the serving processes keep the other cores.
DEFAULT_DUCKDB_THREADS = 1
# DuckDB's default is 80% of RAM, which a background job next to the server must not take.
# 256 MB is the lowest limit the largest events ingest accepts roll under
# (tests/test_roller_memory.py); a default roll peaks well below it (bench/micro_storage.py
# roll_cpu). What does not fit spills to DUCKDB_TEMP_DIRNAME, at most ROLLER_TEMP_LIMIT: inside
# the --min-free-bytes reserve that ingest keeps free, so the free-space guard covers it.
ROLLER_MEMORY_LIMIT = "256MB"
ROLLER_TEMP_LIMIT = "256MiB"
# A segment is converted in pieces of at most this much payload, one DuckDB COPY and one file
# each: the deadline of a final roll is checked between pieces whatever the segment holds. A
# default segment (64 MiB) is one piece: one file per project and day, so compaction (which
# rewrites every event) has less to merge.
ROLL_PIECE_BYTES = 64 * 1024 * 1024
# The roller's resident set above which a pass's DuckDB connection is closed (see _run); idle
# with DuckDB loaded it holds ~50 MB, a connection that has rolled ~80 MB or more.
RECONNECT_ABOVE_RSS_BYTES = 96 * 1024 * 1024


def _rows_copied(con: duckdb.DuckDBPyConnection, copy_sql: str) -> int:
    """Run a COPY ... TO; DuckDB answers with one row holding the number of rows written."""
    (rows,) = con.execute(copy_sql).fetchall()[0]
    return int(rows)


class RollDeadline(Exception):
    """A roll given a deadline reached it part-way through a segment (nothing published)."""


class Roller:
    """Background thread that turns sealed segments into Parquet, compacts and drops."""

    def __init__(
        self,
        data_dir: Path,
        *,
        retention_days: int | None = None,
        compact_min_files: int = DEFAULT_COMPACT_MIN_FILES,
        compact_small_file_bytes: int = DEFAULT_COMPACT_SMALL_FILE_BYTES,
        compact_target_bytes: int = DEFAULT_COMPACT_TARGET_BYTES,
        roll_interval_s: float = DEFAULT_ROLL_INTERVAL_S,
        compact_interval_s: float = DEFAULT_COMPACT_INTERVAL_S,
        retention_interval_s: float = DEFAULT_RETENTION_INTERVAL_S,
        duckdb_threads: int = DEFAULT_DUCKDB_THREADS,
        clock: Callable[[], float] = time.time,
        step_hook: Callable[[str], None] | None = None,
    ) -> None:
        if retention_days is not None and retention_days < 1:
            raise ValueError("retention_days must be at least 1")
        self.data_dir = Path(data_dir)
        self.log_dir = self.data_dir / LOG_DIRNAME
        self.events_dir = self.data_dir / EVENTS_DIRNAME
        self.staging_dir = self.events_dir / STAGING_DIRNAME
        self.trash_dir = self.events_dir / TRASH_DIRNAME
        self.retention_days = retention_days
        self.compact_min_files = compact_min_files
        self.compact_small_file_bytes = compact_small_file_bytes
        self.compact_target_bytes = compact_target_bytes
        self.roll_interval_s = roll_interval_s
        self.compact_interval_s = compact_interval_s
        self.retention_interval_s = retention_interval_s
        self.duckdb_threads = duckdb_threads
        self._clock = clock
        self._step_hook = step_hook
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        # Counters for metrics: per roll, not per event.
        self.segments_rolled = 0
        self.events_rolled = 0
        self.compactions = 0
        self.partitions_dropped = 0
        self.errors = 0
        self.last_error: str | None = None

    # -- Lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="roller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._close_connection()

    def _close_connection(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _run(self) -> None:
        next_compact = self._clock() + self.compact_interval_s
        next_retention = self._clock()
        failures = 0
        while not self._stop.is_set():
            try:
                self.roll_once()
                now = self._clock()
                # Compaction yields to rolling: it rewrites every event (~2.5 us each), so it
                # waits for a pass that left nothing sealed in the log.
                if now >= next_compact and not sealed_segments(self.log_dir):
                    next_compact = now + self.compact_interval_s
                    self.compact_once()
                if self.retention_days is not None and now >= next_retention:
                    next_retention = now + self.retention_interval_s
                    self.apply_retention()
                failures = 0
                self.last_error = None
            except Exception as exc:
                # Keep going: the segment stays in the log (still queryable) and is retried;
                # the commit log's max_unrolled_bytes turns a stuck roller into 503s.
                failures += 1
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if failures == 1 or failures % 10 == 0:
                    log.exception("roller: pass failed (%d in a row); retrying", failures)
            # A connection keeps what its statements allocated (buffer pool, allocator caches),
            # and each pass's peak came on top of it: under sustained load the roller's peak
            # RSS crept from ~130 to ~170 MB. A new connection costs ~20 ms of CPU, so the old
            # one goes only once the process holds more than this.
            if (resident_bytes() or 0) > RECONNECT_ABOVE_RSS_BYTES:
                self._close_connection()
            delay = self.roll_interval_s
            if failures:
                delay = min(self.roll_interval_s * 2**failures, MAX_RETRY_DELAY_S)
            self._stop.wait(delay)

    def _connection(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            make_dirs_durable(self.staging_dir)
            self._con = connect_duckdb(
                temp_dir=self.events_dir / DUCKDB_TEMP_DIRNAME,
                threads=self.duckdb_threads,
                memory_limit=ROLLER_MEMORY_LIMIT,
                temp_limit=ROLLER_TEMP_LIMIT,
            )
        return self._con

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    def backlog(self) -> dict[str, float]:
        """Sealed segments waiting to be rolled: count, bytes, age of the oldest (metrics)."""
        count, size, oldest = 0, 0, None
        for path in sealed_segments(self.log_dir):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            count += 1
            size += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
        age = max(0.0, self._clock() - oldest) if oldest is not None else 0.0
        return {"segments": count, "bytes": size, "oldest_age_s": age}

    # -- Recovery -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self, wait_s: float = 0.0) -> Iterator[bool]:
        """This thread's turn, and no other roller process on the data directory.

        Yields False (do nothing this pass) when another process still holds the roller lock
        after ``wait_s``: two rollers would wipe each other's staging. A reader takes it (shared)
        only to pause the roller for one snapshot.
        """
        with self._lock, roller_lock(self.events_dir, wait_s) as mine:
            if not mine:
                log.debug("roller: %s is held elsewhere; skipping a pass", ROLLER_LOCK_NAME)
            yield mine

    def recover(self) -> None:
        """Wipe staging and trash; finish or undo half-done compactions. Idempotent."""
        with self._exclusive() as mine:
            if mine:
                self._recover_locked()

    def _recover_locked(self) -> None:
        wipe_scratch(self.events_dir)
        finish_compactions(self.events_dir)

    # -- Roll -----------------------------------------------------------------------------

    def roll_once(self, stop_after: float | None = None, lock_wait_s: float = 0.0) -> int:
        """Roll every sealed segment, oldest first; return the number of events converted.

        With ``stop_after`` (a time.monotonic() deadline) no segment is started after it, nor
        once ``stop()`` was called (a stopping server rolls the rest itself, see
        roller_process.roll_before_exit). ``lock_wait_s``: how long to wait for the roller
        lock before giving up on this pass.
        """
        with self._exclusive(lock_wait_s) as mine:
            if not mine:
                return 0
            self._recover_locked()
            total = 0
            for segment in sealed_segments(self.log_dir):
                if self._stop.is_set() or (
                    stop_after is not None and time.monotonic() >= stop_after
                ):
                    break
                try:
                    total += self._roll_segment(segment, stop_after)
                except RollDeadline:
                    break  # the segment stays in the log; the next pass (or start) rolls it
            # After the rolls: a roll that read the tombstones before a purge was recorded
            # published files of the purged project, and they go now.
            apply_purges_locked(self.events_dir)
            remove_expired_purges(self.events_dir, self.log_dir, time.time())
            return total

    def _roll_segment(self, segment: Path, stop_after: float | None = None) -> int:
        stem = segment.name.rsplit(".", 1)[0]
        staging = self.staging_dir / stem
        self._step("roll:start")
        data = map_segment(segment)
        try:
            staged, converted = self._convert_segment(segment, staging, data, stop_after)
        finally:
            if isinstance(data, mmap.mmap):
                with contextlib.suppress(BufferError):  # views still held by a traceback
                    data.close()
        self._step("roll:parquet_written")
        for _, staged_file in staged:
            fsync_file(staged_file)
        self._step("roll:parquet_synced")
        published: dict[Path, set[str]] = {}
        for partition, staged_file in staged:
            final_name = f"{stem}.{staged_file.name}"
            if partition not in published:
                make_dirs_durable(partition)
                published[partition] = set()
            os.replace(staged_file, partition / final_name)
            published[partition].add(final_name)
            self._step("roll:published_one")
        for partition, names in published.items():
            # A replay must not leave an earlier attempt's extra file behind.
            for entry in os.scandir(partition):
                if source_segment(entry.name) == stem and entry.name not in names:
                    os.unlink(entry.path)
            fsync_dir(partition)
        if published:
            self._step("roll:published")
        os.unlink(segment)
        fsync_dir(self.log_dir)
        self._step("roll:segment_deleted")
        shutil.rmtree(staging, ignore_errors=True)
        self.segments_rolled += 1
        self.events_rolled += converted
        return converted

    def _convert_segment(
        self, segment: Path, staging: Path, data, stop_after: float | None
    ) -> tuple[list[tuple[Path, Path]], int]:
        """Stage the segment's Parquet files: [(partition directory, staged file)], events."""
        release_pages = page_releaser(data)
        scan = scan_segment(data, release_pages)
        for start, end in scan.damaged:
            # A sealed segment is complete by construction: damage is corruption. Keep the
            # bytes for forensics and roll every valid record around them.
            target = quarantine_bytes(self.data_dir, segment, start, data[start:end])
            log.error(
                "roller: %s has %d corrupt bytes at offset %d (kept in %s)",
                segment.name,
                end - start,
                start,
                target,
            )
        groups, headless = group_by_partition(scan.payloads, release_pages)
        if release_pages is not None:
            release_pages()
        if headless:
            self._quarantine(segment, headless, "records without a project and arrival time")
        converted = 0
        staged: list[tuple[Path, Path]] = []
        if not groups:
            return staged, converted
        make_dirs_durable(staging)
        cutoff = self._retention_cutoff()
        purges = read_purges(self.events_dir)
        for (project, day), lines in sorted(groups.items()):
            if cutoff is not None and day < cutoff:
                continue  # arrived before the retention window: would only be dropped again
            partition = partition_dir(self.events_dir, project, day)
            for piece in pieces(lines, ROLL_PIECE_BYTES):
                if stop_after is not None and time.monotonic() >= stop_after:
                    # Nothing is published yet: the segment stays whole in the log.
                    raise RollDeadline(segment.name)
                staged_file = staging / f"{len(staged)}.parquet"
                rows = self._convert(segment, piece, staged_file, purges, release_pages)
                if rows:
                    staged.append((partition, staged_file))
                    converted += rows
                else:  # every event of the piece is purged
                    staged_file.unlink(missing_ok=True)
        return staged, converted

    def _convert(
        self,
        segment: Path,
        records: list[Line],
        out: Path,
        purges: list[Purge],
        release_pages: Callable[[], None] | None = None,
    ) -> int:
        """One partition's piece of a segment -> one Parquet file. ``release_pages`` is the
        segment's (page_releaser)."""
        con = self._connection()
        with ndjson_in_memory(records, self.staging_dir, release_pages) as (source, unreadable):
            if unreadable:
                # Not JSON of a record's shape (ingest makes that "cannot happen"): kept for
                # forensics rather than allowed to wedge the roller.
                self._quarantine(segment, unreadable, "unreadable records")
                skipped = {id(record) for record in unreadable}
                records = [record for record in records if id(record) not in skipped]
                if not records:
                    return 0
            try:
                return _rows_copied(
                    con, copy_events_sql(source, out, purges, longest_event_line(records))
                )
            except (duckdb.ConversionException, duckdb.InvalidInputException):
                out.unlink(missing_ok=True)
        # A record whose lines DuckDB cannot type: find it (bisecting) and quarantine it.
        good, bad = split_unreadable(con, records, self.staging_dir)
        self._quarantine(segment, bad, "unreadable records")
        if not good:
            return 0
        with ndjson_in_memory(good, self.staging_dir) as (source, _):
            return _rows_copied(con, copy_events_sql(source, out, purges, longest_event_line(good)))

    def _quarantine(self, segment: Path, lines: list[Line], what: str) -> None:
        target = quarantine_bytes(self.data_dir, segment, 0, b"".join(lines))
        log.error("roller: %d %s in %s moved to %s", len(lines), what, segment.name, target)

    # -- Compaction -----------------------------------------------------------------------

    def compact_once(self) -> int:
        """Merge each partition's small files; return the number of compactions done."""
        with self._exclusive() as mine:
            if not mine:
                return 0
            self._recover_locked()
            live = {
                p.name.rsplit(".", 1)[0]
                for segs in list_segments(self.log_dir).values()
                for p in segs
            }
            done = 0
            for partition in sorted(partition_dirs(self.events_dir)):
                inputs = choose_inputs(
                    partition,
                    live,
                    small_file_bytes=self.compact_small_file_bytes,
                    min_files=self.compact_min_files,
                    target_bytes=self.compact_target_bytes,
                )
                if inputs:
                    compact_partition(
                        self._connection(), self.events_dir, partition, inputs, self._step
                    )
                    done += 1
            self.compactions += done
            return done

    # -- Retention ------------------------------------------------------------------------

    def _retention_cutoff(self) -> dt.date | None:
        """The oldest UTC date kept: partitions (and events) before it go."""
        if self.retention_days is None:
            return None
        return retention_cutoff(self._clock(), self.retention_days)

    def apply_retention(self) -> int:
        """Drop whole ``date=`` partitions whose events all arrived more than retention_days
        ago (retention.py); return how many."""
        cutoff = self._retention_cutoff()
        if cutoff is None:
            return 0
        dropped = 0
        with self._exclusive() as mine:
            if not mine:
                return 0
            for partition in expired_partitions(self._connection(), self.events_dir, cutoff):
                drop_dir(partition, self.trash_dir)
                dropped += 1
        self.partitions_dropped += dropped
        return dropped
