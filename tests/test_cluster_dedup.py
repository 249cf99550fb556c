"""Cross-node dedup (issue 16): a retry that lands on another node of a cluster is stored once.

Against a real Valkey: first in-process (two "nodes" = two dedup tables in two directories,
each with its own link to the coordinator), then end to end with two real server processes
sharing one coordinator, and with the coordinator killed under them.
"""

from __future__ import annotations

import asyncio
import signal
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

    def factory(url: str, name: str, **options) -> ClusterDedup:
        link = CoordinatorLink(url, None)
        link.poll_once()  # up, as the link's thread would find it
        links.append(link)
        table = DedupTable(tmp_path / name / "dedup.table", create=True, slots=64)
        return ClusterDedup(table, link, name, **options)

    yield factory
    for link in links:
        link.stop()


def claim(node, keys: list[bytes], owner: int = 0) -> tuple[list[int], list]:
    """A request's claim as the pipeline makes it: this node's table, then (parked on a loop)
    the coordinator's confirmation; the final statuses and claims."""

    async def claimed():
        statuses, claims = node.claim(keys, owner)
        answer = asyncio.get_running_loop().create_future()
        if not node.confirm(keys, statuses, claims, lambda *final: answer.set_result(final)):
            return statuses, claims
        return await asyncio.wait_for(answer, DEADLINE_S)

    return asyncio.run(claimed())


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
    statuses, claimed = claim(a, [key], owner=0)
    assert statuses == [CLAIMED]
    # While A commits, B's retry is refused with Retry-After (stored-or-not is not known yet).
    assert claim(b, [key], owner=0)[0] == [IN_FLIGHT]
    a.settle(claimed, 3)
    poll_until(lambda: remote_value(coordinator.url, key) == b"d3", DEADLINE_S)
    # Answered as the first time (3 events), and now known to B's own table.
    assert claim(b, [key], owner=0) == ([3], [])
    assert b.table.claim([key], owner=0)[0] == [3]
    assert b.counters()["cross_node"] == {"message": 0, "batch": 1}


def test_a_claim_whose_commit_failed_is_released_everywhere(coordinator, make_node):
    a, b = make_node(coordinator.url, "a"), make_node(coordinator.url, "b")
    keys = [message_key("shop", "m1"), message_key("shop", "m2")]
    _, claimed = claim(a, keys, owner=0)
    a.release(claimed)  # the log answered 503: the client's retry must be stored
    poll_until(lambda: remote_value(coordinator.url, keys[1]) is None, DEADLINE_S)
    statuses, claimed_b = claim(b, keys, owner=0)
    assert statuses == [CLAIMED, CLAIMED]
    b.settle(claimed_b, 2)
    poll_until(lambda: remote_value(coordinator.url, keys[0]) == b"d2", DEADLINE_S)


def test_a_batch_with_one_message_committing_elsewhere_takes_nothing(coordinator, make_node):
    a, b = make_node(coordinator.url, "a"), make_node(coordinator.url, "b")
    claim(a, [message_key("shop", "m2")], owner=0)  # pending on A
    statuses, claimed = claim(b, [message_key("shop", "m1"), message_key("shop", "m2")], owner=0)
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
        _, claimed = claim(a, [key], owner=0)
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
        statuses, claimed = claim(a, [key], owner=0)
        took = time.monotonic() - started
        assert statuses == [CLAIMED]
        a.settle(claimed, 1)
        assert claim(a, [key], owner=0)[0] == [1]  # the local table still catches the retry
        counters = a.counters()["coordinator"]
        assert counters["failures"] >= 1 and counters["local_only"] == 1
        # Refused connections fail at once; the bound is the call timeout (plus slack).
        assert took < CALL_TIMEOUT_S + 5
        # After a failure, the next requests do not wait on the coordinator again.
        claim(a, [message_key("shop", "down-2")], owner=0)
        assert a.counters()["coordinator"]["local_only"] == 2
    finally:
        coordinator.start()


def test_a_coordinator_that_stops_answering_costs_one_timeout(coordinator, make_node):
    """A stalled coordinator (SIGSTOP: connections accepted, nothing answered) is the slow
    case: the claim gives up after the call timeout and the request goes on locally."""
    from inslytic_fast.cluster.dedup import CALL_TIMEOUT_S

    a = make_node(coordinator.url, "a")
    claim(a, [message_key("shop", "warm")], owner=0)  # connected while it answered
    coordinator.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        statuses, _ = claim(a, [message_key("shop", "stalled-1")], owner=0)
        took = time.monotonic() - started
        assert statuses == [CLAIMED]
        assert a.counters()["coordinator"] == {"failures": 1, "local_only": 1}
        assert CALL_TIMEOUT_S <= took < CALL_TIMEOUT_S + 5  # bounded, not a hang
        started = time.monotonic()
        claim(a, [message_key("shop", "stalled-2")], owner=0)  # no second wait
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


