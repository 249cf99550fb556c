"""Hypothesis properties across modules.

1. Fast path vs thorough path, on bodies written the ways real JSON encoders (and attackers)
   write them: any whitespace, \\u escapes in keys and values, escaped slashes, duplicate keys.
   tests/test_schema.py checks the equivalence on ``json.dumps`` output; here the same events
   are re-serialised byte-differently, and the accepted result must not depend on the spelling.
2. Round trip: any accepted batch comes back from ``events`` unchanged, through the real
   commit log, the real roller (Parquet) and the real query, and through the log tail before
   the roll. Every field is compared with a value computed from the request, not from the
   decoder: timestamps as UTC instants, absent/null optional fields as NULL, properties as a map.
3. The protocol's answer to a byte stream does not depend on how the stream is cut into reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inslytic_fast.ingest.schema import DEVICE_TYPES, BatchRejected, Schema, event_fields
from inslytic_fast.log.writer import CommitLog
from inslytic_fast.storage.query import run_query
from inslytic_fast.storage.roller import Roller

from .protocol_helpers import make_conn, post, split_responses
from .test_schema import SMALL, near_valid_events

# -- 1. Spelling-independent validation ----------------------------------------------------

WHITESPACE = ["", "", "", " ", "\n", "\t", "\r\n", "  "]


def spell(value, rng: random.Random, duplicates: bool) -> str:
    """JSON text for ``value`` with random (legal) whitespace, escapes and, optionally,
    a decoy duplicate key before the real one (msgspec keeps the last, as JSON.parse does)."""

    def ws() -> str:
        return rng.choice(WHITESPACE)

    def string(text: str) -> str:
        out = []
        for char in text:
            code = ord(char)
            if char in '"\\' or code < 0x20:
                out.append(json.dumps(char)[1:-1])
            elif char == "/" and rng.random() < 0.5:
                out.append("\\/")
            elif rng.random() < 0.15:
                if code > 0xFFFF:  # as a surrogate pair, the way JSON escapes astral characters
                    code -= 0x10000
                    out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04X}")
                else:
                    out.append(f"\\u{code:04x}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'

    def render(v, top: bool = False) -> str:
        if isinstance(v, dict):
            items = []
            for key, item in v.items():
                # Not at the top level: see test_a_decoy_events_key_before_the_real_one_...
                if duplicates and not top and rng.random() < 0.1:
                    decoy = render(rng.choice([0, "x", None, [], {}]))
                    items.append(f"{ws()}{string(key)}{ws()}:{ws()}{decoy}")
                items.append(f"{ws()}{string(key)}{ws()}:{ws()}{render(item)}{ws()}")
            return "{" + ",".join(items) + ws() + "}"
        if isinstance(v, list):
            return "[" + ",".join(f"{ws()}{render(item)}{ws()}" for item in v) + ws() + "]"
        if isinstance(v, str):
            return string(v)
        return json.dumps(v)

    return ws() + render(value, top=True) + ws()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(near_valid_events(), min_size=1, max_size=4),
    seed=st.integers(0, 2**32),
    duplicates=st.booleans(),
)
def test_fast_and_thorough_paths_agree_whatever_the_spelling(events, seed, duplicates):
    document = {"events": events}
    canonical = json.dumps(document).encode()
    body = spell(document, random.Random(seed), duplicates).encode()
    explained = SMALL.explain(body)
    try:
        decoded = SMALL.decode(body)
    except BatchRejected as error:
        assert (error.error, error.details) == (explained.error, explained.details) != ("", [])
        if not duplicates:
            # Same document, other spelling: rejected for the same reasons, except that the
            # per-event byte cap counts bytes as sent (whitespace and escapes included).
            try:
                SMALL.decode(canonical)
            except BatchRejected as canonical_error:
                if not any("larger than" in d for d in error.details + canonical_error.details):
                    assert canonical_error.details == error.details
        return
    assert explained.details == []
    if not duplicates:
        try:
            same = SMALL.decode(canonical)
        except BatchRejected as canonical_error:
            # json.dumps escapes non-ASCII (6 bytes a character): only the byte cap may differ.
            assert all("larger than" in d for d in canonical_error.details), canonical_error
            return
        assert SMALL.encode_events(decoded) == SMALL.encode_events(same)


def test_a_decoy_events_key_before_the_real_one_is_explained_like_the_fast_path_rejects_it():
    valid = {
        "eventName": "e",
        "timestamp": "2026-02-16T10:30:00Z",
        "anonymousId": "a",
        "sessionId": "s",
        "consentGiven": True,
    }
    body = b'{"events": 0, "events": [%s]}' % json.dumps(valid).encode()
    with pytest.raises(BatchRejected):
        SMALL.decode(body)
    assert SMALL.explain(body).details, "explain() must find what decode() rejected"


# -- 2. Round trip through log -> Parquet -> query -----------------------------------------

SCHEMA = Schema()
FIELDS = event_fields(SCHEMA.limits)
COLUMN_OF = {
    "eventName": "event_name",
    "anonymousId": "anonymous_id",
    "sessionId": "session_id",
    "consentGiven": "consent_given",
    "userId": "user_id",
    "properties": "properties",
    "pageUrl": "page_url",
    "pageTitle": "page_title",
    "referrer": "referrer",
    "utmSource": "utm_source",
    "utmMedium": "utm_medium",
    "utmCampaign": "utm_campaign",
    "deviceType": "device_type",
    "browser": "browser",
    "os": "os",
}
# Any Unicode text a client may send, control characters and NUL included (no lone surrogates:
# those are not valid UTF-8 and the schema refuses them).
any_text = st.text(st.characters(codec="utf-8"), max_size=12)


@st.composite
def timestamps(draw) -> tuple[str, datetime]:
    """A timestamp as some client spells it, and the UTC instant it means."""
    utc = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    utc = utc.replace(tzinfo=UTC)
    minutes = draw(st.sampled_from([0, 0, 60, -300, 330, 14 * 60, -(23 * 60 + 59), 1]))
    local = utc.astimezone(timezone(timedelta(minutes=minutes)))
    separator = draw(st.sampled_from(["T", "t", " "]))
    text = f"{local.year:04d}" + local.strftime(f"-%m-%d{separator}%H:%M:%S")
    micros = f"{local.microsecond:06d}"
    digits = draw(st.integers(len(micros.rstrip("0")), 9))  # exact: never rounds
    if digits:
        text += "." + (micros + "000")[:digits]
    if minutes == 0 and draw(st.booleans()):
        text += draw(st.sampled_from(["Z", "z"]))
    else:
        sign = "-" if minutes < 0 else "+"
        hours, mins = divmod(abs(minutes), 60)
        text += (
            f"{sign}{hours:02d}:{mins:02d}"
            if draw(st.booleans())
            else f"{sign}{hours:02d}{mins:02d}"
        )
    return text, utc


def optional(strategy):
    return st.one_of(st.just("absent"), st.none(), strategy)


@st.composite
def valid_events(draw) -> tuple[dict, datetime]:
    text, instant = draw(timestamps())
    event = {
        "eventName": draw(any_text.filter(bool)),
        "timestamp": text,
        "anonymousId": draw(any_text.filter(bool)),
        "sessionId": draw(any_text.filter(bool)),
        "consentGiven": draw(st.booleans()),
    }
    for name in ("userId", "pageUrl", "pageTitle", "referrer", "utmSource", "utmMedium"):
        event[name] = draw(optional(any_text))
    event["utmCampaign"] = draw(optional(any_text))
    event["browser"] = draw(optional(any_text))
    event["os"] = draw(optional(any_text))
    event["deviceType"] = draw(optional(st.sampled_from(DEVICE_TYPES)))
    event["properties"] = draw(optional(st.dictionaries(any_text, any_text, max_size=4)))
    if draw(st.booleans()):
        event["someUnknownField"] = draw(any_text)
    return {k: v for k, v in event.items() if v != "absent"}, instant


def expected_row(event: dict, instant: datetime) -> dict:
    row = {COLUMN_OF[name]: event.get(name) for name in COLUMN_OF}
    row["timestamp"] = instant
    row["properties"] = event.get("properties") or {}
    return row


def append_batches(data_dir: Path, batches: list[tuple[str, bytes, int]]) -> None:
    async def main():
        log = CommitLog(data_dir, durability="none", min_free_bytes=0)
        log.open()
        log.start(asyncio.get_running_loop())
        for project, events_json, count in batches:
            done = asyncio.get_running_loop().create_future()
            log.append(project, events_json, count, done.set_result)
            assert await done is None
        await log.close()

    asyncio.run(main())
    sealer = CommitLog(data_dir, durability="none", min_free_bytes=0)
    sealer.open()  # a restart seals the segment, so the roller may take it
    asyncio.run(sealer.close())


QUERY = (
    "SELECT event_id, project, received_at, "
    + ", ".join(['"timestamp"', *COLUMN_OF.values()])
    + " FROM events ORDER BY event_id"
)


def rows(data_dir: Path) -> list[dict]:
    columns, values = run_query(data_dir, QUERY)
    return [dict(zip(columns, row, strict=True)) for row in values]


ROUND_TRIP_EXAMPLES = 80
SLOW_ROUND_TRIP_EXAMPLES = int(os.environ.get("INSLYTIC_ROUND_TRIP_EXAMPLES", "2000"))
round_trip_batches = st.lists(
    st.tuples(st.sampled_from(["shop", "blog"]), st.lists(valid_events(), min_size=1, max_size=4)),
    min_size=1,
    max_size=3,
)
ROUND_TRIP_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large]


def check_round_trip(batches) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="roundtrip-"))
    try:
        expected, appended = [], []
        for project, pairs in batches:
            body = json.dumps({"events": [event for event, _ in pairs]}).encode()
            decoded = SCHEMA.decode(body)  # valid by construction: a rejection fails the test
            appended.append((project, SCHEMA.encode_events(decoded), len(decoded)))
            expected += [(project, expected_row(e, instant)) for e, instant in pairs]
        append_batches(data_dir, appended)

        from_log = rows(data_dir)
        assert Roller(data_dir).roll_once() == len(expected)
        from_parquet = rows(data_dir)
        assert not (data_dir / "quarantine").exists(), "an accepted event was quarantined"

        for stage, got in (("log tail", from_log), ("parquet", from_parquet)):
            assert len(got) == len(expected), stage
            assert len({row["event_id"] for row in got}) == len(got)
            for row, (project, want) in zip(got, expected, strict=True):
                assert row["project"] == project
                assert row["received_at"] is not None
                assert row["timestamp"].tzinfo is not None
                assert row["timestamp"].astimezone(UTC) == want["timestamp"], stage
                for column, value in want.items():
                    if column != "timestamp":
                        assert row[column] == value, (stage, column, row[column], value)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@settings(max_examples=ROUND_TRIP_EXAMPLES, deadline=None, suppress_health_check=ROUND_TRIP_HEALTH)
@given(batches=round_trip_batches)
def test_any_accepted_batch_round_trips_through_log_parquet_and_query(batches):
    check_round_trip(batches)


@pytest.mark.slow
@settings(
    max_examples=SLOW_ROUND_TRIP_EXAMPLES, deadline=None, suppress_health_check=ROUND_TRIP_HEALTH
)
@given(batches=round_trip_batches)
def test_round_trip_many_more_batches(batches):
    check_round_trip(batches)


# -- 3. The cut of a byte stream into reads does not change the answers --------------------


@st.composite
def request_streams(draw) -> bytes:
    parts = []
    for i in range(draw(st.integers(1, 4))):
        size = draw(st.sampled_from([0, 10, 1000, 20_000, 40_000]))
        body = bytes([97 + i]) * size
        if draw(st.booleans()):
            parts.append(post(f"/r{i}", body))
        else:
            chunks = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in (body[:7], body[7:]) if c)
            parts.append(
                b"POST /r%d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%b0\r\n\r\n"
                % (i, chunks)
            )
    return b"".join(parts)


def answers(stream: bytes, cuts: list[int]) -> list:
    conn, transport, _ = make_conn()
    start = 0
    for cut in [*sorted(set(cuts)), len(stream)]:
        if cut > start:
            conn.data_received(stream[start:cut])
            start = cut
    return [(status, body) for status, _, body in split_responses(transport.take())]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(stream=request_streams(), data=st.data())
def test_the_answers_do_not_depend_on_how_the_stream_is_cut(stream, data):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=6))
    assert answers(stream, cuts) == answers(stream, [])


def test_headers_split_across_reads_then_a_20_kib_body_is_not_431():
    stream = post("/x", b"a" * 20_000)
    assert [status for status, _ in answers(stream, [30])] == [200]
