"""A sealed segment as DuckDB input: its records by partition, in pieces, fed from memory.

A roll reads the segment in place (mapped), groups its records by (project, arrival day) from
each record's head alone, and hands DuckDB each piece as memfds of event lines
(event_lines.py): no copy of the segment hits disk, and a segment's files are bounded by its
projects and arrival days whatever timestamps its events carry.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import mmap
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb

from ..log.format import SCAN_RELEASE_BYTES
from .event_lines import Record, write_event_lines
from .events_sql import events_from_ndjson_sql

# A log record's head as CommitLog.append writes it: the project (auth.PROJECT_NAME_RE, so its
# JSON string needs no escapes) and the arrival time in microseconds since the epoch.
_RECORD_HEAD = re.compile(rb'\{"p":"([A-Za-z0-9_-]{1,64})","r":([0-9]{1,18}),')
US_PER_DAY = 86_400 * 1_000_000
EPOCH_DATE = dt.date(1970, 1, 1)
# DuckDB reads a list of small files with less memory than one large one (a whole segment in
# one memfd peaked ~90 MB higher, bench/micro_storage.py roll_cpu).
NDJSON_FILE_BYTES = 8 * 1024 * 1024
# An event line is at most this much longer than its record (the index key replaces the
# record's "e":[ ... ]} framing), which bounds read_json's buffer.
EVENT_LINE_OVERHEAD_BYTES = 16

# What the roll calls a record's payload (declared in event_lines.py).
Line = Record


def group_by_partition(
    payloads: list[memoryview], release_pages: Callable[[], None] | None = None
) -> tuple[dict[tuple[str, dt.date], list[Line]], list[Line]]:
    """Payload lines by (project, UTC date of arrival), and the lines with no readable head.

    Reads only each record's head (a regex on its first bytes), but reading one faults in the
    pages around it as well: ``release_pages`` (page_releaser) runs after every
    SCAN_RELEASE_BYTES of records, as in the scan.
    """
    groups: dict[tuple[bytes, int], list[Line]] = {}
    headless: list[Line] = []
    match = _RECORD_HEAD.match
    passed = 0
    for payload in payloads:
        if release_pages is not None:
            passed += len(payload)
            if passed >= SCAN_RELEASE_BYTES:
                release_pages()
                passed = 0
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


def pieces(lines: list[Line], max_bytes: int) -> Iterator[list[Line]]:
    """``lines`` in consecutive runs of at most ``max_bytes`` (a longer line is a run alone)."""
    run: list[Line] = []
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


def page_releaser(data: mmap.mmap | bytes) -> Callable[[], None] | None:
    """What drops the resident pages of a mapped segment (None for bytes, which own theirs).

    A roll reads its segment three times (the scan, the partition heads, the event lines):
    each pass drops the pages it read every few MiB, so the roller never holds the whole
    segment in its RSS on top of DuckDB's buffers (a read faults pages back in from the page
    cache)."""
    if not isinstance(data, mmap.mmap):
        return None
    return lambda: data.madvise(mmap.MADV_DONTNEED)


def longest_event_line(records: list[Line]) -> int:
    """A bound on the longest event line of ``records`` (read_json's buffer size)."""
    return max(map(len, records)) + EVENT_LINE_OVERHEAD_BYTES


@contextlib.contextmanager
def ndjson_in_memory(
    records: list[Line], fallback_dir: Path, release_pages: Callable[[], None] | None = None
) -> Iterator[tuple[list[str], list[Line]]]:
    """(paths DuckDB can read the records' event lines from, the unreadable records).

    Files of at most ~NDJSON_FILE_BYTES of records each: memfds (RAM, no disk) where Linux has
    them, else files in ``fallback_dir``. Nothing of an unreadable record is written.
    ``release_pages`` (page_releaser) runs after each file.
    """
    paths: list[str] = []
    fds: list[int] = []
    unreadable: list[Line] = []
    try:
        for part in pieces(records, NDJSON_FILE_BYTES):
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("inslytic-roll", os.MFD_CLOEXEC)
                fds.append(fd)
                with open(fd, "wb", closefd=False) as f:
                    unreadable += write_event_lines(f, part)
                paths.append(f"/proc/self/fd/{fd}")
            else:
                path = fallback_dir / f"piece-{uuid.uuid4().hex}.ndjson"
                paths.append(os.fspath(path))
                with open(path, "wb") as f:
                    unreadable += write_event_lines(f, part)
            if release_pages is not None:
                release_pages()
        yield paths, unreadable
    finally:
        for fd in fds:
            os.close(fd)
        if not fds:
            for name in paths:
                Path(name).unlink(missing_ok=True)


def split_unreadable(
    con: duckdb.DuckDBPyConnection, lines: list[Line], scratch_dir: Path
) -> tuple[list[Line], list[Line]]:
    """(records DuckDB converts, records it cannot), in order.

    Bisects, so a few bad records among 100k cost ~log2(100k) probes each, not 100k.
    """

    def readable(part: list[Line]) -> bool:
        try:
            with ndjson_in_memory(part, scratch_dir) as (source, unreadable):
                if unreadable:
                    return False
                # Materialise every column: a projection could skip the field that fails.
                select = events_from_ndjson_sql(source, longest_event_line(part))
                con.execute(f"CREATE OR REPLACE TEMP TABLE _probe AS {select}")
            return True
        except duckdb.Error:
            return False
        finally:
            con.execute("DROP TABLE IF EXISTS _probe")

    def split(part: list[Line]) -> tuple[list[Line], list[Line]]:
        if readable(part):
            return part, []
        if len(part) == 1:
            return [], part
        mid = len(part) // 2
        good_left, bad_left = split(part[:mid])
        good_right, bad_right = split(part[mid:])
        return good_left + good_right, bad_left + bad_right

    return split(lines)