# -- the claim off the loop ---------------------------------------------------------------------


async def polled(condition, what: str) -> None:
    """Wait on the loop (serving callbacks meanwhile) until ``condition()``; fail after the
    deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_claims_queued_meanwhile_go_in_one_script_call(coordinator, make_node):
    """Group commit for claims: while the thread waits on one round trip, the claims of every
    request that arrives meanwhile queue up and go in the next single script call."""
    a = make_node(coordinator.url, "a", timeout=DEADLINE_S * 2)  # the stall is not a failure
    claim(a, [message_key("shop", "warm")])  # connected, its script loaded
    client = redis.Redis.from_url(coordinator.url)

    def script_calls() -> int:
        return client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)

    requests = [[message_key("shop", f"r{i}-{j}") for j in range(i + 1)] for i in range(4)]

    async def four_requests():
        loop = asyncio.get_running_loop()
        answers = [loop.create_future() for _ in requests]

        def send(i: int) -> None:
            statuses, claims = a.claim(requests[i], 0)
            done = answers[i].set_result
            assert a.confirm(requests[i], statuses, claims, lambda *final: done(final))

        coordinator.proc.send_signal(signal.SIGSTOP)
        try:
            send(0)
            await polled(lambda: not a._claims, "the thread took the first request's claim")
            for i in (1, 2, 3):  # meanwhile: it waits on the stalled coordinator
                send(i)
        finally:
            coordinator.proc.send_signal(signal.SIGCONT)
        return await asyncio.wait_for(asyncio.gather(*answers), DEADLINE_S)

    try:
        before = script_calls()
        finals = asyncio.run(four_requests())
        assert [statuses for statuses, _ in finals] == [[CLAIMED] * len(k) for k in requests]
        assert script_calls() - before == 2  # the first request's, then the other three's
        assert all(
            remote_value(coordinator.url, key).startswith(b"p") for k in requests for key in k
        )
        assert a.counters()["coordinator"] == {"failures": 0, "local_only": 0}
    finally:
        client.close()


def test_a_request_waiting_on_a_stalled_coordinator_holds_up_no_other(
    coordinator, make_node, tmp_path
):
    """The loop is never blocked by a claim: with the coordinator stalled, a request without
    ids on the same Ingestor is answered while one with an Idempotency-Key waits, parked;
    once the coordinator answers, the parked one goes on to the commit and its 202."""
    from inslytic_fast.http.responses import Responses
    from inslytic_fast.ingest.keyring import KeyRing
    from inslytic_fast.ingest.pipeline import Ingestor
    from inslytic_fast.ingest.schema import Schema
    from inslytic_fast.limits.ratelimit import RateLimiter

    from .test_ingest import Collector, MemorySink, batch, request

    dedup = make_node(coordinator.url, "a", timeout=DEADLINE_S * 2)
    claim(dedup, [message_key("default", "warm")])  # connected, its script loaded
    keyring = KeyRing(tmp_path / "keys")
    keyring.load()
    key = keyring.ensure_default_project().encode()
    sink = MemorySink()
    ingestor = Ingestor(keyring, Schema(), RateLimiter(), sink, Responses(), default_limit=100,
                        max_decompressed_bytes=1_000_000, dedup=dedup)  # fmt: skip

    async def scenario():
        with_ids, without_ids = Collector(), Collector()
        coordinator.proc.send_signal(signal.SIGSTOP)
        try:
            ingestor.submit(request(key, batch(2), idempotency_key=b"order-1"), with_ids)
            ingestor.submit(request(key, batch(1)), without_ids)
            assert [count for _, _, count in sink.appended] == [1]  # only the one without ids
            sink.complete()
            await asyncio.sleep(0.05)  # the loop turns: nothing may answer the parked one
            assert without_ids.status() == 202 and with_ids.data == []
        finally:
            coordinator.proc.send_signal(signal.SIGCONT)
        await polled(lambda: len(sink.appended) == 2, "the parked request reached the commit")
        assert with_ids.data == []  # still no answer before the commit is durable
        sink.complete()
        return with_ids

    with_ids = asyncio.run(scenario())
    assert with_ids.status() == 202 and with_ids.body() == {"accepted": 2}
    poll_until(
        lambda: remote_value(coordinator.url, batch_key("default", b"order-1")) == b"d2",
        DEADLINE_S,
    )
