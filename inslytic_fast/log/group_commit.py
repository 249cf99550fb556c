"""The group-commit scheduler: which stage the sync pipeline is in, and when the next sync starts.

No I/O, no loop, no clock of its own (sans-IO, like h11): the writer (writer.py) reports what
happened (an append, a finished sync, a failure) and realises the answer (a ``call_soon``, a
timer, a job for the sync thread). One sync runs at a time, so the pipeline is in exactly one
of the ``SyncState`` stages; each event below is one transition, and a transition from a stage
that does not allow it raises (a bug, never a client's fault).

::

    IDLE --append--> SOON | WINDOW --start--> SYNCING --synced--> IDLE (or at once SYNCING)
    WINDOW --full group--> SOON          SYNCING --failed--> REPAIRING --repaired--> IDLE
    REPAIRING --repair failed--> UNSOUND --retry (tick, close)--> REPAIRING

While the pipeline is REPAIRING or UNSOUND (``failure`` is set) the log refuses appends: a
failed write or sync fails every batch of it and every batch queued behind it, and nothing is
retried and then acknowledged (PostgreSQL "fsyncgate").
"""

from __future__ import annotations

import enum
from typing import NoReturn

# Group commit window: while producers are concurrent (the last sync carried more than one
# batch), a sync that would carry fewer than FULL_SYNC_BATCHES batches (and under
# FULL_SYNC_BYTES) starts no sooner than COMMIT_WINDOW_S after the previous one started, so it
# gathers company: each sync costs the CPU of an fdatasync and a thread hand-off, and many
# syncs of 2-3 batches used most of a core and stretched the p99 (figures: commit 873f966).
# A lone producer never waits, nor does a full group (64 closed-loop connections bring ~32
# batches a sync: waiting would only idle the core). The idea of PostgreSQL's commit_delay +
# commit_siblings and MySQL's binlog_group_commit_sync_delay; libuv timers resolve
# milliseconds, so this is the smallest window a timer can express.
COMMIT_WINDOW_S = 0.001
FULL_SYNC_BATCHES = 16
FULL_SYNC_BYTES = 1024 * 1024
# When a sync finishes and the next group already carries this much, it starts at once: a loop
# iteration of large batches lasts milliseconds, and waiting for its end slowed 100-event
# requests. Smaller groups start at the end of the iteration so the requests parsed in it join
# (with 1-event requests that served more per second than starting at once; commit 2f75e5c).
SYNC_AT_ONCE_BYTES = 256 * 1024


class SyncState(enum.Enum):
    IDLE = "idle"  # no sync scheduled or running
    SOON = "soon"  # a sync starts at the end of this loop iteration
    WINDOW = "window"  # a sync starts when the commit window closes (a timer)
    SYNCING = "syncing"  # the sync thread writes a group (rotating first if due) and syncs it
    REPAIRING = "repairing"  # the sync thread cuts a failed segment back, opens a new one
    UNSOUND = "unsound"  # a write or repair failed and no repair is running


class Start(enum.Enum):
    """When the waiting group's sync starts."""

    NOW = "now"  # a sync just finished and the next group is already large
    SOON = "soon"  # at the end of this loop iteration, so requests parsed in it join
    WINDOW = "window"  # when the commit window since the last sync's start closes


IDLE, SOON, WINDOW = SyncState.IDLE, SyncState.SOON, SyncState.WINDOW
SYNCING, REPAIRING, UNSOUND = SyncState.SYNCING, SyncState.REPAIRING, SyncState.UNSOUND
START_NOW, START_SOON, START_WINDOW = Start.NOW, Start.SOON, Start.WINDOW
SCHEDULABLE = (IDLE, SOON, WINDOW)  # the stages a sync can start from


class TransitionError(RuntimeError):
    """The writer reported an event its scheduler's stage does not allow (a bug)."""


