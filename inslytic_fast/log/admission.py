"""Whether the commit log takes another batch, and how it says no.

The log refuses an append (``LogUnavailable``, answered 503 + Retry-After) while it shuts down,
while it repairs a failed write, when its unrolled backlog passes ``max_unrolled_bytes`` (the
roller is behind), and when the disk's free space falls under ``min_free_bytes``. Below the
hard backlog mark it slows clients down first (``backpressure_delay``). ``LogRoom`` keeps the
figures: measured once a second by the writer's ``tick``, advanced by each completed sync.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ..config import option
from .format import list_segments

# Built directly (tests, bench harnesses), a log takes serve's defaults: the config table's.
DEFAULT_MAX_UNROLLED_BYTES: int = option("max_unrolled_bytes").default
DEFAULT_MIN_FREE_BYTES: int = option("min_free_bytes").default
# Overload has two marks. Above the hard mark (max_unrolled_bytes) ingest is refused on its
# headers (503 + Retry-After, the body never read). From BACKPRESSURE_FROM_SHARE of it upwards
# the server slows clients down instead: each ingest request is held (its connection not read)
# for a delay rising linearly from 0 to MAX_BACKPRESSURE_DELAY_S at the hard mark, which gives
# the roller the CPU that serving would have used. 2 s is well inside SDK request timeouts
# (Segment's analytics-node and PostHog's clients: 10 s).
BACKPRESSURE_FROM_SHARE = 0.125
MAX_BACKPRESSURE_DELAY_S = 2.0

# Retry-After hints (seconds) per refusal reason: overload clears as soon as the roller catches
# up (it polls every second); a full disk needs an operator or retention, so back off longer.
RETRY_AFTER_OVERLOADED = 1
RETRY_AFTER_DISK_FULL = 30
RETRY_AFTER_IO_ERROR = 5
RETRY_AFTER_SHUTTING_DOWN = 1

# Free space that reads as "none": a failed check, or a write that failed with ENOSPC.
NO_FREE_SPACE = -(1 << 62)


class LogUnavailable(Exception):
    """The log refuses (or failed) this append; the client should retry after ``retry_after``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _is_disk_full(error: BaseException) -> bool:
    return getattr(error, "errno", None) == errno.ENOSPC


def write_failed(error: BaseException) -> LogUnavailable:
    """The answer to each batch of a failed write or sync (and those queued behind it)."""
    if _is_disk_full(error):
        exc = LogUnavailable(f"disk full: write/sync failed ({error})", RETRY_AFTER_DISK_FULL)
    else:
        exc = LogUnavailable(f"I/O error: write/sync failed ({error})", RETRY_AFTER_IO_ERROR)
    exc.__cause__ = error
    return exc


def recovering_from(error: BaseException) -> LogUnavailable:
    """The refusal while the log repairs the segment a failed write or sync left."""
    disk_full = _is_disk_full(error)
    return LogUnavailable(
        f"{'disk full' if disk_full else 'I/O error'}: the log is recovering from a "
        f"failed write/sync ({error})",
        RETRY_AFTER_DISK_FULL if disk_full else RETRY_AFTER_IO_ERROR,
    )


def shutting_down() -> LogUnavailable:
    return LogUnavailable("shutting down", RETRY_AFTER_SHUTTING_DOWN)


