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

from .cluster_servers import S3_CREDENTIALS, SeaweedProcess, ValkeyProcess
from .conftest import cli
from .crash_harness import run_load

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


def metric(node, name: str) -> float:
    _, _, body = node.request("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def poll(condition, what: str, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {deadline_s} s: {what}")


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
    acked = [name for c in clients for name in c.acked]
    rejected = [name for c in clients for name in c.rejected]
    missing = [n for n in acked if counts.get(n, 0) == 0]
    doubled = [n for n, k in counts.items() if k > 1]
    leaked = [n for n in rejected if n in counts]
    assert not missing, f"{len(missing)} acknowledged events not in the lake, e.g. {missing[:5]}"
    assert not doubled, f"{len(doubled)} events in the lake twice, e.g. {doubled[:5]}"
    assert not leaked, f"{len(leaked)} events of refused batches in the lake, e.g. {leaked[:5]}"
    return len(acked)


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
    node = make_server(
        "--lake",
        f"s3://{seaweed.bucket}/{prefix}",
        "--s3-endpoint",
        seaweed.endpoint,
        "--node-id",
        "edge-1",
        "--workers",
        "2",
        "--events-per-minute",
        "0",
        env=env,
    )
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
    poll(lambda: drained(node), "everything uploaded")
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
    poll(lambda: second.ingest([], key)[0] == 400, "the key works on node 2")
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
        poll(lambda n=node: drained(n), "uploads resumed and drained")
    acked = audit_lake(lake_counts(seaweed, prefix, env, tmp_path), clients)
    print(f"object store down {outage:.0f} s: {acked} events acknowledged, each once in the lake")
