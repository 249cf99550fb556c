"""The official Segment Python SDK (segment-analytics-python), unmodified, against a real server."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest

from inslytic_fast.storage.query import run_query

from .sdk_helpers import (
    AnswerLosingProxy,
    duplicate_message_ids,
    expected_rows,
    mapped_rows,
    sdk_test_server,
)

analytics = pytest.importorskip("segment.analytics", reason="pip install segment-analytics-python")

DEADLINE_S = 60


def client(host: str, key: str, **kwargs) -> analytics.Client:
    errors: list = []
    sdk = analytics.Client(
        write_key=key, host=host, on_error=lambda e, batch: errors.append(e), **kwargs
    )
    sdk.errors = errors
    return sdk


def send_every_call(sdk: analytics.Client, tag: str) -> None:
    sdk.identify(f"user-{tag}", {"plan": "pro", "seats": 3, "beta": True})
    sdk.track(f"user-{tag}", "Order Completed", {"amount": 42.5, "items": [{"sku": "a"}]},
              context={"campaign": {"source": "newsletter"}})  # fmt: skip
    sdk.page(f"user-{tag}", "Docs", "Pricing", {"url": "https://example.com/pricing", "n": 2})
    sdk.group(f"user-{tag}", f"group-{tag}", {"name": "Acme", "employees": 100})
    sdk.alias(f"anon-{tag}", f"user-{tag}")
    sdk.flush()


@pytest.fixture(scope="module")
def sdk_server(tmp_path_factory):
    yield from sdk_test_server(tmp_path_factory, "python-sdk")


def test_every_call_is_stored_with_the_segment_mapping(sdk_server):
    sdk = client(sdk_server.url, sdk_server.first_run_key, gzip=True)
    send_every_call(sdk, "plain")
    assert sdk.errors == []
    assert mapped_rows(sdk_server.data_dir, "plain") == expected_rows("plain", "analytics-python")


def test_a_retry_after_a_lost_answer_stores_nothing_twice(sdk_server):
    proxy = AnswerLosingProxy((sdk_server.host, sdk_server.port), lose=2)
    try:
        sdk = client(proxy.url, sdk_server.first_run_key)
        send_every_call(sdk, "lost")
    finally:
        proxy.close()
    assert proxy.lost == 2 and proxy.relayed >= 1  # the server stored the batch every time
    assert sdk.errors == []
    assert mapped_rows(sdk_server.data_dir, "lost") == expected_rows("lost", "analytics-python")
    assert duplicate_message_ids(sdk_server.data_dir) == []


class _Seen(logging.Handler):
    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


def test_a_real_503_is_retried_by_the_sdk_and_stored_once(make_server):
    # One connection allowed: while the test holds it, the server itself answers every other
    # connection 503 + Retry-After (protocol.py's connection cap), before reading a byte.
    server = make_server("--workers", "1", "--max-connections", "1")
    held = socket.create_connection((server.host, server.port))
    seen = _Seen("503")
    sdk_log = logging.getLogger("segment")
    sdk_log.addHandler(seen)
    sdk_log.setLevel(logging.DEBUG)
    try:
        sdk = client(server.url, server.first_run_key)
        for i in range(5):
            sdk.track("user-503", f"Step {i}", {"i": i})
        assert seen.event.wait(DEADLINE_S), "the SDK never saw the server's 503"
        held.close()
        deadline = time.monotonic() + DEADLINE_S
        sdk.flush()  # returns once the SDK's queue is empty: sent after its retries
        assert time.monotonic() < deadline
    finally:
        sdk_log.removeHandler(seen)
        held.close()
    assert sdk.errors == []
    rows = run_query(
        server.data_dir,
        "SELECT event_name, count(*) FROM events WHERE user_id = 'user-503' GROUP BY ALL "
        "ORDER BY 1",
    )[1]
    assert rows == [(f"Step {i}", 1) for i in range(5)]