class GroupCommit:
    """The sync pipeline's stage, the failure it is recovering from, and the last sync's shape.

    Each transition tests its stage with ``is`` and plain attribute stores: they run a few
    times per group commit, on the loop thread that also parses requests.
    """

    __slots__ = ("state", "failure", "last_started", "last_batches")

    def __init__(self) -> None:
        self.state = IDLE
        # Why the log is unsound (the failed write, sync or repair), set from REPAIRING on.
        self.failure: BaseException | None = None
        self.last_started = 0.0  # monotonic seconds when the last sync started
        self.last_batches = 0  # batches the last sync carried

    def _refuse(self, event: str) -> NoReturn:
        raise TransitionError(f"commit log: {event} while {self.state.value}")

    # -- Decisions (pure) ---------------------------------------------------------------------

    @staticmethod
    def is_full(batches: int, nbytes: int) -> bool:
        """The waiting group is worth a sync of its own: no commit window for it."""
        return batches >= FULL_SYNC_BATCHES or nbytes >= FULL_SYNC_BYTES

    def plan(self, now: float, batches: int, nbytes: int, after_sync: bool) -> Start:
        """When the waiting group (``batches``, ``nbytes``) should start; ``after_sync``: a sync
        has just finished. A WINDOW start waits ``window_left(now)`` seconds."""
        if (
            self.last_batches > 1
            and batches < FULL_SYNC_BATCHES  # not is_full(): inline, once per sync
            and nbytes < FULL_SYNC_BYTES
            and self.last_started + COMMIT_WINDOW_S > now
        ):
            return START_WINDOW
        if after_sync and nbytes >= SYNC_AT_ONCE_BYTES:
            return START_NOW
        return START_SOON

    def window_left(self, now: float) -> float:
        return self.last_started + COMMIT_WINDOW_S - now

    # -- Transitions --------------------------------------------------------------------------

    def scheduled(self, start: Start) -> None:
        """A sync was scheduled (``Start.SOON`` or ``Start.WINDOW``): IDLE -> SOON | WINDOW."""
        if self.state is not IDLE:
            self._refuse("schedule")
        self.state = WINDOW if start is START_WINDOW else SOON

    def full_group_arrived(self) -> None:
        """The window's company arrived, start at the end of this iteration: WINDOW -> SOON."""
        if self.state is not WINDOW:
            self._refuse("full group")
        self.state = SOON

    def started(self, now: float, batches: int) -> None:
        """IDLE | SOON | WINDOW -> SYNCING."""
        if self.state not in SCHEDULABLE:
            self._refuse("start")
        self.state = SYNCING
        self.last_started = now
        self.last_batches = batches

    def nothing_to_start(self) -> None:
        """A start found no batch and no rotation waiting: IDLE | SOON | WINDOW -> IDLE."""
        if self.state not in SCHEDULABLE:
            self._refuse("nothing to start")
        self.state = IDLE

    def synced(self) -> None:
        """SYNCING -> IDLE."""
        if self.state is not SYNCING:
            self._refuse("synced")
        self.state = IDLE

    def failed(self, error: BaseException) -> None:
        """A write or sync failed; its batches and those queued behind it fail, and the repair
        starts at once: SYNCING -> REPAIRING."""
        if self.state is not SYNCING:
            self._refuse("failed")
        self.state = REPAIRING
        self.failure = error

    def repair_started(self) -> None:
        """Retry a failed repair (tick, or close on the way out): UNSOUND -> REPAIRING."""
        if self.state is not UNSOUND:
            self._refuse("repair")
        self.state = REPAIRING

    def repaired(self) -> None:
        """REPAIRING -> IDLE, sound again."""
        if self.state is not REPAIRING:
            self._refuse("repaired")
        self.state = IDLE
        self.failure = None

    def repair_failed(self) -> None:
        """REPAIRING -> UNSOUND (until the next tick retries)."""
        if self.state is not REPAIRING:
            self._refuse("repair failed")
        self.state = UNSOUND

    @property
    def busy(self) -> bool:
        """A sync or repair is scheduled or running: close() waits for it."""
        return self.state is not IDLE and self.state is not UNSOUND
