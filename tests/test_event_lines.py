"""Log records -> event lines (storage/event_lines.py): what the roller and the log-tail reader
hand DuckDB instead of the nested record."""

from __future__ import annotations

import io

import orjson
import pytest

from inslytic_fast.log.format import MAX_EVENTS_PER_BATCH
from inslytic_fast.storage.event_lines import UnreadableRecord, event_lines, write_event_lines

PREFIX = "01a2174d-a42a-7000-9ed8-fb534111c"


def record(events: list, *, key: str | None = None, raw_events: bytes | None = None) -> bytes:
    head = b'{"p":"shop","r":1771237807000000,"b":"%b",' % PREFIX.encode()
    if key is not None:
        head += b'"k":%b,' % orjson.dumps(key)
    return head + b'"e":' + (raw_events or orjson.dumps(events)) + b"}\n"


def lines_of(data: bytes) -> list[dict]:
    assert data.endswith(b"\n")
    return [orjson.loads(line) for line in data.split(b"\n")[:-1]]


def test_each_event_becomes_one_line_with_the_envelope_and_its_index():
    events = [
        {"eventName": "a", "properties": {"x": "1"}},
        {"eventName": 'b \u00e9 \\ " }\n{', "userId": "u"},  # escapes, braces and a newline
        {"eventName": "c", "context": {"nested": [{"deep": True}]}},
    ]
    got = lines_of(event_lines(memoryview(record(events, key='retry "1" \\'))))
    assert got == [
        {"p": "shop", "r": 1771237807000000, "b": PREFIX, "k": 'retry "1" \\', "i": i, **event}
        for i, event in enumerate(events)
    ]


def test_a_one_event_record_without_a_key():
    [line] = lines_of(event_lines(record([{"eventName": "solo"}])))
    assert line == {"p": "shop", "r": 1771237807000000, "b": PREFIX, "i": 0, "eventName": "solo"}


def test_raw_newlines_in_an_event_become_spaces_and_never_split_its_line():
    # A Segment client's pretty-printed context is kept verbatim in the record (msgspec Raw).
    pretty = (
        b'[{"type":"track","context":{\n  "ip": "1.2.3.4",\n  "list": [\n{"a": 1}]\n}},\n'
        b'{"type":"page"}]'
    )
    got = lines_of(event_lines(record([], raw_events=pretty)))
    assert got == [
        {"p": "shop", "r": 1771237807000000, "b": PREFIX, "i": 0, "type": "track",
         "context": {"ip": "1.2.3.4", "list": [{"a": 1}]}},
        {"p": "shop", "r": 1771237807000000, "b": PREFIX, "i": 1, "type": "page"},
    ]  # fmt: skip


def test_the_largest_record_keeps_every_index():
    events = [{"eventName": "e"}] * MAX_EVENTS_PER_BATCH
    got = lines_of(event_lines(record(events)))
    assert [line["i"] for line in got] == list(range(MAX_EVENTS_PER_BATCH))


def test_an_empty_record_has_no_lines():
    assert event_lines(record([])) == b""


@pytest.mark.parametrize(
    "payload",
    [
        b"not json\n",
        b'{"p":"shop","r":1,"b":"x","e":5}\n',  # events not an array
        b'{"p":"shop","r":1,"b":"x"}\n',  # no events
        b'{"p":"shop","r":"1","b":"x","e":[]}\n',  # a mistyped envelope
        b'{"p":"shop","r":1,"b":"x","e":[{"a":1}]',  # cut short
        record([{"eventName": "e"}] * (MAX_EVENTS_PER_BATCH + 1)),
    ],
    ids=["garbage", "e-not-array", "no-e", "bad-r", "truncated", "too-many"],
)
def test_records_not_of_the_writers_shape_are_unreadable(payload):
    with pytest.raises(UnreadableRecord):
        event_lines(payload)


def test_write_event_lines_writes_the_readable_and_returns_the_rest():
    good = [record([{"eventName": f"e{i}"}]) for i in range(3)]
    bad = b"{broken\n"
    out = io.BytesIO()
    assert write_event_lines(out, [good[0], bad, good[1], good[2]]) == [bad]
    assert [line["eventName"] for line in lines_of(out.getvalue())] == ["e0", "e1", "e2"]
