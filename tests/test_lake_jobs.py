"""Lake upkeep against a real S3 API (SeaweedFS): compaction and retention by one leader at
a time, crash-safe at every step; the README's DuckDB query on a copy of the lake.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import duckdb
import pytest

from inslytic_fast.lake.uploader import Uploader, finished_files

from . import test_lake as lake_tests
from .cluster_servers import S3_CREDENTIALS
from .conftest import cli
from .test_lake import (
    Crash,
    lake,
    lake_count,
    lake_query_count,
    lake_rows,
    rolled_data_dir,
    uploaded_lake,
)

pytest.importorskip("obstore")

seaweed = lake_tests.seaweed
s3_credentials = lake_tests.s3_credentials


COMPACT_STEPS = ("lake:intent_written", "lake:output_written", "lake:inputs_deleted")


@pytest.mark.parametrize("step", COMPACT_STEPS)
def test_a_compaction_killed_at_any_step_loses_and_doubles_nothing(seaweed, tmp_path, step):
    from inslytic_fast.lake.jobs import LakeJobs

    store, events = uploaded_lake(seaweed, tmp_path, f"compact-{step.replace(':', '-')}")
    before = len(list(store.list("events/")))

    def hook(name: str) -> None:
        if name == step:
            # A reader at this very moment sees every row once.
            assert lake_query_count(store, tmp_path / name) == events
            raise Crash(name)

    with pytest.raises(Crash):
        _crash_compaction(store, hook)
    assert lake_query_count(store, tmp_path / "after-crash") == events
    jobs = LakeJobs(store, min_objects=2, clock=lambda: time.time() + 3600)  # lease expired
    jobs.run(jobs.compact)
    assert lake_query_count(store, tmp_path / "after-recovery") == events
    assert len(list(store.list("events/"))) < before


def _crash_compaction(store, hook) -> None:
    from inslytic_fast.lake.jobs import LakeJobs

    jobs = LakeJobs(store, step_hook=hook, min_objects=2)
    jobs.lease.acquire()  # a crash does not release it: the next run waits for expiry
    jobs.recover()
    jobs.compact()


def test_an_upload_that_died_before_its_local_delete_is_not_sent_again_after_compaction(
    seaweed, tmp_path
):
    """Upload verified, node killed before the local delete, then a lake compaction merged
    the object (twice, in a chain): the restarted node must drop its copy, not upload it."""
    from inslytic_fast.lake.jobs import LakeJobs

    data_dir = tmp_path / "node"
    events = rolled_data_dir(data_dir)
    store = lake(seaweed, "stale-copy")

    def die_before_delete(name: str) -> None:
        if name == "upload:verified":
            raise Crash(name)

    copies = {f.path: f.path.read_bytes() for f in finished_files(data_dir)}
    for _ in copies:  # every file uploaded, none deleted locally
        with pytest.raises(Crash):
            Uploader(store, data_dir, "edge-1", step_hook=die_before_delete).upload_once()
        first = next(p for p in copies if p.exists())
        first.unlink()  # next file next pass; put the copies back afterwards
    for path, data in copies.items():
        path.write_bytes(data)
    # Each file now twice: local and in the lake. query --lake on this data dir counts it
    # once, with the node id the server recorded (no --node-id given).
    Uploader(store, data_dir, "edge-1").write_status()
    env = {**os.environ, **S3_CREDENTIALS, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert lake_count(seaweed, "stale-copy", data_dir, "", env) == events
    jobs = LakeJobs(store, min_objects=2)
    assert jobs.run(jobs.compact) > 0
    jobs.run(jobs.compact)  # outputs are small: the second run merges them further or not
    Uploader(store, data_dir, "edge-1").upload_once()
    assert finished_files(data_dir) == []
    assert lake_query_count(store, tmp_path / "q") == events
    # Not only hidden from our reader: a plain read of every object (Spark, Trino, DuckDB on
    # the bucket) counts each row once too.
    assert lake_rows(store, tmp_path / "raw")[1] == events


def test_one_leader_at_a_time_and_an_expired_lease_is_taken_over(seaweed, tmp_path):
    from inslytic_fast.lake.jobs import LakeJobs, LeaseHeld

    store = lake(seaweed, "lease")
    first = LakeJobs(store)
    first.lease.acquire()
    with pytest.raises(LeaseHeld, match="holds the lease"):
        LakeJobs(store).lease.acquire()
    later = LakeJobs(store, clock=lambda: time.time() + 3600)
    later.lease.acquire()  # the first one stalled past its expiry
    with pytest.raises(LeaseHeld, match="taken over"):
        first.lease.renew()
    later.lease.release()
    LakeJobs(store).lease.acquire()


def test_retention_drops_old_partitions_only(seaweed, tmp_path):
    from inslytic_fast.lake.jobs import LakeJobs

    store, events = uploaded_lake(seaweed, tmp_path, "retention")
    recent = [info.key for info in store.list("events/")]
    old = tmp_path / "old.parquet"
    store.get_file(recent[0], old)
    old_key = "events/project=blog/date=2020-01-01/edge-1-old.parquet"
    store.put_file(old_key, old, old.stat().st_size)
    assert lake_query_count(store, tmp_path / "q1") > events
    jobs = LakeJobs(store)
    assert jobs.run(lambda: jobs.retention(30)) == 1
    assert sorted(info.key for info in store.list("events/")) == sorted(recent)
    assert lake_query_count(store, tmp_path / "q2") == events


def test_lake_compact_command(seaweed, tmp_path):
    uploaded_lake(seaweed, tmp_path, "cli")
    env = {**os.environ, **S3_CREDENTIALS}
    args = ("--lake", f"s3://{seaweed.bucket}/cli", "--s3-endpoint", seaweed.endpoint)
    out = cli("lake", "compact", *args, env=env)
    assert out.stdout.strip() == "compact: 0 merges"  # fewer than 8 small objects per partition
    bad = cli("lake", "retention", "--days", "0", *args, env=env, check=False)
    assert bad.returncode == 2


def test_the_readme_duckdb_query_reads_a_copy_of_the_lake(seaweed, tmp_path):
    """The README's DuckDB example (httpfs is not installable offline here): the same
    read_parquet over a byte-for-byte copy of the bucket's layout, per project."""
    store, events = uploaded_lake(seaweed, tmp_path, "readme")
    copy = tmp_path / "bucket"
    for info in store.list("events/"):
        (copy / info.key).parent.mkdir(parents=True, exist_ok=True)
        store.get_file(info.key, copy / info.key)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "s3://analytics/inslytic/events/**/*.parquet" in readme
    sql = (
        f"SELECT project, count(*) FROM read_parquet('{copy}/events/**/*.parquet', "
        "hive_partitioning = true, union_by_name = true) GROUP BY ALL ORDER BY project"
    )
    rows = duckdb.connect().execute(sql).fetchall()
    assert [p for p, _ in rows] == ["blog", "shop"]
    assert sum(n for _, n in rows) == events
