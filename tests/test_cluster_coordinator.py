"""Cluster mode's coordinator, end to end: real server processes sharing one real Valkey.

Every node has its own data dir and port; nothing is mocked. What is checked: keys and limits
made through one node's CLI work on every node (polled, within the documented 2 s plus slack
for a loaded machine), the global limit holds across nodes (accepted total measured), the
coordinator stays off the per-request path (grants counted), and the documented policy while
the coordinator is down (known keys keep working, each node limited to its share, /ready says
so, nothing crashes) and after it is back.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time

import orjson
import pytest

from .adversarial_helpers import metric, poll_until
from .cluster_servers import ValkeyProcess
from .conftest import EXAMPLE_EVENT, cli

redis = pytest.importorskip("redis")

POLL_DEADLINE_S = 15.0  # the promise is 2 s; the deadline leaves room for a loaded 2-core box


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    server = ValkeyProcess(tmp_path_factory.mktemp("valkey")).start()
    yield server
    server.kill()


@pytest.fixture
def coordinator(valkey):
    """A clean coordinator for each test (the same server)."""
    client = redis.Redis.from_url(valkey.url)
    client.flushdb()
    client.close()
    return valkey


def poll(condition, what: str, deadline_s: float = POLL_DEADLINE_S) -> float:
    """Seconds until ``condition()`` held (``what`` says what is awaited, for the reader)."""
    started = time.monotonic()
    poll_until(condition, deadline_s)
    return time.monotonic() - started


def events(n: int) -> list[dict]:
    return [EXAMPLE_EVENT] * n


def ingest_status(node, key: str, n: int = 1) -> int:
    return node.ingest(events(n), key)[0]


def new_key(output: str) -> str:
    return output.strip().splitlines()[-1]


def create_project(url: str, name: str, limit: int | None = None) -> str:
    """``projects create`` through the coordinator; the new key."""
    extra = ("--events-per-minute", str(limit)) if limit is not None else ()
    return new_key(cli("projects", "create", name, *extra, "--coordinator", url).stdout)


def start_nodes(make_server, url: str, count: int, *extra: str):
    nodes = [
        make_server("--coordinator", url, "--node-id", f"n{i}", "--workers", "1", *extra)
        for i in range(count)
    ]
    return nodes


def test_keys_made_on_one_node_work_on_all_and_revocation_reaches_all(make_server, coordinator):
    first = start_nodes(make_server, coordinator.url, 1)[0]
    # The second node has workers: its supervisor mirrors the catalog, each worker limits.
    second = make_server("--coordinator", coordinator.url, "--node-id", "n1", "--workers", "2")
    default_key = first.first_run_key
    assert default_key, first.stdout()
    assert second.first_run_key is None  # the cluster has its catalog: no second default
    poll(lambda: ingest_status(second, default_key) == 202, "the default key works on node 2")

    created = cli(
        "projects", "create", "shop", "--coordinator", coordinator.url, data_dir=first.data_dir
    )
    shop_key = new_key(created.stdout)
    assert f"in coordinator catalog at {coordinator.url}" in created.stdout
    took = max(
        poll(lambda n=node: ingest_status(n, shop_key) == 202, f"new key on {node.url}")
        for node in (first, second)
    )
    print(f"created key served by both nodes after {took:.2f} s")

    prefix = shop_key[:12]
    cli(
        "projects",
        "revoke-key",
        "shop",
        prefix,
        "--coordinator",
        coordinator.url,
        data_dir=second.data_dir,
    )
    took = max(
        poll(lambda n=node: ingest_status(n, shop_key) == 401, f"revoked on {node.url}")
        for node in (first, second)
    )
    print(f"revoked key refused by both nodes after {took:.2f} s")
    listing = cli("projects", "list", "--json", "--coordinator", coordinator.url)
    names = [p["name"] for p in orjson.loads(listing.stdout)["projects"]]
    assert names == ["default", "shop"]

    cli("projects", "set-limit", "default", "5", "--coordinator", coordinator.url)
    for node in (first, second):
        poll(
            lambda n=node: n.ingest(events(1), default_key)[1].get("x-ratelimit-limit") == "5",
            f"new limit on {node.url}",
        )
    cli("projects", "delete", "default", "--coordinator", coordinator.url)
    for node in (first, second):
        poll(lambda n=node: ingest_status(n, default_key) == 401, f"deleted on {node.url}")


def test_a_single_node_joining_a_cluster_brings_its_projects(make_server, coordinator, tmp_path):
    data_dir = tmp_path / "solo"
    key = new_key(cli("projects", "create", "solo", data_dir=data_dir).stdout)
    node = make_server("--coordinator", coordinator.url, "--workers", "1", data_dir=data_dir)
    assert node.first_run_key is None
    assert ingest_status(node, key) == 202
    other = start_nodes(make_server, coordinator.url, 1)[0]
    poll(lambda: ingest_status(other, key) == 202, "the joined node's key works on another")
    # A second node with projects of its own does not seed (the cluster has a catalog): it
    # says which of its projects stop working.
    lone_dir = tmp_path / "lone"
    cli("projects", "create", "lonely", data_dir=lone_dir)
    lone = make_server("--coordinator", coordinator.url, "--workers", "1", data_dir=lone_dir)
    assert "projects lonely of" in lone.stderr()
    poll(lambda: ingest_status(lone, key) == 202, "the cluster's key works on it")


def accept_until_refused(nodes, key: str, batch: int, max_requests: int = 2000) -> int:
    """Round-robin batches over the nodes until every node refused; events accepted."""
    accepted = 0
    refused = set()
    for i in range(max_requests):
        node = nodes[i % len(nodes)]
        status, headers, _ = node.ingest(events(batch), key)
        if status == 202:
            accepted += batch
            refused.discard(node.url)
        else:
            assert status == 429, (status, headers)
            assert int(headers["x-ratelimit-limit"]) > 0
            assert 1 <= int(headers["retry-after"]) <= 60
            refused.add(node.url)
            if len(refused) == len(nodes):
                return accepted
    raise AssertionError("the limit never refused every node")


def test_the_limit_holds_across_nodes_and_leaves_little_unused(make_server, coordinator):
    nodes = start_nodes(make_server, coordinator.url, 3)
    limit = 300
    key = create_project(coordinator.url, "capped", limit)
    for node in nodes:
        poll(lambda n=node: ingest_status(n, key, 0) in (202, 400), "key known")
    started = time.monotonic()
    accepted = accept_until_refused(nodes, key, batch=7)
    elapsed = time.monotonic() - started
    assert elapsed < 50, "the run spilled into the next 60 s window: inconclusive"
    # Never above the limit; below it by at most the batch granularity plus the leases the
    # other nodes hold (limit // (16 x members) each), which they give back within a tick.
    stranded = 2 * (limit // (16 * 3))
    print(f"accepted {accepted} of {limit} across 3 nodes in {elapsed:.2f} s")
    failed = sum(metric(n, "inslytic_coordinator_calls_failed_total") for n in nodes)
    if failed:
        # A call slower than the timeout (a starved machine) switches that node to its local
        # share for a moment: the documented outage bound, not the exact one, applies.
        assert accepted <= limit + limit // 3 * 3, accepted
        return
    assert limit - 7 - stranded <= accepted <= limit


def test_the_coordinator_is_off_the_per_request_path(make_server, coordinator):
    nodes = start_nodes(make_server, coordinator.url, 2)
    key = create_project(coordinator.url, "busy", 320000)
    for node in nodes:
        poll(lambda n=node: ingest_status(n, key, 0) in (202, 400), "key known")
    poll(lambda: metric(nodes[0], "inslytic_coordinator_up") == 1, "node sees the coordinator")
    before = [metric(n, "inslytic_coordinator_grants_total") for n in nodes]
    requests = 200
    for i in range(requests):
        assert ingest_status(nodes[i % 2], key, 10) == 202
    grants = [
        metric(n, "inslytic_coordinator_grants_total") - b
        for n, b in zip(nodes, before, strict=True)
    ]
    # A grant brings limit // (16 x members) = 10,000 tokens: 1,000 events per node need one.
    print(f"{requests} requests, coordinator grants per node: {grants}")
    assert all(g <= 2 for g in grants), grants


def test_coordinator_down_known_keys_work_each_node_gets_its_share_then_recovers(
    make_server, coordinator
):
    nodes = start_nodes(make_server, coordinator.url, 2)
    limit = 100
    key = create_project(coordinator.url, "outage", limit)
    for node in nodes:
        poll(lambda n=node: ingest_status(n, key, 0) in (202, 400), "key known")
        poll(lambda n=node: metric(n, "inslytic_coordinator_up") == 1, "node reaches it")
    coordinator.kill()

    def degraded(node) -> bool:
        status, _, body = node.request("GET", "/ready")
        return status == 200 and "coordinator unreachable" in body.decode()

    for node in nodes:
        poll(lambda n=node: degraded(n), "/ready reports the outage")
    # Known keys keep working; each node admits at most its share (limit / 2 members).
    per_node = [accept_until_refused([node], key, batch=5) for node in nodes]
    print(f"accepted per node with the coordinator down: {per_node}")
    assert all(0 < n <= limit // 2 for n in per_node), per_node
    assert sum(per_node) <= limit
    # A node restarted meanwhile starts on its local catalog (the mirror) and serves the key.
    nodes[1].stop()
    nodes[1].start()
    assert ingest_status(nodes[1], key, 0) == 400  # authenticated; an empty batch is invalid
    for node in nodes:
        assert node.proc.poll() is None
        assert metric(node, "inslytic_coordinator_up") == 0
        assert node.stderr().count("unreachable") == 1, node.stderr()  # logged once
    assert metric(nodes[0], "inslytic_coordinator_local_admissions_total") > 0

    coordinator.start()
    for node in nodes:
        poll(lambda n=node: metric(n, "inslytic_coordinator_up") == 1, "reconnected")
        status, _, body = node.request("GET", "/ready")
        assert (status, orjson.loads(body)) == (200, {"status": "ready"})
    assert "reachable again" in nodes[0].stderr()
    # Keys made after the outage reach every node again.
    fresh = create_project(coordinator.url, "after")
    for node in nodes:
        poll(lambda n=node: ingest_status(n, fresh) == 202, "a new key after the outage")


# The limiter's decisions against the real coordinator, in-process (two "nodes" = two links).


def make_limiter(url: str, member: str):
    from inslytic_fast.cluster.coordinator import CoordinatorLink
    from inslytic_fast.limits.globallimit import GlobalRateLimiter

    # A generous timeout: these tests are about the coordinator's decisions, and a call slower
    # than the serving default (0.25 s) on a loaded machine would switch to the local share.
    link = CoordinatorLink(url, member, timeout=10.0)
    link.poll_once()
    # Each reading a second later: a refused batch may ask the coordinator again at once
    # (instead of EXHAUSTED_RECHECK_SECONDS later), so every attempt reaches the script.
    clock = itertools.count(time.monotonic()).__next__
    return GlobalRateLimiter(link, clock=clock)


def test_limit_changes_seen_at_different_moments_never_mint_tokens(coordinator):
    """Two nodes, one already on the raised limit and one still on the old: alternating grants
    must not add the difference again and again (the window's total stays <= the new limit)."""
    old_view = make_limiter(coordinator.url, "a/w0")
    new_view = make_limiter(coordinator.url, "b/w0")
    for limiter in (old_view, new_view):
        limiter.link.poll_once()  # both see 2 members
    now = time.monotonic()
    spent = 0
    for _ in range(200):
        for limiter, limit in ((new_view, 1000), (old_view, 100)):
            bucket = limiter.bucket("flip", limit, now)
            while bucket.try_spend(10):
                spent += 10
    assert old_view.calls_failed == new_view.calls_failed == 0
    assert spent <= 1000, spent


def test_a_lease_nobody_uses_goes_back_within_a_tick(coordinator):
    first = make_limiter(coordinator.url, "a/w0")
    second = make_limiter(coordinator.url, "b/w0")
    first.link.poll_once()
    now = time.monotonic()
    limit = 3200  # a grant tops up by 3200 // (16 x 2) = 100
    assert first.bucket("p", limit, now).try_spend(1)
    assert first.bucket("p", limit, now).lease == 100
    first.tick()  # used during this tick: kept
    first.tick()  # unused for a whole tick: given back
    assert first.bucket("p", limit, now).lease == 0
    taken = 0
    bucket = second.bucket("p", limit, now)
    while bucket.try_spend(50):
        taken += 50
    # All but the first node's one event: its idle lease of 100 came back.
    assert first.calls_failed == second.calls_failed == 0
    assert taken == (limit - 1) // 50 * 50, taken


def test_the_coordinator_script_grants_as_the_shared_table_does(coordinator, tmp_path):
    """One refill and grant rule for both budgets: the Lua script and SharedBudget, given the
    same bucket (spent, window) and the same request, answer alike (taken, left, window)."""
    from inslytic_fast.limits.globallimit import _GRANT
    from inslytic_fast.limits.sharedlimit import SLOT, SharedBudget

    client = redis.Redis.from_url(coordinator.url)
    script = client.register_script(_GRANT)
    SharedBudget(tmp_path / "rl.bin", create=True, slots=1024).close()
    table = SharedBudget(tmp_path / "rl.bin")
    # Windows begun 1 s, 61 s and 185 s ago: kept, rolled once, rolled three times (each a
    # second or more from a window's edge, so the script's clock reading a moment later than
    # ours does not matter).
    cases = itertools.product(
        (10, 1000), (0, 7, 10, 990), (1, 3, 20), (0, 5), (0, 4), (1_000, 61_000, 185_000)
    )
    for key, (limit, spent, need, extra, give_back, age_ms) in enumerate(cases, start=1):
        for lease_of_this_window in (True, False):
            seconds, micros = client.time()
            now_ms = seconds * 1000 + micros // 1000
            window_ms = now_ms - age_ms
            lease_window_ms = window_ms if lease_of_this_window else 0
            name = f"case:{key}:{lease_of_this_window}"
            client.hset(name, mapping={"spent": spent, "window": window_ms})
            taken, left, window, _ = script(
                keys=[name], args=[limit, need, extra, give_back, lease_window_ms]
            )
            slot = table._slot_of(key * 2 + lease_of_this_window, now_ms / 1000)
            assert slot is not None
            row = key * 2 + lease_of_this_window
            SLOT.pack_into(table.map, table._offset(slot), row, limit, spent, window_ms / 1000)
            got = table.grant(
                row, limit, need, extra, give_back, lease_window_ms / 1000, now_ms / 1000
            )
            assert got is not None
            shared_taken, shared_window, shared_left = got
            case = (limit, spent, need, extra, give_back, age_ms, lease_of_this_window)
            assert (taken, left) == (shared_taken, shared_left), case
            assert window == round(shared_window * 1000), case
    table.close()
    client.close()


def test_a_coordinator_password_never_reaches_a_message(tmp_path):
    from .cluster_servers import free_ports

    closed = free_ports(1)[0]  # nothing listens there
    url = f"redis://:s3cret-pw@127.0.0.1:{closed}/0"
    failed = cli("projects", "list", "--coordinator", url, data_dir=tmp_path, check=False)
    assert failed.returncode == 1
    assert "s3cret-pw" not in failed.stderr + failed.stdout
    assert f"redis://:***@127.0.0.1:{closed}/0" in failed.stderr


def test_a_node_without_cluster_options_imports_no_cluster_client():
    """The embedded install has neither redis nor obstore: nothing may import them unasked."""
    code = (
        "import sys, inslytic_fast.cli, inslytic_fast.runtime.server; "
        "import inslytic_fast.runtime.supervisor; "
        "from inslytic_fast.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('redis', 'obstore') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
