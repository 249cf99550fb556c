"""Cross-node dedup (issue 16): a retry that lands on another node of a cluster is stored once.

Against a real Valkey: first in-process (two "nodes" = two dedup tables in two directories,
each with its own link to the coordinator), then end to end with two real server processes
sharing one coordinator, and with the coordinator killed under them.
"""

from __future__ import annotations

import time

import pytest

from inslytic_fast.ingest.dedup import CLAIMED, IN_FLIGHT, DedupTable, batch_key, message_key
from inslytic_fast.storage.query import run_query

from . import test_cluster_coordinator as coordinator_tests
from .adversarial_helpers import metric, poll_until
from .test_cluster_coordinator import create_project, start_nodes
from .test_segment import basic, message

redis = pytest.importorskip("redis")

DEADLINE_S = 15.0  # polled; generous for a loaded 2-core machine

# The same real Valkey (one per module, flushed for each test) as the coordinator's tests.
valkey = coordinator_tests.valkey
coordinator = coordinator_tests.coordinator


@pytest.fixture
def make_node(tmp_path):
    """Factory: one node's dedup (its own table, its own link to the coordinator)."""
    from inslytic_fast.cluster.coordinator import CoordinatorLink
    from inslytic_fast.cluster.dedup import ClusterDedup

    links = []

    def factory(url: str, name: str) -> ClusterDedup:
        link = CoordinatorLink(url, None)
        link.poll_once()  # up, as the link's thread would find it
        links.append(link)
        table = DedupTable(tmp_path / name / "dedup.table", create=True, slots=64)
        return ClusterDedup(table, link, name)

    yield factory
    for link in links:
        link.stop()


def remote_value(url: str, key: bytes) -> bytes | None:
    from inslytic_fast.cluster.dedup import coordinator_key

    client = redis.Redis.from_url(url)
    try:
        return client.get(coordinator_key(key))
    finally:
        client.close()


def test_a_key_stored_on_one_node_is_a_duplicate_on_another(coordinator, make_node):
    a, b = make_node(coordinator.url, "a"), make_node(coordinator.url, "b")
    key = batch_key("shop", b"order-1")
    statuses, claimed = a.claim([key], owner=0)
    assert statuses == [CLAIMED]
    # While A commits, B's retry is refused with Retry-After (stored-or-not is not known yet).
    assert b.claim([key], owner=0)[0] == [IN_FLIGHT]
    a.settle(claimed, 3)
    poll_until(lambda: remote_value(coordinator.url, key) == b"d3", DEADLINE_S)
    # Answered as the first time (3 events), and now known to B's own table.
    assert b.claim([key], owner=0) == ([3], [])
    assert b.table.claim([key], owner=0)[0] == [3]
    assert b.counters()["cross_node"] == {"message": 0, "batch": 1}


def test_a_claim_whose_commit_failed_is_released_everywhere(coordinator, make_node):
    a, b = make_node(coordinator.url, "a"), make_node(coordinator.url, "b")
    keys = [message_key("shop", "m1"), message_key("shop", "m2")]
    _, claimed = a.claim(keys, owner=0)
    a.release(claimed)  # the log answered 503: the client's retry must be stored
    poll_until(lambda: remote_value(coordinator.url, keys[1]) is None, DEADLINE_S)
    statuses, claimed_b = b.claim(keys, owner=0)
    assert statuses == [CLAIMED, CLAIMED]
    b.settle(claimed_b, 2)
    poll_until(lambda: remote_value(coordinator.url, keys[0]) == b"d2", DEADLINE_S)


