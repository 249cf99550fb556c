"""Per-project rate limits shared by every node of a cluster, through the coordinator.

The same lease scheme as the workers' shared table (inslytic_fast.limits.sharedlimit), one level up:
each project's bucket for the current 60 s window lives in the coordinator, and a worker takes
tokens from it in *grants* with one atomic script call, then spends them from a local lease on
its own loop. The request path is a subtraction; the coordinator is called when a batch does
not fit in the lease, at most once per ``EXHAUSTED_RECHECK_SECONDS`` while the window's budget is
known to be spent, and once a tick to give back a lease nobody used.

Guarantees, and the documented slack:

- **No overshoot while the coordinator is up.** Tokens leave the bucket before anyone spends
  them. The bucket counts what was *spent* in the window, and what remains is ``limit - spent``
  under whichever limit a grant brings, so a limit change (or two nodes that have not yet
  reloaded the same one) never mints tokens: the window's total is at most the largest limit
  any node applied in it, and at most the new limit once every node has it (within ~1.5 s).
- **Bounded undershoot.** Tokens leased by one worker cannot be spent by another: at most a
  top-up of ``limit // (16 x members)`` per worker sits in leases, for at most a tick (1 s).
- **Windows** start at the project's first grant, on the coordinator's clock (its ``TIME``), so
  every node agrees on them; a node turns "ms left" into its own monotonic clock.
- **Coordinator unreachable** (``CoordinatorLink.up`` false): a worker spends what is left of
  its lease, then admits from a local bucket of ``limit // members`` per 60 s window, where
  ``members`` is the number of limiters (workers on all nodes) last seen alive. The fleet then
  admits about one limit per window in total (the window the outage began in may see up to
  twice the limit: the coordinator's spent count is out of reach). Never unlimited; logged once;
  ``/ready`` and ``/metrics`` say so. When the coordinator answers again, grants resume; a
  coordinator restarted without its data starts a fresh window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..cluster.coordinator import NAMESPACE, CoordinatorLink, redis_errors
from .lease import Lease
from .ratelimit import TokenBucket
from .window import REFILL_MS, REFILL_SECONDS, top_up

if TYPE_CHECKING:
    from .interface import Bucket, Limiter

# While the window's budget is known to be spent, a refused batch asks again at most this often
# (other nodes give leases back); a steady flood of refused batches costs ~4 round trips a second.
EXHAUSTED_RECHECK_SECONDS = 0.25
# An idle project's bucket expires from the coordinator after its window (plus a margin).
_BUCKET_TTL_MS = 2 * REFILL_MS

# window.current_window and window.grant_size, as SharedBudget.grant uses them, in the
# coordinator's milliseconds. KEYS[1] bucket; ARGV limit, need, extra, give_back, its window.
# Takes ``need`` (+ up to ``extra``) if the window has ``need`` left; otherwise takes nothing
# and returns the caller's unspendable lease (``give_back``, if from this window) to the bucket.
# Returns {taken, left, window id (ms), ms left in the window}.
_GRANT = f"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'spent', 'window')
local limit, need = tonumber(ARGV[1]), tonumber(ARGV[2])
local extra, give_back = tonumber(ARGV[3]), tonumber(ARGV[4])
local spent, window = tonumber(b[1]), tonumber(b[2])
if window == nil then
  window, spent = now, 0
elseif now - window >= {REFILL_MS} then
  window = window + math.floor((now - window) / {REFILL_MS}) * {REFILL_MS}
  spent = 0
end
if window ~= tonumber(ARGV[5]) then give_back = 0 end
local taken = 0
local left = math.max(0, limit - spent)
if left >= need then
  taken = need + math.min(extra, left - need)
  spent = spent + taken
else
  spent = math.max(0, spent - give_back)
end
redis.call('HSET', KEYS[1], 'spent', spent, 'window', window)
redis.call('PEXPIRE', KEYS[1], {_BUCKET_TTL_MS})
return {{taken, math.max(0, limit - spent), window, window + {REFILL_MS} - now}}
"""

# KEYS[1] bucket; ARGV count, window id: unspent tokens back into the window they came from.
_GIVE_BACK = """
local b = redis.call('HMGET', KEYS[1], 'spent', 'window')
if tonumber(b[2]) == tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'spent', math.max(0, tonumber(b[1]) - tonumber(ARGV[1])))
end
return 0
"""


