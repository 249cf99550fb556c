"""Roller: Parquet layout, exactly once under faults at every step, compaction, retention, kill."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import duckdb
import pytest

from inslytic_fast.config import Settings
from inslytic_fast.event_columns import EVENT_COLUMNS
from inslytic_fast.log.format import (
    frame_record,
    list_segments,
    scan_segment,
    sealed_segments,
    segment_name,
)
from inslytic_fast.log.writer import CommitLog
from inslytic_fast.storage import roller as roller_module
from inslytic_fast.storage.events_sql import connect_duckdb
from inslytic_fast.storage.query import run_query
from inslytic_fast.storage.roller import Roller
from inslytic_fast.storage.roller_process import FINAL_ROLL_LOCK_WAIT_S, roll_before_exit

from .adversarial_helpers import ROLL_DEADLINE_S, poll_until
from .storage_helpers import LogOnLoop, RollerLock, batch_counts, open_log

REPO_ROOT = Path(__file__).resolve().parent.parent
# Spread over two UTC days (the last microsecond of one and the first of the next).
TIMESTAMPS = [
    "2026-02-16T10:30:00.000Z",
    "2026-02-16T23:59:59.999999Z",
    "2026-02-17T00:00:00Z",
]


class Boom(Exception):
    pass


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


# Arrival times either side of a UTC midnight, for tests of the layout by arrival date.
ARRIVALS = [
    dt.datetime(2026, 2, 16, 23, 59, 59, 999999, tzinfo=dt.UTC).timestamp(),
    dt.datetime(2026, 2, 17, tzinfo=dt.UTC).timestamp(),
]


def write_batches(
    data_dir: Path,
    batches: dict[str, int],
    *,
    segment_max_bytes=4000,
    arrivals: list[float] | None = None,
    timestamps: list[str] = TIMESTAMPS,
) -> None:
    """Append batches (two projects, two event dates); the clean close seals every segment.
    With ``arrivals``, batch n is received at ``arrivals[n % len(arrivals)]``."""
    now = [time.time()]

    async def main():
        log = open_log(
            data_dir,
            segment_max_bytes=segment_max_bytes,
            clock=(lambda: now[0]) if arrivals else time.time,
        )
        driver = LogOnLoop(log)
        for n, (batch, count) in enumerate(batches.items()):
            if arrivals:
                now[0] = arrivals[n % len(arrivals)]
            project = "shop" if n % 2 else "blog"
            assert await driver.append(project, batch, count, timestamps=timestamps) is None
        await log.close()

    run(main())


def expected_batches(prefix: str, n: int) -> dict[str, int]:
    return {f"{prefix}{i}": 1 + i % 5 for i in range(n)}


def parquet_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "events").glob("project=*/date=*/*.parquet"))


def record_steps(data_dir: Path, action) -> list[tuple[str, int]]:
    """Run ``action(roller)`` on a copy and return every (step, occurrence) it passes."""
    steps: list[tuple[str, int]] = []
    seen: dict[str, int] = {}

    def hook(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        steps.append((name, seen[name]))

    scratch = data_dir.parent / "record-steps"
    shutil.copytree(data_dir, scratch)
    action(Roller(scratch, step_hook=hook, compact_min_files=2))
    shutil.rmtree(scratch)
    return steps


def _empty_or_missing(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


def representative(steps: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Each step of the first segment, and a fault between two renames of the last one."""
    first_segment = steps[: steps.index(("roll:start", 2))] if ("roll:start", 2) in steps else steps
    last_rename = max((s for s in steps if s[0] == "roll:published_one"), key=lambda s: s[1])
    return [*first_segment, last_rename] if last_rename not in first_segment else first_segment


