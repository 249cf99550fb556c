"""Segment-spec intake: mapping and clock skew (no I/O), the dedup table, and a real server."""

from __future__ import annotations

import base64
import gzip
import signal
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from inslytic_fast.ingest.dedup import CLAIMED, IN_FLIGHT, DedupTable, message_key
from inslytic_fast.ingest.segment import (
    MAX_FUTURE_S,
    MAX_PAST_S,
    SegmentCodec,
    SegmentRejected,
    corrected_timestamp,
)
from inslytic_fast.storage.query import run_query

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def message(**fields) -> dict:
    base = {
        "type": "track",
        "event": "Order Completed",
        "userId": "u1",
        "anonymousId": "a1",
        "messageId": "m1",
        "timestamp": "2026-03-01T11:59:00Z",
        "properties": {"amount": 42.5, "paid": True, "items": [{"sku": "a"}]},
        "context": {
            "page": {"url": "https://shop.example/p", "title": "P", "referrer": "https://r/"},
            "campaign": {"source": "news", "medium": "email", "name": "spring"},
            "userAgent": "Mozilla/5.0",
            "device": {"type": "mobile"},
            "os": {"name": "iOS"},
            "library": {"name": "analytics-python", "version": "2.3.4"},
        },
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def mapped(body: dict, route_type: str | None = None, now: datetime = NOW) -> list[dict]:
    codec = SegmentCodec()
    decoded = codec.decode(orjson.dumps(body), route_type)
    return orjson.loads(codec.encode(decoded.messages, decoded.sent_at, now.timestamp()))


# -- mapping ---------------------------------------------------------------------------------


def test_every_message_type_maps_to_the_documented_columns():
    batch = {
        "batch": [
            message(),
            message(type="page", event=None, name="Pricing", context=None,
                    properties={"url": "https://x/pricing", "title": "Pricing", "n": 1}),
            message(type="screen", event=None, name="Home"),
            message(type="identify", event=None, userId=42, traits={"plan": "pro", "seats": 3}),
            message(type="group", event=None, groupId="g1", traits={"name": "Acme"}),
            message(type="alias", event=None, previousId="a1", userId="u2"),
        ],
        "sentAt": "2026-03-01T12:00:00Z",
    }  # fmt: skip
    track, page, screen, identify, group, alias = mapped(batch)
    assert track["type"] == "track" and track["eventName"] == "Order Completed"
    assert track["properties"] == {"amount": 42.5, "paid": True, "items": [{"sku": "a"}]}
    assert (track["pageUrl"], track["pageTitle"], track["referrer"]) == (
        "https://shop.example/p", "P", "https://r/",
    )  # fmt: skip
    assert (track["utmSource"], track["utmMedium"], track["utmCampaign"]) == (
        "news", "email", "spring",
    )  # fmt: skip
    assert (track["userAgent"], track["deviceType"], track["os"]) == (
        "Mozilla/5.0", "mobile", "iOS",
    )  # fmt: skip
    assert track["context"]["library"] == {"name": "analytics-python", "version": "2.3.4"}
    assert (track["userId"], track["anonymousId"], track["messageId"]) == ("u1", "a1", "m1")
    assert page["eventName"] == "Pricing" and page["pageUrl"] == "https://x/pricing"
    assert page["pageTitle"] == "Pricing" and "context" not in page
    assert screen["type"] == "screen" and screen["eventName"] == "Home"
    assert identify["userId"] == "42" and identify["traits"] == {"plan": "pro", "seats": 3}
    assert "eventName" not in identify
    assert group["groupId"] == "g1" and group["traits"] == {"name": "Acme"}
    assert alias["previousId"] == "a1" and alias["userId"] == "u2"


def test_a_single_message_route_sets_the_type_and_reads_the_write_key():
    codec = SegmentCodec()
    decoded = codec.decode(orjson.dumps({**message(type=None), "writeKey": "ik_x"}), "track")
    assert decoded.write_key == "ik_x" and decoded.messages[0].type == "track"


def test_device_types_outside_the_column_enum_stay_only_in_context():
    [event] = mapped({"batch": [message(context={"device": {"type": "ios"}})]})
    assert "deviceType" not in event and event["context"] == {"device": {"type": "ios"}}


@pytest.mark.parametrize(
    "bad, detail",
    [
        (message(userId=None, anonymousId=None), "batch[0]: userId or anonymousId is required"),
        (message(type="nope"), "batch[0]: type must be one of"),
        (message(event=None), "batch[0]: event is required for a track message"),
        (message(type="group", groupId=None), "batch[0]: groupId is required"),
        (message(type="alias"), "batch[0]: previousId is required"),
        (message(properties=[1]), "batch[0]: properties must be an object"),
        (message(context="x"), "batch[0]: context must be an object"),
    ],
)
def test_invalid_messages_are_refused_with_a_reason(bad, detail):
    with pytest.raises(SegmentRejected) as caught:
        mapped({"batch": [message(), bad]})
    assert caught.value.details[0].replace("[1]", "[0]").startswith(detail)


def test_null_json_fields_are_absent():
    [event] = mapped({"batch": [message(properties=None, traits=None) | {"traits": None}]})
    assert "traits" not in event and "properties" not in event


# -- clock skew ------------------------------------------------------------------------------


def test_a_client_clock_an_hour_slow_is_corrected_and_the_original_kept():
    sent = NOW - timedelta(hours=1)
    happened = sent - timedelta(seconds=30)
    assert corrected_timestamp(happened, sent, NOW) == NOW - timedelta(seconds=30)
    [event] = mapped(
        {"batch": [message(timestamp=happened.isoformat())], "sentAt": sent.isoformat()}
    )
    assert event["timestamp"] == "2026-03-01T11:59:30Z"
    assert event["originalTimestamp"] == "2026-03-01T10:59:30Z"
    assert event["sentAt"] == "2026-03-01T11:00:00Z"


def test_transit_time_is_not_a_skew():
    sent = NOW - timedelta(milliseconds=300)
    happened = sent - timedelta(seconds=5)
    assert corrected_timestamp(happened, sent, NOW) == happened


def test_no_timestamp_means_when_it_was_sent_or_received():
    assert corrected_timestamp(None, NOW - timedelta(milliseconds=10), NOW) == NOW - timedelta(
        milliseconds=10
    )
    assert corrected_timestamp(None, None, NOW) == NOW


def test_timestamps_outside_the_bounds_are_replaced_by_received_at():
    future = NOW + timedelta(seconds=MAX_FUTURE_S + 60)
    past = NOW - timedelta(seconds=MAX_PAST_S + 60)
    assert corrected_timestamp(future, None, NOW) == NOW
    assert corrected_timestamp(past, None, NOW) == NOW
    assert corrected_timestamp(datetime(1, 1, 1, tzinfo=UTC), None, NOW) == NOW
    inside = NOW - timedelta(days=30)
    assert corrected_timestamp(inside, None, NOW) == inside
    [event] = mapped({"batch": [message(timestamp="0001-01-01T00:00:00Z")]})
    assert event["timestamp"] == "2026-03-01T12:00:00Z"
    assert event["originalTimestamp"] == "0001-01-01T00:00:00Z"


# -- the dedup table ---------------------------------------------------------------------------


def test_claims_are_seen_by_another_mapping_of_the_table(tmp_path):
    clock = [1_000_000.0]
    one = DedupTable(tmp_path / "t", create=True, slots=64, clock=lambda: clock[0])
    other = DedupTable(tmp_path / "t", clock=lambda: clock[0])  # as another worker maps it
    key = message_key("shop", "m1")
    statuses, claimed = one.claim([key], owner=0)
    assert statuses == [CLAIMED] and len(claimed) == 1
    assert other.claim([key], owner=1)[0] == [IN_FLIGHT]
    one.settle(claimed, 3)
    assert other.claim([key], owner=1) == ([3], [])
    clock[0] += one.window_s + 1  # past the window: stored again if sent again
    assert other.claim([key], owner=1)[0] == [CLAIMED]


def test_a_failed_commit_releases_the_claim(tmp_path):
    table = DedupTable(tmp_path / "t", create=True, slots=64)
    key = message_key("shop", "m1")
    _, claimed = table.claim([key], owner=0)
    table.release(claimed)
    assert table.claim([key], owner=0)[0] == [CLAIMED]


def test_a_dead_workers_claims_are_released_by_its_successor(tmp_path):
    table = DedupTable(tmp_path / "t", create=True, slots=64)
    table.claim([message_key("shop", "m1")], owner=3)
    table.claim([message_key("shop", "m2")], owner=1)
    assert table.release_owner(3) == 1
    assert table.claim([message_key("shop", "m1"), message_key("shop", "m2")], owner=0)[0] == [
        CLAIMED,
        IN_FLIGHT,
    ]


def test_a_full_bucket_drops_its_oldest_entry(tmp_path):
    clock = [1_000_000.0]
    table = DedupTable(tmp_path / "t", create=True, slots=8, clock=lambda: clock[0])  # 1 bucket
    keys = [message_key("shop", f"m{i}") for i in range(9)]
    for key in keys[:8]:
        clock[0] += 1
        table.settle(table.claim([key], owner=0)[1], 1)
    clock[0] += 1
    table.settle(table.claim([keys[8]], owner=0)[1], 1)
    assert table.evictions == 1
    assert table.claim(keys[1:], owner=0)[0] == [1] * 8  # the newest eight are still known
    assert table.claim([keys[0]], owner=0)[0] == [CLAIMED]  # the oldest was dropped


# -- a real server -----------------------------------------------------------------------------


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def rows(server, sql: str):
    return run_query(server.data_dir, sql)[1]


@pytest.fixture(scope="module")
def segment_server(tmp_path_factory):
    from .conftest import ServerProcess

    data_dir = tmp_path_factory.mktemp("segment") / "data"
    server = ServerProcess(data_dir, "--workers", "2", "--events-per-minute", "0").start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def test_batch_with_basic_auth_is_stored_with_the_mapping(segment_server):
    key = segment_server.first_run_key
    body = {"batch": [message(messageId="map-1")], "sentAt": datetime.now(UTC).isoformat()}
    status, _, answer = segment_server.request("POST", "/v1/batch", body, headers=basic(key))
    assert (status, orjson.loads(answer)) == (200, {"success": True})
    [row] = rows(
        segment_server,
        "SELECT type, event_name, user_id, page_url, utm_source, user_agent, "
        "properties_json->>'$.amount', json_type(properties_json->'$.paid'), "
        "context->>'$.library.name' FROM events WHERE message_id = 'map-1'",
    )
    assert row == ("track", "Order Completed", "u1", "https://shop.example/p", "news",
                   "Mozilla/5.0", "42.5", "BOOLEAN", "analytics-python")  # fmt: skip


def test_write_key_in_the_body_and_the_header_must_agree(segment_server):
    key = segment_server.first_run_key
    one = message(messageId="wk-1")
    status, _, _ = segment_server.request("POST", "/v1/track", {**one, "writeKey": key})
    assert status == 200
    status, _, _ = segment_server.request(
        "POST", "/v1/track", {**message(messageId="wk-2"), "writeKey": "ik_other"},
        headers=basic(key),
    )  # fmt: skip
    assert status == 401
    status, _, _ = segment_server.request("POST", "/v1/track", message(messageId="wk-3"))
    assert status == 401
    assert [r[0] for r in rows(segment_server, "SELECT message_id FROM events "
                               "WHERE message_id LIKE 'wk-%'")] == ["wk-1"]  # fmt: skip


def test_retried_messages_are_stored_once_whichever_worker_answers(segment_server):
    key = segment_server.first_run_key
    body = {"batch": [message(messageId=f"retry-{i}") for i in range(5)]}
    workers = set()
    # New connections: SO_REUSEPORT spreads them over both workers by a hash of the client's
    # port, so 12 of them all land on one worker once in ~2,000 runs; go on until both did.
    for attempt in range(400):
        status, headers, answer = segment_server.request(
            "POST", "/v1/batch", body, headers=basic(key)
        )
        assert (status, answer) == (200, b'{"success":true}')
        workers.add(segment_server.request("GET", "/health")[1]["x-inslytic-worker"])
        if attempt >= 11 and len(workers) == 2:
            break
    # A retry that also carries new messages stores only those.
    body["batch"].append(message(messageId="retry-new"))
    assert segment_server.request("POST", "/v1/batch", body, headers=basic(key))[0] == 200
    assert rows(segment_server, "SELECT count(*), count(DISTINCT message_id) FROM events "
                "WHERE message_id LIKE 'retry-%'") == [(6, 6)]  # fmt: skip
    assert workers == {"w0", "w1"}


def test_idempotency_key_retries_answer_as_the_first_time(segment_server):
    key = segment_server.first_run_key
    events = [{"eventName": "signup", "timestamp": "2026-02-16T10:30:00Z", "anonymousId": "a",
               "sessionId": "s", "consentGiven": True}] * 3  # fmt: skip
    answers = {
        segment_server.ingest(events, key, headers={"Idempotency-Key": "order-77"})[::2]
        for _ in range(8)
    }
    assert answers == {(202, b'{"accepted":3}')}
    assert rows(segment_server, "SELECT count(*) FROM events "
                "WHERE idempotency_key = 'order-77'") == [(3,)]  # fmt: skip
    status, _, body = segment_server.ingest(events, key, headers={"Idempotency-Key": "x" * 256})
    assert status == 400 and b"Idempotency-Key" in body


def test_gzip_beacon_with_the_key_in_the_body_and_no_content_encoding(segment_server):
    key = segment_server.first_run_key
    body = {"writeKey": key, "events": [{"eventName": "beacon", "timestamp": "2026-02-16T10:30:00Z",
            "anonymousId": "gz", "sessionId": "s", "consentGiven": True}]}  # fmt: skip
    status, _, answer = segment_server.request(
        "POST", "/v1/ingest", gzip.compress(orjson.dumps(body)),
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )  # fmt: skip
    assert (status, answer) == (202, b'{"accepted":1}')
    wrong = {**body, "writeKey": "ik_live_wrong"}
    status, _, _ = segment_server.request(
        "POST", "/v1/ingest", orjson.dumps(wrong), headers={"Content-Type": "text/plain"}
    )
    assert status == 401
    status, _, _ = segment_server.request(
        "POST", "/v1/ingest", orjson.dumps(wrong),
        headers={"Content-Type": "text/plain", "Authorization": f"Bearer {key}"},
    )  # fmt: skip
    assert status == 401  # the header wins, and a body key that disagrees is refused


def test_preflight_of_the_segment_routes_allows_what_browser_sdks_send(segment_server):
    status, headers, _ = segment_server.request(
        "OPTIONS", "/v1/batch", headers={"Origin": "https://a.example"}
    )
    assert status == 204
    allowed = headers["access-control-allow-headers"]
    for name in ("Authorization", "Content-Type", "Content-Encoding", "Idempotency-Key"):
        assert name in allowed


def test_origin_allowlist_is_enforced_by_the_server(make_server):
    server = make_server("--workers", "1", "--cors-origins", "https://app.example")
    key = server.first_run_key
    body = {"batch": [message(messageId="o-1")]}
    status, _, answer = server.request(
        "POST", "/v1/batch", body, headers={**basic(key), "Origin": "https://evil.example"}
    )
    assert status == 403 and b"Origin not allowed" in answer
    status, headers, _ = server.request(
        "POST", "/v1/batch", body, headers={**basic(key), "Origin": "https://app.example"}
    )
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    assert (
        server.request(
            "POST", "/v1/batch", {"batch": [message(messageId="o-2")]}, headers=basic(key)
        )[0]
        == 200
    )  # fmt: skip  (no Origin: not a browser)


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_dedup_survives_a_restart_and_a_crash(make_server, how):
    server = make_server("--workers", "2")
    key = server.first_run_key
    body = {"batch": [message(messageId="durable-1"), message(messageId="durable-2")]}
    events = [{"eventName": "x", "timestamp": "2026-02-16T10:30:00Z", "anonymousId": "a",
               "sessionId": "s", "consentGiven": True}] * 2  # fmt: skip
    assert server.request("POST", "/v1/batch", body, headers=basic(key))[0] == 200
    assert server.ingest(events, key, headers={"Idempotency-Key": "k-1"})[0] == 202
    server.stop(signal.SIGTERM if how == "restart" else signal.SIGKILL)
    server.start()
    assert server.request("POST", "/v1/batch", body, headers=basic(key))[0] == 200
    assert server.ingest(events, key, headers={"Idempotency-Key": "k-1"})[::2] == (
        202, b'{"accepted":2}',
    )  # fmt: skip
    server.stop()
    assert rows(server, "SELECT count(*) FROM events") == [(4,)]


def test_the_short_paths_analytics_js_posts_to_are_served(segment_server):
    key = segment_server.first_run_key
    status, _, _ = segment_server.request(
        "POST", "/v1/t", {**message(messageId="short-1"), "writeKey": key},
        headers={"Content-Type": "text/plain"},
    )  # fmt: skip
    assert status == 200
    status, _, _ = segment_server.request(
        "POST", "/v1/b", {"batch": [message(messageId="short-2")], "writeKey": key}
    )
    assert status == 200
    assert rows(segment_server, "SELECT count(*) FROM events WHERE message_id LIKE 'short-%'") == [
        (2,)
    ]


def test_projects_set_origins_limits_the_sites_a_key_works_from(make_server):
    from .conftest import cli

    server = make_server("--workers", "2")
    key = server.first_run_key
    shop, evil = "https://shop.example", "https://evil.example"

    def status(origin: str | None, message_id: str) -> int:
        headers = {**basic(key), **({"Origin": origin} if origin else {})}
        return server.request(
            "POST", "/v1/batch", {"batch": [message(messageId=message_id)]}, headers=headers
        )[0]

    assert status(evil, "so-0") == 200  # --cors-origins is * and no project list yet
    done = cli("projects", "set-origins", "default", shop, data_dir=server.data_dir)
    assert shop in done.stdout
    deadline = time.monotonic() + 30
    while status(evil, "so-1") != 403:  # running servers pick the catalog up within 2 s
        assert time.monotonic() < deadline, "set-origins was not picked up"
        time.sleep(0.1)
    assert status(shop, "so-2") == 200 and status(None, "so-3") == 200
    assert cli("projects", "set-origins", "default", "https://a/b", data_dir=server.data_dir,
               check=False).returncode == 2  # fmt: skip
    cli("projects", "set-origins", "default", "any", data_dir=server.data_dir)
    deadline = time.monotonic() + 30
    while status(evil, "so-4") != 200:
        assert time.monotonic() < deadline, "set-origins any was not picked up"
        time.sleep(0.1)


def test_keys_in_bodies_and_basic_auth_stay_out_of_the_access_log(make_server):
    server = make_server("--workers", "1", "--access-log")
    key = server.first_run_key
    beacon = {"writeKey": key, "events": [{"eventName": "b", "timestamp": "2026-02-16T10:30:00Z",
              "anonymousId": "a", "sessionId": "s", "consentGiven": True}]}  # fmt: skip
    sent = [
        server.request("POST", "/v1/ingest", orjson.dumps(beacon),
                       headers={"Content-Type": "text/plain"})[0],
        server.request("POST", "/v1/batch", {"batch": [message(messageId="log-1")]},
                       headers=basic(key))[0],
        server.request("POST", "/v1/t", {**message(messageId="log-2"), "writeKey": key})[0],
    ]  # fmt: skip
    assert sent == [202, 200, 200]
    encoded = base64.b64encode(f"{key}:".encode()).decode()
    wait = time.monotonic() + 30
    while server.stderr().count("/v1/") < 3:  # access lines are written as answers go out
        assert time.monotonic() < wait, server.stderr()
        time.sleep(0.05)
    server.stop()
    logged = server.stderr()  # the logs; stdout holds only the first-run banner with the key
    assert '"POST /v1/batch"' in logged and '"POST /v1/t"' in logged
    assert key not in logged and encoded not in logged and key[8:20] not in logged