class GlobalBucket(Lease):
    """A worker's lease on one project's cluster-wide budget: a ``Bucket``."""

    __slots__ = ("limiter", "key", "window_end", "recheck_at")

    def __init__(self, limiter: GlobalRateLimiter, project: str, limit: int) -> None:
        super().__init__(limit)
        self.limiter = limiter
        self.key = f"{NAMESPACE}bucket:{project}"
        # window_start is the coordinator's window id (ms); window_end is on this process's
        # monotonic clock.
        self.window_end = 0.0
        self.recheck_at = 0.0

    @property
    def tokens(self) -> int:
        """Remaining as far as this worker knows (for X-RateLimit-Remaining)."""
        if self.fallback is not None:
            return self.lease + self.fallback.tokens
        return self.table_left + self.lease

    def refresh(self, limit: int, now: float) -> None:
        if limit != self.limit:
            self.limit = limit
            self.recheck_at = 0.0
        self.grant = top_up(limit, self.limiter.link.members)
        if self.window_start and now >= self.window_end:
            self.lease = 0  # a lease is only good in the window it was granted in
            self.window_start = 0.0
            self.table_left = limit
            self.recheck_at = 0.0

    def _spend_granted(self, cost: int) -> bool:
        limiter = self.limiter
        if not limiter.link.up:
            return self._spend_locally(cost)
        now = limiter.clock()
        if now < self.recheck_at:
            return False  # this window's budget was spent a moment ago; see the module doc
        need = cost - self.lease
        try:
            taken, left, window, ms_left = limiter.grant_script(
                keys=[self.key], args=[self.limit, need, self.grant, self.lease, self.window_start]
            )
        except limiter.errors as exc:
            limiter.link.failed(exc)
            limiter.calls_failed += 1
            return self._spend_locally(cost)
        limiter.grants += 1
        self.window_end = now + ms_left / 1000
        spent = self._granted(cost, taken, window, left)
        if spent is None:
            return self._spend_granted(cost)
        if not spent:
            self.recheck_at = now + EXHAUSTED_RECHECK_SECONDS
        return spent

    def _spend_locally(self, cost: int) -> bool:
        """The coordinator is unreachable: this worker's share of the limit, per local window."""
        limiter = self.limiter
        share = max(1, self.limit // limiter.link.members)
        now = limiter.clock()
        if self.fallback is None:
            self.fallback = TokenBucket(share, now)
        else:
            self.fallback.refresh(share, now)
        spent = self.lease + self.fallback.tokens >= cost
        if spent:
            from_lease = min(self.lease, cost)
            self.lease -= from_lease
            self.fallback.try_spend(cost - from_lease)
            limiter.local_admissions += 1
        return spent

    def refund(self, cost: int, spent_at_window: float) -> None:
        if spent_at_window == self.window_start and self.window_start:
            self.lease += cost
        elif self.fallback is not None:
            self.fallback.refund(cost, spent_at_window)

    def reset_in(self, now: float) -> int:
        if self.fallback is not None:
            return self.fallback.reset_in(now)
        end = self.window_end if self.window_start else now + REFILL_SECONDS
        return max(1, min(int(REFILL_SECONDS), math.ceil(end - now)))


class GlobalRateLimiter:
    """The ``Limiter`` of a server of a cluster (``serve --coordinator``)."""

    __slots__ = (
        "link",
        "clock",
        "grant_script",
        "give_back_script",
        "errors",
        "_buckets",
        "grants",
        "calls_failed",
        "local_admissions",
    )

    def __init__(self, link: CoordinatorLink, clock: Callable[[], float] = time.monotonic):
        self.link = link
        self.clock = clock
        # register_script: EVALSHA, reloading the script after a coordinator restart.
        self.grant_script = link.client.register_script(_GRANT)
        self.give_back_script = link.client.register_script(_GIVE_BACK)
        self.errors = redis_errors()
        self._buckets: dict[str, GlobalBucket] = {}
        self.grants = 0
        self.calls_failed = 0
        self.local_admissions = 0

    def bucket(self, project: str, limit: int, now: float) -> GlobalBucket:
        bucket = self._buckets.get(project)
        if bucket is None:
            bucket = self._buckets[project] = GlobalBucket(self, project, limit)
        bucket.refresh(limit, now)
        return bucket

    def tick(self) -> None:
        """Idle leases go back to the coordinator, all in one round trip."""
        idle = [b for b in self._buckets.values() if b.idle_lease()]
        if not idle or not self.link.up:
            return
        try:
            pipe = self.link.client.pipeline(transaction=False)
            for bucket in idle:
                self.give_back_script(
                    keys=[bucket.key], args=[bucket.lease, bucket.window_start], client=pipe
                )
            pipe.execute()
        except self.errors as exc:
            self.link.failed(exc)
            return
        for bucket in idle:
            bucket.gave_back()

    def forget(self, keep: set[str]) -> None:
        for name in [n for n in self._buckets if n not in keep]:
            del self._buckets[name]

    def stats(self) -> dict[str, int]:
        return {
            "coordinator_up": int(self.link.up),
            "coordinator_grants": self.grants,
            "coordinator_calls_failed": self.calls_failed,
            "coordinator_local_admissions": self.local_admissions,
        }


if TYPE_CHECKING:  # mypy proves the declared seam is implemented
    _global = GlobalRateLimiter(CoordinatorLink("", ""))
    _limiter: Limiter = _global
    _bucket: Bucket = GlobalBucket(_global, "", 0)
