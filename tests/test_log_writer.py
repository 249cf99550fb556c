"""The commit log writer: group commit, rotation, recovery at open (real files, a real loop and
sync thread). Refusals (fsync failures, backpressure): test_log_refusals.py; the format alone:
test_log_format.py."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

from inslytic_fast.log import group_commit, sync_thread, writer
from inslytic_fast.log.format import (
    list_segments,
    scan_records,
    scan_segment,
    sealed_segments,
)
from inslytic_fast.log.writer import CommitLog, LogUnavailable

from .log_helpers import SyncGate, batches_per_segment, records_on_disk, run
from .storage_helpers import LogOnLoop, as_after_a_crash, batch_counts, make_events, open_log

# -- Appends and group commit ---------------------------------------------------------------


def test_append_acks_on_loop_thread_after_record_is_on_disk(tmp_path):
    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        results = await asyncio.gather(*(driver.append("shop", f"b{i}", 3) for i in range(5)))
        assert results == [None] * 5
        assert set(driver.loop_thread_ids) == {threading.get_ident()}
        assert log.stats.acked == 5 and log.stats.events == 15
        await log.close()

    run(main())
    records = records_on_disk(tmp_path)
    assert [r["e"][0]["anonymousId"] for r in records] == [f"b{i}" for i in range(5)]
    assert {r["p"] for r in records} == {"shop"}


def test_concurrent_appends_share_syncs(tmp_path, monkeypatch):
    gate = SyncGate(monkeypatch, hold_first=True)
    appends = 200

    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        first = driver.append("shop", "first", 1)
        await asyncio.get_running_loop().run_in_executor(None, gate.started.wait, 10)
        # The first sync is now running: everything below must share the next one.
        rest = [driver.append("shop", f"b{i}", 2) for i in range(appends - 1)]
        gate.release.set()
        assert await first is None
        assert await asyncio.gather(*rest) == [None] * (appends - 1)
        assert log.stats.syncs == 2
        await log.close()

    run(main())
    assert gate.calls == 3  # two group syncs + the final sync in close()
    assert len(records_on_disk(tmp_path)) == appends


def test_lone_append_syncs_at_once_without_a_timer(tmp_path, monkeypatch):
    gate = SyncGate(monkeypatch)

    async def main():
        log, starts, driver = watched_log(tmp_path, monkeypatch)
        fut = driver.append("shop", "lonely", 1)
        # One loop iteration later the sync thread has the job; nobody calls tick(), and no
        # timer was asked for (a timer-based batcher would wait its interval). Counted, not
        # timed: an fdatasync on a busy machine can take longer than any such interval.
        await asyncio.sleep(0)
        assert log.stats.appends == 1
        assert starts.batches == [1] and starts.windowed == []
        assert await fut is None
        assert gate.calls == 1 and log.stats.syncs == 1
        await log.close()

    run(main())


class SyncStarts:
    """Records when each group commit starts and whether it waited for the commit window."""

    def __init__(self, log: CommitLog, monkeypatch) -> None:
        self.times: list[float] = []
        self.batches: list[int] = []
        self.windowed: list[float] = []  # call_later delays the log asked for
        self.timers: list[asyncio.TimerHandle] = []
        real_start, real_call_later = CommitLog._start_sync, log._loop.call_later
        loop = log._loop

        def call_later(delay, callback, *args):
            self.windowed.append(delay)
            self.timers.append(real_call_later(delay, callback, *args))
            return self.timers[-1]

        def start_sync(self_log: CommitLog) -> None:
            pending = len(self_log._pending_waiters)
            real_start(self_log)
            if pending and not self_log._pending_waiters:  # this call started a sync
                self.times.append(loop.time())
                self.batches.append(pending)

        monkeypatch.setattr(CommitLog, "_start_sync", start_sync)
        monkeypatch.setattr(loop, "call_later", call_later)


def watched_log(tmp_path: Path, monkeypatch, **kwargs) -> tuple[CommitLog, SyncStarts, LogOnLoop]:
    log = open_log(tmp_path, **kwargs)
    return log, SyncStarts(log, monkeypatch), LogOnLoop(log)


def test_a_lone_producer_never_waits_for_the_commit_window(tmp_path, monkeypatch):
    async def main():
        log, starts, driver = watched_log(tmp_path, monkeypatch)
        for i in range(20):  # an SDK sending one batch at a time
            assert await driver.append("shop", f"b{i}", 1) is None
        assert starts.batches == [1] * 20
        assert starts.windowed == []  # every sync started at the end of its loop iteration
        await log.close()

    run(main())


def freeze_the_logs_monotonic_clock(monkeypatch) -> None:
    """The commit window is measured on time.monotonic: frozen, a sync is always "just now",
    whatever a busy machine did to the real gaps (the loop's own clock keeps running)."""
    frozen = types.SimpleNamespace(
        monotonic=lambda: 1000.0,
        perf_counter=time.perf_counter,
        time=time.time,
        time_ns=time.time_ns,
    )
    monkeypatch.setattr(writer, "time", frozen)


def test_concurrent_producers_share_syncs_spaced_by_the_commit_window(tmp_path, monkeypatch):
    """Order and counts, not wall-clock gaps (a busy CI machine stretches those): the log's
    clock stands still, so every sync after one that carried several batches must ask for the
    whole window, and the producers' next batches all wait for it together."""
    window = group_commit.COMMIT_WINDOW_S
    freeze_the_logs_monotonic_clock(monkeypatch)
    # Fewer producers than a full group: every sync after the first waits out the window.
    producers = group_commit.FULL_SYNC_BATCHES // 2
    rounds = 25

    async def main():
        log, starts, driver = watched_log(tmp_path, monkeypatch, durability="none")

        async def producer(name: str) -> None:
            for i in range(rounds):  # an SDK that sends its next batch once the last is acked
                assert await driver.append("shop", f"{name}-{i}", 1) is None

        await asyncio.gather(*(producer(f"p{i}") for i in range(producers)))
        await log.close()
        return starts

    starts = run(main())
    # Each round's batches, acknowledged together, come back together and share one sync ...
    assert starts.batches == [producers] * rounds
    # ... which, after the first, starts from a timer set for the whole commit window.
    assert starts.windowed == pytest.approx([window] * (rounds - 1))
    assert len(records_on_disk(tmp_path)) == producers * rounds


def test_a_full_group_does_not_wait_for_the_window(tmp_path, monkeypatch):
    full = group_commit.FULL_SYNC_BATCHES
    freeze_the_logs_monotonic_clock(monkeypatch)  # else a slow iteration outlasts the window

    async def main():
        log, starts, driver = watched_log(tmp_path, monkeypatch, durability="none")
        await asyncio.gather(*(driver.append("shop", f"a{i}", 1) for i in range(3)))
        # The last sync carried 3 batches: a smaller group would now wait for company ...
        windowed = len(starts.windowed)
        await asyncio.gather(*(driver.append("shop", f"b{i}", 1) for i in range(full)))
        # ... a full one starts at the end of the loop iteration that filled it: the timer its
        # first batch set is cancelled.
        assert starts.batches[-1] == full
        assert len(starts.timers) == windowed + 1 and starts.timers[-1].cancelled()
        await log.close()

    run(main())


@pytest.mark.parametrize(("events", "at_once"), [(1, False), (2_000, True)])
def test_a_waiting_group_starts_at_once_only_when_it_is_large(
    tmp_path, monkeypatch, events, at_once
):
    """Small groups start at the end of the loop iteration (the requests parsed in it join);
    a group of SYNC_AT_ONCE_BYTES or more starts the moment the previous sync finishes."""
    gate = SyncGate(monkeypatch, hold_first=True)

    async def main():
        log = open_log(tmp_path)
        loop = asyncio.get_running_loop()
        deferred = []
        real_call_soon = loop.call_soon

        def call_soon(callback, *args, **kwargs):
            if getattr(callback, "__name__", "") == "_start_sync":
                deferred.append(callback)
            return real_call_soon(callback, *args, **kwargs)

        driver = LogOnLoop(log)
        first = driver.append("shop", "first", 1)
        await loop.run_in_executor(None, gate.started.wait, 10)
        monkeypatch.setattr(loop, "call_soon", call_soon)
        waiting = driver.append("shop", "waiting", events)  # joins the group behind the sync
        size = log._pending_bytes
        assert (size >= group_commit.SYNC_AT_ONCE_BYTES) is at_once
        gate.release.set()
        assert await first is None and await waiting is None
        assert bool(deferred) is not at_once
        await log.close()

    run(main())


def test_batch_ids_are_time_ordered_uuidv7_prefixes(tmp_path):
    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        for i in range(50):
            await driver.append("shop", f"b{i}", 1)
        await log.close()

    run(main())
    records = records_on_disk(tmp_path)
    prefixes = [r["b"] for r in records]
    assert prefixes == sorted(prefixes) and len(set(prefixes)) == 50
    for record in records:
        first = uuid.UUID(record["b"] + "000")
        last = uuid.UUID(record["b"] + "fff")
        assert first.version == 7 and last.version == 7
        assert first.variant == uuid.RFC_4122
        unix_ms = first.int >> 80
        assert abs(unix_ms - record["r"] // 1000) <= 1


def test_durability_none_never_syncs_records(tmp_path, monkeypatch):
    gate = SyncGate(monkeypatch)

    async def main():
        log = open_log(tmp_path, durability="none")
        driver = LogOnLoop(log)
        assert (
            await asyncio.gather(*(driver.append("shop", f"b{i}") for i in range(10)))
            == [None] * 10
        )
        await log.close()

    run(main())
    assert gate.calls == 1  # only the final sync at close
    assert len(records_on_disk(tmp_path)) == 10


def test_close_finishes_queued_appends_then_refuses(tmp_path):
    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        futs = [driver.append("shop", f"b{i}") for i in range(20)]
        await log.close()
        assert all(f.done() and f.result() is None for f in futs)
        with pytest.raises(LogUnavailable) as info:
            log.append("shop", make_events("late", 1), 1, lambda exc: None)
        assert "shutting down" in str(info.value)

    run(main())
    assert len(records_on_disk(tmp_path)) == 20


# -- Rotation --------------------------------------------------------------------------------


def test_rotation_by_size_seals_previous_segment_durably(tmp_path):
    async def main():
        log = open_log(tmp_path, segment_max_bytes=2000)
        driver = LogOnLoop(log)
        for i in range(12):
            await driver.append("shop", f"b{i}", 2)
        await log.close()
        return log.stats.rotations

    rotations = run(main())
    assert rotations >= 2
    segments = list_segments(tmp_path / "log")["w0"]
    # One per rotation, the last written one, and the empty successor that seals it on close.
    assert len(segments) == rotations + 2
    assert segments[-1].stat().st_size == 0
    assert sealed_segments(tmp_path / "log") == segments[:-1]
    assert len(records_on_disk(tmp_path)) == 12


def test_rotation_by_age_on_tick(tmp_path):
    now = [1_800_000_000.0]

    async def main():
        log = open_log(tmp_path, segment_max_age_s=30, clock=lambda: now[0])
        driver = LogOnLoop(log)
        await driver.append("shop", "a")
        log.tick()  # young segment: nothing happens
        assert len(list_segments(tmp_path / "log")["w0"]) == 1
        now[0] += 31
        log.tick()
        while log.stats.rotations == 0:
            await asyncio.sleep(0.001)
        await driver.append("shop", "b")
        now[0] += 31
        await log.close()

    run(main())
    segments = list_segments(tmp_path / "log")["w0"]
    assert [len(scan_records(p.read_bytes())[0]) for p in segments] == [1, 1, 0]


def test_open_seals_existing_segments_and_numbers_grow(tmp_path):
    for round_ in range(3):

        async def main(round_=round_):
            log = open_log(tmp_path)
            await LogOnLoop(log).append("shop", f"r{round_}")
            await log.close()

        run(main())
    segments = list_segments(tmp_path / "log")["w0"]
    # Each clean close sealed its segment with an empty successor, which the next open reused.
    assert batches_per_segment(tmp_path) == [["r0"], ["r1"], ["r2"], []]
    assert segments == sorted(segments)
    assert sealed_segments(tmp_path / "log") == segments[:-1]


def test_a_clean_close_seals_only_a_segment_it_wrote_to(tmp_path):
    async def main():
        log = open_log(tmp_path)
        await log.close()

    run(main())
    run(main())
    assert len(list_segments(tmp_path / "log")["w0"]) == 1
    assert sealed_segments(tmp_path / "log") == []


def test_a_close_whose_final_sync_fails_does_not_seal(tmp_path, monkeypatch):
    def failing_fdatasync(fd):
        raise OSError(errno.EIO, "I/O error")

    async def main():
        log = open_log(tmp_path)
        assert await LogOnLoop(log).append("shop", "good") is None
        monkeypatch.setattr(sync_thread, "fdatasync", failing_fdatasync)
        await log.close()

    run(main())
    # The segment is not known to be whole on disk: the next start recovers it as active.
    assert sealed_segments(tmp_path / "log") == []


# -- Recovery at open ----------------------------------------------------------------------


def test_damage_in_the_middle_of_the_active_segment_keeps_later_acked_records(tmp_path):
    async def write(batches):
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        for b in batches:
            assert await driver.append("shop", b) is None
        await log.close()
        return log.segment_path

    segment = run(write(["a", "b", "c", "d"]))
    as_after_a_crash(tmp_path)
    data = bytearray(segment.read_bytes())
    second = scan_segment(bytes(data)).records[1]
    data[second[0] + 40] ^= 0xFF  # a flipped byte inside record "b"
    segment.write_bytes(bytes(data))
    assert batch_counts(tmp_path) == {"a": 3, "c": 3, "d": 3}  # readers salvage too
    run(write(["e"]))
    assert [r["e"][0]["anonymousId"] for r in records_on_disk(tmp_path)] == ["a", "c", "d", "e"]
    quarantined = b"".join(p.read_bytes() for p in (tmp_path / "quarantine").iterdir())
    assert quarantined == bytes(data[second[0] : second[1]])


def test_open_recovers_torn_tail_and_appends_after_it(tmp_path):
    async def write(batches):
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        for b in batches:
            await driver.append("shop", b)
        await log.close()
        return log.segment_path

    segment = run(write(["a", "b", "c"]))
    as_after_a_crash(tmp_path)
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 7)  # tear the last record
    run(write(["d"]))
    assert [r["e"][0]["anonymousId"] for r in records_on_disk(tmp_path)] == ["a", "b", "d"]
