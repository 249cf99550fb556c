"""The events columns of event_columns.py flow log -> Parquet -> query, typed JSON intact."""

from __future__ import annotations

from pathlib import Path

import duckdb
import msgspec
import orjson
import pytest

from inslytic_fast.event_columns import (
    COLUMN_OF_LOG_KEY,
    EVENT_COLUMN_NAMES,
    EVENT_COLUMN_SPECS,
    EVENT_LINE_COLUMNS_SQL,
)
from inslytic_fast.ingest.schema import EventLimits, Schema
from inslytic_fast.log.format import frame_record, segment_name
from inslytic_fast.storage.layout import EVENTS_DIRNAME
from inslytic_fast.storage.query import run_query
from inslytic_fast.storage.roller import Roller

SEGMENT_EVENT = {
    "eventName": "Order Completed",
    "timestamp": "2026-02-16T10:30:05Z",
    "anonymousId": "anon-1",
    "userId": "user-1",
    "properties": {"amount": 42.5, "paid": True, "items": [{"sku": "a", "qty": 2}], "note": "x"},
    "pageUrl": "https://shop.example/checkout",
    "type": "track",
    "messageId": "msg-1",
    "sentAt": "2026-02-16T10:30:07Z",
    "originalTimestamp": "2026-02-16T10:30:00Z",
    "traits": {"plan": "pro", "seats": 3},
    "context": {"library": {"name": "analytics-python"}, "page": {"url": "x"}},
    "integrations": {"All": True},
}
INGEST_EVENT = {
    "eventName": "page_viewed",
    "timestamp": "2026-02-16T10:30:00Z",
    "anonymousId": "anon-2",
    "sessionId": "sess-2",
    "consentGiven": True,
    "properties": {"path": "/pricing"},
}


def write_sealed_log(data_dir: Path, records: list[dict]) -> None:
    log_dir = data_dir / "log"
    log_dir.mkdir(parents=True)
    with open(log_dir / segment_name("w0", 1), "wb") as f:
        for record in records:
            f.write(frame_record(orjson.dumps(record) + b"\n"))
    (log_dir / segment_name("w0", 2)).touch()  # a successor seals it


RECORDS = [
    {"p": "shop", "r": 1771237807000000, "b": "0" * 33, "e": [SEGMENT_EVENT]},
    {"p": "shop", "r": 1771237808000000, "b": "1" * 33, "k": "retry-me", "e": [INGEST_EVENT]},
]

QUERY = """
    SELECT type, message_id, strftime(sent_at, '%H:%M:%S'),
           strftime(original_timestamp, '%H:%M:%S'), strftime("timestamp", '%H:%M:%S'),
           properties_json->>'$.amount', json_type(properties_json->'$.paid'),
           properties_json->'$.items[0].qty', properties['amount'], properties['paid'],
           traits->>'$.plan', CAST(traits->'$.seats' AS INTEGER),
           context->>'$.library.name', integrations->>'$.All', idempotency_key,
           properties['path'], properties_json->>'$.path'
    FROM events ORDER BY event_id
"""
EXPECTED = [
    ("track", "msg-1", "10:30:07", "10:30:00", "10:30:05", "42.5", "BOOLEAN", "2", "42.5",
     "true", "pro", 3, "analytics-python", "true", None, None, None),
    (None, None, None, None, "10:30:00", None, None, None, None, None, None, None, None, None,
     "retry-me", "/pricing", "/pricing"),
]  # fmt: skip


@pytest.mark.parametrize("rolled", [False, True], ids=["log_tail", "parquet"])
def test_new_columns_keep_types_from_the_log_and_from_parquet(tmp_path, rolled):
    write_sealed_log(tmp_path, RECORDS)
    if rolled:
        assert Roller(tmp_path).roll_once() == 2
        assert not list((tmp_path / "log").glob("*00001.log"))
    _, rows = run_query(tmp_path, QUERY)
    assert rows == EXPECTED
    _, described = run_query(tmp_path, "DESCRIBE events")
    assert [r[0] for r in described] == list(EVENT_COLUMN_NAMES)
    assert {r[0]: r[1] for r in described}["traits"] == "JSON"


@pytest.mark.parametrize("rolled", [False, True], ids=["log_tail", "parquet"])
def test_pretty_printed_json_kept_verbatim_is_read_whole(tmp_path, rolled):
    # A Segment client's JSON is stored as sent (msgspec Raw), whitespace and newlines included;
    # a newline used to cut the record's NDJSON line: every query of the log tail failed and
    # the roller quarantined the acknowledged events.
    pretty = orjson.dumps([SEGMENT_EVENT], option=orjson.OPT_INDENT_2)
    assert pretty.count(b"\n") > 10
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    with open(log_dir / segment_name("w0", 1), "wb") as f:
        f.write(frame_record(b'{"p":"shop","r":1771237807000000,"b":"%b","e":%b}\n'
                             % (b"0" * 33, pretty)))  # fmt: skip
    (log_dir / segment_name("w0", 2)).touch()
    if rolled:
        assert Roller(tmp_path).roll_once() == 1
        assert not (tmp_path / "quarantine").exists()
    _, rows = run_query(tmp_path, QUERY)
    assert rows == EXPECTED[:1]


