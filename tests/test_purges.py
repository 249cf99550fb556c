"""`projects delete --purge`: tombstones honoured by query and the roller (real files, DuckDB)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time

import duckdb
import pytest

from inslytic_fast.log.format import sealed_segments
from inslytic_fast.log.writer import CommitLog
from inslytic_fast.storage.purges import (
    PURGE_GRACE_S,
    Purge,
    apply_purges_now,
    expired,
    find_purge,
    mark_applied,
    record_purge,
    why_name_is_blocked,
)
from inslytic_fast.storage.query import run_query
from inslytic_fast.storage.roller import Roller

from .adversarial_helpers import killed_at_fsync, poll_until
from .conftest import EXAMPLE_EVENT, cli
from .storage_helpers import LogOnLoop

BEFORE_PURGE = 1_790_000_000.0  # 2026-09-21, the clock the log stamps received_at with
PURGED_AT = BEFORE_PURGE + 10
AFTER_GRACE = PURGED_AT + PURGE_GRACE_S + 1


def append_batches(data_dir, received_at: float, batches: list[tuple[str, str, int]]) -> None:
    """Append (project, batch id, events) at a fixed receive time, then seal the segment."""

    async def main():
        log = CommitLog(data_dir, clock=lambda: received_at)
        log.open()
        log.start(asyncio.get_running_loop())
        driver = LogOnLoop(log)
        for project, batch, count in batches:
            assert await driver.append(project, batch, count) is None
        await log.close()

    asyncio.run(asyncio.wait_for(main(), timeout=60))


def applied_or_expired(events_dir, project: str) -> bool:
    """Applied; or already expired, which a roller pass does only to an applied tombstone once
    the log is past it (these tests date their events months before the segments holding
    them, so a pass that applies a tombstone may expire it at once)."""
    purge = find_purge(events_dir, project)
    return purge is None or purge.applied


def counts(data_dir) -> dict[str, int]:
    _, rows = run_query(data_dir, "SELECT project, count(*) FROM events GROUP BY ALL")
    return dict(rows)


def test_a_purge_hides_log_and_parquet_events_at_once_and_no_roll_brings_them_back(tmp_path):
    events_dir = tmp_path / "events"
    append_batches(tmp_path, BEFORE_PURGE, [("shop", "s1", 3), ("blog", "b1", 2)])
    Roller(tmp_path).roll_once()
    assert (events_dir / "project=shop").is_dir()
    # More of both in the log, not rolled yet.
    append_batches(tmp_path, BEFORE_PURGE + 1, [("shop", "s2", 4), ("blog", "b2", 1)])
    assert sealed_segments(tmp_path / "log")
    assert counts(tmp_path) == {"shop": 7, "blog": 3}

    purge = record_purge(events_dir, "shop", now=PURGED_AT)
    assert purge.received_before_us == int((PURGED_AT + PURGE_GRACE_S) * 1_000_000)
    # Queries honour it before any file is touched: Parquet and log alike.
    assert (events_dir / "project=shop").is_dir()
    assert counts(tmp_path) == {"blog": 3}

    # Applying it removes what was rolled before; the log still holds purged events.
    assert apply_purges_now(tmp_path, wait_s=5)
    assert find_purge(events_dir, "shop").applied
    assert not (events_dir / "project=shop").exists()
    assert sealed_segments(tmp_path / "log")
    # The roll drops them: nothing comes back under project=shop.
    Roller(tmp_path).roll_once()
    assert not sealed_segments(tmp_path / "log")
    assert not (events_dir / "project=shop").exists()
    assert counts(tmp_path) == {"blog": 3}

    # A project of the same name after the grace period is a new project: its events stay.
    append_batches(tmp_path, AFTER_GRACE, [("shop", "s3", 5)])
    assert counts(tmp_path) == {"blog": 3, "shop": 5}
    Roller(tmp_path).roll_once()
    assert counts(tmp_path) == {"blog": 3, "shop": 5}
    _, rows = run_query(tmp_path, "SELECT DISTINCT anonymous_id FROM events WHERE project='shop'")
    assert rows == [("s3",)]


def test_events_accepted_during_the_grace_period_are_purged_too(tmp_path):
    # Servers stop accepting a deleted project's keys at their next catalog check.
    events_dir = tmp_path / "events"
    record_purge(events_dir, "shop", now=PURGED_AT)
    append_batches(tmp_path, PURGED_AT + PURGE_GRACE_S - 0.5, [("shop", "late", 2)])
    assert counts(tmp_path) == {}
    Roller(tmp_path).roll_once()
    assert not (events_dir / "project=shop").exists()
    assert counts(tmp_path) == {}


def test_purging_again_extends_the_tombstone_and_applies_again(tmp_path):
    events_dir = tmp_path / "events"
    first = record_purge(events_dir, "shop", now=PURGED_AT)
    mark_applied(events_dir, first)
    append_batches(tmp_path, AFTER_GRACE, [("shop", "again", 2)])
    Roller(tmp_path).roll_once()
    assert counts(tmp_path) == {"shop": 2}
    second = record_purge(events_dir, "shop", now=AFTER_GRACE + 1)
    assert second.received_before_us > first.received_before_us and not second.applied
    assert counts(tmp_path) == {}
    assert apply_purges_now(tmp_path, wait_s=5)
    assert not (events_dir / "project=shop").exists()


def test_the_name_is_free_again_only_once_applied_and_past_the_grace(tmp_path):
    events_dir = tmp_path / "events"
    assert why_name_is_blocked(events_dir, "shop", now=PURGED_AT) is None
    purge = record_purge(events_dir, "shop", now=PURGED_AT)
    assert "still being purged" in why_name_is_blocked(events_dir, "shop", now=AFTER_GRACE)
    mark_applied(events_dir, purge)
    assert "free again in 5 s" in why_name_is_blocked(events_dir, "shop", now=PURGED_AT)
    assert why_name_is_blocked(events_dir, "shop", now=AFTER_GRACE) is None
    assert why_name_is_blocked(events_dir, "blog", now=PURGED_AT) is None


def test_a_purge_waits_for_the_roller_lock_and_otherwise_leaves_it_to_the_roller(tmp_path):
    events_dir = tmp_path / "events"
    append_batches(tmp_path, BEFORE_PURGE, [("shop", "s1", 3)])
    Roller(tmp_path).roll_once()
    record_purge(events_dir, "shop", now=PURGED_AT)
    roller = Roller(tmp_path)
    with roller._exclusive() as mine:  # noqa: SLF001 - a roller pass in progress
        assert mine
        assert apply_purges_now(tmp_path, wait_s=0.2) is False
        assert (events_dir / "project=shop").is_dir()
    assert counts(tmp_path) == {}
    roller.roll_once()  # the next pass applies it
    assert not (events_dir / "project=shop").exists()
    assert applied_or_expired(events_dir, "shop")


def test_purge_while_serving_keeps_the_events_out_across_restarts(make_server, tmp_path):
    data_dir = tmp_path / "live"
    shop_key = cli("projects", "create", "shop", data_dir=data_dir).stdout.split()[-1]
    blog_key = cli("projects", "create", "blog", data_dir=data_dir).stdout.split()[-1]
    server = make_server("--workers", "1", data_dir=data_dir)
    assert server.ingest([EXAMPLE_EVENT] * 3, shop_key)[0] == 202
    assert server.ingest([EXAMPLE_EVENT] * 2, blog_key)[0] == 202
    server.stop()
    server.start()  # the restart seals the log; the roller rolls it to Parquet
    wait_for(lambda: (data_dir / "events" / "project=shop").is_dir())
    assert server.ingest([EXAMPLE_EVENT] * 4, shop_key)[0] == 202  # in the log

    out = json.loads(
        cli("projects", "delete", "shop", "--purge", "--json", data_dir=data_dir).stdout
    )
    assert out["deleted"] and out["purged"] and out["files_removed"]
    assert not (data_dir / "events" / "project=shop").exists()
    assert query_counts(data_dir) == {"blog": 2}

    server.stop()
    server.start()  # seals the segment that still holds 4 purged events; the roller rolls it
    wait_for(lambda: not sealed_segments(data_dir / "log"))
    assert not (data_dir / "events" / "project=shop").exists()
    assert query_counts(data_dir) == {"blog": 2}
    # Within the grace the name is refused; after it (the restarts above may outlast 5 s on
    # a loaded machine) a new shop is created and sees none of the old one's events.
    again = cli("projects", "create", "shop", data_dir=data_dir, check=False)
    if again.returncode == 1:
        assert "was just purged" in again.stderr or "can be reused from" in again.stderr
    else:
        assert again.returncode == 0 and query_counts(data_dir) == {"blog": 2}


def query_counts(data_dir) -> dict[str, int]:
    proc = cli(
        "query",
        "SELECT project, count(*) AS n FROM events GROUP BY ALL",
        "--format",
        "json",
        data_dir=data_dir,
    )
    return {row["project"]: row["n"] for row in json.loads(proc.stdout)}


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_purge_cut_short_after_its_rename_is_finished_by_the_next_pass(tmp_path):
    # A crash between moving project=shop/ to .trash and marking the tombstone applied.
    events_dir = tmp_path / "events"
    append_batches(tmp_path, BEFORE_PURGE, [("shop", "s1", 3), ("blog", "b1", 2)])
    Roller(tmp_path).roll_once()
    record_purge(events_dir, "shop", now=PURGED_AT)
    trash = events_dir / ".trash"
    trash.mkdir()
    (events_dir / "project=shop").rename(trash / "cut-short")
    assert not find_purge(events_dir, "shop").applied
    assert counts(tmp_path) == {"blog": 2}

    roller = Roller(tmp_path)
    roller.recover()  # what a restart does first: the half-deleted files go
    assert not any(trash.iterdir())
    roller.roll_once()
    assert applied_or_expired(events_dir, "shop")
    assert counts(tmp_path) == {"blog": 2}


# Deleted projects' events and a reused name ------------------------------------------------

CRASH_EXIT = -9  # subprocess' returncode for a child killed by SIGKILL (strace passes it on)


def projects(data_dir, *args: str) -> subprocess.CompletedProcess:
    return cli("projects", *args, data_dir=data_dir, check=False)


def projects_killed_at_fsync(data_dir, when: int, *args: str) -> subprocess.CompletedProcess:
    """``projects ARGS`` SIGKILLed on entering its ``when``-th fsync."""
    cmd = [
        *killed_at_fsync(when),
        *[sys.executable, "-m", "inslytic_fast", "projects", *args, "--data-dir", str(data_dir)],
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


def shop_with_events(data_dir) -> None:
    """Project shop with 3 events in Parquet and 4 still in the log."""
    assert projects(data_dir, "create", "shop").returncode == 0
    append_batches(data_dir, BEFORE_PURGE, [("shop", "s1", 3), ("blog", "b1", 2)])
    Roller(data_dir).roll_once()
    append_batches(data_dir, BEFORE_PURGE + 1, [("shop", "s2", 4)])
    assert counts(data_dir) == {"shop": 7, "blog": 2}


def test_a_name_deleted_without_purge_cannot_be_reused_while_its_events_remain(tmp_path):
    """Before: `delete shop` then `create shop` gave the new project the old one's 7 events."""
    shop_with_events(tmp_path)
    assert projects(tmp_path, "delete", "shop").returncode == 0
    refused = projects(tmp_path, "create", "shop")
    assert refused.returncode == 1
    assert "delete shop --purge" in refused.stderr
    # Purging the deleted project's data is allowed, and then the name is free again.
    assert projects(tmp_path, "delete", "shop", "--purge").returncode == 0
    poll_until(lambda: projects(tmp_path, "create", "shop").returncode == 0, PURGE_GRACE_S + 30)
    assert counts(tmp_path) == {"blog": 2}


