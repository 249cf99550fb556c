"""Cluster mode's counters on /metrics survive a worker restart, as the other counters do.

A real node (two workers) on a real Valkey: the coordinator counters of a worker that is
SIGKILLed and restarted by its supervisor are carried over by its successor, so no scrape
ever sees them go down (Prometheus would read a drop as a counter reset and count it twice).
"""

from __future__ import annotations

import orjson
import pytest

from .adversarial_helpers import poll_until
from .cluster_servers import ValkeyProcess
from .conftest import EXAMPLE_EVENT
from .test_metrics import CounterWatch, kill_worker_until_restarted

redis = pytest.importorskip("redis")

GRANTS = ("inslytic_coordinator_grants_total", ())
# A grant carries limit / (16 x workers) = 5,000 tokens: a 1,000-event batch in five needs one,
# so the victim holds several grants and a successor starting from 0 would show a drop.
LIMIT = 160_000
BATCH = [EXAMPLE_EVENT] * 1000


@pytest.fixture
def valkey(tmp_path_factory):
    server = ValkeyProcess(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.kill()


def test_coordinator_counters_never_go_down_across_a_killed_worker(make_server, valkey):
    server = make_server(
        "--workers", "2", "--coordinator", valkey.url, "--node-id", "n0",
        "--events-per-minute", str(LIMIT),
    )  # fmt: skip
    key = server.first_run_key
    snapshot = server.data_dir / "run" / "metrics-w0.json"
    watch = CounterWatch(server)
    scrape_and_compare = watch.scrape

    def victim_has_grants() -> bool:
        # New connections until w0 has taken grants and published them (its 1 s tick).
        assert server.ingest(BATCH, key)[0] == 202
        scrape_and_compare()
        try:
            published = orjson.loads(snapshot.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return False
        # "coordinator" holds the counters; before they moved there they sat in "gauges".
        where = published.get("coordinator") or published.get("gauges", {})
        return where.get("coordinator_grants", 0) >= 3

    poll_until(victim_has_grants, timeout=60)

    def successor_published(old_start: float) -> bool:
        # The successor's own snapshot replaced its predecessor's file.
        published = orjson.loads(snapshot.read_bytes())
        return published["process"]["w0"]["start_time_seconds"] != old_start

    kill_worker_until_restarted(
        watch, "w0", lambda: server.ingest([EXAMPLE_EVENT], key), successor_published
    )
    for _ in range(10):
        scrape_and_compare()
    assert GRANTS in watch.previous
    assert watch.drops == [], watch.drops[:10]
