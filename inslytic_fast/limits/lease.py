"""A worker's lease on a budget kept elsewhere: the workers' shared table or the coordinator.

Tokens leave the budget in *grants* (a batch's cost plus a top-up, see ``window.top_up``) and
are spent from the lease on the worker's own loop, so most requests cost a subtraction. The
budget answers a grant as ``window.grant_size`` says, whole or nothing, and takes back the
lease of a worker it refuses (another worker's client may need those tokens). This is the part
``sharedlimit.LeasedBucket`` and ``globallimit.GlobalBucket`` have in common; each keeps its
own way to reach the budget and its own fallback while the budget cannot be reached.
"""

from __future__ import annotations

from .ratelimit import TokenBucket


class Lease:
    __slots__ = ("limit", "lease", "window_start", "table_left", "grant", "used", "fallback")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lease = 0  # tokens granted to this worker, not spent yet
        self.window_start = 0.0  # the budget's window the lease belongs to; 0: none yet
        self.table_left = limit  # left in the budget at its last answer
        self.grant = 0  # the top-up asked for beyond a batch's need
        self.used = False  # spent from since the last tick
        self.fallback: TokenBucket | None = None  # while the budget cannot be used

    @property
    def tokens(self) -> int:
        """Remaining as far as this worker knows (for X-RateLimit-Remaining)."""
        return self.table_left + self.lease

    def try_spend(self, cost: int) -> bool:
        self.used = True
        if cost <= self.lease:
            self.lease -= cost
            return True
        return self._spend_granted(cost)

    def _spend_granted(self, cost: int) -> bool:
        """The lease is short of ``cost``: ask the budget (or fall back)."""
        raise NotImplementedError

    def _granted(self, cost: int, taken: int, window: float, left: int) -> bool | None:
        """Apply the budget's answer to a grant for ``cost``: spent (True), refused (False), or
        None when the window turned since the lease was counted (ask again: it now matches)."""
        self.fallback = None
        if window != self.window_start:
            self.lease = 0  # a lease is only good in the window it was granted in
            self.window_start = window
        self.table_left = left
        if not taken:
            self.lease = 0  # refused: the budget took the lease back
            return False
        self.lease += taken
        if cost <= self.lease:
            self.lease -= cost
            return True
        return None

    def idle_lease(self) -> bool:
        """Tick: whether this holds a lease nobody spent from for a whole tick."""
        idle = not self.used and self.lease > 0 and bool(self.window_start)
        self.used = False
        return idle

    def gave_back(self) -> None:
        """The idle lease went back to the budget."""
        self.table_left += self.lease
        self.lease = 0
