"""Global per-project rate limits across worker processes: a shared budget, leased in grants.

With ``--workers N`` every worker runs its own event loop, and a project limited to 1,000
events/min must get 1,000 in total, not 1,000 per worker. The budget of each project lives in a
small shared table (an mmap'd file under ``<data_dir>/run/``); a worker takes tokens from it in
*grants* and spends them from a local lease on its own loop, so the hot path is a subtraction,
and the table is touched (two ``fcntl`` range-lock syscalls) only once per grant.

Guarantees, and the documented slack:

- **No overshoot.** Tokens leave the table before any worker spends them, and each window's
  table row is refilled exactly once, so the accepted total per window never exceeds the limit.
  A row counts what was *spent* (granted) in its window and a grant takes at most ``limit -
  spent`` under the granting worker's limit, so a limit change, or workers that have not yet
  reloaded the same one, never mint tokens: the window's total is at most the largest limit
  any worker applied in it.
- **Bounded undershoot.** Tokens leased by one worker cannot be spent by another. A client may
  get a 429 while up to ``(N - 1) x grant`` tokens sit in other workers' leases; a lease unused
  for a whole tick (1 s) is given back, and a worker that refuses a batch gives its whole lease
  back at once. A grant is a batch's cost plus a top-up of ``limit // (16 x N)``, so at most
  1/16 of the limit is stranded, for at most a second; limits under 16 x N get no top-up and
  are exact.
- fcntl locks die with their process: a worker SIGKILLed while holding a row lock cannot wedge
  the others (a process-shared semaphore would).
- **A bounded table that never fills for good.** A project's row sits within ``MAX_PROBE``
  rows of its hash, so finding it reads at most that many rows (unlocked; a worker also caches
  where its projects are). A row whose window ended (or that never got one) is idle and is
  taken over by the next project that needs a row, so the table holds the projects active in
  the last minute. When all ``MAX_PROBE`` rows near a new project's hash are active, that
  project is limited per worker instead (``limit // N`` each, about the limit in total) until a
  row frees up.
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .lease import Lease
from .ratelimit import TokenBucket
from .window import REFILL_SECONDS, current_window, grant_size, top_up

if TYPE_CHECKING:
    from .interface import Bucket, Limiter

MAGIC = b"IFRL0002"
HEADER = struct.Struct("<8sQ")  # magic, slot count
SLOT = struct.Struct("<Qqqd")  # project key (0 = empty), limit, spent, window start
DEFAULT_SLOTS = 16384  # 512 KiB: the projects active within a minute, see the docstring
MAX_PROBE = 64  # rows read to find a project: 64 x 32 B, a few cache lines, no syscall


def project_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") or 1


class SharedBudget:
    """The table. Created (zeroed) by the supervisor; opened by every worker."""

    def __init__(self, path: Path, *, create: bool = False, slots: int = DEFAULT_SLOTS) -> None:
        self.path = path
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as fh:
                fh.write(HEADER.pack(MAGIC, slots))
                fh.truncate(HEADER.size + slots * SLOT.size)
            # Atomic (no worker maps a half-made header) but not fsynced: rate-limit budgets
            # are not data, and the supervisor creates a fresh table at every start.
            os.replace(tmp, path)
        self.fd = os.open(path, os.O_RDWR)
        self.map = mmap.mmap(self.fd, 0)
        magic, self.slots = HEADER.unpack_from(self.map, 0)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a rate-limit table")
        self._index: dict[int, int] = {}

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def _offset(self, slot: int) -> int:
        return HEADER.size + slot * SLOT.size

    def _lock(self, offset: int, size: int = SLOT.size) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, size, offset, os.SEEK_SET)

    def _unlock(self, offset: int, size: int = SLOT.size) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, size, offset, os.SEEK_SET)

    def _slot_of(self, key: int, now: float) -> int | None:
        """The row of ``key``, claiming an empty or idle one near its hash if it has none."""
        slot = self._index.get(key)
        if slot is not None:
            return slot
        # Claims are serialised on the header's lock, so two workers cannot give one project
        # two rows; rows are read unlocked (8-byte aligned fields: no torn key or window).
        self._lock(0, HEADER.size)
        try:
            free = None
            start = key % self.slots
            for probe in range(min(MAX_PROBE, self.slots)):
                slot = (start + probe) % self.slots
                found, _, _, window = SLOT.unpack_from(self.map, self._offset(slot))
                if found == key:
                    self._index[key] = slot
                    return slot
                if free is None and (found == 0 or now - window >= REFILL_SECONDS):
                    free = slot
                if found == 0:
                    break  # rows are never emptied again: the key is not further on
            if free is None:
                return None
            offset = self._offset(free)
            self._lock(offset)
            try:
                found, _, _, window = SLOT.unpack_from(self.map, offset)
                if found != 0 and now - window < REFILL_SECONDS:
                    return None  # its project came back meanwhile: per-worker this time
                SLOT.pack_into(self.map, offset, key, 0, 0, 0.0)
            finally:
                self._unlock(offset)
            self._index[key] = free
            return free
        finally:
            self._unlock(0, HEADER.size)

    def grant(
        self,
        key: int,
        limit: int,
        need: int,
        extra: int,
        give_back: int,
        lease_window: float,
        now: float,
    ) -> tuple[int, float, int] | None:
        """Take ``need`` tokens (+ up to ``extra``) of this window if it has ``need`` left; else
        take none and take back the caller's lease of ``give_back`` if it is of this window.
        (taken, window start, left in the table), or None when the project has no row (the
        caller limits it per worker)."""
        for _ in range(2):  # a cached row may have been taken over by another project
            slot = self._slot_of(key, now)
            if slot is None:
                return None
            offset = self._offset(slot)
            self._lock(offset)
            try:
                found, _, spent, window = SLOT.unpack_from(self.map, offset)
                if found == key:
                    if window == 0.0:
                        window, spent = now, 0
                    elif now - window >= REFILL_SECONDS:
                        window, spent = current_window(window, now), 0
                    taken = grant_size(limit, spent, need, extra)
                    if taken:
                        spent += taken
                    elif window == lease_window:
                        spent = max(0, spent - give_back)
                    SLOT.pack_into(self.map, offset, key, limit, spent, window)
                    return taken, window, max(0, limit - spent)
            finally:
                self._unlock(offset)
            self._index.pop(key, None)
        return None

    def give_back(self, key: int, count: int, window: float) -> None:
        slot = self._index.get(key)
        if slot is None:
            return
        offset = self._offset(slot)
        self._lock(offset)
        try:
            found, limit, spent, current = SLOT.unpack_from(self.map, offset)
            if found == key and current == window:
                SLOT.pack_into(self.map, offset, key, limit, max(0, spent - count), window)
        finally:
            self._unlock(offset)


class LeasedBucket(Lease):
    """A worker's lease on one project's row of the table: a ``Bucket``."""

    __slots__ = ("budget", "clock", "key", "workers")

    def __init__(
        self,
        budget: SharedBudget,
        clock: Callable[[], float],
        key: int,
        limit: int,
        workers: int,
    ) -> None:
        super().__init__(limit)
        self.budget = budget
        self.clock = clock
        self.key = key
        self.workers = workers
        self.grant = top_up(limit, workers)

    @property
    def tokens(self) -> int:
        """Remaining as far as this worker knows (for X-RateLimit-Remaining)."""
        if self.fallback is not None:
            return self.fallback.tokens
        return self.table_left + self.lease

    def refresh(self, limit: int, now: float, workers: int) -> None:
        if limit != self.limit:
            self.limit = limit
            self.grant = top_up(limit, workers)
        if self.window_start and now - self.window_start >= REFILL_SECONDS:
            self.lease = 0  # a lease is only good in the window it was granted in
            self.window_start = 0.0
            self.table_left = limit

    def _spend_granted(self, cost: int) -> bool:
        # CLOCK_MONOTONIC is system-wide on Linux, so every worker agrees on window starts.
        now = self.clock()
        got = self.budget.grant(
            self.key, self.limit, cost - self.lease, self.grant, self.lease, self.window_start, now
        )
        if got is None:
            return self._spend_per_worker(cost, now)
        spent = self._granted(cost, *got)
        return self._spend_granted(cost) if spent is None else spent

    def _spend_per_worker(self, cost: int, now: float) -> bool:
        """No row for this project (all near its hash active): this worker's share."""
        share = max(1, self.limit // self.workers)
        if self.fallback is None:
            self.fallback = TokenBucket(share, now)
        else:
            self.fallback.refresh(share, now)
        return self.fallback.try_spend(cost)

    def refund(self, cost: int, spent_at_window: float) -> None:
        if self.fallback is not None:
            self.fallback.refund(cost, spent_at_window)
        elif spent_at_window == self.window_start:
            self.lease += cost

    def reset_in(self, now: float) -> int:
        if self.fallback is not None:
            return self.fallback.reset_in(now)
        start = self.window_start or now
        # The grant may be stamped a hair after ``now``: never report more than a window.
        return max(1, min(int(REFILL_SECONDS), math.ceil(start + REFILL_SECONDS - now)))


class SharedRateLimiter:
    """The ``Limiter`` of a worker of a multi-process server."""

    __slots__ = ("budget", "workers", "clock", "_buckets")

    def __init__(
        self, budget: SharedBudget, workers: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.budget = budget
        self.workers = workers
        self.clock = clock
        self._buckets: dict[str, LeasedBucket] = {}

    def bucket(self, project: str, limit: int, now: float) -> LeasedBucket:
        bucket = self._buckets.get(project)
        if bucket is None:
            bucket = LeasedBucket(
                self.budget, self.clock, project_key(project), limit, self.workers
            )
            self._buckets[project] = bucket
        bucket.refresh(limit, now, self.workers)
        return bucket

    def tick(self) -> None:
        """A lease nobody spent from for a whole tick goes back to the table."""
        for bucket in self._buckets.values():
            if bucket.idle_lease():
                self.budget.give_back(bucket.key, bucket.lease, bucket.window_start)
                bucket.gave_back()

    def forget(self, keep: set[str]) -> None:
        for name in [n for n in self._buckets if n not in keep]:
            del self._buckets[name]

    def stats(self) -> dict[str, int]:
        return {}


if TYPE_CHECKING:  # mypy proves the declared seam is implemented
    _limiter: Limiter = SharedRateLimiter(SharedBudget(Path()), 1)
    _bucket: Bucket = LeasedBucket(SharedBudget(Path()), time.monotonic, 1, 0, 1)