def test_parquet_written_before_the_new_columns_reads_them_as_null(tmp_path):
    write_sealed_log(tmp_path, RECORDS[1:])
    Roller(tmp_path).roll_once()
    (rolled,) = (tmp_path / EVENTS_DIRNAME).rglob("*.parquet")
    old_columns = [c.name for c in EVENT_COLUMN_SPECS[: EVENT_COLUMN_NAMES.index("os") + 1]]
    # The columns this project's Parquet files had before event_columns.py added any, with
    # `properties` stored as a MAP (it is derived from properties_json since).
    stored_map = """json_transform("properties_json", '"MAP(VARCHAR, VARCHAR)"')"""
    select = ", ".join(
        f'{stored_map} AS "properties"' if c == "properties" else f'"{c}"' for c in old_columns
    )
    duckdb.sql(
        f"COPY (SELECT {select} FROM read_parquet('{rolled}')) TO '{rolled}.old' (FORMAT parquet)"
    )
    rolled.unlink()
    Path(f"{rolled}.old").rename(rolled)
    _, rows = run_query(
        tmp_path, "SELECT event_name, type, message_id, traits, properties['path'] FROM events"
    )
    assert rows == [("page_viewed", None, None, None, "/pricing")]


# How the ingest Struct's JSON encoding of each kind of field must be read from the log
# (log_type) and stored (sql_type) for a value to reach its column unchanged.
LOG_TYPE_OF_KIND = {
    "string": "VARCHAR",
    "device_type": "VARCHAR",
    "timestamp": "VARCHAR",  # RFC 3339 text, cast with a fallback (event_columns.py)
    "boolean": "BOOLEAN",
    "properties": "JSON",
}
SQL_TYPE_OF_KIND = {
    "string": "VARCHAR",
    "device_type": "VARCHAR",
    "timestamp": "TIMESTAMPTZ",
    "boolean": "BOOLEAN",
    "properties": "MAP(VARCHAR, VARCHAR)",
}


def test_the_ingest_struct_matches_the_event_columns_field_for_field():
    schema = Schema(EventLimits())
    struct_fields = msgspec.structs.fields(schema.Event)
    assert [f.encode_name for f in struct_fields] == [spec.name for spec in schema.fields]
    for spec, field in zip(schema.fields, struct_fields, strict=True):
        column = COLUMN_OF_LOG_KEY[spec.name]
        assert f"'{spec.name}': '{column.log_type}'" in EVENT_LINE_COLUMNS_SQL
        assert field.name == column.name, spec.name
        assert (column.log_type, column.sql_type) == (
            LOG_TYPE_OF_KIND[spec.kind],
            SQL_TYPE_OF_KIND[spec.kind],
        ), spec.name
        if spec.required:
            assert field.required, spec.name
        elif spec.kind == "properties":
            assert field.default_factory is dict  # omitted when empty: read back as {}
        else:
            assert field.default is None, spec.name  # omitted: read back as NULL


def test_the_segment_log_event_writes_only_keys_the_columns_read_with_their_types():
    # segment.LogEvent spells the log keys a second time (a hand-written Struct on the Segment
    # hot path): a misspelt key would be written to the log and read by no column.
    from datetime import datetime
    from types import NoneType
    from typing import get_args

    from inslytic_fast.ingest.segment import LogEvent

    python_type_of_sql = {"VARCHAR": str, "TIMESTAMPTZ": datetime}
    for field in msgspec.structs.fields(LogEvent):
        column = COLUMN_OF_LOG_KEY.get(field.encode_name)
        assert column is not None, f"LogEvent.{field.name} is no column's log key"
        assert f"'{field.encode_name}': '{column.log_type}'" in EVENT_LINE_COLUMNS_SQL
        written = set(get_args(field.type) or (field.type,)) - {NoneType}
        # JSON and MAP columns are read from the JSON text the Struct writes as it came.
        assert written == {python_type_of_sql.get(column.sql_type, msgspec.Raw)}, field.name


FULL_INGEST_EVENT = {
    "eventName": "checkout_started",
    "timestamp": "2026-02-16T11:30:00.250+01:00",
    "anonymousId": "anon-3",
    "sessionId": "sess-3",
    "consentGiven": False,
    "userId": "user-3",
    "properties": {"plan": "pro"},
    "pageUrl": "https://shop.example/cart",
    "pageTitle": "Cart",
    "referrer": "https://search.example/",
    "utmSource": "news",
    "utmMedium": "email",
    "utmCampaign": "spring",
    "deviceType": "tablet",
    "browser": "Firefox",
    "os": "Linux",
}


@pytest.mark.parametrize("rolled", [False, True], ids=["log_tail", "parquet"])
def test_every_ingest_field_reaches_the_column_the_table_names(tmp_path, rolled):
    schema = Schema(EventLimits())
    assert set(FULL_INGEST_EVENT) == {spec.name for spec in schema.fields}
    events = schema.decode(orjson.dumps({"events": [FULL_INGEST_EVENT]}))
    record = b'{"p":"shop","r":1771237807000000,"b":"' + b"2" * 33 + b'","e":'
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    with open(log_dir / segment_name("w0", 1), "wb") as f:
        f.write(frame_record(record + schema.encode_events(events) + b"}\n"))
    (log_dir / segment_name("w0", 2)).touch()
    if rolled:
        assert Roller(tmp_path).roll_once() == 1
    columns = [COLUMN_OF_LOG_KEY[name].name for name in FULL_INGEST_EVENT]
    _, rows = run_query(
        tmp_path, f"SELECT {', '.join(f'{chr(34)}{c}{chr(34)}' for c in columns)} FROM events"
    )
    (row,) = rows
    stored = dict(zip(FULL_INGEST_EVENT, row, strict=True))
    assert stored.pop("timestamp").isoformat() == "2026-02-16T10:30:00.250000+00:00"
    assert stored.pop("properties") == {"plan": "pro"}
    assert stored == {
        k: v for k, v in FULL_INGEST_EVENT.items() if k not in ("timestamp", "properties")
    }