def key_is_served(server, key: str) -> bool:
    """Whether the server takes ``key`` (a body it refuses, so nothing is stored: 400 for a
    known key, 401 for an unknown one)."""
    status = server.request("POST", "/v1/ingest", b'{"events":1}', key=key)[0]
    assert status in (400, 401), status
    return status == 400


def test_a_name_deleted_moments_ago_is_not_reused_while_servers_may_take_its_old_key(
    make_server, tmp_path
):
    """Before: `delete shop` (shop had no events yet) then `create shop` at once succeeded while
    the running server still took shop's old key until its next catalog reload: an event sent
    with it in that window went to the new shop."""
    data_dir = tmp_path / "live"
    server = make_server("--workers", "1", data_dir=data_dir)
    old_key = projects(data_dir, "create", "shop").stdout.split()[-1]
    poll_until(lambda: key_is_served(server, old_key), 60)
    deleted = projects(data_dir, "delete", "shop")
    assert deleted.returncode == 0 and "can be created again from" in deleted.stdout
    refused = projects(data_dir, "create", "shop")
    assert refused.returncode == 1, refused.stdout
    assert "may still accept its old keys" in refused.stderr
    assert "can be reused from" in refused.stderr
    poll_until(lambda: not key_is_served(server, old_key), 60)
    created = poll_until(
        lambda: (p := projects(data_dir, "create", "shop")).returncode == 0 and p, 60
    )
    new_key = created.stdout.split()[-1]
    poll_until(lambda: key_is_served(server, new_key), 60)
    assert server.ingest([EXAMPLE_EVENT], new_key)[0] == 202
    assert query_counts(data_dir) == {"shop": 1}