def test_a_batch_with_one_message_committing_elsewhere_takes_nothing(coordinator, make_node):
    a, b = make_node(coordinator.url, "a"), make_node(coordinator.url, "b")
    a.claim([message_key("shop", "m2")], owner=0)  # pending on A
    statuses, claimed = b.claim([message_key("shop", "m1"), message_key("shop", "m2")], owner=0)
    assert statuses == [CLAIMED, IN_FLIGHT] and claimed == []
    # B gave back its claim of m1, locally and in the coordinator: a retry of it is new.
    poll_until(lambda: remote_value(coordinator.url, message_key("shop", "m1")) is None, 15)
    assert b.table.claim([message_key("shop", "m1")], owner=0)[0] == [CLAIMED]


def test_a_coordinator_that_lost_its_scripts_still_claims_and_settles(coordinator, make_node):
    a = make_node(coordinator.url, "a")
    key = message_key("shop", "flushed-1")
    client = redis.Redis.from_url(coordinator.url)
    try:
        client.script_flush()  # as after a restart
        _, claimed = a.claim([key], owner=0)
        client.script_flush()
        a.settle(claimed, 1)
        poll_until(lambda: remote_value(coordinator.url, key) == b"d1", DEADLINE_S)
        assert a.counters()["coordinator"]["failures"] == 0
    finally:
        client.close()


def test_coordinator_down_dedups_locally_within_the_timeout(coordinator, make_node, tmp_path):
    from inslytic_fast.cluster.dedup import CALL_TIMEOUT_S

    a = make_node(coordinator.url, "a")
    coordinator.kill()
    try:
        key = message_key("shop", "down-1")
        started = time.monotonic()
        statuses, claimed = a.claim([key], owner=0)
        took = time.monotonic() - started
        assert statuses == [CLAIMED]
        a.settle(claimed, 1)
        assert a.claim([key], owner=0)[0] == [1]  # the local table still catches the retry
        counters = a.counters()["coordinator"]
        assert counters["failures"] >= 1 and counters["local_only"] == 1
        # Refused connections fail at once; the bound is the call timeout (plus slack).
        assert took < CALL_TIMEOUT_S + 5
        # After a failure, the next requests do not wait on the coordinator again.
        a.claim([message_key("shop", "down-2")], owner=0)
        assert a.counters()["coordinator"]["local_only"] == 2
    finally:
        coordinator.start()


def test_a_coordinator_that_stops_answering_costs_one_timeout(coordinator, make_node):
    """A stalled coordinator (SIGSTOP: connections accepted, nothing answered) is the slow
    case: the claim gives up after the call timeout and the request goes on locally."""
    import signal

    from inslytic_fast.cluster.dedup import CALL_TIMEOUT_S

    a = make_node(coordinator.url, "a")
    a.claim([message_key("shop", "warm")], owner=0)  # connected while it answered
    coordinator.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        statuses, _ = a.claim([message_key("shop", "stalled-1")], owner=0)
        took = time.monotonic() - started
        assert statuses == [CLAIMED]
        assert a.counters()["coordinator"] == {"failures": 1, "local_only": 1}
        assert CALL_TIMEOUT_S <= took < CALL_TIMEOUT_S + 5  # bounded, not a hang
        started = time.monotonic()
        a.claim([message_key("shop", "stalled-2")], owner=0)  # no second wait
        assert a.counters()["coordinator"] == {"failures": 1, "local_only": 2}
    finally:
        coordinator.proc.send_signal(signal.SIGCONT)


# -- two real nodes -----------------------------------------------------------------------------


def stored(nodes, sql_where: str) -> int:
    total = 0
    for node in nodes:
        total += run_query(node.data_dir, f"SELECT count(*) FROM events WHERE {sql_where}")[1][0][0]
    return total


EVENTS = [{"eventName": "signup", "timestamp": "2026-02-16T10:30:00Z", "anonymousId": "a",
           "sessionId": "s", "consentGiven": True}] * 3  # fmt: skip


def two_nodes(make_server, url: str):
    nodes = start_nodes(make_server, url, 2)
    key = create_project(url, "dedup")
    for node in nodes:
        poll_until(lambda n=node: n.ingest([], key)[0] == 400, DEADLINE_S)  # the key is known
        poll_until(lambda n=node: metric(n, "inslytic_coordinator_up") == 1, DEADLINE_S)
    return nodes, key


