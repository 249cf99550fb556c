"""The dedup table's figures for operators: duplicates counted by kind, the effective window
(shorter than 24 h once the table is full), and its size as a setting."""

from __future__ import annotations

import pytest

from inslytic_fast.config import ConfigError, resolve
from inslytic_fast.ingest.dedup import (
    CLAIMED,
    DEFAULT_WINDOW_S,
    IN_FLIGHT,
    DedupTable,
    batch_key,
    message_key,
)

from .adversarial_helpers import TICK_DEADLINE_S, metric, poll_until
from .test_segment import basic, message


def test_duplicates_and_retries_in_flight_are_counted_by_kind(tmp_path):
    table = DedupTable(tmp_path / "t", create=True, slots=64)
    _, claimed = table.claim([message_key("shop", "m1"), batch_key("shop", b"k1")], owner=0)
    assert table.claim([batch_key("shop", b"k1")], owner=1)[0] == [IN_FLIGHT]
    table.settle(claimed, 2)
    assert table.claim([message_key("shop", "m1")], owner=1)[0] == [2]
    counters = table.counters()
    assert counters["duplicates"] == {"message": 1, "batch": 0}
    assert counters["in_flight"] == {"message": 0, "batch": 1}


def test_the_effective_window_is_the_age_of_the_last_entry_dropped_for_room(tmp_path):
    clock = [1_000_000.0]
    table = DedupTable(tmp_path / "t", create=True, slots=8, clock=lambda: clock[0])  # 1 bucket
    other = DedupTable(tmp_path / "t", clock=lambda: clock[0])  # another worker's mapping
    assert table.effective_window_s() == DEFAULT_WINDOW_S  # nothing dropped: the whole window
    for i in range(9):  # one entry every 10 s: the ninth drops the first, 80 s old
        table.settle(table.claim([message_key("shop", f"m{i}")], owner=0)[1], 1)
        clock[0] += 10
    assert table.evictions == 1
    assert other.effective_window_s() == 80  # shared through the file
    assert table.gauges() == {"window_seconds": 80, "table_slots": 8}
    clock[0] += DEFAULT_WINDOW_S  # no eviction for a whole window: the whole window again
    assert table.effective_window_s() == DEFAULT_WINDOW_S
    assert table.claim([message_key("shop", "m8")], owner=0)[0] == [CLAIMED]  # expired


@pytest.mark.parametrize("bad", ["0", "1000", "4"])
def test_dedup_slots_must_be_a_power_of_two(bad):
    with pytest.raises(ConfigError, match="dedup_slots must be a power of two"):
        resolve({}, {"INSLYTIC_DEDUP_SLOTS": bad})
    assert resolve({}, {"INSLYTIC_DEDUP_SLOTS": "1024"}).dedup_slots == 1024


def test_metrics_show_duplicates_and_the_table_size(make_server):
    server = make_server("--workers", "2", "--dedup-slots", "1024")
    auth = basic(server.first_run_key)
    batch = {"batch": [message(messageId="dm-1"), message(messageId="dm-2")]}
    for _ in range(3):
        assert server.request("POST", "/v1/batch", batch, headers=auth)[0] == 200
    assert metric(server, "inslytic_dedup_table_slots") == 1024
    assert metric(server, "inslytic_dedup_window_seconds") == DEFAULT_WINDOW_S
    # Summed over both workers, whichever answered the retries (each publishes once a second).
    poll_until(
        lambda: metric(server, 'inslytic_dedup_duplicates_total{kind="message"}') == 4,
        TICK_DEADLINE_S,
    )
    assert metric(server, 'inslytic_dedup_duplicates_total{kind="batch"}') == 0
    assert metric(server, "inslytic_dedup_evictions_total") == 0
    assert "inslytic_dedup_cross_node_total" not in server.request("GET", "/metrics")[2].decode()
