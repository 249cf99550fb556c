"""The lake uploader against a real S3 API (SeaweedFS), with real rolled Parquet files.

Exactly once, whatever step an upload pass dies at; verification before a local delete; the
object store stopped and restarted; large files in one PUT; nodes with --lake end to end,
including what a clean stop uploads (a stop during a slow upload: test_cluster_lake_stop.py).
Lake jobs and purges: test_lake_jobs.py, test_lake_purges.py (they share this file's fixtures
and helpers).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

import duckdb
import pytest

from inslytic_fast.lake.layout import object_key
from inslytic_fast.lake.objectstore import (
    MULTIPART_PART_BYTES,
    S3ObjectStore,
    UploadMismatch,
    expected_etag,
)
from inslytic_fast.lake.status import read_status
from inslytic_fast.lake.uploader import Uploader, finished_files
from inslytic_fast.storage.events_sql import sql_string
from inslytic_fast.storage.roller import Roller

from .adversarial_helpers import metric, poll_until
from .cluster_servers import S3_CREDENTIALS, SeaweedProcess, lake_serve_args
from .conftest import EXAMPLE_EVENT, cli, free_port
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


BIG_RELATIVE = "project=big/date=2026-02-16/c-00000000000000000001-abcdef12.parquet"
BIG_SIZE = 2 * MULTIPART_PART_BYTES + 12345  # sent in parts, that is three


def big_waiting_file(data_dir: Path) -> Path:
    """A finished file of random bytes over two multipart parts, waiting for its upload."""
    big = data_dir / "events" / BIG_RELATIVE
    big.parent.mkdir(parents=True)
    big.write_bytes(os.urandom(BIG_SIZE))
    return big


def test_a_large_file_goes_up_in_one_put_and_is_verified(seaweed, tmp_path):
    """One PUT, not parts: a PUT cut off leaves nothing (test_cluster_lake_stop.py)."""
    data_dir = tmp_path / "node"
    big = big_waiting_file(data_dir)
    store = lake(seaweed, "multipart")
    assert Uploader(store, data_dir, "edge-1").upload_once() == 1
    info = store.head(object_key("edge-1", BIG_RELATIVE))
    assert info.size == BIG_SIZE
    assert "-" not in info.etag  # the whole file's MD5, checked against this node's
    assert not big.exists()


def test_a_file_an_earlier_version_sent_in_parts_is_verified_and_kept_once(seaweed, tmp_path):
    """put_file (the lake jobs' outputs) still uses parts; such an object, found by a node
    restarted before its local delete, is recognised by the MD5 of the parts' MD5s."""
    data_dir = tmp_path / "node"
    big = big_waiting_file(data_dir)
    store = lake(seaweed, "multipart-before")
    key = object_key("edge-1", BIG_RELATIVE)
    store.put_file(key, big, BIG_SIZE)
    assert store.head(key).etag.endswith("-3")  # three parts, as expected_etag says
    assert store.head(key).etag == expected_etag(big)[1]
    assert Uploader(store, data_dir, "edge-1").upload_once() == 1
    assert not big.exists()
    assert [o.key for o in store.list("events/")] == [key]


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


def test_a_pass_with_nothing_to_send_asks_the_store_nothing(tmp_path):
    """So a store that is down is reported (/ready, errors) only once a file waits for it."""
    store = S3ObjectStore("s3://lake/idle", f"http://127.0.0.1:{free_port()}")  # nobody there
    data_dir = tmp_path / "node"
    (data_dir / "events").mkdir(parents=True)
    assert Uploader(store, data_dir, "edge-1").upload_once() == 0


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
    each request would wait for the client's 120 s timeout. The stop drops the call in flight
    at its final-pass deadline (10 s); the files wait locally and go up at the next start,
    once."""
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
        # Each call in flight at the deadline was dropped: the thread ended, not abandoned.
        assert "did not stop in time" not in node.stderr()
    finally:
        silent.close()
        seaweed.start()
    node.start()
    poll_until(lambda: nothing_waits_locally(node.data_dir), 60)
    keys, rows = lake_rows(lake(seaweed, prefix), tmp_path / "scratch")
    assert rows == sent and set(keys.values()) == {1}


# Helpers of the lake job and purge tests too ---------------------------------------------------


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
