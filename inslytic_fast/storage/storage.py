"""The roller: sealed log segments -> hive-partitioned ZSTD Parquet; compaction; retention.

Layout under ``<data_dir>/events``::

    project=<p>/date=<YYYY-MM-DD>/<segment>.<i>.parquet   rolled from log segment <segment>;
                                                          date = UTC day the events arrived
    project=<p>/date=<YYYY-MM-DD>/c-<id>.parquet          output of a compaction
    _compactions/<id>.json                                compaction intent (inputs -> output)
    .staging/                                             scratch: never read, wiped by recover()
    .trash/                                               partitions being dropped by retention
    .roller.lock                                          one roller process at a time

A roll reads the segment in place and converts it per (project, arrival day), in pieces of at
most ROLL_PIECE_BYTES fed to DuckDB from memory, each piece one file (compaction sorts a
partition's files by ``timestamp``):
files per roll are bounded by projects x arrival days, and no copy of the segment hits disk.

Exactly once, whatever step a roll dies at: outputs are named after their segment, written to
staging, fsynced, renamed into place (a replay overwrites the same names) and their directories
fsynced; only then is the segment deleted. Readers (query.py) ignore a ``<segment>.*.parquet``
file while its segment is still in the log, so a half-published roll is read from the log and
never twice. Compaction writes an intent naming inputs and output before the output appears;
readers drop the inputs of an intent whose output exists, and recover() finishes or undoes it.

Only one roller works on a data directory at a time (``.roller.lock``, flock per pass);
readers take no lock. Compaction only touches files whose segment has left the log, and a
roll skips events already past ``retention_days``. A record DuckDB cannot convert (ingest
validation makes that "cannot happen") is quarantined rather than allowed to wedge the roller.

Every step goes through ``self._step(name)`` so tests can inject a fault between each pair.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import mmap
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote

import duckdb
import orjson

from .. import event_columns
from ..log.commitlog import (
    LOG_DIRNAME,
    MAX_RECORD_BYTES,
    list_segments,
    parse_segment_name,
    quarantine_bytes,
    scan_segment,
    sealed_segments,
)
from ..runtime.durable import (
    fsync_dir,
    fsync_file,
    make_dirs_durable,
    rename_durably,
    write_file_durably,
)
from ..runtime.filelock import lock_exclusive
from .purges import (
    Purge,
    expired,
    mark_applied,
    project_dirs,
    purges_dir,
    read_purges,
    remove_purge,
)

log = logging.getLogger("inslytic_fast.storage")

EVENTS_DIRNAME = "events"
STAGING_DIRNAME = ".staging"
TRASH_DIRNAME = ".trash"
INTENTS_DIRNAME = "_compactions"
COMPACTED_PREFIX = "c-"
ROLLER_LOCK_NAME = ".roller.lock"
# DuckDB spill files; outside .staging, which recover() wipes while the connection lives.
DUCKDB_TEMP_DIRNAME = ".duckdb_tmp"

# Compaction: files under 32 MiB count as small; a partition is compacted once it holds 8 of
# them, into outputs of at most ~256 MiB (DuckDB's default row group is ~120k rows; a few
# hundred MiB per file is what Spark/Trino guides recommend for scan efficiency).
DEFAULT_COMPACT_SMALL_FILE_BYTES = 32 * 1024 * 1024
DEFAULT_COMPACT_MIN_FILES = 8
DEFAULT_COMPACT_TARGET_BYTES = 256 * 1024 * 1024
# The roller polls once a second (the commit log's tick granularity); compaction and retention
# are far less urgent.
DEFAULT_ROLL_INTERVAL_S = 1.0
DEFAULT_COMPACT_INTERVAL_S = 60.0
DEFAULT_RETENTION_INTERVAL_S = 3600.0
# A failing pass (disk full, a bad file) is retried with exponential backoff up to this.
MAX_RETRY_DELAY_S = 30.0
# One DuckDB thread by default: the serving processes keep the other cores. Measured with
# bench/micro_storage.py roll_cpu, one thread converts ~100-140k events/s (7-10 us/event CPU)
# on a 2-core EPYC VM.
DEFAULT_DUCKDB_THREADS = 1
# DuckDB's default is 80% of RAM, which a background job next to the server must not take.
# The roller's share of the issue-14 budget (<= 200 MB for server, workers and roller): with
# the limits below a 64 MiB segment rolls at a peak RSS of ~140-160 MB (bench/micro_storage.py
# roll_cpu; 374 MB with 1 GB, one read_json of the whole piece and DuckDB's default row group),
# and a compaction streams. What does not fit spills to DUCKDB_TEMP_DIRNAME, at most
# ROLLER_TEMP_LIMIT: inside the --min-free-bytes reserve (512 MiB by default) that ingest
# keeps free, so the free-space guard covers it.
ROLLER_MEMORY_LIMIT = "256MB"
ROLLER_TEMP_LIMIT = "256MiB"
# Rows per Parquet row group, rolls and compactions alike. DuckDB's default (122,880) made the
# writer hold a whole 64 MiB segment's rows (~250 MB); 16,384 bounds it, and finer row-group
# statistics on ``timestamp`` (events arrive roughly in time order) prune time ranges better.
PARQUET_ROW_GROUP_ROWS = 16_384

EVENT_COLUMN_NAMES = event_columns.EVENT_COLUMN_NAMES
EVENT_COLUMNS = event_columns.EVENT_COLUMNS
HIVE_TYPES_SQL = "{'project': 'VARCHAR', 'date': 'DATE'}"


def sql_string(value: str | os.PathLike) -> str:
    return "'" + os.fspath(value).replace("'", "''") + "'"


def sql_files(paths: Path | str | list[str]) -> str:
    """One path, or a list of them, as a DuckDB file list."""
    if isinstance(paths, list):
        return "[" + ", ".join(sql_string(p) for p in paths) + "]"
    return sql_string(paths)


def events_from_ndjson_sql(
    ndjson_path: Path | str | list[str], longest_line: int = MAX_RECORD_BYTES
) -> str:
    """SELECT turning commit log payload lines into ``events`` rows plus a ``date`` column
    (the columns and their log fields: event_columns.py)."""
    source = (
        f"read_json({sql_files(ndjson_path)}, format='newline_delimited', "
        f"maximum_object_size={json_buffer_bytes(longest_line)}, "
        f"columns={event_columns.ENVELOPE_COLUMNS_SQL})"
    )
    return event_columns.events_select_sql(source)


# A log record's head as CommitLog.append writes it: the project (auth.PROJECT_NAME_RE, so its
# JSON string needs no escapes) and the arrival time in microseconds since the epoch.
_RECORD_HEAD = re.compile(rb'\{"p":"([A-Za-z0-9_-]{1,64})","r":([0-9]{1,18}),')
US_PER_DAY = 86_400 * 1_000_000
# read_json's buffer is sized to the longest line it reads (json_buffer_bytes), but not below
# this: a 1 MiB read is already cheap per byte.
MIN_JSON_BUFFER_BYTES = 1024 * 1024
EPOCH_DATE = dt.date(1970, 1, 1)
# A segment is converted in pieces of at most ROLL_PIECE_BYTES of payload, one DuckDB COPY and
# one file each, fed from memory in NDJSON_FILE_BYTES memfds: the deadline of a final roll is
# checked between pieces whatever the segment holds, and no copy of the segment goes to disk.
# A default segment (64 MiB) is one piece: one file per project and day, so compaction (which
# costs ~2.5 us/event to rewrite) has less to merge. DuckDB reads a list of small files with
# less memory than one large one (64 MiB in one memfd: 306 -> 216 MB peak).
ROLL_PIECE_BYTES = 64 * 1024 * 1024
NDJSON_FILE_BYTES = 8 * 1024 * 1024

# Lines joined per write: writelines() costs ~0.75 us per line, a join of 4,096 memoryviews
# then one write ~0.2 us (1-event records, 100,000 per segment: 30% of the roll's Python time).
LINES_PER_WRITE = 4096


def write_lines(f, payloads) -> None:
    for i in range(0, len(payloads), LINES_PER_WRITE):
        f.write(b"".join(payloads[i : i + LINES_PER_WRITE]))


def without_purged(select: str, purges: list[Purge]) -> str:
    """``select`` (rows of the events relation) minus the events purge tombstones cover."""
    if not purges:
        return select
    purged = " OR ".join(
        f"(project = {sql_string(p.project)} AND epoch_us(received_at) <= {p.received_before_us})"
        for p in purges
    )
    return f"SELECT * FROM ({select}) WHERE NOT ({purged})"


# Written to a rolled file: the project is its hive directory, as the date is.
_ROLLED_COLUMNS_SQL = ", ".join(f'"{name}"' for name in EVENT_COLUMN_NAMES if name != "project")


def json_buffer_bytes(longest_line: int) -> int:
    """read_json's maximum_object_size for lines of at most ``longest_line`` bytes. DuckDB
    allocates two buffers of it up front: 64 MiB (MAX_RECORD_BYTES) for every read cost the
    roller 128 MiB of RSS, and an out-of-memory error under a tighter memory limit."""
    return max(MIN_JSON_BUFFER_BYTES, min(MAX_RECORD_BYTES, longest_line + 1))


def copy_events_sql(
    ndjson: str | list[str], out: Path, purges: list[Purge], longest_line: int = MAX_RECORD_BYTES
) -> str:
    """COPY one piece of payload lines to a Parquet file.

    Not sorted: an ORDER BY "timestamp" measured ~0.6 us/event here (12% of the roll) and
    1.7 us/event and ~700 MB in compaction (bench/micro_storage.py). Events arrive roughly in
    time order, so small row groups' statistics prune time ranges without it.
    DuckDB's default ZSTD level (3): level 1 measured no cheaper within this VM's noise, and
    wrote files twice the size (bench/micro_storage.py roll_cpu).
    """
    select = without_purged(events_from_ndjson_sql(ndjson, longest_line), purges)
    return (
        f"COPY (SELECT {_ROLLED_COLUMNS_SQL} FROM ({select})) "
        f"TO {sql_string(out)} "
        f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {PARQUET_ROW_GROUP_ROWS})"
    )


class RollDeadline(Exception):
    """A roll given a deadline reached it part-way through a segment (nothing published)."""


def group_by_partition(payloads) -> tuple[dict[tuple[str, dt.date], list], list]:
    """Payload lines by (project, UTC date of arrival), and the lines with no readable head.

    Reads only each record's head (a regex on its first bytes): a segment's files are bounded
    by its projects and arrival days, whatever timestamps its events carry.
    """
    groups: dict[tuple[str, int], list] = {}
    headless = []
    match = _RECORD_HEAD.match
    for payload in payloads:
        head = match(payload)
        if head is None:
            headless.append(payload)
            continue
        key = (head[1], int(head[2]) // US_PER_DAY)
        lines = groups.get(key)
        if lines is None:
            lines = groups[key] = []
        lines.append(payload)
    return {
        (project.decode(), EPOCH_DATE + dt.timedelta(days=day)): lines
        for (project, day), lines in groups.items()
    }, headless


def pieces(lines: list, max_bytes: int) -> Iterator[list]:
    """``lines`` in consecutive runs of at most ``max_bytes`` (a longer line is a run alone)."""
    run: list = []
    size = 0
    for line in lines:
        if run and size + len(line) > max_bytes:
            yield run
            run, size = [], 0
        run.append(line)
        size += len(line)
    if run:
        yield run


def map_segment(segment: Path) -> mmap.mmap | bytes:
    """The segment's bytes, mapped read-only (bytes for an empty one, which mmap refuses)."""
    with open(segment, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


@contextlib.contextmanager
def ndjson_in_memory(lines: list, fallback_dir: Path) -> Iterator[list[str]]:
    """Paths DuckDB can read ``lines`` from, at most NDJSON_FILE_BYTES each: memfds (RAM, no
    disk) where Linux has them, else files in ``fallback_dir``. DuckDB reads a list of small
    files with far less memory than one large one (see ROLL_PIECE_BYTES)."""
    paths: list[str] = []
    fds: list[int] = []
    try:
        for part in pieces(lines, NDJSON_FILE_BYTES):
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("inslytic-roll", os.MFD_CLOEXEC)
                fds.append(fd)
                with open(fd, "wb", closefd=False) as f:
                    write_lines(f, part)
                paths.append(f"/proc/self/fd/{fd}")
            else:
                path = fallback_dir / f"piece-{uuid.uuid4().hex}.ndjson"
                paths.append(os.fspath(path))
                with open(path, "wb") as f:
                    write_lines(f, part)
        yield paths
    finally:
        for fd in fds:
            os.close(fd)
        if not fds:
            for path in paths:
                Path(path).unlink(missing_ok=True)


def compaction_started_ns(parquet_name: str) -> int | None:
    """When the compaction that wrote ``parquet_name`` chose its inputs (None: not compacted)."""
    if not parquet_name.startswith(COMPACTED_PREFIX):
        return None
    try:
        return int(parquet_name[len(COMPACTED_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def source_segment(parquet_name: str) -> str:
    """The segment stem a rolled Parquet file came from (``c-...`` for compaction outputs)."""
    return parquet_name.split(".", 1)[0]


def connect_duckdb(
    *,
    threads: int | None = None,
    temp_dir: Path | None = None,
    memory_limit: str | None = None,
    temp_limit: str | None = None,
):
    """An in-memory DuckDB connection that reads and prints timestamps in UTC."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    if temp_dir is not None:
        con.execute(f"SET temp_directory = {sql_string(temp_dir)}")
    if memory_limit is not None:
        con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
    if temp_limit is not None:
        con.execute(f"SET max_temp_directory_size = {sql_string(temp_limit)}")
    return con


def partition_dirs(events_dir: Path) -> list[Path]:
    """Every ``project=*/date=*`` directory."""
    found: list[Path] = []
    try:
        projects = list(os.scandir(events_dir))
    except FileNotFoundError:
        return found
    for project in projects:
        if not project.name.startswith("project=") or not project.is_dir():
            continue
        try:
            dates = list(os.scandir(project.path))
        except FileNotFoundError:
            continue
        found.extend(Path(d.path) for d in dates if d.name.startswith("date=") and d.is_dir())
    return found


def drop_dir(directory: Path, trash_dir: Path) -> None:
    """Delete a partition directory: renamed into trash first, so it vanishes from readers at
    once and recover() finishes the delete after a crash. The caller holds the roller lock."""
    make_dirs_durable(trash_dir)
    doomed = trash_dir / uuid.uuid4().hex
    os.rename(directory, doomed)
    fsync_dir(directory.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def apply_purges_locked(events_dir: Path) -> int:
    """Remove ``project=NAME/`` of every purge not yet applied; the caller holds the roller
    lock. All of it is purgeable: a purged name cannot be created again before this ran."""
    applied = 0
    for purge in read_purges(events_dir):
        if purge.applied:
            continue
        for partition in project_dirs(events_dir, purge.project):
            if partition.exists():
                drop_dir(partition, events_dir / TRASH_DIRNAME)
        mark_applied(events_dir, purge)
        applied += 1
    return applied


def apply_purges_now(data_dir: Path, wait_s: float) -> bool:
    """Apply recorded purges under the roller lock, waiting up to ``wait_s`` for a roller pass
    to finish. False if the lock stayed busy: the roller's next pass applies them then."""
    events_dir = Path(data_dir) / EVENTS_DIRNAME
    make_dirs_durable(events_dir)
    fd = os.open(events_dir / ROLLER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not lock_exclusive(fd, wait_s):
            return False
        apply_purges_locked(events_dir)
        return True
    finally:
        os.close(fd)


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
        self.intents_dir = self.events_dir / INTENTS_DIRNAME
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
        with self._lock:
            make_dirs_durable(self.events_dir)
            fd = os.open(self.events_dir / ROLLER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not lock_exclusive(fd, wait_s):
                    # Another roller process, or a reader pausing us for one snapshot.
                    log.debug("roller: %s is held elsewhere; skipping a pass", ROLLER_LOCK_NAME)
                    yield False
                    return
                yield True
            finally:
                os.close(fd)  # releases the flock

    def recover(self) -> None:
        """Wipe staging and trash; finish or undo half-done compactions. Idempotent."""
        with self._exclusive() as mine:
            if mine:
                self._recover_locked()

    def _recover_locked(self) -> None:
        for scratch in (self.staging_dir, self.trash_dir):
            if scratch.exists():
                for entry in os.scandir(scratch):
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
        if not self.intents_dir.exists():
            return
        for entry in sorted(os.scandir(self.intents_dir), key=lambda e: e.name):
            if not entry.name.endswith(".json"):
                os.unlink(entry.path)  # an intent that never became durable: nothing happened
                continue
            intent = orjson.loads(Path(entry.path).read_bytes())
            self._finish_compaction(intent, Path(entry.path))

    def _finish_compaction(self, intent: dict, intent_path: Path) -> None:
        partition = self.events_dir / intent["partition"]
        output = partition / intent["output"]
        if output.exists():
            removed = False
            for name in intent["inputs"]:
                try:
                    os.unlink(partition / name)
                    removed = True
                except FileNotFoundError:
                    pass
            if removed:
                fsync_dir(partition)
        # Output never published: inputs are intact and the staged output is wiped with staging.
        os.unlink(intent_path)
        fsync_dir(self.intents_dir)

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
            self._expire_purges()
            return total

    def _expire_purges(self) -> None:
        """Delete the tombstones nothing in the log needs any more (purges.expired)."""
        purges = read_purges(self.events_dir)
        if not purges:
            return
        seqs = []
        for segments in list_segments(self.log_dir).values():
            for path in segments:
                try:
                    if path.stat().st_size == 0:
                        continue
                except FileNotFoundError:
                    continue  # rolled meanwhile
                seqs.append(parse_segment_name(path.name)[1])
        now = time.time()
        gone = [p for p in purges if expired(p, seqs, now)]
        for purge in gone:
            remove_purge(self.events_dir, purge)
        if gone:
            fsync_dir(purges_dir(self.events_dir))

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
        scan = scan_segment(data)
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
        groups, headless = group_by_partition(scan.payloads)
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
            partition = self.events_dir / f"project={project}" / f"date={day.isoformat()}"
            for piece in pieces(lines, ROLL_PIECE_BYTES):
                if stop_after is not None and time.monotonic() >= stop_after:
                    # Nothing is published yet: the segment stays whole in the log.
                    raise RollDeadline(segment.name)
                staged_file = staging / f"{len(staged)}.parquet"
                rows = self._convert(segment, piece, staged_file, purges, data)
                if rows:
                    staged.append((partition, staged_file))
                    converted += rows
                else:  # every event of the piece is purged
                    staged_file.unlink(missing_ok=True)
        return staged, converted

    def _convert(
        self, segment: Path, lines: list, out: Path, purges: list[Purge], data=None
    ) -> int:
        """One partition's piece of a segment -> one Parquet file."""
        con = self._connection()
        try:
            with ndjson_in_memory(lines, self.staging_dir) as source:
                if isinstance(data, mmap.mmap):
                    # The lines are copied out: the segment's pages leave the roller's RSS
                    # while DuckDB works (any read again comes back from the page cache).
                    data.madvise(mmap.MADV_DONTNEED)
                copy = copy_events_sql(source, out, purges, max(map(len, lines)))
                return con.execute(copy).fetchone()[0]
        except (duckdb.ConversionException, duckdb.InvalidInputException):
            # A record DuckDB cannot read (ingest validation makes this "cannot happen").
            # Quarantine the offending lines rather than wedge the roller forever.
            out.unlink(missing_ok=True)
            good, bad = self._split_unreadable(lines)
            self._quarantine(segment, bad, "unreadable records")
            if not good:
                return 0
            with ndjson_in_memory(good, self.staging_dir) as source:
                copy = copy_events_sql(source, out, purges, max(map(len, good)))
                return con.execute(copy).fetchone()[0]

    def _quarantine(self, segment: Path, lines: list, what: str) -> None:
        target = quarantine_bytes(self.data_dir, segment, 0, b"".join(lines))
        log.error("roller: %d %s in %s moved to %s", len(lines), what, segment.name, target)

    def _split_unreadable(self, lines: list) -> tuple[list, list]:
        """(lines DuckDB converts, lines it cannot), in order.

        Bisects, so a few bad lines among 100k cost ~log2(100k) probes each, not 100k.
        """
        con = self._connection()

        def readable(part: list) -> bool:
            try:
                with ndjson_in_memory(part, self.staging_dir) as source:
                    # Materialise every column: a projection could skip the field that fails.
                    select = events_from_ndjson_sql(source, max(map(len, part)))
                    con.execute(f"CREATE OR REPLACE TEMP TABLE _probe AS {select}")
                return True
            except duckdb.Error:
                return False
            finally:
                con.execute("DROP TABLE IF EXISTS _probe")

        def split(part: list) -> tuple[list, list]:
            if readable(part):
                return part, []
            if len(part) == 1:
                return [], part
            mid = len(part) // 2
            good_left, bad_left = split(part[:mid])
            good_right, bad_right = split(part[mid:])
            return good_left + good_right, bad_left + bad_right

        return split(lines)

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
                inputs = self._compaction_inputs(partition, live)
                if inputs:
                    self._compact(partition, inputs)
                    done += 1
            self.compactions += done
            return done

    def _compaction_inputs(self, partition: Path, live: set[str]) -> list[str]:
        # Two tiers, merged apart: rolled files with rolled files, compaction outputs with
        # compaction outputs. Merging an output again with every few new rolled files rewrote
        # each event ~compact_small_file_bytes / (rolled file size) times (~8x under sustained
        # load, where compaction then held the core for tens of seconds); tiered, twice at most.
        rolled: list[tuple[str, int]] = []
        compacted: list[tuple[str, int]] = []
        for entry in os.scandir(partition):
            if not entry.name.endswith(".parquet"):
                continue
            # A file whose segment is still in the log is mid-roll: readers ignore it.
            if source_segment(entry.name) in live:
                continue
            size = entry.stat().st_size
            if size < self.compact_small_file_bytes:
                tier = compacted if entry.name.startswith(COMPACTED_PREFIX) else rolled
                tier.append((entry.name, size))
        small = rolled if len(rolled) >= self.compact_min_files else compacted
        if len(small) < self.compact_min_files:
            return []
        small.sort()
        chosen, total = [], 0
        for name, size in small:
            if chosen and total + size > self.compact_target_bytes:
                break
            chosen.append(name)
            total += size
        return chosen if len(chosen) >= 2 else []

    def _compact(self, partition: Path, inputs: list[str]) -> None:
        con = self._connection()
        # Named after the wall clock *after* the inputs were chosen: a reader that began before
        # this instant knows the compaction could not have taken a segment it read from the log
        # (see query.take_snapshot).
        cid = f"{COMPACTED_PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        output_name = cid + ".parquet"
        staged = self.staging_dir / output_name
        files = "[" + ", ".join(sql_string(partition / name) for name in inputs) + "]"
        con.execute(
            f"COPY (SELECT * FROM read_parquet({files}, union_by_name=true)) TO "
            f"{sql_string(staged)} "
            f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {PARQUET_ROW_GROUP_ROWS})"
        )
        fsync_file(staged)
        self._step("compact:written")
        make_dirs_durable(self.intents_dir)
        intent = {
            "partition": partition.relative_to(self.events_dir).as_posix(),
            "output": output_name,
            "inputs": inputs,
        }
        intent_path = self.intents_dir / (cid + ".json")
        write_file_durably(intent_path, orjson.dumps(intent))
        self._step("compact:intent_written")
        rename_durably(staged, partition / output_name)
        self._step("compact:published")
        for name in inputs:
            os.unlink(partition / name)
        fsync_dir(partition)
        self._step("compact:inputs_deleted")
        os.unlink(intent_path)
        fsync_dir(self.intents_dir)

    # -- Retention ------------------------------------------------------------------------

    def _retention_cutoff(self) -> dt.date | None:
        """The oldest UTC date kept: partitions (and events) before it go."""
        if self.retention_days is None:
            return None
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        return (now - dt.timedelta(days=self.retention_days)).date()

    def apply_retention(self) -> int:
        """Drop whole ``date=`` partitions whose events all arrived more than retention_days
        ago; return how many.

        Rolls name partitions after the UTC date of arrival. A partition written before that
        layout is named after its events' own date, so one dated before the cutoff is dropped
        only once its newest ``received_at`` is before the cutoff too.
        """
        cutoff = self._retention_cutoff()
        if cutoff is None:
            return 0
        dropped = 0
        with self._exclusive() as mine:
            if not mine:
                return 0
            for partition in partition_dirs(self.events_dir):
                try:
                    day = dt.date.fromisoformat(unquote(partition.name.removeprefix("date=")))
                except ValueError:
                    continue
                if day >= cutoff or self._arrived_since(partition, cutoff):
                    continue
                drop_dir(partition, self.trash_dir)
                dropped += 1
        self.partitions_dropped += dropped
        return dropped

    def _arrived_since(self, partition: Path, cutoff: dt.date) -> bool:
        files = [e.path for e in os.scandir(partition) if e.name.endswith(".parquet")]
        if not files:
            return False
        listed = "[" + ", ".join(sql_string(f) for f in files) + "]"
        (newest,) = (
            self._connection()
            .execute(f"SELECT max(received_at) FROM read_parquet({listed}, union_by_name=true)")
            .fetchone()
        )
        return newest is not None and newest.date() >= cutoff