class LogRoom:
    """One worker's unrolled backlog and the disk's free space, against their limits."""

    __slots__ = (
        "log_dir",
        "worker_id",
        "max_unrolled_bytes",
        "min_free_bytes",
        "unrolled_bytes",
        "free_bytes",
        "headroom",
        "error",
        "_dir_identity",
    )

    def __init__(
        self, log_dir: Path, worker_id: str, max_unrolled_bytes: int, min_free_bytes: int
    ) -> None:
        self.log_dir = log_dir
        self.worker_id = worker_id
        self.max_unrolled_bytes = max_unrolled_bytes
        self.min_free_bytes = min_free_bytes
        self.unrolled_bytes = 0
        self.free_bytes = 1 << 62
        # Bytes that still fit under both limits, kept current by every change of the two
        # figures, so that append tests one number: unrolled + n > max_unrolled or
        # free - n < min_free  <=>  n > min(max_unrolled - unrolled, free - min_free).
        self.headroom = 0
        self._update_headroom()
        # Why the last free-space check failed (the data dir was removed or unmounted), or None.
        self.error: OSError | None = None
        self._dir_identity: tuple[int, int] | None = None

    def _update_headroom(self) -> None:
        self.headroom = min(
            self.max_unrolled_bytes - self.unrolled_bytes, self.free_bytes - self.min_free_bytes
        )

    def refusal(self, pending_bytes: int) -> LogUnavailable | None:
        """Why ``pending_bytes`` more would not fit (``pending_bytes > headroom``), or None."""
        if self.unrolled_bytes + pending_bytes > self.max_unrolled_bytes:
            return LogUnavailable(
                "overloaded: the log is too far ahead of the Parquet roller", RETRY_AFTER_OVERLOADED
            )
        if self.free_bytes - pending_bytes < self.min_free_bytes:
            if self.error is not None:
                reason = self.error.strerror or self.error
                return LogUnavailable(
                    f"storage unavailable: cannot check {self.log_dir}: {reason}",
                    RETRY_AFTER_IO_ERROR,
                )
            return LogUnavailable(
                "disk full: not enough free space for the log", RETRY_AFTER_DISK_FULL
            )
        return None

    def backpressure_delay(self, pending_bytes: int) -> float:
        """Seconds to hold an ingest request before handling it: 0 below the backpressure mark,
        rising to MAX_BACKPRESSURE_DELAY_S at the hard mark (see BACKPRESSURE_FROM_SHARE)."""
        backlog = self.unrolled_bytes + pending_bytes
        soft = self.max_unrolled_bytes * BACKPRESSURE_FROM_SHARE
        if backlog <= soft:
            return 0.0
        share = (backlog - soft) / (self.max_unrolled_bytes - soft)
        return MAX_BACKPRESSURE_DELAY_S * min(1.0, share)

    def written(self, nbytes: int) -> None:
        """A sync completed: its bytes join the backlog and leave the free space."""
        self.unrolled_bytes += nbytes
        self.free_bytes -= nbytes
        self._update_headroom()

    def disk_full(self) -> None:
        """A write failed with ENOSPC: refused as "disk full" until the next measurement says
        there is room again (at most one failing write a second while the disk stays full)."""
        self.free_bytes = NO_FREE_SPACE
        self._update_headroom()

    def measure(self, active_segment: Path | None, active_size: int) -> None:
        """Free space and unrolled bytes, from the file system. On OSError the room counts as
        none (``error`` says why) and the error is raised for the caller to report."""
        try:
            self._measure(active_segment, active_size)
        except OSError as exc:
            # Not the last figure: a data dir that was removed or unmounted has no free space
            # to speak of, and an append would go to a file nobody will ever read.
            self.error = exc
            self.free_bytes = NO_FREE_SPACE
            raise
        finally:
            self._update_headroom()
        self.error = None

    def _measure(self, active_segment: Path | None, active_size: int) -> None:
        st_dir = os.stat(self.log_dir)
        identity = (st_dir.st_dev, st_dir.st_ino)
        if self._dir_identity is None:
            self._dir_identity = identity
        elif identity != self._dir_identity:
            # Our segments are in the directory that was removed: this one is someone else's.
            raise FileNotFoundError(
                errno.ENOENT, "replaced by another directory", str(self.log_dir)
            )
        st = os.statvfs(self.log_dir)
        # Bytes a sync in flight has already written are counted again when it completes:
        # an overestimate of at most one group commit, corrected by the next measurement.
        unrolled = active_size
        for path in list_segments(self.log_dir).get(self.worker_id, []):
            if path == active_segment:
                continue
            try:
                unrolled += path.stat().st_size
            except FileNotFoundError:
                continue  # rolled between listing and stat
        self.free_bytes = st.f_bavail * st.f_frsize
        self.unrolled_bytes = unrolled
