"""Waiting for an exclusive flock with a deadline (the catalog's and the roller's locks)."""

from __future__ import annotations

import fcntl
import time

# For locks held for seconds (a roller pass): noticed soon after release, without spinning.
POLL_SECONDS = 0.05


def lock_exclusive(fd: int, timeout_s: float, poll_s: float = POLL_SECONDS) -> bool:
    """flock(LOCK_EX) on ``fd``, polling until ``timeout_s`` has passed; False if still held.

    Polled rather than blocking: a blocking flock cannot be given a deadline.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
