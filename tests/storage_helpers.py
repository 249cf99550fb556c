"""Shared test code for the commit log, roller and query tests (real files, real DuckDB).

Also runnable as the SIGKILL victim: ``python -m tests.storage_helpers crash-writer DIR SEED``
appends concurrent batches with the roller running and prints ``ACK <batch id> <count>`` to
stdout after each on_done(None).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import signal
import sys
import threading
from pathlib import Path

import orjson

from inslytic_fast.log.format import list_segments
from inslytic_fast.log.writer import CommitLog
from inslytic_fast.storage.query import run_query
from inslytic_fast.storage.roller import Roller

BASE_EVENT = {
    "eventName": "page_viewed",
    "timestamp": "2026-02-16T10:30:00.000Z",
    "anonymousId": "anon-123",
    "sessionId": "sess-456",
    "consentGiven": True,
    "userId": None,
    "properties": {"path": "/pricing"},
    "pageUrl": "https://example.com/pricing",
    "pageTitle": "Pricing",
    "referrer": "https://www.google.com/",
    "utmSource": "google",
    "utmMedium": "cpc",
    "utmCampaign": None,
    "deviceType": "desktop",
    "browser": "Firefox",
    "os": "Linux",
}


def make_events(batch_id: str, count: int, *, timestamps: list[str] | None = None) -> bytes:
    """A batch as schema.encode_events would produce it; anonymousId carries the batch id."""
    events = []
    for i in range(count):
        event = dict(BASE_EVENT)
        event["anonymousId"] = batch_id
        event["sessionId"] = f"{batch_id}-{i}"
        if timestamps is not None:
            event["timestamp"] = timestamps[i % len(timestamps)]
        events.append(event)
    return orjson.dumps(events)


def event_count(data_dir: Path, where: str = "TRUE") -> int:
    return run_query(data_dir, f"SELECT count(*) FROM events WHERE {where}")[1][0][0]


def batch_counts(data_dir: Path) -> dict[str, int]:
    """Events per batch id, and asserts no event id is seen twice."""
    columns, rows = run_query(
        data_dir,
        "SELECT anonymous_id, count(*), count(DISTINCT event_id) FROM events GROUP BY ALL",
    )
    for batch, total, distinct in rows:
        assert total == distinct, f"batch {batch}: duplicate event ids"
    return {batch: total for batch, total, _ in rows}


class LogOnLoop:
    """A CommitLog opened and started on a real asyncio loop, driven from async tests."""

    def __init__(self, log: CommitLog) -> None:
        self.log = log
        self.loop_thread_ids: list[int] = []

    def append(self, project: str, batch_id: str, count: int = 3, **kwargs) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()

        def on_done(exc: BaseException | None) -> None:
            self.loop_thread_ids.append(threading.get_ident())
            fut.set_result(exc)

        self.log.append(project, make_events(batch_id, count, **kwargs), count, on_done)
        return fut


class RollerLock:
    """Holds the roller's process lock, so the server's roller leaves sealed segments alone."""

    def __init__(self, data_dir: Path) -> None:
        events = data_dir / "events"
        events.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(events / ".roller.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        os.close(self.fd)


def as_after_a_crash(data_dir: Path, worker_id: str = "w0") -> None:
    """Remove the empty successor a clean close creates to seal the last segment: the log as
    a SIGKILL after the last sync leaves it (that segment still the active one)."""
    newest = list_segments(data_dir / "log")[worker_id][-1]
    assert newest.stat().st_size == 0, newest
    newest.unlink()


def open_log(data_dir: Path, **kwargs) -> CommitLog:
    log = CommitLog(data_dir, **kwargs)
    log.open()
    log.start(asyncio.get_running_loop())
    return log


# -- SIGKILL victim ------------------------------------------------------------------------

CRASH_PRODUCERS = 8
CRASH_BATCH_EVENTS = 20


async def crash_writer(data_dir: Path, seed: int) -> None:
    rng = random.Random(seed)
    # Small segments so rotations and rolls happen all the time while we are killed.
    log = CommitLog(data_dir, segment_max_bytes=256 * 1024, segment_max_age_s=0.2)
    log.open()
    log.start(asyncio.get_running_loop())
    roller = Roller(data_dir, roll_interval_s=0.05, compact_interval_s=0.3, compact_min_files=4)
    roller.start()
    out = sys.stdout

    async def producer(n: int) -> None:
        i = 0
        while True:
            batch_id = f"s{seed}-p{n}-{i}"
            count = rng.randint(1, CRASH_BATCH_EVENTS)
            fut = asyncio.get_running_loop().create_future()
            try:
                log.append("shop", make_events(batch_id, count), count, fut.set_result)
            except Exception:
                await asyncio.sleep(0.01)
                continue
            if await fut is None:
                out.write(f"ACK {batch_id} {count}\n")
                out.flush()
            i += 1

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.1)
            log.tick()

    await asyncio.gather(ticker(), *(producer(n) for n in range(CRASH_PRODUCERS)))


def roll_and_die(data_dir: Path, action: str, step: str, occurrence: int) -> None:
    """Run a roll or compaction and SIGKILL this process at the given step."""
    seen: dict[str, int] = {}

    def hook(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        if (name, seen[name]) == (step, occurrence):
            os.kill(os.getpid(), signal.SIGKILL)

    roller = Roller(data_dir, step_hook=hook, compact_min_files=2)
    roller.roll_once() if action == "roll" else roller.compact_once()
    print("step never reached", file=sys.stderr)
    os._exit(3)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "crash-writer":
        asyncio.run(crash_writer(Path(sys.argv[2]), int(sys.argv[3])))
    elif len(sys.argv) == 6 and sys.argv[1] == "roll-and-die":
        roll_and_die(Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        print(
            "usage: python -m tests.storage_helpers crash-writer DIR SEED\n"
            "       python -m tests.storage_helpers roll-and-die DIR roll|compact STEP N",
            file=sys.stderr,
        )
        os._exit(2)
