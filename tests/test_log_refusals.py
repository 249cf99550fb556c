"""When the commit log says no: fsync and write failures (fsyncgate), overload, a short disk,
backpressure (real files, a real loop and sync thread)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil

import pytest

from inslytic_fast.log import admission, batch_ids
from inslytic_fast.log.format import (
    list_segments,
    scan_records,
)
from inslytic_fast.log.group_commit import SyncState
from inslytic_fast.log.writer import CommitLog, LogUnavailable
from inslytic_fast.storage.roller import Roller

from .log_helpers import FsyncGate, SyncGate, batches_per_segment, records_on_disk, run
from .storage_helpers import LogOnLoop, batch_counts, make_events, open_log

# -- fsync failures (fsyncgate) ----------------------------------------------------------------


@pytest.mark.parametrize(("err", "reason"), [(errno.EIO, "I/O error"), (errno.ENOSPC, "disk full")])
def test_failed_sync_fails_the_batch_refuses_then_recovers(tmp_path, monkeypatch, err, reason):
    gate = SyncGate(monkeypatch)

    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        assert await driver.append("shop", "good-1") is None
        repair_gate = FsyncGate(monkeypatch)
        gate.fail_with.append(OSError(err, os.strerror(err)))
        failed = await driver.append("shop", "doomed")
        assert isinstance(failed, LogUnavailable)
        assert reason in str(failed) and failed.retry_after > 0
        assert failed.__cause__.errno == err
        # Unsound: refuse at once, never retry-then-ack. (The repair is held at its fsync.)
        await asyncio.get_running_loop().run_in_executor(None, repair_gate.started.wait, 10)
        with pytest.raises(LogUnavailable) as refused:
            log.append("shop", make_events("refused", 1), 1, lambda exc: None)
        assert reason in str(refused.value)
        damaged = log.segment_path
        repair_gate.release.set()  # repair: cut back to the durable offset, new segment
        while log.group_commit.failure is not None:  # poll-with-deadline via wait_for
            await asyncio.sleep(0.001)
        assert log.segment_path != damaged
        log.tick()  # after ENOSPC, appends wait for a tick that sees free space again
        assert await driver.append("shop", "good-2") is None
        await log.close()
        assert log.stats.failed == 1 and log.stats.sync_errors == 1

    run(main())
    ids = [r["e"][0]["anonymousId"] for r in records_on_disk(tmp_path)]
    assert ids == ["good-1", "good-2"]  # the failed batch is gone, nothing corrupt
    for segs in list_segments(tmp_path / "log").values():
        for path in segs:
            assert scan_records(path.read_bytes())[1] == path.stat().st_size


def test_appends_queued_behind_a_failed_sync_fail_too(tmp_path, monkeypatch):
    gate = SyncGate(monkeypatch, hold_first=True)

    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        gate.fail_with.append(OSError(errno.EIO, "injected"))
        first = driver.append("shop", "first")
        await asyncio.get_running_loop().run_in_executor(None, gate.started.wait, 10)
        queued = [driver.append("shop", f"q{i}") for i in range(5)]
        gate.release.set()
        results = [await first, *[await q for q in queued]]
        assert all(isinstance(r, LogUnavailable) for r in results)
        await log.close()

    run(main())
    assert records_on_disk(tmp_path) == []


def test_failed_repair_keeps_refusing_until_a_repair_succeeds(tmp_path, monkeypatch):
    gate = SyncGate(monkeypatch)
    real_fsync = os.fsync
    fsync_failures = [OSError(errno.EIO, "repair fails")]

    def flaky_fsync(fd):
        if fsync_failures:
            raise fsync_failures.pop()
        real_fsync(fd)

    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        gate.fail_with.append(OSError(errno.EIO, "injected"))
        monkeypatch.setattr(os, "fsync", flaky_fsync)
        assert isinstance(await driver.append("shop", "doomed"), LogUnavailable)
        while log.group_commit.state is SyncState.REPAIRING:  # the immediate repair, which fails
            await asyncio.sleep(0.001)
        assert log.group_commit.state is SyncState.UNSOUND
        with pytest.raises(LogUnavailable):
            log.append("shop", make_events("x", 1), 1, lambda exc: None)
        log.tick()
        while log.group_commit.failure is not None:
            await asyncio.sleep(0.001)
        assert await driver.append("shop", "ok") is None
        await log.close()

    run(main())
    assert [r["e"][0]["anonymousId"] for r in records_on_disk(tmp_path)] == ["ok"]


def test_write_error_is_treated_like_a_sync_error(tmp_path, monkeypatch):
    real_writev = os.writev
    box = {}

    def failing_writev(fd, buffers):
        if fd == box.get("fd"):
            box.pop("fd")
            os.write(fd, b"".join(buffers)[:10])  # a partial record reaches the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", failing_writev)

    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        assert await driver.append("shop", "good") is None
        box["fd"] = log._segment.fd  # noqa: SLF001
        result = await driver.append("shop", "partial")
        assert isinstance(result, LogUnavailable) and "disk full" in str(result)
        while log.group_commit.failure is not None:
            await asyncio.sleep(0.001)
        await log.close()

    run(main())
    assert [r["e"][0]["anonymousId"] for r in records_on_disk(tmp_path)] == ["good"]
    for segs in list_segments(tmp_path / "log").values():
        for path in segs:
            assert scan_records(path.read_bytes())[1] == path.stat().st_size


# -- Backpressure ---------------------------------------------------------------------------------


def test_refuses_fast_when_too_far_ahead_of_the_roller(tmp_path):
    async def main():
        log = open_log(tmp_path, max_unrolled_bytes=3000, segment_max_bytes=1000)
        driver = LogOnLoop(log)
        acked = 0
        with pytest.raises(LogUnavailable) as info:
            for i in range(100):
                await driver.append("shop", f"b{i}")
                acked += 1
        assert "overloaded" in str(info.value) and info.value.retry_after >= 1
        assert 0 < acked < 100
        # The roller catches up; the next tick sees the log shrink and accepts again.
        await asyncio.get_running_loop().run_in_executor(None, Roller(tmp_path).roll_once)
        log.tick()
        assert await driver.append("shop", "after-roll") is None
        await log.close()
        return acked

    acked = run(main())
    counts = batch_counts(tmp_path)
    assert sum(counts.values()) == (acked + 1) * 3


def test_refuses_fast_when_disk_is_short(tmp_path):
    async def main():
        free = shutil.disk_usage(tmp_path).free
        log = open_log(tmp_path, min_free_bytes=free * 4)
        with pytest.raises(LogUnavailable) as info:
            log.append("shop", make_events("x", 1), 1, lambda exc: None)
        assert "disk full" in str(info.value)
        assert info.value.retry_after == admission.RETRY_AFTER_DISK_FULL
        await log.close()

    run(main())
    assert records_on_disk(tmp_path) == []


def test_invalid_configuration_is_rejected(tmp_path):
    with pytest.raises(ValueError):
        CommitLog(tmp_path, durability="sometimes")
    with pytest.raises(ValueError):
        CommitLog(tmp_path, worker_id="w-0")


def test_short_writev_is_completed_not_corrupted(tmp_path, monkeypatch):
    real_writev = os.writev
    shortened = []

    def short_writev(fd, buffers):
        data = b"".join(buffers)
        if len(data) > 40:
            shortened.append(len(data))
            return os.write(fd, data[: len(data) // 3])
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", short_writev)

    async def main():
        log = open_log(tmp_path)
        driver = LogOnLoop(log)
        assert (
            await asyncio.gather(*(driver.append("shop", f"b{i}") for i in range(4))) == [None] * 4
        )
        await log.close()

    run(main())
    assert shortened
    assert [r["e"][0]["anonymousId"] for r in records_on_disk(tmp_path)] == [
        f"b{i}" for i in range(4)
    ]


def test_tick_while_a_sync_is_in_flight_still_rotates_and_measures(tmp_path, monkeypatch):
    now = [1_800_000_000.0]
    gate = SyncGate(monkeypatch)

    async def main():
        log = open_log(
            tmp_path, segment_max_age_s=30, max_unrolled_bytes=100_000, clock=lambda: now[0]
        )
        driver = LogOnLoop(log)
        assert await driver.append("shop", "first") is None
        first_segment = log.segment_path
        # Under load a sync is always in flight: hold one to stand for that.
        gate.release.clear()
        gate.started.clear()
        held = driver.append("shop", "held")
        await asyncio.get_running_loop().run_in_executor(None, gate.started.wait, 10)
        # A backlog appears (an older segment the roller has not converted yet) ...
        backlog = tmp_path / "log" / "w0-00000000000000000001.log"
        backlog.write_bytes(b"\0" * 200_000)
        now[0] += 31
        log.tick()
        assert log.refusal() == "overloaded: the log is too far ahead of the Parquet roller"
        # ... and is rolled away: the next tick sees it even though the sync still runs.
        backlog.unlink()
        log.tick()
        assert log.refusal() is None
        after = driver.append("shop", "after")
        gate.release.set()
        assert await held is None and await after is None
        assert log.stats.rotations == 1  # the age rotation was scheduled, not skipped
        assert log.segment_path != first_segment
        await log.close()

    run(main())
    assert batches_per_segment(tmp_path) == [["first", "held"], ["after"], []]


def test_batches_beyond_the_event_id_counter_are_rejected(tmp_path):
    async def main():
        log = open_log(tmp_path)
        with pytest.raises(ValueError):
            log.append("shop", b"[]", batch_ids.MAX_EVENTS_PER_BATCH + 1, lambda e: None)
        await log.close()

    run(main())


def test_backpressure_rises_from_its_mark_and_the_hard_mark_refuses(tmp_path):
    async def main():
        log = open_log(tmp_path, max_unrolled_bytes=800_000)
        backlog = tmp_path / "log" / "w0-00000000000000000001.log"  # an unrolled segment
        soft = 800_000 * admission.BACKPRESSURE_FROM_SHARE
        delays = []
        for size in (0, int(soft) - 1000, int(soft) + 100_000, 700_000, 900_000):
            backlog.write_bytes(b"\0" * size)
            log.tick()
            delays.append(log.backpressure_delay())
        # Nothing below the mark, then rising with the backlog, the most at the hard mark.
        assert delays[:2] == [0.0, 0.0]
        assert 0 < delays[2] < delays[3] < delays[4] == admission.MAX_BACKPRESSURE_DELAY_S
        # Past the hard mark: refused, and the refusal is the one append raises.
        refusal = log.unavailable()
        assert refusal is not None and refusal.retry_after >= 1
        with pytest.raises(LogUnavailable, match=str(refusal)):
            log.append("shop", make_events("late", 1), 1, lambda _: None)
        assert log.refusal() == str(refusal)
        backlog.unlink()
        log.tick()
        assert log.unavailable() is None and log.backpressure_delay() == 0.0
        await log.close()

    asyncio.run(main())
