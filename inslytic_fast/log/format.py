"""The commit log's on-disk format: segment names, record framing, scanning and recovery.

Everything a reader of the log needs, and nothing of the writer (writer.py), in the manner of
LevelDB's db/log_format.h and log_reader: the roller (storage/), query, purges, the lake
uploader and the CLI read segments through this module and never import the writer.

On-disk layout::

    <data_dir>/log/<worker>-<seq:020d>.log     segments; seq grows with creation time
    <data_dir>/quarantine/                     bytes cut off a segment, kept for forensics

Record framing (little endian)::

    magic b"IFL1" | u32 payload length | u32 crc32(payload) | payload

The payload is one JSON object ending in b"\\n" (one line, unless a Segment client's JSON kept
verbatim holds newline whitespace); readers rewrite it as one line per event before DuckDB
reads it (storage/event_lines.py)::

    {"p":"<project>","r":<received_at_us>,"b":"<event-id prefix>","e":<events JSON array>}

with ``"k":"<Idempotency-Key>"`` before ``"e"`` when the batch came with one; ``"e"`` is always
last (the event lines reuse the envelope's bytes before it). Event ``i`` of a
record has the id ``b || printf('%03x', i)`` (batch_ids.py makes ``b``; readers compute the ids
in SQL).

A segment is *sealed* once a newer segment of the same worker exists: the writer creates the
next segment durably only after the previous one is completely written and synced, and it never
writes to an older one again. Only sealed segments are rolled.

Recovery: ``recover_segment`` removes a torn tail, cutting at the last valid record and never
earlier; damage in the middle of a segment (a flipped bit) costs only the damaged record, the
valid records after it are kept (``scan_segment`` resynchronises). Removed bytes are copied to
``quarantine/`` first.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..runtime.durable import fsync_dir, make_dirs_durable, write_file_durably

log = logging.getLogger("inslytic_fast.commitlog")

# -- Framing -------------------------------------------------------------------------------

RECORD_MAGIC = b"IFL1"
RECORD_HEADER = struct.Struct("<4sII")
HEADER_SIZE = RECORD_HEADER.size
RECORD_END = b"}\n"  # closes the JSON object the envelope head opened, and the NDJSON line
# A record is one HTTP request body plus ~120 bytes of envelope. Ingest bodies are capped far
# below this (1,000 events per request); the bound keeps a corrupt length field from making a
# reader allocate gigabytes, and is what DuckDB's read_json ``maximum_object_size`` is set to.
MAX_RECORD_BYTES = 64 * 1024 * 1024
# Event ids append the event's index to the batch's id prefix as 3 hex digits (rand_b's low
# 12 bits, batch_ids.py), so a record holds at most this many events; the API caps a request
# at 1,000.
MAX_EVENTS_PER_BATCH = 0x1000

# How much of a mapped segment a scan reads between two releases of its pages (scan_segment).
SCAN_RELEASE_BYTES = 8 * 1024 * 1024
SEGMENT_SUFFIX = ".log"
SALVAGE_SUFFIX = ".salvage"  # a segment being rewritten by recovery; never read
LOG_DIRNAME = "log"
QUARANTINE_DIRNAME = "quarantine"
SEGMENT_NAME_RE = re.compile(r"^([A-Za-z0-9_]+)-(\d{20})\.log$")
WORKER_ID_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # what a segment name can carry

# -- Segment names ---------------------------------------------------------------------------


def segment_name(worker_id: str, seq: int) -> str:
    return f"{worker_id}-{seq:020d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> tuple[str, int] | None:
    """(worker_id, seq) for a segment file name, None for anything else."""
    match = SEGMENT_NAME_RE.match(name)
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


# -- Records ---------------------------------------------------------------------------------


def frame_record(payload: bytes) -> bytes:
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _record_at(view: memoryview, offset: int, size: int) -> memoryview | None:
    """The payload of the valid record starting at ``offset`` (which ends HEADER_SIZE + its
    length later), or None."""
    if offset + HEADER_SIZE > size:
        return None
    magic, length, crc = RECORD_HEADER.unpack_from(view, offset)
    end = offset + HEADER_SIZE + length
    if magic != RECORD_MAGIC or length == 0 or length > MAX_RECORD_BYTES or end > size:
        return None
    payload = view[offset + HEADER_SIZE : end]
    if zlib.crc32(payload) != crc or payload[-1] != 0x0A:
        return None
    return payload


def scan_records(data: bytes | bytearray | memoryview) -> tuple[list[memoryview], int]:
    """Payloads of the valid record prefix of ``data`` and the offset where it ends.

    Scanning stops at the first record that is incomplete (a tail still being written, or torn
    by a crash) or corrupt (bad magic, absurd length, checksum mismatch, not one JSON line).
    """
    view = memoryview(data)
    size = len(view)
    payloads: list[memoryview] = []
    offset = 0
    while (payload := _record_at(view, offset, size)) is not None:
        payloads.append(payload)
        offset += HEADER_SIZE + len(payload)
    return payloads, offset


@dataclass(slots=True)
class SegmentScan:
    # A segment is valid records and damaged ranges, back to back: the one list and the
    # payloads' lengths give every record's place (``records``), so a scan of a segment of
    # small records keeps no object per record beyond its payload.
    payloads: list[memoryview]  # of every valid record, in file order
    damaged: list[tuple[int, int]]  # byte ranges that are not valid records, in file order

    @property
    def records(self) -> list[tuple[int, int]]:
        """(start, end) of every valid framed record."""
        spans = []
        damaged = iter(self.damaged)
        next_damage = next(damaged, None)
        offset = 0
        for payload in self.payloads:
            while next_damage is not None and next_damage[0] == offset:
                offset = next_damage[1]
                next_damage = next(damaged, None)
            end = offset + HEADER_SIZE + len(payload)
            spans.append((offset, end))
            offset = end
        return spans

    def only_tail_damaged(self, size: int) -> bool:
        return len(self.damaged) == 1 and self.damaged[0][1] == size


def scan_segment(
    data: bytes | bytearray, release_pages: Callable[[], None] | None = None
) -> SegmentScan:
    """Every valid record of a segment, resynchronising after a damaged stretch.

    ``release_pages``, if given, is called after every SCAN_RELEASE_BYTES scanned: a caller
    scanning a mapped segment drops the pages read so far there, so a scan never holds more
    than that much of the file resident (the payloads stay valid; a read faults them back in).

    A torn tail damages only the end; a flipped bit in the middle of a segment must not cost
    the acknowledged records after it. Resynchronising cannot be fooled by event data: a
    header's length field (<= MAX_RECORD_BYTES) has a high byte below 0x20, which JSON text
    never contains raw, and the CRC must match as well.
    """
    view = memoryview(data)
    size = len(view)
    scan = SegmentScan([], [])
    append = scan.payloads.append
    offset = 0
    release_at = SCAN_RELEASE_BYTES if release_pages is not None else size
    while offset < size:
        if offset >= release_at and release_pages is not None:
            release_pages()
            release_at = offset + SCAN_RELEASE_BYTES
        payload = _record_at(view, offset, size)
        if payload is not None:
            append(payload)
            offset += HEADER_SIZE + len(payload)
            continue
        resume = data.find(RECORD_MAGIC, offset + 1)
        while resume != -1 and _record_at(view, resume, size) is None:
            resume = data.find(RECORD_MAGIC, resume + 1)
        if resume == -1:
            scan.damaged.append((offset, size))
            break
        scan.damaged.append((offset, resume))
        offset = resume
    return scan


# -- Recovery --------------------------------------------------------------------------------


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
