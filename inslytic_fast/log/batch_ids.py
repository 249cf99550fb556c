"""Batch ids: the UUIDv7 prefix each record's events share.

Event ids are UUIDv7: each batch gets a UUIDv7 whose last 3 hex digits are 0 (the record's
``"b"`` holds its 33 leading characters); event ``i`` is ``b || printf('%03x', i)`` (computed in
SQL when the log is read), so no per-event Python work is needed. rand_a counts batches within a
millisecond (RFC 9562 section 6.2, method 1), the low 12 bits of rand_b count events within the
batch.
"""

from __future__ import annotations

import os

from .format import MAX_EVENTS_PER_BATCH

__all__ = ["MAX_EVENTS_PER_BATCH", "BatchIds"]

# One getrandom() per 512 milliseconds that saw batches: a syscall per batch was 12% of the event
# loop's time with 1-event requests (py-spy --native, bench/results/2026-11-26-vm-profiles.txt).
RANDOM_POOL_BYTES = 7 * 512


class BatchIds:
    """Batch id prefixes, monotonic within this process. Called on the event loop only."""

    __slots__ = ("_ms", "_seq", "_random_pool", "_random_pos", "_head", "_tail")

    def __init__(self) -> None:
        self._ms = 0
        self._seq = 0
        self._random_pool = b""
        self._random_pos = 0
        self._head = b""
        self._tail = b""

    def prefix(self, now_ms: int) -> bytes:
        """33 leading hex/dash characters of a UUIDv7 whose last 3 hex digits are 0."""
        # Monotonic within this process: rand_a counts batches inside one millisecond
        # (RFC 9562 6.2 method 1); a clock step backwards keeps the last timestamp.
        if now_ms > self._ms:
            self._ms = now_ms
            self._seq = 0
        else:
            self._seq += 1
            if self._seq > 0xFFF:
                self._ms += 1
                self._seq = 0
            else:
                return b"%b%03x%b" % (self._head, self._seq, self._tail)
        # A new millisecond: new timestamp text and 50 fresh random bits from the CSPRNG (drawn
        # in bulk). Batches of the same millisecond share them and differ in the counter, which
        # keeps ids unique in this process; another worker's ids differ in the random bits.
        # Formatting only the counter per batch is what keeps an id cheap.
        pos = self._random_pos
        if pos >= len(self._random_pool):
            self._random_pool = os.urandom(RANDOM_POOL_BYTES)
            pos = 0
        self._random_pos = pos + 7
        rand = int.from_bytes(self._random_pool[pos : pos + 7]) & 0x3FFFFFFFFFFFF
        text = b"%012x" % self._ms
        # time_high-time_low | "7" + rand_a (the counter) | variant 0b10 + 14 bits | 36 bits;
        # the 3 hex digits the caller appends complete rand_b.
        self._head = text[:8] + b"-" + text[8:] + b"-7"
        self._tail = b"-%04x-%09x" % (0x8000 | (rand >> 36), rand & 0xFFFFFFFFF)
        return b"%b%03x%b" % (self._head, self._seq, self._tail)
