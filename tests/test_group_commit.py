"""The group-commit scheduler without a loop, a thread or a file (log/group_commit.py), and the
batch ids without a log (log/batch_ids.py)."""

from __future__ import annotations

import errno
import uuid

import pytest

from inslytic_fast.log.batch_ids import BatchIds
from inslytic_fast.log.group_commit import (
    COMMIT_WINDOW_S,
    FULL_SYNC_BATCHES,
    FULL_SYNC_BYTES,
    SYNC_AT_ONCE_BYTES,
    GroupCommit,
    Start,
    SyncState,
    TransitionError,
)


def test_a_lone_producer_starts_at_the_end_of_the_iteration() -> None:
    sync = GroupCommit()
    assert sync.plan(100.0, 1, 500, after_sync=False) is Start.SOON
    sync.scheduled(Start.SOON)
    sync.started(100.0, 1)
    sync.synced()
    # The last sync carried one batch: the next one does not wait for company either.
    assert sync.plan(100.0, 1, 500, after_sync=True) is Start.SOON


def test_after_a_shared_sync_a_small_group_waits_for_the_rest_of_the_window() -> None:
    sync = GroupCommit()
    sync.started(100.0, 3)
    sync.synced()
    now = 100.0 + COMMIT_WINDOW_S / 4
    assert sync.plan(now, 2, 1000, after_sync=True) is Start.WINDOW
    assert sync.window_left(now) == pytest.approx(COMMIT_WINDOW_S * 3 / 4)
    sync.scheduled(Start.WINDOW)
    assert sync.state is SyncState.WINDOW
    # Once the window has passed, the same group starts at the end of the iteration.
    assert sync.plan(100.0 + COMMIT_WINDOW_S, 2, 1000, after_sync=False) is Start.SOON


@pytest.mark.parametrize(("batches", "nbytes"), [(FULL_SYNC_BATCHES, 1000), (2, FULL_SYNC_BYTES)])
def test_a_full_group_never_waits_for_the_window(batches: int, nbytes: int) -> None:
    sync = GroupCommit()
    sync.started(100.0, 3)
    sync.synced()
    assert sync.plan(100.0, batches, nbytes, after_sync=False) is Start.SOON
    sync.scheduled(Start.WINDOW)  # a small group set the timer; company arrives
    sync.full_group_arrived()
    assert sync.state is SyncState.SOON


def test_a_large_group_starts_the_moment_the_previous_sync_finishes() -> None:
    sync = GroupCommit()
    sync.started(100.0, 1)
    sync.synced()
    assert sync.plan(100.0, 1, SYNC_AT_ONCE_BYTES, after_sync=True) is Start.NOW
    assert sync.plan(100.0, 1, SYNC_AT_ONCE_BYTES - 1, after_sync=True) is Start.SOON
    # Not after a sync: the appends of this iteration may still join.
    assert sync.plan(100.0, 1, SYNC_AT_ONCE_BYTES, after_sync=False) is Start.SOON


def test_a_failure_refuses_until_a_repair_succeeds() -> None:
    sync = GroupCommit()
    sync.scheduled(Start.SOON)
    sync.started(100.0, 4)
    error = OSError(errno.EIO, "injected")
    sync.failed(error)
    assert (sync.state, sync.failure) == (SyncState.REPAIRING, error)
    assert sync.busy  # close() waits for the repair
    sync.repair_failed()
    assert (sync.state, sync.failure) == (SyncState.UNSOUND, error)
    assert not sync.busy
    sync.repair_started()  # the next tick retries
    sync.repaired()
    assert (sync.state, sync.failure) == (SyncState.IDLE, None)


@pytest.mark.parametrize(
    ("path", "event"),
    [
        ([], "synced"),  # nothing is running
        ([], "repaired"),
        ([], "repair_started"),  # not unsound
        ([("scheduled", Start.SOON)], "scheduled"),  # one sync scheduled at a time
        ([("scheduled", Start.SOON)], "full_group_arrived"),  # no timer to cut short
        ([("started",)], "started"),  # one sync at a time
        ([("started",)], "nothing_to_start"),
        ([("started",), ("failed",)], "started"),  # no sync while repairing
        ([("started",), ("failed",), ("repair_failed",)], "scheduled"),  # nor while unsound
    ],
)
def test_a_transition_its_stage_does_not_allow_raises(path: list[tuple], event: str) -> None:
    sync = GroupCommit()
    arguments = {
        "scheduled": (Start.SOON,),
        "started": (100.0, 1),
        "failed": (OSError(errno.EIO, "injected"),),
    }
    for name, *_ in path:
        getattr(sync, name)(*arguments.get(name, ()))
    before = sync.state
    with pytest.raises(TransitionError):
        getattr(sync, event)(*arguments.get(event, ()))
    assert sync.state is before


def test_batch_ids_count_within_a_millisecond_and_never_go_back() -> None:
    ids = BatchIds()
    prefixes = [ids.prefix(1_800_000_000_000) for _ in range(3)]
    prefixes.append(ids.prefix(1_799_999_999_000))  # the clock stepped back a second
    prefixes.append(ids.prefix(1_800_000_000_001))
    assert prefixes == sorted(prefixes) and len(set(prefixes)) == len(prefixes)
    first = uuid.UUID((prefixes[0] + b"000").decode())
    assert first.version == 7 and first.int >> 80 == 1_800_000_000_000


def test_batch_ids_carry_over_into_the_next_millisecond_after_4096_batches() -> None:
    ids = BatchIds()
    prefixes = [ids.prefix(1_800_000_000_000) for _ in range(0x1000 + 1)]
    assert len(set(prefixes)) == len(prefixes) and prefixes == sorted(prefixes)
    assert uuid.UUID((prefixes[-1] + b"000").decode()).int >> 80 == 1_800_000_000_001
