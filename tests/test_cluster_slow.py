"""Cluster mode under load and faults (slow): real nodes, real SeaweedFS, real Valkey.

- SIGKILL of a --lake node under load, again and again (uploads in flight at random moments),
  then a clean restart: every acknowledged event is in the lake exactly once, nothing from a
  refused batch.
- The object store stopped for 20 s under load on two nodes: every request still answered
  202, /ready says what is wrong, uploads resume by themselves, nothing lost or doubled.
"""

from __future__ import annotations

import os
import random
import signal
import time

import orjson
import pytest

from .adversarial_helpers import metric, poll_until
from .cluster_servers import S3_CREDENTIALS, SeaweedProcess, ValkeyProcess, lake_serve_args
from .conftest import cli
from .crash_harness import check_counts, run_load

pytestmark = pytest.mark.slow
pytest.importorskip("obstore")

OUTAGE_S = 20.0


@pytest.fixture
def seaweed(tmp_path):
    server = SeaweedProcess(tmp_path / "seaweed").start()
    yield server
    server.kill()


@pytest.fixture
def valkey(tmp_path):
    server = ValkeyProcess(tmp_path / "valkey").start()
    yield server
    server.kill()


def env_for(tmp_path) -> dict[str, str]:
    return {**os.environ, **S3_CREDENTIALS, "XDG_CACHE_HOME": str(tmp_path / "cache")}


def lake_counts(seaweed, prefix: str, env, tmp_path) -> dict[str, int]:
    """Events per name in the lake alone (a reader with no data dir)."""
    out = cli(
        "query",
        "SELECT event_name, count(*) AS n FROM events GROUP BY ALL",
        "--format",
        "json",
        "--lake",
        f"s3://{seaweed.bucket}/{prefix}",
        "--s3-endpoint",
        seaweed.endpoint,
        data_dir=tmp_path / "no-data-dir",
        env=env,
    )
    return {row["event_name"]: row["n"] for row in orjson.loads(out.stdout)}


def audit_lake(counts: dict[str, int], clients) -> int:
    check_counts(counts, clients)
    return sum(len(c.acked) for c in clients)


def failing(node) -> bool:
    return metric(node, "inslytic_lake_errors_total") > 0


def drained(node) -> bool:
    return (
        metric(node, "inslytic_lake_pending_files") == 0
        and metric(node, "inslytic_log_pending_bytes") == 0
    )


def test_sigkill_of_a_lake_node_under_load_leaves_each_event_once_in_the_lake(
    make_server, seaweed, tmp_path
):
    env = env_for(tmp_path)
    prefix = "kill"
    node = make_server(*lake_serve_args(seaweed, prefix, "edge-1", 2), env=env)
    key = node.first_run_key
    rng = random.Random(7)
    clients = []
    cycles = int(os.environ.get("INSLYTIC_CLUSTER_CRASH_CYCLES", "8"))
    for cycle in range(cycles):
        threads, stop = run_load(node, key, clients=4, seconds=rng.uniform(1.0, 3.0), seed=cycle)
        node.stop(signal.SIGKILL)
        stop.set()
        for thread in threads:
            thread.join(30)
        clients += threads
        node.start()
    node.stop()  # clean: rolls the tail
    node.start()  # uploads it
    poll_until(lambda: drained(node), 120)
    acked = audit_lake(lake_counts(seaweed, prefix, env, tmp_path), clients)
    assert acked > 1000 * cycles / 4, "the load was too light to prove anything"
    print(f"{cycles} SIGKILL cycles, {acked} acknowledged events, each once in the lake")


def test_object_store_down_for_20_s_under_load_loses_nothing(
    make_server, seaweed, valkey, tmp_path
):
    env = env_for(tmp_path)
    prefix = "outage"
    args = (
        "--lake",
        f"s3://{seaweed.bucket}/{prefix}",
        "--s3-endpoint",
        seaweed.endpoint,
        "--coordinator",
        valkey.url,
        "--events-per-minute",
        "0",
        "--workers",
        "1",
    )
    first = make_server(*args, "--node-id", "edge-1", env=env)
    second = make_server(*args, "--node-id", "edge-2", env=env)
    key = first.first_run_key
    poll_until(lambda: second.ingest([], key)[0] == 400, 30)  # the key works on node 2
    seaweed.stop()
    started = time.monotonic()
    clients = []
    seed = 0
    # At least OUTAGE_S, and until both nodes have a rolled file they failed to upload
    # (a log segment seals after 30 s): the outage must be felt, not only scheduled.
    while time.monotonic() - started < OUTAGE_S or not all(map(failing, (first, second))):
        assert time.monotonic() - started < 180, "no upload was attempted during the outage"
        for node in (first, second):
            seed += 1  # event names are unique per seed
            threads, stop = run_load(node, key, clients=2, seconds=1.0, seed=seed)
            stop.set()
            for thread in threads:
                thread.join(30)
            clients += threads
    unanswered = [n for c in clients for n in c.unknown]
    assert not unanswered, "a node refused (503) or dropped ingest while the store was down"
    for node in (first, second):
        status, _, body = node.request("GET", "/ready")
        assert status == 200 and "lake uploads failing" in body.decode(), body
        assert metric(node, "inslytic_lake_pending_files") > 0
    outage = time.monotonic() - started
    seaweed.start()
    for node in (first, second):
        node.stop()
        node.start()
    for node in (first, second):
        poll_until(lambda n=node: drained(n), 120)  # uploads resumed and drained
    acked = audit_lake(lake_counts(seaweed, prefix, env, tmp_path), clients)
    print(f"object store down {outage:.0f} s: {acked} events acknowledged, each once in the lake")
