"""SQL over everything acknowledged: the Parquet data set plus the records still in the log.

Readers never block the server and normally take no locks at all. A snapshot is taken in this
order, which is what makes it exact while the roller renames and deletes files under it:

1. list the log segments and read each one; every valid record is used (a tail still being
   written fails its length/checksum test and is skipped, so a half-written record is never
   shown). A segment that vanished meanwhile was fully rolled: it is simply not "live".
2. list the Parquet files, skipping ``<segment>.*.parquet`` of every live segment (a roll that
   is part-way through publishing is read from the log instead), then read the compaction
   intents and skip the inputs of every intent whose output is present.
3. list the log again. A live segment that is gone was rolled during the snapshot; that is
   harmless (its Parquet files were skipped in step 2) unless a compaction that chose its
   inputs after step 1 began could have merged those files into an output listed in step 2.
   Compaction outputs are named after that instant, so only then is the snapshot retaken:
   a roller that rolls every few milliseconds cannot starve readers. Should compactions land
   during several attempts in a row, the reader holds a shared flock on the roller's lock for
   one attempt (the roller skips a pass); the commit log is never involved.

DuckDB then reads the chosen files. Should one disappear before it is opened (compaction or
retention deleted it), the query is retried on a fresh snapshot.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import orjson

from ..event_columns import (
    EVENT_COLUMNS_SQL,
    EVENTS_VIEW_COLUMNS_SQL,
    NO_EVENTS_SQL,
    STORED_AS_EVENT_COLUMNS_SQL,
)
from ..log.format import LOG_DIRNAME, list_segments, scan_segment
from .event_lines import write_event_lines
from .events_sql import (
    HIVE_TYPES_SQL,
    connect_duckdb,
    events_from_ndjson_sql,
    sql_string,
    without_purged,
)
from .layout import (
    EVENTS_DIRNAME,
    INTENTS_DIRNAME,
    ROLLER_LOCK_NAME,
    CompactionIntent,
    compaction_started_ns,
    partition_dirs,
    source_segment,
)
from .purges import Purge, read_purges

# A snapshot is retaken only when a compaction began while it read; after a handful of those
# in a row it pauses the roller instead (see take_snapshot).
LOCK_FREE_ATTEMPTS = 5
# Compaction names and reader start times both come from the wall clock of this machine; the
# slack covers an NTP step between the two (a false positive only costs a retry).
CLOCK_SLACK_NS = 5_000_000_000
MAX_QUERY_ATTEMPTS = 5


class SnapshotError(RuntimeError):
    pass


@dataclass(slots=True)
class Snapshot:
    """What one query reads. ``log_ndjson`` (a temp file the caller removes) holds the payload
    lines of every valid log record: streamed there segment by segment, so memory stays at
    one segment however far the roller is behind."""

    parquet_files: list[Path] = field(default_factory=list)
    log_ndjson: str | None = None
    log_records: int = 0
    live_segments: set[str] = field(default_factory=set)
    purges: list[Purge] = field(default_factory=list)  # read first: see _attempt

    def discard(self) -> None:
        if self.log_ndjson is not None:
            _remove(self.log_ndjson)
            self.log_ndjson = None


def take_snapshot(data_dir: Path) -> Snapshot:
    data_dir = Path(data_dir)
    fd, scratch = tempfile.mkstemp(prefix="inslytic-log-", suffix=".ndjson")
    try:
        with os.fdopen(fd, "wb") as out:
            for _ in range(LOCK_FREE_ATTEMPTS):
                snap = _attempt(data_dir, out, scratch)
                if snap is not None:
                    return snap
            # Liveness: compactions kept landing during our reads. Hold the roller off for
            # one snapshot (it skips a pass; ingest is never involved) and read a still set.
            with _roller_paused(data_dir / EVENTS_DIRNAME):
                snap = _attempt(data_dir, out, scratch)
            if snap is not None:
                return snap
    except BaseException:
        _remove(scratch)
        raise
    _remove(scratch)
    raise SnapshotError("the data set kept changing while it was being read; try again")


def _attempt(data_dir: Path, out, scratch: str) -> Snapshot | None:
    """One snapshot attempt into ``out``; None if it must be retaken (see module docstring)."""
    log_dir = data_dir / LOG_DIRNAME
    started_ns = time.time_ns()
    out.seek(0)
    out.truncate()
    snap = Snapshot(log_ndjson=scratch)
    # Tombstones before anything else: a purge recorded later may delete files this snapshot
    # lists (the query is then retried), but never shows it events the tombstone hides.
    snap.purges = read_purges(data_dir / EVENTS_DIRNAME)
    for segments in list_segments(log_dir).values():
        for path in segments:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            snap.live_segments.add(path.name.rsplit(".", 1)[0])
            payloads = scan_segment(data).payloads
            # A record that is not JSON of a record's shape is left out (the roller
            # quarantines it) rather than failing every query until then.
            unreadable = write_event_lines(out, payloads)
            snap.log_records += len(payloads) - len(unreadable)
            del payloads, data
    out.flush()
    snap.parquet_files = _parquet_files(data_dir / EVENTS_DIRNAME, snap.live_segments)
    still_there = {
        p.name.rsplit(".", 1)[0] for segs in list_segments(log_dir).values() for p in segs
    }
    vanished = not snap.live_segments <= still_there
    if vanished and _compacted_since(snap.parquet_files, started_ns):
        return None
    if not snap.log_records:
        snap.discard()
    return snap


@contextlib.contextmanager
def _roller_paused(events_dir: Path) -> Iterator[None]:
    """A shared flock on the roller's lock: waits out the current pass, blocks the next."""
    try:
        fd = os.open(events_dir / ROLLER_LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        yield  # no roller has ever run here
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _compacted_since(files: list[Path], started_ns: int) -> bool:
    """Whether a compaction listed here chose its inputs after ``started_ns`` (with slack)."""
    threshold = started_ns - CLOCK_SLACK_NS
    for path in files:
        began = compaction_started_ns(path.name)
        if began is not None and began >= threshold:
            return True
    return False


def _parquet_files(events_dir: Path, live: set[str]) -> list[Path]:
    listing: dict[str, set[str]] = {}
    for partition in partition_dirs(events_dir):
        try:
            names = {e.name for e in os.scandir(partition) if e.name.endswith(".parquet")}
        except FileNotFoundError:
            continue  # dropped by retention meanwhile
        rel = partition.relative_to(events_dir).as_posix()
        listing[rel] = {n for n in names if source_segment(n) not in live}
    # Intents are read after the partitions: an output seen above was published after its
    # intent became durable, and the intent outlives the inputs it names.
    intents_dir = events_dir / INTENTS_DIRNAME
    try:
        intent_entries = [e for e in os.scandir(intents_dir) if e.name.endswith(".json")]
    except FileNotFoundError:
        intent_entries = []
    for entry in intent_entries:
        try:
            intent: CompactionIntent = orjson.loads(Path(entry.path).read_bytes())
        except FileNotFoundError:
            continue  # completed meanwhile: its inputs were deleted before it was
        published = listing.get(intent["partition"])
        if published is not None and intent["output"] in published:
            published.difference_update(intent["inputs"])
    return [events_dir / rel / name for rel, names in sorted(listing.items()) for name in names]


def open_events(data_dir: Path, *, snapshot: Snapshot | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with a view ``events`` over a fresh snapshot.

    The connection reads the snapshot's files: use it for a query or two, then open another
    (compaction and retention delete files that an old snapshot still names). The log tail is
    staged in a temporary file that is removed when the process exits.
    """
    for attempt in range(MAX_QUERY_ATTEMPTS):
        try:
            con, scratch = _open(data_dir, snapshot)
            break
        except duckdb.IOException as exc:
            if snapshot is not None or not _is_missing_file(exc):
                raise
            if attempt == MAX_QUERY_ATTEMPTS - 1:
                raise
    if scratch is not None:
        atexit.register(_remove, scratch)
    return con


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _open(
    data_dir: Path, snapshot: Snapshot | None, lake: Callable[[Snapshot], None] | None = None
) -> tuple[duckdb.DuckDBPyConnection, str | None]:
    """Views over ``snapshot`` (a fresh one if None); nothing is left behind if this fails.
    ``lake`` (lake.LakeView) swaps the snapshot's files for the lake's plus the local ones
    not in it yet, after the local snapshot was taken.

    Returns the connection and the temp file the caller must remove once done with it.
    """
    if snapshot is None:
        snapshot = take_snapshot(data_dir)
    if lake is not None:
        try:
            lake(snapshot)
        except BaseException:
            snapshot.discard()
            raise
    con = connect_duckdb()
    try:
        _create_views(con, snapshot)
    except BaseException:
        con.close()
        snapshot.discard()
        raise
    return con, snapshot.log_ndjson


def _create_views(con: duckdb.DuckDBPyConnection, snapshot: Snapshot) -> None:
    if snapshot.log_ndjson is not None:
        # A view, not a table: DuckDB then parses only the JSON fields a query uses.
        log_source = (
            f"SELECT {STORED_AS_EVENT_COLUMNS_SQL} "
            f"FROM ({events_from_ndjson_sql(snapshot.log_ndjson)})"
        )
    else:
        log_source = NO_EVENTS_SQL
    con.execute(f"CREATE TEMP VIEW _log_events AS {log_source}")
    if snapshot.parquet_files:
        files = "[" + ", ".join(sql_string(p) for p in snapshot.parquet_files) + "]"
        # UNION BY NAME with a typed empty row set: files written before a column existed
        # (event_columns.py) read it as NULL even when no file in the snapshot has it.
        con.execute(
            f"CREATE TEMP VIEW _parquet_events AS SELECT {EVENT_COLUMNS_SQL} FROM (SELECT * FROM "
            f"read_parquet({files}, hive_partitioning=true, hive_types={HIVE_TYPES_SQL}, "
            f"union_by_name=true) UNION ALL BY NAME {NO_EVENTS_SQL})"
        )
        rows = (
            f"SELECT {EVENT_COLUMNS_SQL} FROM _parquet_events "
            f"UNION ALL SELECT {EVENT_COLUMNS_SQL} FROM _log_events"
        )
    else:
        rows = "SELECT * FROM _log_events"
    # Derived columns (event_columns.py) are computed here, where a row lacks them.
    source = f"SELECT {EVENTS_VIEW_COLUMNS_SQL} FROM ({rows})"
    # Purged events may still sit in the log, or in files the roller has yet to remove.
    source = without_purged(source, snapshot.purges)
    con.execute(f"CREATE TEMP VIEW events AS {source}")


def _is_missing_file(exc: Exception) -> bool:
    if isinstance(exc, FileNotFoundError):
        return True  # a lake object compacted or dropped after the listing (lake.LakeView)
    text = str(exc)
    return isinstance(exc, duckdb.IOException) and (
        "No such file" in text or "No files found" in text or "not found" in text.lower()
    )


def run_query(data_dir: Path, sql: str, params=None, *, lake=None):
    """Run ``sql`` against a fresh snapshot; return (column names, rows). ``lake``: see _open.

    Retried on a new snapshot when a file the snapshot named was deleted under it.
    """
    for attempt in range(MAX_QUERY_ATTEMPTS):
        con = scratch = None
        try:
            con, scratch = _open(data_dir, None, lake)
            result = con.execute(sql, params)
            columns = [d[0] for d in result.description] if result.description else []
            rows = result.fetchall() if result.description else []
            return columns, rows
        except (duckdb.IOException, FileNotFoundError) as exc:
            if not _is_missing_file(exc) or attempt == MAX_QUERY_ATTEMPTS - 1:
                raise
        finally:
            if con is not None:
                con.close()
            if scratch is not None:
                _remove(scratch)
    raise AssertionError("unreachable")