@needs_strace
def test_delete_purge_killed_at_any_step_never_hands_old_events_to_a_new_project(tmp_path):
    """Before: killed after the catalog write and before the tombstone, the project was gone,
    its events stayed, and `create shop` at once saw all 7."""
    template = tmp_path / "template"
    shop_with_events(template)
    for when in range(1, 100):
        data_dir = tmp_path / f"kill-{when}"
        shutil.copytree(template, data_dir)
        run = projects_killed_at_fsync(data_dir, when, "delete", "shop", "--purge")
        if run.returncode == 0:
            assert when > 2, "no fsync was reached: strace did not inject"
            break
        assert run.returncode == 128 + 9 or run.returncode == CRASH_EXIT, run.stderr
        if projects(data_dir, "create", "shop").returncode == 0:
            assert counts(data_dir).get("shop", 0) == 0, f"killed at fsync {when}"
        # And the purge can always be finished by running it again.
        assert projects(data_dir, "delete", "shop", "--purge").returncode == 0, when
        assert counts(data_dir) == {"blog": 2}
    else:
        raise AssertionError("delete --purge never finished")


def test_a_project_named_like_the_hive_null_partition_is_refused_and_old_files_purged(tmp_path):
    """Before: DuckDB wrote such a project under project=%5F_HIVE_DEFAULT_PARTITION__, purge
    looked for the plain name, reported it gone and left the files."""
    refused = projects(tmp_path, "create", "__HIVE_DEFAULT_PARTITION__")
    assert refused.returncode == 1 and "NULL" in refused.stderr
    # Files an older release wrote for such a project, which was then deleted without purge.
    events_dir = tmp_path / "events"
    events_dir.mkdir(parents=True)
    con = duckdb.connect()
    con.execute(
        "COPY (SELECT '__HIVE_DEFAULT_PARTITION__' AS project, 1 AS x) TO ? "
        "(FORMAT parquet, PARTITION_BY (project))",
        [str(events_dir)],
    )
    escaped = events_dir / "project=%5F_HIVE_DEFAULT_PARTITION__"
    assert escaped.is_dir()
    purge = projects(tmp_path, "delete", "__HIVE_DEFAULT_PARTITION__", "--purge")
    assert purge.returncode == 0, purge.stderr
    assert not escaped.exists()