def failing_at(step: tuple[str, int]):
    seen: dict[str, int] = {}

    def hook(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        if (name, seen[name]) == step:
            raise Boom(f"{name} #{seen[name]}")

    return hook


# -- Layout and schema -------------------------------------------------------------------------


def test_roll_writes_hive_partitions_by_project_and_utc_date_of_arrival(tmp_path):
    batches = expected_batches("b", 8)
    write_batches(tmp_path, batches, arrivals=[ARRIVALS[0], ARRIVALS[0], ARRIVALS[1], ARRIVALS[1]])
    assert sealed_segments(tmp_path / "log")
    converted = Roller(tmp_path).roll_once()
    assert converted == sum(batches.values())
    assert sealed_segments(tmp_path / "log") == []
    partitions = {
        p.parent.relative_to(tmp_path / "events").as_posix() for p in parquet_files(tmp_path)
    }
    assert partitions == {
        f"project={p}/date={d}" for p in ("shop", "blog") for d in ("2026-02-16", "2026-02-17")
    }
    for path in parquet_files(tmp_path):
        meta = duckdb.sql(f"SELECT DISTINCT compression FROM parquet_metadata('{path}')").fetchall()
        assert meta == [("ZSTD",)]
    _, rows = run_query(
        tmp_path,
        "SELECT DISTINCT project, CAST(received_at AS DATE), CAST(timestamp AS DATE) FROM events",
    )
    # Each event sits under the date it arrived, whatever its own timestamp says.
    assert {(p, str(r)) for p, r, _ in rows} == {
        (p, d) for p in ("shop", "blog") for d in ("2026-02-16", "2026-02-17")
    }
    assert {str(t) for _, _, t in rows} == {"2026-02-16", "2026-02-17"}
    assert batch_counts(tmp_path) == batches
    assert not any((tmp_path / "events" / ".staging").iterdir())


def test_events_relation_has_the_documented_columns_and_values(tmp_path):
    write_batches(tmp_path, {"only": 3})
    Roller(tmp_path).roll_once()
    columns, rows = run_query(tmp_path, "DESCRIBE events")
    assert [(r[0], r[1]) for r in rows] == [
        (name, "TIMESTAMP WITH TIME ZONE" if sql_type == "TIMESTAMPTZ" else sql_type)
        for name, sql_type in EVENT_COLUMNS
    ]
    _, rows = run_query(
        tmp_path,
        "SELECT event_id, project, properties['path'], "
        "strftime(\"timestamp\", '%Y-%m-%d %H:%M:%S.%f'), user_id, consent_given, utm_source, "
        "device_type, received_at FROM events ORDER BY event_id",
    )
    assert [r[0][-3:] for r in rows] == ["000", "001", "002"]
    assert len({r[0][:-3] for r in rows}) == 1
    assert {r[1] for r in rows} == {"blog"}
    assert {r[2] for r in rows} == {"/pricing"}
    assert [r[3] for r in rows] == [
        "2026-02-16 10:30:00.000000",
        "2026-02-16 23:59:59.999999",
        "2026-02-17 00:00:00.000000",
    ]
    assert {(r[4], r[5], r[6], r[7]) for r in rows} == {(None, True, "google", "desktop")}
    received = rows[0][8]
    assert received.tzinfo is not None
    assert abs(received.timestamp() - time.time()) < 600


def test_a_stopping_roller_finishes_its_segment_and_starts_no_other(tmp_path):
    batches = expected_batches("s", 30)
    write_batches(tmp_path, batches, segment_max_bytes=2000)
    sealed = sealed_segments(tmp_path / "log")
    assert len(sealed) >= 3

    def stop_after_the_first(step: str) -> None:
        if step == "roll:segment_deleted":
            roller._stop.set()  # noqa: SLF001 - what stop() sets, without joining this thread

    roller = Roller(tmp_path, step_hook=stop_after_the_first)
    roller.roll_once()
    assert sealed_segments(tmp_path / "log") == sealed[1:]
    # A deadline already past starts nothing; without one, the rest is rolled.
    assert Roller(tmp_path).roll_once(stop_after=time.monotonic()) == 0
    assert sealed_segments(tmp_path / "log") == sealed[1:]
    Roller(tmp_path).roll_once()
    assert sealed_segments(tmp_path / "log") == []
    assert batch_counts(tmp_path) == batches


def test_the_final_roll_waits_for_a_reader_holding_the_roller_lock(tmp_path):
    batches = expected_batches("f", 6)
    write_batches(tmp_path, batches)
    lock = RollerLock(tmp_path)  # a reader's snapshot: released well within the wait
    threading.Timer(FINAL_ROLL_LOCK_WAIT_S / 4, lock.release).start()
    assert roll_before_exit(Settings(data_dir=tmp_path)) == sum(batches.values())
    assert sealed_segments(tmp_path / "log") == []
    assert batch_counts(tmp_path) == batches


def test_the_final_roll_leaves_the_log_to_the_next_start_if_the_lock_stays_held(tmp_path):
    write_batches(tmp_path, expected_batches("f", 6))
    sealed = sealed_segments(tmp_path / "log")
    lock = RollerLock(tmp_path)
    try:
        started = time.monotonic()
        assert roll_before_exit(Settings(data_dir=tmp_path)) == 0
        assert time.monotonic() - started >= FINAL_ROLL_LOCK_WAIT_S
    finally:
        lock.release()
    assert sealed_segments(tmp_path / "log") == sealed


def test_a_deadline_reached_inside_a_segment_leaves_it_whole_in_the_log(tmp_path, monkeypatch):
    # The final roll's budget holds whatever one segment holds: it is converted in pieces and
    # the deadline is checked before each, so a roll past it publishes nothing of the segment.
    batches = expected_batches("d", 12)
    write_batches(tmp_path, batches, segment_max_bytes=1 << 20)
    (segment,) = sealed_segments(tmp_path / "log")
    monkeypatch.setattr(roller_module, "ROLL_PIECE_BYTES", 1)  # one record per piece
    ticks = iter(range(1_000_000))
    clock = types.SimpleNamespace(monotonic=lambda: next(ticks), time=time.time)
    monkeypatch.setattr(roller_module, "time", clock)
    # Checked before the segment (0), then before each piece (1, 2, ...): stops at piece 3.
    assert Roller(tmp_path).roll_once(stop_after=3) == 0
    assert sealed_segments(tmp_path / "log") == [segment]
    assert parquet_files(tmp_path) == []
    monkeypatch.undo()
    assert Roller(tmp_path).roll_once() == sum(batches.values())
    assert batch_counts(tmp_path) == batches


def test_empty_sealed_segments_are_removed(tmp_path):
    # As an earlier version left them (every start opened a new segment).
    (tmp_path / "log").mkdir()
    for seq in (1, 2, 3):
        (tmp_path / "log" / segment_name("w0", seq)).touch()
    assert len(sealed_segments(tmp_path / "log")) == 2
    assert Roller(tmp_path).roll_once() == 0
    assert sealed_segments(tmp_path / "log") == []
    assert parquet_files(tmp_path) == []


def test_corrupt_sealed_segment_rolls_its_valid_records_and_keeps_the_rest(tmp_path):
    write_batches(tmp_path, {"a": 2, "b": 2})
    segment = sealed_segments(tmp_path / "log")[-1]
    with open(segment, "ab") as f:
        f.write(frame_record(b'{"p":"shop","r":1,"b":"x","e":[]}\n')[:-5] + b"garbage")
    assert Roller(tmp_path).roll_once() == 4
    assert batch_counts(tmp_path) == {"a": 2, "b": 2}
    assert list((tmp_path / "quarantine").iterdir())


# -- Exactly once under faults -----------------------------------------------------------------


def test_a_fault_between_any_two_roll_steps_then_recovery_gives_each_event_once(tmp_path):
    base = tmp_path / "base"
    batches = expected_batches("b", 10)
    write_batches(base, batches, segment_max_bytes=6000)  # two segments, four partitions each
    steps = record_steps(base, lambda r: r.roll_once())
    names = {name for name, _ in steps}
    assert {"roll:parquet_written", "roll:published_one", "roll:segment_deleted"} <= names
    assert ("roll:published_one", 2) in steps  # a fault between two renames is covered too
    for step in representative(steps):
        data_dir = tmp_path / f"case-{step[0].replace(':', '-')}-{step[1]}"
        shutil.copytree(base, data_dir)
        with pytest.raises(Boom):
            Roller(data_dir, step_hook=failing_at(step)).roll_once()
        # Readers see each event once in the half-done state ...
        assert batch_counts(data_dir) == batches, step
        # ... and after recovery, with the log fully rolled.
        Roller(data_dir).roll_once()
        assert batch_counts(data_dir) == batches, step
        assert sealed_segments(data_dir / "log") == []
        assert not any((data_dir / "events" / ".staging").iterdir())
        shutil.rmtree(data_dir)


def test_query_at_every_roll_step_sees_each_event_once(tmp_path):
    batches = expected_batches("q", 8)
    write_batches(tmp_path, batches)
    checked: list[str] = []

    def hook(name: str) -> None:
        assert batch_counts(tmp_path) == batches, name
        checked.append(name)

    Roller(tmp_path, step_hook=hook).roll_once()
    assert "roll:published_one" in checked and "roll:segment_deleted" in checked
    assert batch_counts(tmp_path) == batches


def test_replaying_a_rolled_segment_overwrites_instead_of_duplicating(tmp_path):
    batches = expected_batches("r", 6)
    write_batches(tmp_path, batches)
    saved = {p: p.read_bytes() for p in sealed_segments(tmp_path / "log")}
    Roller(tmp_path).roll_once()
    files_before = parquet_files(tmp_path)
    for path, data in saved.items():  # as if the unlink of the segments was lost in a crash
        path.write_bytes(data)
    Roller(tmp_path).roll_once()
    assert parquet_files(tmp_path) == files_before
    assert batch_counts(tmp_path) == batches


# -- Compaction ----------------------------------------------------------------------------------


def _many_small_files(data_dir: Path, rounds: int = 4) -> dict[str, int]:
    batches: dict[str, int] = {}
    for round_ in range(rounds):
        more = expected_batches(f"c{round_}-", 4)
        write_batches(data_dir, more)
        Roller(data_dir).roll_once()
        batches.update(more)
    return batches


def test_compaction_merges_small_files_without_changing_the_data(tmp_path):
    batches = _many_small_files(tmp_path)
    before = len(parquet_files(tmp_path))
    partitions = {p.parent for p in parquet_files(tmp_path)}
    roller = Roller(tmp_path, compact_min_files=2)
    assert roller.compact_once() == len(partitions)  # one per partition
    files = parquet_files(tmp_path)
    assert len(files) == len(partitions) < before
    assert all(p.name.startswith("c-") for p in files)
    assert batch_counts(tmp_path) == batches
    assert _empty_or_missing(tmp_path / "events" / "_compactions")


def test_compaction_merges_rolled_files_apart_from_its_own_outputs(tmp_path):
    # Tiers: an output is not rewritten each time a few new rolled files arrive beside it.
    batches = _many_small_files(tmp_path, rounds=2)
    roller = Roller(tmp_path, compact_min_files=2)
    assert roller.compact_once() >= 1
    first = {p for p in parquet_files(tmp_path) if p.name.startswith("c-")}
    assert first
    more = expected_batches("later-", 4)
    for half in (dict(list(more.items())[:2]), dict(list(more.items())[2:])):
        write_batches(tmp_path, half)
        Roller(tmp_path).roll_once()
    roller.compact_once()
    outputs = {p for p in parquet_files(tmp_path) if p.name.startswith("c-")}
    assert first < outputs  # the first outputs untouched, new ones beside them
    assert all(p.name.startswith("c-") for p in parquet_files(tmp_path))
    # Outputs are merged with each other once enough of them are there.
    roller.compact_once()
    assert len({p for p in parquet_files(tmp_path)} & first) == 0
    assert batch_counts(tmp_path) == {**batches, **more}


def test_a_fault_at_any_compaction_step_then_recovery_gives_each_event_once(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    batches = _many_small_files(base, rounds=3)
    steps = record_steps(base, lambda r: r.compact_once())
    assert {"compact:intent_written", "compact:published", "compact:inputs_deleted"} <= {
        s for s, _ in steps
    }
    # Each partition repeats the same steps: the first and the last partition are enough.
    first = [s for s in steps if s[1] == 1]
    last = [s for s in steps if s[1] == max(n for _, n in steps)]
    for step in first + last:
        data_dir = tmp_path / f"case-{step[0].replace(':', '-')}-{step[1]}"
        shutil.copytree(base, data_dir)
        with pytest.raises(Boom):
            Roller(data_dir, step_hook=failing_at(step), compact_min_files=2).compact_once()
        assert batch_counts(data_dir) == batches, step
        Roller(data_dir).recover()
        assert batch_counts(data_dir) == batches, step
        assert _empty_or_missing(data_dir / "events" / "_compactions")
        Roller(data_dir, compact_min_files=2).compact_once()
        assert batch_counts(data_dir) == batches, step
        shutil.rmtree(data_dir)


def test_query_at_every_compaction_step_sees_each_event_once(tmp_path):
    batches = _many_small_files(tmp_path, rounds=3)
    checked: list[str] = []

    def hook(name: str) -> None:
        assert batch_counts(tmp_path) == batches, name
        checked.append(name)

    Roller(tmp_path, step_hook=hook, compact_min_files=2).compact_once()
    assert "compact:published" in checked


def test_files_of_a_segment_still_in_the_log_are_never_compacted(tmp_path):
    batches = _many_small_files(tmp_path, rounds=2)
    # Put a rolled segment back, as if its deletion had not happened yet.
    write_batches(tmp_path, {"late": 2})
    segment = sealed_segments(tmp_path / "log")[-1]
    saved = segment.read_bytes()
    Roller(tmp_path).roll_once()
    segment.write_bytes(saved)
    Roller(tmp_path, compact_min_files=2).compact_once()
    stem = segment.name.rsplit(".", 1)[0]
    assert any(p.name.startswith(stem) for p in parquet_files(tmp_path))
    assert batch_counts(tmp_path) == {**batches, "late": 2}


# -- Retention ---------------------------------------------------------------------------------


def test_retention_drops_whole_partitions_that_arrived_more_than_n_days_ago(tmp_path):
    write_batches(
        tmp_path, expected_batches("t", 8), arrivals=[ARRIVALS[0], ARRIVALS[0], *ARRIVALS[1:] * 2]
    )
    Roller(tmp_path).roll_once()
    # 2026-02-18 12:00 UTC: with 1 day kept, what arrived on the 16th goes and the 17th stays,
    # whatever the events' own timestamps say.
    now = dt.datetime(2026, 2, 18, 12, tzinfo=dt.UTC).timestamp()
    roller = Roller(tmp_path, retention_days=1, clock=lambda: now)
    assert roller.apply_retention() == 2
    _, rows = run_query(
        tmp_path,
        'SELECT DISTINCT CAST(received_at AS DATE), CAST("timestamp" AS DATE) FROM events',
    )
    assert sorted(rows) == [(dt.date(2026, 2, 17), dt.date(2026, 2, 16 + i)) for i in (0, 1)]
    assert Roller(tmp_path).apply_retention() == 0  # retention off by default


def test_retention_keeps_what_arrived_inside_the_window_whatever_its_timestamp(tmp_path):
    # Acknowledged now, stamped in the distant past and future: one file per project, and
    # retention counts from the arrival, so none of it is dropped the moment it is rolled.
    stamps = ["0001-01-01T00:00:00Z", "2020-03-01T12:00:00Z", "9999-12-31T23:59:59Z"]
    stamps += [f"{year}-06-01T00:00:00Z" for year in range(2000, 2019)]
    batches = {"spread": len(stamps)}
    write_batches(tmp_path, batches, timestamps=stamps)
    roller = Roller(tmp_path, retention_days=30)
    assert roller.roll_once() == len(stamps)
    assert len(parquet_files(tmp_path)) == 1
    assert roller.apply_retention() == 0
    assert batch_counts(tmp_path) == batches


def test_retention_reads_the_arrival_times_of_a_partition_dated_by_event_time(tmp_path):
    # A data directory from before the layout by arrival: its date= is the events' own date.
    stamps = ["2020-03-01T12:00:00Z"]
    write_batches(tmp_path, {"legacy": 2, "old": 2}, timestamps=stamps)
    Roller(tmp_path).roll_once()
    for path in parquet_files(tmp_path):
        legacy = path.parent.parent / "date=2020-03-01"
        legacy.mkdir(exist_ok=True)
        path.rename(legacy / path.name)
        path.parent.rmdir()
    assert Roller(tmp_path, retention_days=30).apply_retention() == 0
    assert batch_counts(tmp_path) == {"legacy": 2, "old": 2}
    # Once everything in it arrived before the window, it goes.
    later = time.time() + 40 * 86_400
    assert Roller(tmp_path, retention_days=30, clock=lambda: later).apply_retention() == 2
    assert batch_counts(tmp_path) == {}


# -- SIGKILL -----------------------------------------------------------------------------------


def _parse_acks(lines: list[bytes]) -> dict[str, int]:
    acked: dict[str, int] = {}
    for line in lines:
        if line.endswith(b"\n"):  # a line cut by the kill was never fully reported
            _, batch, count = line.decode().split()
            acked[batch] = int(count)
    return acked


def _run_writer(data_dir: Path, seed: int, while_running) -> dict[str, int]:
    """Start the crash writer, call ``while_running(lines)``, SIGKILL it; return the acks."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.storage_helpers", "crash-writer", str(data_dir), str(seed)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    lines: list[bytes] = []
    first_ack = threading.Event()

    def reader() -> None:
        for line in proc.stdout:
            lines.append(line)
            first_ack.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert first_ack.wait(30), "crash writer never acknowledged a batch"
        while_running(lines)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        thread.join(30)
    acked = _parse_acks(lines)
    assert acked
    return acked


def _kill_writer_once(data_dir: Path, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    # The random kill moment: rotations and rolls happen every few tens of ms.
    return _run_writer(data_dir, seed, lambda lines: time.sleep(rng.uniform(0.05, 0.8)))


def _check_acked_exactly_once(data_dir: Path, acked: dict[str, int]) -> None:
    counts = batch_counts(data_dir)
    missing = {b: n for b, n in acked.items() if counts.get(b) != n}
    assert not missing, f"acked batches lost or duplicated: {list(missing.items())[:5]}"
    # Unacknowledged batches may or may not have made it, but only ever whole and once.
    _, rows = run_query(
        data_dir,
        "SELECT anonymous_id FROM events GROUP BY ALL "
        "HAVING count(*) <> count(DISTINCT session_id) "
        "OR max(CAST(split_part(session_id, '-', -1) AS INT)) + 1 <> count(*)",
    )
    assert rows == []


def _restart_recovery(data_dir: Path) -> None:
    log = CommitLog(data_dir)
    log.open()
    log._close_and_seal()  # noqa: SLF001
    Roller(data_dir).roll_once()


def _crash_cycles(data_dir: Path, cycles: int, seed: int) -> None:
    acked: dict[str, int] = {}
    for cycle in range(cycles):
        new = _kill_writer_once(data_dir, seed * 1000 + cycle)
        acked.update(new)
        _check_acked_exactly_once(data_dir, acked)  # before any recovery: query copes alone
        _restart_recovery(data_dir)
        _check_acked_exactly_once(data_dir, acked)
    live = list_segments(data_dir / "log")
    assert all(len(segs) == 1 for segs in live.values())


def test_sigkill_during_appends_and_rolls_loses_no_acked_batch(tmp_path):
    _crash_cycles(tmp_path, cycles=1, seed=int(os.environ.get("CRASH_SEED", "7")))


@pytest.mark.slow
def test_sigkill_many_cycles(tmp_path):
    _crash_cycles(tmp_path, cycles=12, seed=int(os.environ.get("CRASH_SEED", "11")))


def test_a_second_roller_process_stands_aside(tmp_path):
    write_batches(tmp_path, {"a": 2})
    holder, other = Roller(tmp_path), Roller(tmp_path)
    with holder._exclusive() as mine:  # noqa: SLF001 - as another process would hold it
        assert mine
        assert other.roll_once() == 0
        assert sealed_segments(tmp_path / "log")
    assert other.roll_once() == 2
    assert batch_counts(tmp_path) == {"a": 2}


def test_background_roller_converts_sealed_segments_and_stops(tmp_path):
    write_batches(tmp_path, {"bg1": 3, "bg2": 4})
    roller = Roller(tmp_path, roll_interval_s=0.01)
    roller.start()
    try:
        poll_until(lambda: sealed_segments(tmp_path / "log") == [], ROLL_DEADLINE_S, 0.01)
    finally:
        roller.stop()
    assert roller.events_rolled == 7 and roller.errors == 0
    assert batch_counts(tmp_path) == {"bg1": 3, "bg2": 4}


def test_a_record_duckdb_cannot_read_is_quarantined_not_wedging_the_roller(tmp_path):
    batches = expected_batches("good", 9)
    write_batches(tmp_path, batches, segment_max_bytes=1 << 20)
    segment = sealed_segments(tmp_path / "log")[-1]
    poison = [
        b'{"p":"shop","r":1,"b":"x","e":[{"eventName":"x","consentGiven":"maybe"}]}\n',
        b'{"p":"shop","r":1,"b":"x","e":5}\n',
    ]
    with open(segment, "ab") as f:
        f.write(frame_record(poison[0]))
        f.write(frame_record(poison[1]))
    assert Roller(tmp_path).roll_once() == sum(batches.values())
    assert sealed_segments(tmp_path / "log") == []
    assert batch_counts(tmp_path) == batches
    kept = b"".join(p.read_bytes() for p in (tmp_path / "quarantine").iterdir())
    # Not JSON of a record's shape (event_lines.py) and not typeable by DuckDB: two finds.
    assert sorted(kept.splitlines(keepends=True)) == sorted(poison)


def test_events_past_retention_are_not_written_by_the_roll(tmp_path):
    write_batches(tmp_path, expected_batches("old", 4), arrivals=ARRIVALS)
    # 2026-02-18 12:00 UTC with one day kept: only the events that arrived on the 17th are
    # written.
    now = dt.datetime(2026, 2, 18, 12, tzinfo=dt.UTC).timestamp()
    converted = Roller(tmp_path, retention_days=1, clock=lambda: now).roll_once()
    _, rows = run_query(tmp_path, "SELECT count(*), min(CAST(received_at AS DATE)) FROM events")
    assert rows == [(converted, dt.date(2026, 2, 17))]
    assert 0 < converted < sum(expected_batches("old", 4).values())


def test_damage_inside_a_sealed_segment_costs_only_the_damaged_record(tmp_path):
    write_batches(tmp_path, {"a": 2, "b": 2, "c": 2}, segment_max_bytes=1 << 20)
    segment = sealed_segments(tmp_path / "log")[-1]
    data = bytearray(segment.read_bytes())
    start, end = scan_segment(bytes(data)).records[1]
    data[start + 20] ^= 0x01
    segment.write_bytes(bytes(data))
    assert Roller(tmp_path).roll_once() == 4
    assert batch_counts(tmp_path) == {"a": 2, "c": 2}
    quarantined = b"".join(p.read_bytes() for p in (tmp_path / "quarantine").iterdir())
    assert quarantined == bytes(data[start:end])


def _kill_at(data_dir: Path, action: str, step: tuple[str, int]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.storage_helpers", "roll-and-die", str(data_dir), action]
        + [step[0], str(step[1])],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def _sigkill_at_steps(tmp_path: Path, action: str, pick) -> None:
    base = tmp_path / "base"
    base.mkdir()
    if action == "roll":
        batches = expected_batches("k", 10)
        write_batches(base, batches, segment_max_bytes=6000)
        steps = record_steps(base, lambda r: r.roll_once())
    else:
        batches = _many_small_files(base, rounds=2)
        steps = record_steps(base, lambda r: r.compact_once())
    for step in pick(steps):
        data_dir = tmp_path / f"case-{step[0].replace(':', '-')}-{step[1]}"
        shutil.copytree(base, data_dir)
        _kill_at(data_dir, action, step)
        assert batch_counts(data_dir) == batches, step
        Roller(data_dir, compact_min_files=2).roll_once()
        Roller(data_dir, compact_min_files=2).compact_once()
        assert batch_counts(data_dir) == batches, step
        assert sealed_segments(data_dir / "log") == []
        shutil.rmtree(data_dir)


def test_sigkill_between_two_renames_of_a_roll(tmp_path):
    _sigkill_at_steps(tmp_path, "roll", lambda steps: [("roll:published_one", 2)])


@pytest.mark.slow
@pytest.mark.parametrize("action", ["roll", "compact"])
def test_sigkill_at_every_step(tmp_path, action):
    _sigkill_at_steps(tmp_path, action, lambda steps: steps)


def test_backlog_reports_what_waits_for_the_roller(tmp_path):
    roller = Roller(tmp_path)
    assert roller.backlog() == {"segments": 0, "bytes": 0, "oldest_age_s": 0.0}
    write_batches(tmp_path, {"a": 2, "b": 2}, segment_max_bytes=500)
    waiting = sealed_segments(tmp_path / "log")
    backlog = roller.backlog()
    assert backlog["segments"] == len(waiting) >= 2
    assert backlog["bytes"] == sum(p.stat().st_size for p in waiting)
    roller.roll_once()
    assert roller.backlog()["segments"] == 0


def test_queries_during_live_appends_rolls_and_compactions_see_each_event_once(tmp_path):
    checked = []

    def query_repeatedly(lines: list[bytes]) -> None:
        started = time.monotonic()
        # At least 3 s and 3 queries (a loaded machine makes each query slower), at most 30 s.
        while (time.monotonic() - started < 3 or len(checked) < 3) and (
            time.monotonic() - started < 30
        ):
            acked_before = _parse_acks(list(lines))
            _check_acked_exactly_once(tmp_path, acked_before)
            checked.append(len(acked_before))

    _run_writer(tmp_path, 5, query_repeatedly)
    assert len(checked) >= 3 and checked[-1] > checked[0]


@pytest.mark.parametrize("reconnect_above", [0, 1 << 62], ids=["above-the-mark", "below"])
def test_the_background_roller_drops_its_connection_once_it_holds_too_much(
    tmp_path, monkeypatch, reconnect_above
):
    """A DuckDB connection keeps what its statements allocated; each pass's peak came on top
    of it (the roller's peak crept from ~130 to ~170 MB in a 5-minute sustained run). Above
    RECONNECT_ABOVE_RSS_BYTES the connection is closed after the pass, and the next pass
    opens a new one; below it, the connection (~20 ms of CPU to open) is kept."""
    connects = []

    def counting_connect(**kwargs):
        connects.append(kwargs)
        return connect_duckdb(**kwargs)

    monkeypatch.setattr(roller_module, "connect_duckdb", counting_connect)
    monkeypatch.setattr(roller_module, "RECONNECT_ABOVE_RSS_BYTES", reconnect_above)
    roller = Roller(tmp_path, roll_interval_s=0.01)
    roller.start()
    try:
        for n, batches in enumerate(({"c1": 3}, {"c2": 4})):
            write_batches(tmp_path, batches)
            poll_until(lambda: sealed_segments(tmp_path / "log") == [], ROLL_DEADLINE_S, 0.01)
            if reconnect_above == 0:
                poll_until(lambda: roller._con is None, ROLL_DEADLINE_S, 0.01)  # noqa: SLF001
                assert len(connects) == n + 1
            else:
                assert roller._con is not None and len(connects) == 1  # noqa: SLF001
    finally:
        roller.stop()
    assert roller.events_rolled == 7 and roller.errors == 0
    assert batch_counts(tmp_path) == {"c1": 3, "c2": 4}
