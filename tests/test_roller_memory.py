"""The roller's DuckDB memory limit (storage/roller.py ROLLER_MEMORY_LIMIT) must let a segment
of anything ingest accepts roll: a roll that runs out of memory fails at every retry, and the
log then fills until ingest refuses. However much the issue-14 RSS budget would like it lower.
The worst case found: full default segments of the largest events (32 KiB, 100 properties of
long values), every property name its own; DuckDB needs the most for it.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import orjson

from inslytic_fast.ingest.fields import EventLimits
from inslytic_fast.ingest.schema import Schema
from inslytic_fast.log.writer import DEFAULT_SEGMENT_MAX_BYTES
from inslytic_fast.storage.roller import Roller

from .storage_helpers import open_log, run_query

EVENTS_PER_BATCH = 100
SEGMENTS = 2  # one connection rolls them in turn, as the roller process does
BATCH_BYTES = EventLimits().max_event_bytes * EVENTS_PER_BATCH
BATCHES_PER_SEGMENT = DEFAULT_SEGMENT_MAX_BYTES // BATCH_BYTES + 1


def largest_events(limits: EventLimits, seed: int) -> bytes:
    """A batch of events as large as ingest accepts, every property name its own (DuckDB's
    JSON reader needs more for many distinct keys), decoded and encoded as ingest does."""
    rng = random.Random(seed)
    events = []
    for i in range(EVENTS_PER_BATCH):
        names = [f"p{j}_{rng.randrange(10**9)}" for j in range(limits.max_properties)]
        event = {"eventName": "large", "timestamp": "2026-02-16T10:30:00.000Z",
                 "anonymousId": f"anon-{seed}-{i}", "sessionId": "s", "consentGiven": True,
                 "properties": dict.fromkeys(names, "")}  # fmt: skip
        room = limits.max_event_bytes - 64 - len(orjson.dumps(event))
        value = "x" * min(limits.max_property_value_length, room // limits.max_properties)
        event["properties"] = dict.fromkeys(event["properties"], value)
        events.append(event)
    schema = Schema(limits)
    body = orjson.dumps({"events": events})
    decoded = schema.decode(body)  # accepted by ingest, as large as it accepts
    assert max(len(orjson.dumps(e)) for e in events) > limits.max_event_bytes - 1024
    return schema.encode_events(decoded)


async def fill_one_segment(data_dir: Path) -> int:
    """A sealed segment of DEFAULT_SEGMENT_MAX_BYTES (and a little more) of the largest events."""
    # Every event of a segment with its own names: with fewer distinct ones (4 batches cycled)
    # it rolled within 128MB.
    batches = [largest_events(EventLimits(), seed) for seed in range(BATCHES_PER_SEGMENT)]
    log = open_log(data_dir, durability="none")
    loop = asyncio.get_running_loop()
    written = sent = 0
    while written < SEGMENTS * DEFAULT_SEGMENT_MAX_BYTES:
        batch = batches[sent % len(batches)]
        done = loop.create_future()
        log.append("shop", batch, EVENTS_PER_BATCH, done.set_result)
        assert await done is None
        written += len(batch)
        sent += EVENTS_PER_BATCH
    await log.close()
    return sent


def test_a_default_segment_of_the_largest_events_rolls_within_the_memory_limit(tmp_path):
    sent = asyncio.run(fill_one_segment(tmp_path))
    roller = Roller(tmp_path)
    try:
        # "128MB", "160MB" and "192MB" ran out of memory here (DuckDB 2.0.1); "256MB" did not.
        assert roller.roll_once() == sent
    finally:
        roller.stop()
    assert run_query(tmp_path, "SELECT count(*) FROM events")[1] == [(sent,)]
