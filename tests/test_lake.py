"""The lake uploader against a real S3 API (SeaweedFS), with real rolled Parquet files.

Exactly once, whatever step an upload pass dies at; verification before a local delete; the
object store stopped and restarted; multipart for large files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import duckdb
import pytest

from inslytic_fast.lake import (
    MULTIPART_PART_BYTES,
    S3ObjectStore,
    Uploader,
    UploadMismatch,
    finished_files,
    object_key,
)
from inslytic_fast.storage import Roller, sql_string

from .cluster_servers import S3_CREDENTIALS, SeaweedProcess
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


def lake_metric(node, name: str) -> float:
    status, _, body = node.request("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def poll(condition, what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {deadline_s} s: {what}")


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
        "--node-id",
        node_id,
        data_dir=data_dir,
        env=env,
    )
    return int(out.stdout.splitlines()[1])


def test_two_nodes_upload_everything_and_query_lake_sees_each_event_once(
    seaweed, make_server, tmp_path
):
    env = {**os.environ, **S3_CREDENTIALS, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    prefix = "e2e"
    lake_args = ("--lake", f"s3://{seaweed.bucket}/{prefix}", "--s3-endpoint", seaweed.endpoint)
    nodes = [
        make_server(
            *lake_args,
            "--node-id",
            f"n{i}",
            "--workers",
            str(1 + i),
            "--events-per-minute",
            "0",
            env=env,
        )
        for i in range(2)
    ]
    sent = 0
    for _ in range(30):
        for node in nodes:
            status, _, _ = node.ingest([EXAMPLE_EVENT] * 5, node.first_run_key)
            assert status == 202
            sent += 5
    for node in nodes:
        poll(lambda n=node: lake_metric(n, "inslytic_lake_uploaded_files_total") > 0, "uploads")
    # A clean stop rolls the tail; a restart uploads it.
    for node in nodes:
        assert node.stop() == 0
        node.start()
    for node in nodes:
        poll(
            lambda n=node: (
                lake_metric(n, "inslytic_lake_pending_files") == 0
                and lake_count(
                    seaweed, prefix, n.data_dir, n.args[n.args.index("--node-id") + 1], env
                )
                == sent
            ),
            "every event in the lake",
        )
    # From a machine with no data dir at all: the lake alone has every event, once.
    assert lake_count(seaweed, prefix, tmp_path / "nowhere", "reader", env) == sent
    assert lake_metric(nodes[0], "inslytic_lake_errors_total") == 0
