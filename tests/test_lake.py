"""The lake uploader against a real S3 API (SeaweedFS), with real rolled Parquet files.

Exactly once, whatever step an upload pass dies at; verification before a local delete; the
object store stopped and restarted; multipart for large files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from pathlib import Path

import duckdb
import orjson
import pytest

from inslytic_fast.lake.layout import object_key
from inslytic_fast.lake.objectstore import MULTIPART_PART_BYTES, S3ObjectStore, UploadMismatch
from inslytic_fast.lake.status import read_status
from inslytic_fast.lake.uploader import Uploader, finished_files
from inslytic_fast.storage.events_sql import sql_string
from inslytic_fast.storage.roller import Roller

from .adversarial_helpers import metric, poll_until
from .cluster_servers import S3_CREDENTIALS, SeaweedProcess, ValkeyProcess, lake_serve_args
from .conftest import EXAMPLE_EVENT, cli
from .storage_helpers import LogOnLoop, open_log

pytest.importorskip("obstore")

UPLOAD_STEPS = ("upload:start", "upload:put", "upload:verified", "upload:local_deleted")
TIMESTAMPS = ["2026-02-16T10:30:00.000Z", "2026-02-17T08:00:00.000Z"]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory):
    server = SeaweedProcess(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.kill()


@pytest.fixture(autouse=True)
def s3_credentials(monkeypatch):
    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)


def lake(seaweed: SeaweedProcess, prefix: str) -> S3ObjectStore:
    return S3ObjectStore(f"s3://{seaweed.bucket}/{prefix}", seaweed.endpoint)


def rolled_data_dir(data_dir: Path, batches: int = 12) -> int:
    """Batches for two projects and two dates, rolled to Parquet; returns the event count."""

    async def main():
        log = open_log(data_dir, segment_max_bytes=4000)
        driver = LogOnLoop(log)
        for n in range(batches):
            project = "shop" if n % 2 else "blog"
            assert await driver.append(project, f"b{n}", 1 + n % 5, timestamps=TIMESTAMPS) is None
        await log.close()

    asyncio.run(main())
    Roller(data_dir).roll_once()
    return sum(1 + n % 5 for n in range(batches))


def lake_rows(store: S3ObjectStore, scratch: Path) -> tuple[dict[str, int], int]:
    """Objects under events/ (key -> count of that key) and the rows they hold."""
    keys: dict[str, int] = {}
    scratch.mkdir(parents=True, exist_ok=True)
    files = []
    for info in store.list("events/"):
        keys[info.key] = keys.get(info.key, 0) + 1
        local = scratch / info.key.replace("/", "__")
        store.get_file(info.key, local)
        files.append(local)
    if not files:
        return keys, 0
    listing = "[" + ", ".join(sql_string(f) for f in files) + "]"
    sql = f"SELECT count(*) FROM read_parquet({listing})"
    rows = duckdb.connect().execute(sql).fetchall()[0][0]
    return keys, rows


def test_finished_files_land_once_under_the_hive_path_and_leave_the_node(seaweed, tmp_path):
    data_dir = tmp_path / "node"
    events = rolled_data_dir(data_dir)
    files = finished_files(data_dir)
    assert len(files) >= 4 and {f.relative.split("/")[0] for f in files} == {
        "project=blog",
        "project=shop",
    }
    store = lake(seaweed, "once")
    assert Uploader(store, data_dir, "edge-1").upload_once() == len(files)
    keys, rows = lake_rows(store, tmp_path / "scratch")
    assert sorted(keys) == sorted(object_key("edge-1", f.relative) for f in files)
    assert all(k.startswith("events/project=") and "/edge-1-" in k for k in keys)
    assert rows == events
    assert finished_files(data_dir) == []
    assert not list((data_dir / "events").glob("project=*/*/*.parquet"))


@pytest.mark.parametrize("step", UPLOAD_STEPS)
@pytest.mark.parametrize("occurrence", [1, 2])
def test_a_crash_at_any_upload_step_converges_to_one_object_per_file(
    seaweed, tmp_path, step, occurrence
):
    data_dir = tmp_path / "node"
    events = rolled_data_dir(data_dir)
    files = finished_files(data_dir)
    store = lake(seaweed, f"crash-{step.replace(':', '-')}-{occurrence}")
    seen: dict[str, int] = {}

    def hook(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        if (name, seen[name]) == (step, occurrence):
            raise Crash(name)

    with pytest.raises(Crash):
        Uploader(store, data_dir, "edge-1", step_hook=hook).upload_once()
    Uploader(store, data_dir, "edge-1").upload_once()  # the restarted node
    keys, rows = lake_rows(store, tmp_path / "scratch")
    assert sorted(keys) == sorted(object_key("edge-1", f.relative) for f in files)
    assert set(keys.values()) == {1}
    assert rows == events
    assert finished_files(data_dir) == []


def test_an_object_that_is_not_this_file_keeps_the_local_copy(seaweed, tmp_path):
    data_dir = tmp_path / "node"
    rolled_data_dir(data_dir, batches=2)
    first = finished_files(data_dir)[0]
    store = lake(seaweed, "mismatch")
    store.put_bytes(object_key("edge-1", first.relative), b"another node's bytes")
    with pytest.raises(UploadMismatch, match="--node-id"):
        Uploader(store, data_dir, "edge-1").upload_once()
    assert first.path.exists()


def test_a_large_file_goes_up_in_parts_and_is_verified(seaweed, tmp_path):
    data_dir = tmp_path / "node"
    partition = data_dir / "events" / "project=big" / "date=2026-02-16"
    partition.mkdir(parents=True)
    big = partition / "c-00000000000000000001-abcdef12.parquet"
    big.write_bytes(os.urandom(2 * MULTIPART_PART_BYTES + 12345))
    store = lake(seaweed, "multipart")
    assert Uploader(store, data_dir, "edge-1").upload_once() == 1
    info = store.head(object_key("edge-1", "project=big/date=2026-02-16/" + big.name))
    assert info.size == 2 * MULTIPART_PART_BYTES + 12345
    assert info.etag.endswith("-3")  # three parts, checked against this node's MD5s
    assert not big.exists()


def test_object_store_down_files_wait_then_uploads_resume(seaweed, tmp_path):
    data_dir = tmp_path / "node"
    events = rolled_data_dir(data_dir)
    files = finished_files(data_dir)
    store = lake(seaweed, "outage")
    uploader = Uploader(store, data_dir, "edge-1")
    seaweed.stop()
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever the client raises, nothing moves
            uploader.upload_once()
        assert len(finished_files(data_dir)) == len(files)
        status = uploader.status()
        assert status["pending_files"] == len(files)
        assert status["pending_bytes"] == sum(f.size for f in files)
    finally:
        seaweed.start()
    assert uploader.upload_once() == len(files)
    keys, rows = lake_rows(store, tmp_path / "scratch")
    assert len(keys) == len(files) and rows == events
    shutil.rmtree(tmp_path / "scratch")


# Nodes with --lake, end to end -----------------------------------------------------------------


def lake_count(seaweed, prefix: str, data_dir: Path, node_id: str, env) -> int:
    out = cli(
        "query",
        "SELECT count(*) AS n FROM events",
        "--format",
        "csv",
        "--lake",
        f"s3://{seaweed.bucket}/{prefix}",
        "--s3-endpoint",
        seaweed.endpoint,
        *(("--node-id", node_id) if node_id else ()),
        data_dir=data_dir,
        env=env,
    )
    return int(out.stdout.splitlines()[1])


def test_two_nodes_upload_everything_and_query_lake_sees_each_event_once(
    seaweed, make_server, tmp_path
):
    env = {**os.environ, **S3_CREDENTIALS, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    prefix = "e2e"
    nodes = [
        make_server(*lake_serve_args(seaweed, prefix, f"n{i}", 1 + i), env=env) for i in range(2)
    ]
    sent = 0
    for _ in range(30):
        for node in nodes:
            status, _, _ = node.ingest([EXAMPLE_EVENT] * 5, node.first_run_key)
            assert status == 202
            sent += 5
    # A clean stop rolls the tail (a running node's log segment seals after 30 s: the slow
    # tests wait for that) and uploads it before exiting.
    for node in nodes:
        assert node.stop() == 0
        status = read_status(node.data_dir)
        assert status is not None and status["uploaded_files"] > 0
        node.start()
    for node in nodes:  # every event in the lake
        poll_until(
            lambda n=node: (
                metric(n, "inslytic_lake_pending_files") == 0
                # No --node-id: query finds the one the data dir's server used.
                and lake_count(seaweed, prefix, n.data_dir, "", env) == sent
            ),
            60,
        )
    # From a machine with no data dir at all: the lake alone has every event, once.
    assert lake_count(seaweed, prefix, tmp_path / "nowhere", "reader", env) == sent
    exported = cli(
        "export",
        "--out",
        str(tmp_path / "export"),
        "--format",
        "ndjson",
        "--lake",
        f"s3://{seaweed.bucket}/{prefix}",
        "--s3-endpoint",
        seaweed.endpoint,
        data_dir=tmp_path / "nowhere",
        env=env,
    )
    assert exported.returncode == 0
    lines = (tmp_path / "export" / "events.ndjson").read_text().splitlines()
    assert len(lines) == sent
    # The restarted nodes found nothing left to send: each stop had uploaded its files.
    assert all(metric(n, "inslytic_lake_uploaded_files_total") == 0 for n in nodes)
    assert metric(nodes[0], "inslytic_lake_errors_total") == 0


def lake_node(make_server, seaweed, prefix: str, env, workers: int = 1):
    return make_server(*lake_serve_args(seaweed, prefix, "edge-1", workers), env=env)


def ingest_some(node, batches: int = 20, per_batch: int = 5, key: str | None = None) -> int:
    for _ in range(batches):
        status, _, _ = node.ingest([EXAMPLE_EVENT] * per_batch, key or node.first_run_key)
        assert status == 202
    return batches * per_batch


def nothing_waits_locally(data_dir: Path) -> bool:
    status = read_status(data_dir)
    return finished_files(data_dir) == [] and status is not None and status["pending_files"] == 0


@pytest.mark.parametrize("workers", [1, 2])  # the server itself; a supervisor of workers
def test_a_clean_stop_uploads_the_final_roll_before_the_node_exits(
    seaweed, make_server, tmp_path, workers
):
    env = {**os.environ, **S3_CREDENTIALS}
    prefix = f"clean-stop-{workers}"
    node = lake_node(make_server, seaweed, prefix, env, workers)
    sent = ingest_some(node)
    assert node.stop() == 0
    # The node is gone: whatever is in the bucket now, it put there before exiting.
    keys, rows = lake_rows(lake(seaweed, prefix), tmp_path / "scratch")
    assert rows == sent and set(keys.values()) == {1}
    assert nothing_waits_locally(node.data_dir)


def test_a_store_unreachable_at_stop_delays_the_stop_by_the_deadline_only_and_loses_nothing(
    seaweed, make_server, tmp_path
):
    """The worst kind of down: the store's port accepts connections and never answers, so
    each request would wait for the client's 120 s timeout. The stop gives up after its
    final-pass deadline (10 s); the files wait locally and go up at the next start, once."""
    env = {**os.environ, **S3_CREDENTIALS}
    prefix = "unreachable-at-stop"
    node = lake_node(make_server, seaweed, prefix, env)
    sent = ingest_some(node)
    seaweed.stop()
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", seaweed.ports["s3.port"]))
    silent.listen(64)  # connections complete in the kernel; nobody reads or answers
    try:
        # Generous for a loaded machine, and still far below one request's 120 s timeout.
        assert node.stop(timeout=90) == 0
        assert finished_files(node.data_dir), "the final roll's files should wait locally"
    finally:
        silent.close()
        seaweed.start()
    node.start()
    poll_until(lambda: nothing_waits_locally(node.data_dir), 60)
    keys, rows = lake_rows(lake(seaweed, prefix), tmp_path / "scratch")
    assert rows == sent and set(keys.values()) == {1}


# Lake upkeep: compaction and retention, one leader --------------------------------------------


def lake_query_count(store, tmp_path: Path, node: str = "reader", data_dir: Path | None = None):
    from inslytic_fast.lake.view import LakeView
    from inslytic_fast.storage.query import run_query

    data_dir = data_dir or tmp_path / "no-data-dir"
    view = LakeView(store, node, data_dir, tmp_path / "reader-cache")
    return run_query(data_dir, "SELECT count(*) FROM events", lake=view)[1][0][0]


def uploaded_lake(seaweed, tmp_path, prefix: str, batches: int = 12) -> tuple:
    data_dir = tmp_path / "node"
    events = rolled_data_dir(data_dir, batches)
    store = lake(seaweed, prefix)
    Uploader(store, data_dir, "edge-1").upload_once()
    return store, events


PURGE_GRACE_US = 5_000_000


def events_of(batches: int) -> dict[str, int]:
    """Events per project that rolled_data_dir(batches) writes."""
    counts = {"blog": 0, "shop": 0}
    for n in range(batches):
        counts["shop" if n % 2 else "blog"] += 1 + n % 5
    return counts


def test_a_lake_purge_hides_the_rows_at_once_then_deletes_them_everywhere(seaweed, tmp_path):
    from inslytic_fast.lake.jobs import LakeJobs
    from inslytic_fast.lake.purges import record_lake_purge

    store, _ = uploaded_lake(seaweed, tmp_path, "purge")  # edge-1's files: in the lake
    waiting = tmp_path / "edge-2"  # edge-2's files: rolled, not uploaded yet
    rolled_data_dir(waiting)
    shop = 2 * events_of(12)["shop"]
    record_lake_purge(store, "blog", int(time.time() * 1_000_000) + PURGE_GRACE_US)
    # Readers: at once, in lake objects and in a node's waiting files alike.
    assert lake_query_count(store, tmp_path / "q1", "edge-2", waiting) == shop
    assert any(k.startswith("events/project=blog/") for k in lake_rows(store, tmp_path / "r")[0])
    # The next lake job deletes the objects; the node deletes its files instead of uploading.
    jobs = LakeJobs(store)
    jobs.run(jobs.compact)
    uploader = Uploader(store, waiting, "edge-2")
    uploader.upload_once()
    assert uploader.purged_files > 0 and finished_files(waiting) == []
    keys, rows = lake_rows(store, tmp_path / "raw")
    assert rows == shop  # a plain read of the bucket too
    assert keys and all(k.startswith("events/project=shop/") for k in keys)
    assert lake_query_count(store, tmp_path / "q2") == shop


def test_rows_received_after_a_lake_purge_stay(seaweed, tmp_path):
    """A project created again under the purged name after T: its rows are not covered."""
    from inslytic_fast.lake.jobs import LakeJobs
    from inslytic_fast.lake.purges import record_lake_purge

    data_dir = tmp_path / "node"
    events = rolled_data_dir(data_dir)
    store = lake(seaweed, "purge-before")
    record_lake_purge(store, "blog", int(time.time() * 1_000_000) - 3600 * 1_000_000)
    uploader = Uploader(store, data_dir, "edge-1")
    uploader.upload_once()
    assert uploader.purged_files == 0 and finished_files(data_dir) == []
    jobs = LakeJobs(store)
    jobs.run(jobs.compact)
    assert lake_rows(store, tmp_path / "raw")[1] == events
    assert lake_query_count(store, tmp_path / "q") == events


def test_a_compaction_leaves_purged_rows_out_of_its_output(seaweed, tmp_path):
    """Objects uploaded after the last purge pass (a node that had not seen the tombstone)
    are merged without the rows the tombstone covers."""
    from inslytic_fast.lake.jobs import LakeJobs
    from inslytic_fast.lake.purges import record_lake_purge

    store, _ = uploaded_lake(seaweed, tmp_path, "purge-compact")
    record_lake_purge(store, "blog", int(time.time() * 1_000_000) + PURGE_GRACE_US)
    jobs = LakeJobs(store, min_objects=2)
    jobs.lease.acquire()
    assert jobs.compact() > 0  # no apply_purges first: the merge itself must drop them
    assert lake_query_count(store, tmp_path / "q") == events_of(12)["shop"]
    jobs.recover()  # the merged inputs are gone; the outputs hold no blog row
    assert lake_rows(store, tmp_path / "raw")[1] == events_of(12)["shop"]


@pytest.fixture
def valkey(tmp_path):
    server = ValkeyProcess(tmp_path / "valkey").start()
    yield server
    server.kill()


def test_projects_delete_purge_with_coordinator_reaches_the_lake_and_the_nodes(
    seaweed, valkey, make_server, tmp_path
):
    env = {**os.environ, **S3_CREDENTIALS, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    prefix = "purge-cli"
    lake_url = f"s3://{seaweed.bucket}/{prefix}"
    args = (*lake_serve_args(seaweed, prefix, "edge-1", 1), "--coordinator", valkey.url)
    node = make_server(*args, env=env)
    blog_key = cli("projects", "create", "blog", "--coordinator", valkey.url, env=env)
    blog_key = blog_key.stdout.strip().splitlines()[-1]
    default_key = node.first_run_key
    kept = ingest_some(node)  # the default project's
    poll_until(lambda: node.ingest([], blog_key)[0] == 400, 30)  # the node knows the new key
    for _ in range(4):
        assert node.ingest([EXAMPLE_EVENT] * 5, blog_key)[0] == 202
    assert node.stop() == 0  # both projects' files go to the lake
    node.start()
    kept += ingest_some(node, batches=4, key=default_key)
    for _ in range(4):  # in the node's log, rolled and uploaded only after the purge
        assert node.ingest([EXAMPLE_EVENT] * 5, blog_key)[0] == 202

    lake_args = ("--lake", lake_url, "--s3-endpoint", seaweed.endpoint)
    purge = ("delete", "blog", "--purge", "--coordinator", valkey.url, *lake_args, "--json")
    out = orjson.loads(cli("projects", *purge, data_dir=tmp_path / "admin", env=env).stdout)
    assert out["deleted"] and out["purged"] and out["lake_objects_deleted"] > 0

    def counts() -> dict[str, int]:
        sql = "SELECT project, count(*) AS n FROM events GROUP BY ALL"
        query = cli("query", sql, "--format", "json", *lake_args, data_dir=node.data_dir, env=env)
        return {row["project"]: row["n"] for row in orjson.loads(query.stdout)}

    assert counts() == {"default": kept}  # at once: the lake, the waiting files, the log tail
    assert node.stop() == 0  # the final roll's blog rows are dropped, not uploaded
    keys, rows = lake_rows(lake(seaweed, prefix), tmp_path / "raw")
    assert rows == kept and not any("project=blog" in k for k in keys)
    assert finished_files(node.data_dir) == []
    no_lake = ("delete", "default", "--purge", "--coordinator", valkey.url)
    refused = cli("projects", *no_lake, data_dir=tmp_path / "admin", env=env, check=False)
    assert refused.returncode == 1 and "needs the cluster's --lake" in refused.stderr


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
