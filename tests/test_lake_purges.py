"""Purges in the lake (lake/purges.py) against a real S3 API (SeaweedFS), a real Valkey and
real nodes: readers filter at once, uploaders drop instead of uploading, lake jobs delete,
and ``projects delete --purge --coordinator --lake`` ties it together.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from inslytic_fast.lake.objectstore import S3ObjectStore
from inslytic_fast.lake.uploader import Uploader, finished_files

from . import test_lake as lake_tests
from .adversarial_helpers import poll_until
from .cluster_servers import S3_CREDENTIALS, ValkeyProcess, lake_serve_args
from .conftest import EXAMPLE_EVENT, cli
from .test_lake import (
    ingest_some,
    lake,
    lake_query_count,
    lake_rows,
    rolled_data_dir,
    uploaded_lake,
)

pytest.importorskip("obstore")

seaweed = lake_tests.seaweed
s3_credentials = lake_tests.s3_credentials

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


def test_a_serving_process_drops_a_purged_waiting_file_without_loading_duckdb(seaweed, tmp_path):
    """The uploader runs in the serving process; reading a waiting file's newest arrival takes
    DuckDB, which must not stay resident there (tens of MB): the check runs in a child."""
    from inslytic_fast.lake.purges import record_lake_purge

    prefix = "purge-child"
    waiting = tmp_path / "edge-2"
    rolled_data_dir(waiting)
    record_lake_purge(lake(seaweed, prefix), "blog", int(time.time() * 1_000_000) + PURGE_GRACE_US)
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from inslytic_fast.lake.uploader import lake_uploader\n"
        "uploader = lake_uploader(sys.argv[1], sys.argv[2], Path(sys.argv[3]), 'edge-2')\n"
        "uploader.upload_once()\n"
        "print(uploader.purged_files, uploader.uploaded_files, 'duckdb' in sys.modules)\n"
    )
    lake_url = f"s3://{seaweed.bucket}/{prefix}"
    done = subprocess.run(
        [sys.executable, "-c", script, lake_url, seaweed.endpoint, str(waiting)],
        env={**os.environ, **S3_CREDENTIALS, "XDG_CACHE_HOME": str(tmp_path / "cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    purged, uploaded, duckdb_loaded = done.stdout.split()
    assert int(purged) > 0 and int(uploaded) > 0  # blog's files dropped, shop's uploaded
    assert duckdb_loaded == "False"
    assert finished_files(waiting) == []
    keys, _ = lake_rows(lake(seaweed, prefix), tmp_path / "raw")
    assert keys and all(k.startswith("events/project=shop/") for k in keys)


class CountingStore(S3ObjectStore):
    """The real store, counting the event objects it downloads."""

    downloads = 0

    def get_file(self, key: str, path: Path) -> None:
        self.downloads += key.startswith("events/")
        super().get_file(key, path)


@pytest.mark.parametrize("purged_ago_s", [1800, 3 * 3600])
def test_rows_received_after_a_lake_purge_stay(seaweed, tmp_path, purged_ago_s):
    """A project created again under the purged name after T: its rows are not covered.
    Objects named more than the clock-step margin (1 h) after T are not even downloaded."""
    from inslytic_fast.lake.jobs import LakeJobs
    from inslytic_fast.lake.purges import record_lake_purge

    data_dir = tmp_path / "node"
    events = rolled_data_dir(data_dir)
    store = CountingStore(f"s3://{seaweed.bucket}/purge-before-{purged_ago_s}", seaweed.endpoint)
    record_lake_purge(store, "blog", int((time.time() - purged_ago_s) * 1_000_000))
    uploader = Uploader(store, data_dir, "edge-1")
    uploader.upload_once()
    assert uploader.purged_files == 0 and finished_files(data_dir) == []
    blog_objects = len(list(store.list("events/project=blog/")))
    assert blog_objects > 0
    jobs = LakeJobs(store)
    store.downloads = 0
    jobs.run(lambda: 0)  # a run applies the tombstones first
    assert jobs.purged_objects == 0
    assert store.downloads == (blog_objects if purged_ago_s < 3600 else 0)
    assert lake_rows(store, tmp_path / "raw")[1] == events
    assert lake_query_count(store, tmp_path / "q") == events


def test_object_names_that_prove_their_rows_newer_than_a_purge():
    from inslytic_fast.lake.purges import may_hold_covered_rows

    hour_us = 3600 * 1_000_000
    t = 1_796_000_000 * 1_000_000
    rolled = "events/project=p/date=2026-12-01/edge-1-w0-{:020d}.0.parquet"
    merged = "events/project=p/date=2026-12-01/c-{:020d}-abcdef12.parquet"
    assert may_hold_covered_rows(rolled.format(t + hour_us), t)  # within the clock margin
    assert not may_hold_covered_rows(rolled.format(t + hour_us + 1), t)
    assert may_hold_covered_rows(merged.format((t + hour_us) * 1000), t)
    assert not may_hold_covered_rows(merged.format((t + hour_us + 1) * 1000), t)
    assert not may_hold_covered_rows(
        f"events/project=p/date=d/edge-1-c-{(t + 2 * hour_us) * 1000:020d}-0123abcd.parquet", t
    )
    assert may_hold_covered_rows("events/project=p/date=d/someone-elses-name.parquet", t)


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
