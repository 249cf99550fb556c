"""The rate limiter as the ingest path sees it: declared here, implemented three ways.

- ``ratelimit.RateLimiter``: one process, buckets owned by its event loop.
- ``sharedlimit.SharedRateLimiter``: ``--workers N``, a lease on each project's row of a table
  shared by the workers of one node.
- ``globallimit.GlobalRateLimiter``: ``--coordinator``, a lease on each project's bucket in the
  cluster's coordinator.

The ingest path asks the limiter for a project's bucket, spends from it, refunds a batch the
log could not store, and writes the X-RateLimit-* headers from what the bucket reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Bucket(Protocol):
    """One project's budget for the current window."""

    @property
    def limit(self) -> int:
        """The limit in force (X-RateLimit-Limit)."""
        ...

    @property
    def tokens(self) -> int:
        """What remains of this window, as far as this process knows (X-RateLimit-Remaining)."""
        ...

    @property
    def window_start(self) -> float:
        """The current window's identity: a refund names the window its tokens came from."""
        ...

    def try_spend(self, cost: int) -> bool:
        """Take ``cost`` tokens, or none at all and False."""
        ...

    def refund(self, cost: int, spent_at_window: float) -> None:
        """Give back tokens of a batch that was not stored, if still in that window."""
        ...

    def reset_in(self, now: float) -> int:
        """Whole seconds until the next refill, at least 1 (X-RateLimit-Reset)."""
        ...


class Limiter(Protocol):
    """The buckets of every project, kept by one serving process."""

    @property
    def clock(self) -> Callable[[], float]:
        """The clock ``now`` is read from for ``bucket`` and ``reset_in``."""
        ...

    def bucket(self, project: str, limit: int, now: float) -> Bucket:
        """The project's bucket, refilled if its window has passed, under ``limit``."""
        ...

    def tick(self) -> None:
        """Once a second: housekeeping (leases nobody spent from go back)."""
        ...

    def forget(self, keep: set[str]) -> None:
        """Drop the buckets of projects not in ``keep`` (deleted projects)."""
        ...

    def stats(self) -> dict[str, int]:
        """Gauges for /metrics (empty where the limiter has nothing to report)."""
        ...
