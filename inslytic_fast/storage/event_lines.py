"""Commit log records -> flat event lines: the NDJSON shape DuckDB reads fastest.

A log record nests its batch's events under its envelope (log/format.py)::

    {"p":"shop","r":1771237807000000,"b":"<event-id prefix>","k":"retry-1","e":[{...}, {...}]}

DuckDB's read_json parses a list of structs at about half the speed of the same keys at the
top level of a line (bench/micro_storage.py roll_cpu; the figures are in the commit message),
so the roller and the log-tail reader first rewrite each record as one line per event, the
envelope's keys first and the event's index ``i`` after them::

    {"p":"shop","r":1771237807000000,"b":"<prefix>","k":"retry-1","i":0,"eventName":...}
    {"p":"shop","r":1771237807000000,"b":"<prefix>","k":"retry-1","i":1,"eventName":...}

msgspec decodes the record (which validates it as JSON of that shape) and each event's bytes
are spliced in as they are: no event is re-encoded. The log's own format does not change, so
a data directory written by any version rolls the same way.

An event is a non-empty JSON object (both ingest encoders write required keys). A record
that is not valid JSON of the envelope's shape raises UnreadableRecord; a line DuckDB then
cannot type (the roller bisects to find it) is quarantined as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, repeat
from typing import BinaryIO

import msgspec
from msgspec import Raw

from ..log.format import MAX_EVENTS_PER_BATCH


class LogRecord(msgspec.Struct, gc=False):
    """A commit log record's envelope and its events' raw bytes (log/format.py)."""

    p: str  # project
    r: int  # received at, microseconds since the epoch
    b: str  # event-id prefix: event i's id is b || printf('%03x', i)
    e: list[Raw]
    k: str | None = None  # the batch's Idempotency-Key


class UnreadableRecord(ValueError):
    """A log record that is not a JSON object of LogRecord's shape."""


_decode_record = msgspec.json.Decoder(LogRecord).decode
_EVENTS_KEY = b'"e":['
# The index key of each event line, with the comma that joins it to the event's own keys.
_INDEX_KEYS = tuple(b'"i":%d,' % i for i in range(MAX_EVENTS_PER_BATCH))
_NEWLINE = b"\n"

# A log record's payload as readers hold it: bytes, or a slice of a mapped segment.
Record = bytes | memoryview


def event_lines(payload: Record) -> bytes:
    """The record's events as NDJSON lines, each headed by the record's envelope."""
    data = payload if type(payload) is bytes else bytes(payload)
    try:
        events = _decode_record(data).e
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UnreadableRecord(str(exc)) from None
    # The lines' head is the record's envelope as written (the writer puts "e" last): its
    # bytes up to "e", comma included. The first "e":[ is that key: inside a JSON string a
    # quote is escaped.
    events_at = data.find(_EVENTS_KEY)
    count = len(events)
    if events_at < 0 or count > MAX_EVENTS_PER_BATCH:
        raise UnreadableRecord("not a record as the commit log writes them")
    head = data[:events_at]
    if data.find(_NEWLINE, events_at, len(data) - 1) != -1:
        # A raw newline inside a record can only be JSON whitespace (inside a string it would
        # be invalid JSON): a Segment client's pretty-printed context, kept verbatim. It would
        # cut the event's line in two, so it becomes a space.
        events = [Raw(bytes(event).replace(_NEWLINE, b" ")) for event in events]
    # Each event without its opening brace: the head opened the line's object.
    if count == 1:  # most records of small requests: no per-event lists
        return b"".join((head, _INDEX_KEYS[0], memoryview(events[0])[1:], _NEWLINE))
    heads = [head + index_key for index_key in _INDEX_KEYS[:count]]
    bodies = [memoryview(event)[1:] for event in events]
    return b"".join(chain.from_iterable(zip(heads, bodies, repeat(_NEWLINE, count), strict=True)))


# Event lines are joined into writes of about this size: one write per record costs a Python
# call per 1-event record, one join for a whole segment a second copy of it in memory.
WRITE_CHUNK_BYTES = 1024 * 1024


def write_event_lines(f: BinaryIO, records: Iterable[Record]) -> list[Record]:
    """Write the records' event lines to ``f``; return the records that are unreadable (nothing
    of them is written)."""
    unreadable: list[Record] = []
    chunk: list[bytes] = []
    size = 0
    for record in records:
        try:
            lines = event_lines(record)
        except UnreadableRecord:
            unreadable.append(record)
            continue
        chunk.append(lines)
        size += len(lines)
        if size >= WRITE_CHUNK_BYTES:
            f.write(b"".join(chunk))
            chunk.clear()
            size = 0
    if chunk:
        f.write(b"".join(chunk))
    return unreadable
