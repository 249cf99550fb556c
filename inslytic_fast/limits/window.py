"""The arithmetic of one project's budget, shared by every limiter.

The API reference: "a token bucket rate limiter per project. Each event in a request costs one
token. The default limit is 1,000 events per minute per project. Tokens refill every 60
seconds." So a budget holds ``limit`` tokens and is refilled to full once per 60-second window
that starts with the project's first request; a batch that costs more than what remains is
refused whole.

A budget counts what was *spent* in its window; what remains is ``limit - spent`` under the
limit in force. So a limit change never mints tokens: flipping 1000 -> 10 -> 1000 leaves the
window with what 1000 leaves, and a window's total is at most the largest limit applied in it.

Where the budget lives differs (a loop-owned object, a row of the workers' shared table, a hash
in the cluster's coordinator); these rules do not. The coordinator's copy is a Lua script
(``globallimit``) built from the constants here.
"""

from __future__ import annotations

REFILL_SECONDS = 60.0  # API reference: "Tokens refill every 60 seconds"
REFILL_MS = int(REFILL_SECONDS * 1000)  # the coordinator's clock counts milliseconds
UNLIMITED = 0  # a project limit of 0 means no rate limit (benchmarks, trusted back-ends)
# A lease's top-up is limit // (GRANT_FRACTION x holders): at most 1/16 of a limit sits unspent
# in leases, and a project under 16 x holders events/min gets no top-up (exact, one grant each).
GRANT_FRACTION = 16


def current_window(window_start: float, now: float) -> float:
    """The start of the window ``now`` falls in: windows stay aligned to the first request, so
    the Reset a client is told is predictable. ``now`` at or after ``window_start``."""
    return window_start + ((now - window_start) // REFILL_SECONDS) * REFILL_SECONDS


def grant_size(limit: int, spent: int, need: int, extra: int) -> int:
    """Tokens a grant takes from a window that has ``spent`` of ``limit``: ``need`` plus up to
    ``extra`` when ``need`` fits, else none (a batch is admitted whole or not at all)."""
    left = limit - spent
    if left < need:
        return 0
    return need + min(extra, left - need)


def top_up(limit: int, holders: int) -> int:
    """The extra tokens a grant brings, so that most batches spend from the lease alone."""
    return limit // (GRANT_FRACTION * holders)