# Tombstones expire ---------------------------------------------------------------------------

HOUR_US = 3600 * 1_000_000


def test_an_applied_tombstone_expires_only_once_the_log_is_past_it():
    t = 1_790_000_000 * 1_000_000
    purge = Purge("shop", t, applied=True)
    now = t / 1e6 + 7200
    assert expired(purge, [t + 2 * HOUR_US], now)
    assert expired(purge, [], now)
    assert not expired(Purge("shop", t, applied=False), [], now), "not applied yet"
    assert not expired(purge, [t - 1, t + 2 * HOUR_US], now), "a segment may hold its events"
    assert not expired(purge, [t + 10], now), "within the margin for a clock stepped back"
    assert not expired(purge, [], t / 1e6 + 60), "T + margin not reached"


def test_the_roller_deletes_tombstones_nothing_needs_any_more(tmp_path):
    """Before: tombstones were never deleted (2,000 of them cost every query 0.8 s)."""
    events_dir = tmp_path / "events"
    long_ago = time.time() - 3 * 3600
    append_batches(tmp_path, long_ago - 60, [("shop", "s1", 3), ("blog", "b1", 2)])
    record_purge(events_dir, "shop", now=long_ago)
    fresh = record_purge(events_dir, "blog", now=time.time())
    Roller(tmp_path).roll_once()  # rolls (dropping shop's events), applies both, expires one
    assert find_purge(events_dir, "shop") is None
    assert find_purge(events_dir, "blog") == Purge("blog", fresh.received_before_us, True)
    assert counts(tmp_path) == {}


def test_recording_a_purge_reads_only_its_own_tombstone(tmp_path):
    """Before: record_purge read every tombstone (writing 2,000 took 94.5 s); here another
    project's tombstone is unreadable and recording this one does not care."""
    events_dir = tmp_path / "events"
    record_purge(events_dir, "blog")
    (events_dir / "_purges" / "blog.json").write_bytes(b"{not json")
    assert record_purge(events_dir, "shop").project == "shop"
    assert find_purge(events_dir, "shop").project == "shop"