def test_a_retry_sent_to_another_node_is_stored_once(make_server, coordinator):
    nodes, key = two_nodes(make_server, coordinator.url)

    def answer_once_settled(send):
        """The answer once the first attempt's settle reached the coordinator: it is sent off
        the answer's path, so a retry may reach the other node first and get Retry-After
        (409 on /v1/ingest, 503 on the Segment routes), as a retry racing its first attempt."""
        return poll_until(lambda: (a := send())[0] not in (409, 503) and a, DEADLINE_S)

    batch = {"batch": [message(messageId=f"x-{i}") for i in range(4)]}
    for node in (*nodes, *nodes):
        answer = answer_once_settled(
            lambda n=node: n.request("POST", "/v1/batch", batch, headers=basic(key))[::2]
        )
        assert answer == (200, b'{"success":true}')
    headers = {"Idempotency-Key": "order-9"}
    answers = [
        answer_once_settled(lambda n=node: n.ingest(EVENTS, key, headers=headers)[::2])
        for node in nodes
    ]
    assert answers == [(202, b'{"accepted":3}')] * 2
    for node in nodes:
        node.stop()
    assert stored(nodes, "message_id LIKE 'x-%'") == 4
    assert stored(nodes, "idempotency_key = 'order-9'") == 3


def dedup_keys(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match=b"inslytic:dedup:*"))
    finally:
        client.close()


def test_cross_node_hits_are_counted_and_requests_without_ids_stay_local(make_server, coordinator):
    nodes, key = two_nodes(make_server, coordinator.url)
    for node in nodes:  # no messageId, no Idempotency-Key: the coordinator is not asked
        assert node.request("POST", "/v1/batch", {"batch": [message(messageId=None)]},
                            headers=basic(key))[0] == 200  # fmt: skip
        assert node.ingest(EVENTS, key)[0] == 202
    assert dedup_keys(coordinator.url) == []
    batch = {"batch": [message(messageId="c-1"), message(messageId="c-2")]}
    assert nodes[0].request("POST", "/v1/batch", batch, headers=basic(key))[0] == 200
    hits = 'inslytic_dedup_cross_node_total{kind="message"}'
    poll_until(lambda: nodes[1].request("POST", "/v1/batch", batch, headers=basic(key))[0] == 200
               and metric(nodes[1], hits) == 2, DEADLINE_S)  # fmt: skip
    assert metric(nodes[1], 'inslytic_dedup_duplicates_total{kind="message"}') == 2
    assert metric(nodes[0], hits) == 0
    assert metric(nodes[1], "inslytic_dedup_window_seconds") == 24 * 3600


def test_coordinator_killed_both_nodes_accept_and_dedup_locally(make_server, coordinator):
    nodes, key = two_nodes(make_server, coordinator.url)
    coordinator.kill()
    try:
        for node in nodes:
            poll_until(lambda n=node: b"deduplicated on this node only"
                       in n.request("GET", "/ready")[2], DEADLINE_S)  # fmt: skip
        batch = {"batch": [message(messageId="down-1")]}
        for node in (*nodes, *nodes):
            assert node.request("POST", "/v1/batch", batch, headers=basic(key))[0] == 200
            assert node.ingest(EVENTS, key, headers={"Idempotency-Key": "down-k"})[::2] == (
                202, b'{"accepted":3}',
            )  # fmt: skip
        for node in nodes:
            assert metric(node, "inslytic_dedup_coordinator_local_only_total") >= 2
            assert metric(node, 'inslytic_dedup_duplicates_total{kind="batch"}') == 1
            node.stop()
        # Once per node: each node caught its own retry, not the other node's.
        assert stored(nodes, "message_id = 'down-1'") == 2
        assert stored(nodes, "idempotency_key = 'down-k'") == 6
    finally:
        coordinator.start()
