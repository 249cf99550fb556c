"""Per-project token buckets, owned by the event loop (no locks), with time passed in.

The rules of a bucket (window, refill, what a limit change does) are ``window``'s; here each
bucket is a plain object of one process's loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .window import REFILL_SECONDS, current_window

if TYPE_CHECKING:
    from .interface import Bucket, Limiter


class TokenBucket:
    __slots__ = ("limit", "spent", "window_start")

    def __init__(self, limit: int, now: float) -> None:
        self.limit = limit
        self.spent = 0
        self.window_start = now

    @property
    def tokens(self) -> int:
        """What remains of this window under the current limit."""
        return max(0, self.limit - self.spent)

    def refresh(self, limit: int, now: float) -> None:
        """Refill if the window has passed; apply a changed limit to the current window."""
        if now - self.window_start >= REFILL_SECONDS:
            self.window_start = current_window(self.window_start, now)
            self.spent = 0
        self.limit = limit

    def try_spend(self, cost: int) -> bool:
        # window.grant_size(limit, spent, cost, 0), written out: this runs on every request.
        if cost > self.limit - self.spent:
            return False
        self.spent += cost
        return True

    def refund(self, cost: int, spent_at_window: float) -> None:
        """Give back tokens of a batch that was not stored (server fault), in the same window."""
        if spent_at_window == self.window_start:
            self.spent = max(0, self.spent - cost)

    def reset_in(self, now: float) -> int:
        """Whole seconds until the next refill (at least 1)."""
        return max(1, math.ceil(self.window_start + REFILL_SECONDS - now))


class RateLimiter:
    """A plain dict of buckets keyed by project name."""

    __slots__ = ("_buckets", "clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self.clock = clock

    def bucket(self, project: str, limit: int, now: float) -> TokenBucket:
        bucket = self._buckets.get(project)
        if bucket is None:
            bucket = self._buckets[project] = TokenBucket(limit, now)
        else:
            bucket.refresh(limit, now)
        return bucket

    def tick(self) -> None:
        """Nothing to do once a second for local buckets (see SharedRateLimiter.tick)."""

    def forget(self, keep: set[str]) -> None:
        """Drop buckets of projects that no longer exist (bounded memory across deletes)."""
        for name in [n for n in self._buckets if n not in keep]:
            del self._buckets[name]

    def stats(self) -> dict[str, int]:
        return {}


if TYPE_CHECKING:  # mypy proves the declared seam is implemented
    _limiter: Limiter = RateLimiter()
    _bucket: Bucket = TokenBucket(0, 0.0)
