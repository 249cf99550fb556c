"""Tests for inslytic_fast.ingest.schema: fast decoder, explainer, limits and log encoder."""

from __future__ import annotations

import json
import time
import tracemalloc
from datetime import UTC, datetime, timedelta, timezone

import duckdb
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inslytic_fast.ingest.schema import (
    DEVICE_TYPES,
    ECHOED_KEY_CHARS,
    MAX_ERROR_DETAILS,
    MAX_EVENTS_CEILING,
    BatchRejected,
    EventLimits,
    Schema,
    event_fields,
)

SCHEMA = Schema()
LIMITS = SCHEMA.limits

# The request body of the API reference's curl example, byte for byte.
REFERENCE_BODY = b"""{
  "events": [
    {
      "eventName": "page_viewed",
      "timestamp": "2026-02-16T10:30:00.000Z",
      "anonymousId": "anon-123",
      "sessionId": "sess-456",
      "consentGiven": true,
      "properties": {
        "path": "/pricing"
      },
      "pageUrl": "https://example.com/pricing",
      "pageTitle": "Pricing"
    }
  ]
}"""


def valid_event(**overrides) -> dict:
    event = {
        "eventName": "page_viewed",
        "timestamp": "2026-02-16T10:30:00.000Z",
        "anonymousId": "anon-123",
        "sessionId": "sess-456",
        "consentGiven": True,
    }
    event.update(overrides)
    return event


def without(key: str, **overrides) -> dict:
    event = valid_event(**overrides)
    del event[key]
    return event


def body_of(*events, **top_level) -> bytes:
    return json.dumps({"events": list(events), **top_level}).encode()


def rejection(body: bytes, schema: Schema = SCHEMA) -> BatchRejected:
    with pytest.raises(BatchRejected) as caught:
        schema.decode(body)
    return caught.value


def details(body: bytes, schema: Schema = SCHEMA) -> list[str]:
    return rejection(body, schema).details


# --------------------------------------------------------------------------- accepted input


def test_reference_curl_example_is_accepted():
    [event] = SCHEMA.decode(REFERENCE_BODY)
    assert event.event_name == "page_viewed"
    assert event.timestamp == datetime(2026, 2, 16, 10, 30, tzinfo=UTC)
    assert event.anonymous_id == "anon-123"
    assert event.session_id == "sess-456"
    assert event.consent_given is True
    assert event.properties == {"path": "/pricing"}
    assert event.page_url == "https://example.com/pricing"
    assert event.page_title == "Pricing"
    assert event.user_id is None and event.referrer is None and event.device_type is None


def test_every_field_set_is_decoded():
    full = valid_event(
        userId="user-1",
        properties={"plan": "pro", "größe": "42"},
        pageUrl="https://example.com/a?b=c",
        pageTitle="A",
        referrer="https://ref.example/",
        utmSource="newsletter",
        utmMedium="email",
        utmCampaign="spring",
        deviceType="tablet",
        browser="Firefox",
        os="Linux",
    )
    [event] = SCHEMA.decode(body_of(full))
    decoded = msgspec.to_builtins(event)
    full["timestamp"] = "2026-02-16T10:30:00Z"
    assert decoded == full


def test_missing_optional_fields_take_defaults():
    [event] = SCHEMA.decode(body_of(valid_event()))
    assert event.properties == {}
    for spec in event_fields(LIMITS):
        if not spec.required and spec.name != "properties":
            assert getattr(event, spec.attr) is None, spec.name


@pytest.mark.parametrize("name", [spec.name for spec in event_fields(LIMITS) if not spec.required])
def test_null_is_accepted_for_every_optional_field(name):
    [event] = SCHEMA.decode(body_of(valid_event(**{name: None})))
    attr = next(spec.attr for spec in event_fields(LIMITS) if spec.name == name)
    assert getattr(event, attr) is None


def test_all_optional_fields_null_at_once():
    nulls = {spec.name: None for spec in event_fields(LIMITS) if not spec.required}
    assert len(SCHEMA.decode(body_of(valid_event(**nulls)))) == 1


def test_unknown_fields_are_ignored_at_every_level():
    event = valid_event(
        unknownField={"nested": [1, 2, {"x": None}]}, context={"ip": "1.2.3.4"}, eventname=5
    )
    body = body_of(event, batchId="abc", sentAt="not-a-date", meta=[1, 2])
    [decoded] = SCHEMA.decode(body)
    assert decoded.event_name == "page_viewed"
    assert not hasattr(decoded, "unknownField")


@pytest.mark.parametrize("device_type", DEVICE_TYPES)
def test_every_device_type_is_accepted(device_type):
    [event] = SCHEMA.decode(body_of(valid_event(deviceType=device_type)))
    assert event.device_type == device_type


def test_empty_strings_are_accepted_where_the_reference_only_says_string():
    empty = {
        spec.name: ""
        for spec in event_fields(LIMITS)
        if spec.kind == "string" and spec.min_length == 0
    }
    [event] = SCHEMA.decode(body_of(valid_event(properties={"": ""}, **empty)))
    assert event.user_id == "" and event.properties == {"": ""}


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2026-02-16T10:30:00Z", datetime(2026, 2, 16, 10, 30, tzinfo=UTC)),
        ("2026-02-16T10:30:00.5Z", datetime(2026, 2, 16, 10, 30, 0, 500000, tzinfo=UTC)),
        ("2026-02-16T10:30:00.123456789Z", datetime(2026, 2, 16, 10, 30, 0, 123457, tzinfo=UTC)),
        ("2026-02-16T12:30:00+02:00", datetime(2026, 2, 16, 10, 30, tzinfo=UTC)),
        ("2026-02-16T05:00:00-05:30", datetime(2026, 2, 16, 10, 30, tzinfo=UTC)),
        ("2026-02-16T10:30:00+00:00", datetime(2026, 2, 16, 10, 30, tzinfo=UTC)),
        ("2026-02-16t10:30:00z", datetime(2026, 2, 16, 10, 30, tzinfo=UTC)),
        ("2026-02-17T00:30:00+14:00", datetime(2026, 2, 16, 10, 30, tzinfo=UTC)),
    ],
)
def test_timestamps_are_stored_in_utc(sent, stored):
    [event] = SCHEMA.decode(body_of(valid_event(timestamp=sent)))
    assert event.timestamp == stored
    assert event.timestamp.tzinfo is UTC


def test_offsets_are_converted_in_a_mixed_batch():
    events = SCHEMA.decode(
        body_of(
            valid_event(timestamp="2026-02-16T10:30:00Z"),
            valid_event(timestamp="2026-02-16T11:30:00+01:00"),
            valid_event(timestamp="2026-02-16T10:30:00Z"),
        )
    )
    assert {event.timestamp for event in events} == {datetime(2026, 2, 16, 10, 30, tzinfo=UTC)}
    assert all(event.timestamp.tzinfo is UTC for event in events)


def test_maximum_batch_is_accepted():
    limits = EventLimits(max_events=7)
    assert len(Schema(limits).decode(body_of(*[valid_event()] * 7))) == 7
    assert len(SCHEMA.decode(body_of(*[valid_event()] * LIMITS.max_events))) == 1000


def test_body_may_be_bytearray_or_memoryview():
    assert len(SCHEMA.decode(bytearray(REFERENCE_BODY))) == 1
    assert len(SCHEMA.decode(memoryview(REFERENCE_BODY))) == 1


# --------------------------------------------------------------------------- batch-level errors


def test_reference_validation_error_example_exactly():
    body = body_of({k: v for k, v in valid_event().items() if k not in ("eventName", "timestamp")})
    error = rejection(body)
    assert error.error == "Validation failed"
    assert error.details == ["Event 0: eventName is required", "Event 0: timestamp is required"]
    assert error.as_dict() == {
        "error": "Validation failed",
        "details": ["Event 0: eventName is required", "Event 0: timestamp is required"],
    }


@pytest.mark.parametrize(
    ("body", "where"),
    [
        (b'{"events": [', "unexpected end of input (byte 12)"),
        (b'{"events": [1,,2]}', "(byte 14)"),
        (b'{"events": []} trailing', "trailing characters (byte "),
        (b"", "unexpected end of input (byte 0)"),
        (b"\xff", "(byte 0)"),
        (b'{"events": [{"eventName": "x",}]}', "trailing comma in object (byte "),
        (b"{'events': []}", "(byte 1)"),
        # A syntax error after a value that would already fail validation is still invalid JSON.
        (b'{"events": [{"eventName": 1}], "x": [1,,]}', "byte"),
        (b"[1, 2", "unexpected end of input (byte 5)"),
    ],
)
def test_invalid_json_says_where(body, where):
    error = rejection(body)
    assert error.error == "Invalid JSON"
    [detail] = error.details
    assert where in detail


def test_deep_nesting_is_invalid_json_not_a_crash():
    nested = b"[" * 100_000 + b"]" * 100_000
    error = rejection(b'{"events": [{"junk": ' + nested + b"}]}")
    assert (error.error, error.details) == ("Invalid JSON", ["JSON is nested too deeply"])


@pytest.mark.parametrize("body", [b"[]", b'"events"', b"1", b"null", b"true", b"[{}]"])
def test_body_must_be_an_object(body):
    error = rejection(body)
    assert error.error == "Validation failed"
    assert error.details == ["body must be a JSON object with an events array"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"{}", "events is required"),
        (b'{"event": []}', "events is required"),
        (b'{"events": null}', "events must be an array"),
        (b'{"events": {"0": {}}}', "events must be an array"),
        (b'{"events": "[]"}', "events must be an array"),
        (b'{"events": 3}', "events must be an array"),
        (b'{"events": []}', "events must contain at least 1 event"),
    ],
)
def test_events_array_problems(body, expected):
    assert details(body) == [expected]


def test_too_many_events():
    assert details(body_of(*[valid_event()] * 1001)) == ["events must contain at most 1000 events"]
    small = Schema(EventLimits(max_events=3))
    assert details(body_of(*[valid_event()] * 4), small) == ["events must contain at most 3 events"]


@pytest.mark.parametrize("item", [1, "x", None, True, [], [valid_event()]])
def test_event_must_be_an_object(item):
    assert details(body_of(valid_event(), item, valid_event())) == ["Event 1: must be an object"]


def test_indices_are_zero_based_and_every_event_is_reported():
    body = body_of(
        valid_event(),
        valid_event(consentGiven="true"),
        valid_event(),
        valid_event(deviceType="phone"),
        42,
    )
    assert details(body) == [
        "Event 1: consentGiven must be a boolean",
        "Event 3: deviceType must be one of desktop, mobile, tablet",
        "Event 4: must be an object",
    ]


def test_all_problems_of_one_event_in_field_order():
    event = {
        "os": 1,
        "properties": {"plan": 1},
        "deviceType": "phone",
        "consentGiven": "yes",
        "userId": 7,
        "timestamp": "yesterday",
        "eventName": "",
    }
    assert details(body_of(event)) == [
        "Event 0: eventName must not be empty",
        "Event 0: timestamp must be an ISO 8601 UTC timestamp",
        "Event 0: anonymousId is required",
        "Event 0: sessionId is required",
        "Event 0: consentGiven must be a boolean",
        "Event 0: userId must be a string",
        "Event 0: properties.plan must be a string",
        "Event 0: deviceType must be one of desktop, mobile, tablet",
        "Event 0: os must be a string",
    ]


# --------------------------------------------------------------------------- field tables

REQUIRED = [spec.name for spec in event_fields(LIMITS) if spec.required]
STRING_FIELDS = [spec for spec in event_fields(LIMITS) if spec.kind == "string"]
NOT_STRINGS = [1, 1.5, True, False, [], ["x"], {}, {"a": "b"}]


@pytest.mark.parametrize("name", REQUIRED)
def test_each_required_field_is_required(name):
    assert details(body_of(without(name))) == [f"Event 0: {name} is required"]


@pytest.mark.parametrize("spec", STRING_FIELDS, ids=lambda spec: spec.name)
@pytest.mark.parametrize("value", NOT_STRINGS, ids=repr)
def test_string_fields_reject_other_types(spec, value):
    assert details(body_of(valid_event(**{spec.name: value}))) == [
        f"Event 0: {spec.name} must be a string"
    ]


@pytest.mark.parametrize("spec", [s for s in STRING_FIELDS if s.required], ids=lambda s: s.name)
def test_required_strings_reject_null_and_empty(spec):
    assert details(body_of(valid_event(**{spec.name: None}))) == [
        f"Event 0: {spec.name} must be a string"
    ]
    assert details(body_of(valid_event(**{spec.name: ""}))) == [
        f"Event 0: {spec.name} must not be empty"
    ]


@pytest.mark.parametrize("spec", STRING_FIELDS, ids=lambda spec: spec.name)
def test_string_length_limits(spec):
    at_limit = "é" * spec.max_length  # lengths count characters, not UTF-8 bytes
    limits = EventLimits(max_event_bytes=1 << 20)
    schema = Schema(limits)
    [event] = schema.decode(body_of(valid_event(**{spec.name: at_limit})))
    assert getattr(event, spec.attr) == at_limit
    assert details(body_of(valid_event(**{spec.name: at_limit + "x"})), schema) == [
        f"Event 0: {spec.name} must be at most {spec.max_length} characters"
    ]


def test_string_limits_follow_event_limits():
    limits = EventLimits(max_name_length=3, max_id_length=4, max_url_length=5, max_text_length=6)
    schema = Schema(limits)
    event = valid_event(
        eventName="abcd", anonymousId="abcde", sessionId="s", userId="abcde",
        pageUrl="abcdef", referrer="abcdef", pageTitle="abcdefg", os="abcdef",
    )  # fmt: skip
    assert details(body_of(event), schema) == [
        "Event 0: eventName must be at most 3 characters",
        "Event 0: anonymousId must be at most 4 characters",
        "Event 0: userId must be at most 4 characters",
        "Event 0: pageUrl must be at most 5 characters",
        "Event 0: pageTitle must be at most 6 characters",
        "Event 0: referrer must be at most 5 characters",
    ]


@pytest.mark.parametrize(
    "timestamp",
    [
        "2026-02-16",
        "2026-02-16T10:30Z",
        "2026-02-30T10:30:00Z",
        "2026-13-01T10:30:00Z",
        "2026-02-16T24:00:00Z",
        "2026-02-16T10:30:00.Z",
        "16/02/2026 10:30",
        "1771237800",
        "",
        "now",
        "2026-02-16T10:30:00+25:00",
        1771237800,
        1771237800.5,
        True,
        None,
        [],
        {},
    ],
    ids=repr,
)
def test_invalid_timestamps(timestamp):
    assert details(body_of(valid_event(timestamp=timestamp))) == [
        "Event 0: timestamp must be an ISO 8601 UTC timestamp"
    ]


@pytest.mark.parametrize("timestamp", ["2026-02-16T10:30:00", "2026-02-16T10:30:00.123"])
def test_naive_timestamp_is_rejected(timestamp):
    assert details(body_of(valid_event(timestamp=timestamp))) == [
        "Event 0: timestamp must include a timezone (Z or an offset such as +02:00)"
    ]


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:30:00-01:00"])
def test_timestamp_out_of_range_after_utc_conversion(timestamp):
    assert details(body_of(valid_event(), valid_event(timestamp=timestamp))) == [
        "Event 1: timestamp is out of range (year 1 to 9999 in UTC)"
    ]


@pytest.mark.parametrize("value", ["true", "false", 1, 0, None, "", [], {}], ids=repr)
def test_consent_given_must_be_a_strict_boolean(value):
    assert details(body_of(valid_event(consentGiven=value))) == [
        "Event 0: consentGiven must be a boolean"
    ]


@pytest.mark.parametrize("value", ["phone", "Desktop", "DESKTOP", "", 1, True, [], ["mobile"]])
def test_device_type_enum(value):
    assert details(body_of(valid_event(deviceType=value))) == [
        "Event 0: deviceType must be one of desktop, mobile, tablet"
    ]


@pytest.mark.parametrize("value", [[], ["a"], "a=b", 1, True], ids=repr)
def test_properties_must_be_an_object(value):
    assert details(body_of(valid_event(properties=value))) == [
        "Event 0: properties must be an object"
    ]


@pytest.mark.parametrize("value", [1, 1.5, True, None, [], {"a": "b"}], ids=repr)
def test_property_values_must_be_strings(value):
    assert details(body_of(valid_event(properties={"ok": "x", "plan": value}))) == [
        "Event 0: properties.plan must be a string"
    ]


def test_every_bad_property_is_reported():
    properties = {"a": 1, "b": "fine", "c": None, "d": "x" * (LIMITS.max_property_value_length + 1)}
    assert details(body_of(valid_event(properties=properties))) == [
        "Event 0: properties.a must be a string",
        "Event 0: properties.c must be a string",
        f"Event 0: properties.d must be at most {LIMITS.max_property_value_length} characters",
    ]


def test_property_count_limit():
    limit = LIMITS.max_properties
    at_limit = {f"k{i}": "v" for i in range(limit)}
    assert len(SCHEMA.decode(body_of(valid_event(properties=at_limit)))) == 1
    over = at_limit | {"one_more": 1}  # the count alone is reported; entries are not examined
    assert details(body_of(valid_event(properties=over))) == [
        f"Event 0: properties must have at most {limit} entries"
    ]


def test_property_key_length_limit_and_key_echo_is_short_and_escaped():
    limit = LIMITS.max_property_key_length
    key = "\x1b[31m\u202e" + "k" * (limit + 500)
    assert len(SCHEMA.decode(body_of(valid_event(properties={"k" * limit: "v"})))) == 1
    [detail] = details(body_of(valid_event(properties={key: "v"})))
    shown = repr(key[:ECHOED_KEY_CHARS])
    assert detail == f"Event 0: properties key {shown}... must be at most {limit} characters"
    assert "\x1b" not in detail and "\u202e" not in detail and "\\x1b" in detail
    assert len(detail) < 120


def test_awkward_property_keys_are_quoted_in_messages():
    properties = {"a.b": 1, "with space": 2, "ünï": 3, "x" * 41: 4, "\n": 5}
    assert details(body_of(valid_event(properties=properties))) == [
        "Event 0: properties['a.b'] must be a string",
        "Event 0: properties['with space'] must be a string",
        "Event 0: properties['ünï'] must be a string",
        f"Event 0: properties['{'x' * 40}'...] must be a string",
        "Event 0: properties['\\n'] must be a string",
    ]


def test_property_limits_follow_event_limits():
    schema = Schema(
        EventLimits(max_properties=2, max_property_key_length=3, max_property_value_length=4)
    )
    assert len(schema.decode(body_of(valid_event(properties={"abc": "abcd", "x": ""})))) == 1
    assert details(body_of(valid_event(properties={"abcd": "abcde"})), schema) == [
        "Event 0: properties key 'abcd' must be at most 3 characters",
        "Event 0: properties.abcd must be at most 4 characters",
    ]
    assert details(body_of(valid_event(properties={"a": "", "b": "", "c": ""})), schema) == [
        "Event 0: properties must have at most 2 entries"
    ]


# --------------------------------------------------------------------------- byte-level input


def test_invalid_utf8_in_a_field_is_reported_per_field():
    body = body_of(valid_event(eventName="PLACEHOLDER")).replace(b"PLACEHOLDER", b"bad\xff")
    assert details(body) == ["Event 0: eventName must be valid Unicode text"]
    body = body_of(valid_event(properties={"k": "PLACEHOLDER"})).replace(b"PLACEHOLDER", b"\xc3")
    assert details(body) == ["Event 0: properties.k must be valid Unicode text"]
    body = body_of(valid_event(properties={"PLACEHOLDER": "v"})).replace(b"PLACEHOLDER", b"\xc3")
    assert details(body) == ["Event 0: properties must be valid Unicode text"]


def test_lone_surrogate_escape_is_invalid_json():
    body = body_of(valid_event(anonymousId="PLACEHOLDER")).replace(b"PLACEHOLDER", b"\\ud800")
    error = rejection(body)
    assert error.error == "Invalid JSON"
    assert "lone UTF-16 surrogate \\ud800 at byte" in error.details[0]  # was "hex escape"


def test_invalid_utf8_inside_an_ignored_field_is_ignored():
    # msgspec skips unknown fields without decoding their strings; nothing of them is stored.
    body = body_of(valid_event(junk="PLACEHOLDER")).replace(b"PLACEHOLDER", b"\xff")
    assert len(SCHEMA.decode(body)) == 1


def test_escaped_strings_and_control_characters_are_decoded():
    raw = b'"a\\u0000b\\n\\u00e9\\ud83d\\ude00"'
    body = body_of(valid_event(eventName="PLACEHOLDER")).replace(b'"PLACEHOLDER"', raw)
    [event] = SCHEMA.decode(body)
    assert event.event_name == "a\x00b\né\U0001f600"


def test_duplicate_keys_follow_msgspec_and_are_still_explained():
    body = (
        b'{"events": [{"eventName": 1, "eventName": "x", "timestamp": "2026-02-16T10:30:00Z",'
        b' "anonymousId": "a", "sessionId": "s", "consentGiven": true}]}'
    )
    [detail] = details(body)
    assert detail.startswith("Event 0: is invalid: Expected `str`, got `int`")


# --------------------------------------------------------------------------- per-event byte cap


def test_event_larger_than_the_byte_cap():
    cap = 600
    schema = Schema(EventLimits(max_event_bytes=cap))
    small = valid_event()
    big = valid_event(junk="x" * cap)
    body = body_of(small, big, small)
    assert len(body) > cap
    assert details(body, schema) == [f"Event 1: event is larger than {cap} bytes"]


SHORTEST_EVENT = (
    b'{"eventName":"x","timestamp":"0001-01-01T00:00:00Z","anonymousId":"x","sessionId":"x",'
    b'"consentGiven":true}'
)


def test_an_oversized_event_among_the_shortest_possible_events_is_found():
    # The fast path skips the byte-cap pass while body <= cap + (n - 1) * shortest event; an
    # oversized event surrounded by the shortest valid events is just past that bound.
    cap = 600
    schema = Schema(EventLimits(max_event_bytes=cap))
    big = valid_event(pageTitle="t" * 600)
    body = b'{"events":[' + b",".join([SHORTEST_EVENT] * 5 + [json.dumps(big).encode()]) + b"]}"
    assert details(body, schema) == [f"Event 5: event is larger than {cap} bytes"]
    assert len(schema.decode(b'{"events":[' + b",".join([SHORTEST_EVENT] * 9) + b"]}")) == 9


def test_the_shortest_event_really_is_the_shortest():
    # Every required value at its minimum: dropping any byte makes it invalid.
    assert len(SCHEMA.decode(b'{"events":[' + SHORTEST_EVENT + b"]}")) == 1
    for cut in range(len(SHORTEST_EVENT)):
        shorter = SHORTEST_EVENT[:cut] + SHORTEST_EVENT[cut + 1 :]
        with pytest.raises(BatchRejected):
            SCHEMA.decode(b'{"events":[' + shorter + b"]}")


def test_byte_cap_boundary_is_inclusive():
    filler = valid_event(junk="")
    size = len(json.dumps(filler).encode())
    exact = valid_event(junk="x" * (600 - size))
    assert len(json.dumps(exact).encode()) == 600
    schema = Schema(EventLimits(max_event_bytes=600))
    assert len(schema.decode(body_of(exact, exact))) == 2
    over = valid_event(junk="x" * (601 - size))
    assert details(body_of(exact, over), schema) == ["Event 1: event is larger than 600 bytes"]


def test_byte_cap_counts_raw_bytes_including_escapes_and_whitespace():
    schema = Schema(EventLimits(max_event_bytes=400))
    event = valid_event(pageTitle="é" * 60)  # 60 characters, 360 bytes as \u00e9 escapes
    escaped = json.dumps({"events": [event]}, ensure_ascii=True).encode()
    literal = json.dumps({"events": [event]}, ensure_ascii=False).encode()
    assert len(schema.decode(literal)) == 1
    assert details(escaped, schema) == ["Event 0: event is larger than 400 bytes"]


def test_an_oversized_event_is_not_examined_further():
    schema = Schema(EventLimits(max_event_bytes=300))
    event = without("sessionId", junk="x" * 400)
    assert details(body_of(event, without("eventName")), schema) == [
        "Event 0: event is larger than 300 bytes",
        "Event 1: eventName is required",
    ]


def rejection_and_peak_memory(body: bytes) -> tuple[BatchRejected, int]:
    """The rejection of ``body`` and the peak bytes Python allocated while finding it."""
    tracemalloc.start()
    try:
        error = rejection(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return error, peak


def test_one_huge_event_of_tiny_properties_is_refused_without_building_it():
    properties = {f"k{i}": "" for i in range(300_000)}  # ~3.5 MiB of JSON
    body = body_of(valid_event(properties=properties))
    error, peak = rejection_and_peak_memory(body)
    assert error.details == [f"Event 0: event is larger than {LIMITS.max_event_bytes} bytes"]
    assert peak < 4 * 1024 * 1024, peak  # the dict alone would take ~30 MB


# --------------------------------------------------------------------------- detail cap


def test_details_are_capped_with_a_summary_line():
    bad = valid_event(consentGiven=1)
    error = rejection(body_of(*[bad] * 150))
    assert len(error.details) == MAX_ERROR_DETAILS
    assert error.details[:99] == [f"Event {i}: consentGiven must be a boolean" for i in range(99)]
    assert error.details[99] == "... and 51 more problems"


def test_exactly_the_cap_is_listed_in_full_and_one_more_is_summarised():
    bad = valid_event(consentGiven=1)
    assert details(body_of(*[bad] * 100))[-1] == "Event 99: consentGiven must be a boolean"
    assert details(body_of(*[bad] * 101))[-1] == "... and 2 more problems"


def test_explain_is_bounded_on_a_hostile_batch():
    # 1,000 events, each with every field wrong and oversized property maps: ~9 MiB.
    hostile = {spec.name: [0] for spec in event_fields(LIMITS)}
    hostile["properties"] = {f"{'k' * 300}{i}": [i] for i in range(LIMITS.max_properties)}
    body = body_of(*[hostile] * LIMITS.max_events)
    assert len(body) > 8 * 1024 * 1024
    started = time.perf_counter()
    error = rejection(body)
    elapsed = time.perf_counter() - started
    assert len(error.details) == MAX_ERROR_DETAILS
    assert error.details[-1].startswith("... and ")
    assert max(map(len, error.details)) < 200
    assert elapsed < 20, f"explain took {elapsed:.1f} s"  # generous: it takes ~1-2 s on 2 cores


def test_a_huge_events_array_is_refused_without_materialising_it():
    body = b'{"events": [' + b"0," * 2_000_000 + b"0]}"
    error, peak = rejection_and_peak_memory(body)
    assert error.details == ["events must contain at most 1000 events"]
    assert peak < 4 * 1024 * 1024, peak  # one object per element would be ~150 MB


def test_far_too_many_valid_events_are_refused_without_building_them():
    body = body_of(*[valid_event()] * 40_000)  # ~5.6 MiB of valid events
    error, peak = rejection_and_peak_memory(body)
    assert error.details == ["events must contain at most 1000 events"]
    assert peak < 8 * 1024 * 1024, peak  # building them all takes ~16 MB


@pytest.mark.parametrize("count", [999, 1000, 1001, 1002])
def test_batch_size_limits_hold_on_both_decoders(count):
    # Bodies this large are measured (and counted) before any event is built.
    events = [valid_event(pageTitle="t" * 100)] * count
    body = body_of(*events)
    assert len(body) > (LIMITS.max_events + 1) * len(SHORTEST_EVENT)
    if count <= LIMITS.max_events:
        assert len(SCHEMA.decode(body)) == count
    else:
        assert details(body) == ["events must contain at most 1000 events"]
        assert details(body_of(*events[:1000], 0)) == ["events must contain at most 1000 events"]


def test_an_empty_events_array_in_a_large_body():
    body = body_of(padding="x" * 200_000)
    assert details(body) == ["events must contain at least 1 event"]


def test_explain_of_a_valid_body_finds_nothing():
    assert SCHEMA.explain(REFERENCE_BODY).details == []


# --------------------------------------------------------------------------- limits


def test_default_limits():
    assert LIMITS.max_events == 1000
    assert LIMITS.max_event_bytes == 32 * 1024
    assert LIMITS.max_name_length >= 40  # GA4's own limit; anything shorter would reject real names


def test_max_events_has_a_ceiling():
    assert Schema(EventLimits(max_events=MAX_EVENTS_CEILING)).limits.max_events == 10_000
    with pytest.raises(ValueError, match="max_events must be at most"):
        EventLimits(max_events=MAX_EVENTS_CEILING + 1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", None, True])
def test_limits_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="max_properties"):
        EventLimits(max_properties=bad)


def test_event_field_specs_match_the_struct():
    names = [field.encode_name for field in msgspec.structs.fields(SCHEMA.Event)]
    assert names == [spec.name for spec in event_fields(LIMITS)]
    assert REQUIRED == ["eventName", "timestamp", "anonymousId", "sessionId", "consentGiven"]


# --------------------------------------------------------------------------- log encoding


def test_encode_events_shape():
    events = SCHEMA.decode(
        body_of(
            valid_event(timestamp="2026-02-16T12:30:00.250+02:00", userId=None, properties={}),
            valid_event(properties=None, deviceType="mobile", ignored=1),
        )
    )
    assert json.loads(SCHEMA.encode_events(events)) == [
        {
            "eventName": "page_viewed",
            "timestamp": "2026-02-16T10:30:00.250000Z",
            "anonymousId": "anon-123",
            "sessionId": "sess-456",
            "consentGiven": True,
        },
        {
            "eventName": "page_viewed",
            "timestamp": "2026-02-16T10:30:00Z",
            "anonymousId": "anon-123",
            "sessionId": "sess-456",
            "consentGiven": True,
            "properties": None,
            "deviceType": "mobile",
        },
    ]


def test_encode_events_round_trips_through_the_decoder():
    events = SCHEMA.decode(REFERENCE_BODY)
    again = SCHEMA.decode(b'{"events": ' + SCHEMA.encode_events(events) + b"}")
    assert again == events


DUCKDB_COLUMNS = {
    "eventName": "VARCHAR",
    "timestamp": "TIMESTAMPTZ",
    "anonymousId": "VARCHAR",
    "sessionId": "VARCHAR",
    "consentGiven": "BOOLEAN",
    "userId": "VARCHAR",
    "properties": "MAP(VARCHAR, VARCHAR)",
    "pageUrl": "VARCHAR",
    "pageTitle": "VARCHAR",
    "referrer": "VARCHAR",
    "utmSource": "VARCHAR",
    "utmMedium": "VARCHAR",
    "utmCampaign": "VARCHAR",
    "deviceType": "VARCHAR",
    "browser": "VARCHAR",
    "os": "VARCHAR",
}


def test_encoded_log_reads_back_through_duckdb(tmp_path):
    sent = [
        valid_event(
            eventName="signup_completed",
            timestamp="2026-02-16T12:30:00.123456789+02:00",
            userId="user-1",
            properties={"plan": "pro", "größe": "42", "quote": 'say "hi"\n', "emoji": "\U0001f600"},
            pageUrl="https://example.com/a?b=c&d=%20",
            pageTitle="Ünïcode — title",
            referrer="https://ref.example/",
            utmSource="newsletter",
            utmMedium="email",
            utmCampaign="spring",
            deviceType="desktop",
            browser="Firefox",
            os="Linux",
        ),
        valid_event(timestamp="0001-01-01T00:00:00Z", consentGiven=False, properties=None),
        valid_event(timestamp="9999-12-31T23:59:59.999999Z", userId=None, properties={}),
        valid_event(timestamp="2026-02-16T10:30:00.5-00:30"),
    ]
    events = SCHEMA.decode(body_of(*sent))
    log = tmp_path / "segment.json"
    log.write_bytes(SCHEMA.encode_events(events))

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    rows = con.execute(
        "SELECT * FROM read_json(?, format = 'array', columns = ?)",
        [str(log), DUCKDB_COLUMNS],
    ).fetchall()
    assert len(rows) == len(events)
    for row, event in zip(rows, events, strict=True):
        stored = dict(zip(DUCKDB_COLUMNS, row, strict=True))
        expected = {
            spec.name: getattr(event, spec.attr) for spec in event_fields(LIMITS)
        }  # absent/null/{} properties all read back as NULL
        expected["properties"] = expected["properties"] or None
        assert stored == expected
    # The instant survives exactly (microseconds), not just the rendering.
    epochs = con.execute(
        "SELECT epoch_us(timestamp) FROM read_json(?, format = 'array', columns = ?)",
        [str(log), DUCKDB_COLUMNS],
    ).fetchall()
    origin = datetime(1970, 1, 1, tzinfo=UTC)
    assert [e for (e,) in epochs] == [
        (event.timestamp - origin) // timedelta(microseconds=1) for event in events
    ]


# --------------------------------------------------------------------------- equivalence property

# Small limits so that hypothesis reaches every boundary with short strings.
SMALL = Schema(
    EventLimits(
        max_events=4,
        max_event_bytes=420,
        max_name_length=6,
        max_id_length=5,
        max_url_length=8,
        max_text_length=5,
        max_properties=3,
        max_property_key_length=4,
        max_property_value_length=5,
    )
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=6,
)

digits = st.integers(min_value=0, max_value=9)


@st.composite
def timestamps(draw) -> str:
    year = draw(st.sampled_from([1, 2, 1969, 1970, 2024, 2026, 9998, 9999]))
    month = draw(st.integers(0, 13))
    day = draw(st.integers(0, 32))
    hour = draw(st.integers(0, 25))
    minute = draw(st.sampled_from([0, 30, 59, 60]))
    second = draw(st.sampled_from([0, 1, 59, 60, 61]))
    separator = draw(st.sampled_from(["T", "t", " ", "_"]))
    fraction_digits = draw(st.integers(0, 10))
    fraction = "".join(str(draw(digits)) for _ in range(fraction_digits))
    fraction = "." + fraction if fraction_digits or draw(st.booleans()) else ""
    zone = draw(
        st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+02:00", "-05:30", "+14:00",
                         "+2400", "-23:59", "+0530", "UTC", "+01"])
    )  # fmt: skip
    text = f"{year:04d}-{month:02d}-{day:02d}{separator}{hour:02d}:{minute:02d}:{second:02d}"
    if draw(st.booleans()):  # mostly plausible, sometimes valid calendar dates
        moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
        text = f"{moment.year:04d}" + moment.strftime("-%m-%dT%H:%M:%S")
    return text + fraction + zone


def strings(min_size: int, max_size: int):
    tricky = st.text(alphabet='aé\U0001f600\x00\n"\\', min_size=min_size, max_size=max_size)
    return st.text(min_size=min_size, max_size=max_size) | tricky


@st.composite
def valid_timestamps(draw) -> str:
    moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    fraction_digits = draw(st.integers(0, 9))
    fraction = "".join(str(draw(digits)) for _ in range(fraction_digits))
    zone = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+02:00", "-05:30", "+0100"]))
    separator = draw(st.sampled_from(["T", "t", " "]))
    # %Y is not zero-padded below year 1000 on glibc, so the year is formatted by hand.
    text = f"{moment.year:04d}" + moment.strftime(f"-%m-%d{separator}%H:%M:%S")
    return text + ("." + fraction if fraction else "") + zone


SPECS = event_fields(SMALL.limits)


def _valid_value(spec):
    """Values that SMALL accepts for the field."""
    limits = SMALL.limits
    if spec.kind == "string":
        value = strings(spec.min_length, spec.max_length)
    elif spec.kind == "timestamp":
        value = valid_timestamps()
    elif spec.kind == "boolean":
        value = st.booleans()
    elif spec.kind == "device_type":
        value = st.sampled_from(DEVICE_TYPES)
    else:
        value = st.dictionaries(
            strings(0, limits.max_property_key_length),
            strings(0, limits.max_property_value_length),
            max_size=limits.max_properties,
        )
    return value if spec.required else st.none() | value


def _mutated_value(spec):
    """Values that are wrong for the field, or right at / just over one of its edges."""
    limits = SMALL.limits
    options = [json_values, st.none()]
    if spec.kind == "string":
        options += [strings(spec.max_length, spec.max_length + 2), st.just("")]
    elif spec.kind == "timestamp":
        options += [timestamps(), valid_timestamps().map(lambda t: t.rstrip("Zz"))]
    elif spec.kind == "boolean":
        options += [st.sampled_from(["true", "false", 1, 0])]
    elif spec.kind == "device_type":
        options += [st.sampled_from(["phone", "Mobile", "", "desktop "])]
    else:
        options += [
            st.dictionaries(strings(0, 6), strings(0, 7) | json_values, max_size=5),
            st.just({"k" * (limits.max_property_key_length + 1): "v"}),
            st.just({"k": "v" * (limits.max_property_value_length + 1)}),
        ]
    return st.one_of(options)


@st.composite
def near_valid_events(draw):
    event = {}
    for spec in SPECS:
        if spec.required or draw(st.booleans()):
            event[spec.name] = draw(_valid_value(spec))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        spec = draw(st.sampled_from(SPECS))
        action = draw(st.integers(0, 5))
        if action == 0:
            event.pop(spec.name, None)  # missing key
        elif action == 1:  # an unknown key (possibly a case variant of a known one)
            event[draw(st.text(max_size=6) | st.just(spec.name.lower()))] = draw(json_values)
        else:
            event[spec.name] = draw(_mutated_value(spec))
    # Hypothesis favours the ends of an integer range, so rare branches test a middle value.
    if draw(st.integers(0, 30)) == 15:
        return draw(json_values)  # not an object at all (or by chance an object)
    return event


@st.composite
def bodies(draw) -> bytes:
    events = draw(st.lists(near_valid_events(), min_size=1, max_size=4))
    shape = draw(st.integers(0, 40))
    if shape == 10:
        document = draw(json_values)
    elif shape == 11:
        document = {"other": events}
    elif shape == 12:
        document = {"events": draw(json_values)}
    elif shape == 13:
        document = {"events": events + events}  # over max_events when long enough
    else:
        document = {"events": events}
        if draw(st.booleans()):
            document.update(draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2)))
    body = json.dumps(document, ensure_ascii=draw(st.booleans())).encode()
    if draw(st.integers(0, 40)) == 20 and body:
        body = body[: draw(st.integers(0, len(body) - 1))]  # truncated: invalid JSON
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies())
def test_fast_path_and_explain_accept_exactly_the_same_batches(body):
    explained = SMALL.explain(body)
    try:
        events = SMALL.decode(body)
    except BatchRejected as error:
        assert error.details, "a rejection must say why"
        assert len(error.details) <= MAX_ERROR_DETAILS
        assert error.error in ("Invalid JSON", "Validation failed")
        assert explained.details, f"explain found nothing but decode failed: {error.details}"
        assert (error.error, error.details) == (explained.error, explained.details)
        assert not any(
            detail.startswith(("Event", "...")) and ": is invalid:" in detail
            for detail in error.details
        ), "fell back to the generic message"
    else:
        assert explained.details == [], f"explain found problems in an accepted body: {body!r}"
        assert all(event.timestamp.tzinfo is UTC for event in events)


@settings(max_examples=150, deadline=None)
@given(events=st.lists(near_valid_events(), min_size=1, max_size=3))
def test_equivalence_with_default_limits(events):
    body = json.dumps({"events": events}).encode()
    explained = SCHEMA.explain(body)
    try:
        SCHEMA.decode(body)
    except BatchRejected as error:
        assert error.details == explained.details != []
    else:
        assert explained.details == []


def test_offsets_outside_utc_range_are_excluded_consistently():
    body = body_of(valid_event(timestamp="0001-01-01T00:00:00+00:01"))
    assert SCHEMA.explain(body).details == [
        "Event 0: timestamp is out of range (year 1 to 9999 in UTC)"
    ]
    ok = body_of(valid_event(timestamp="0001-01-01T00:00:00-00:01"))
    assert Schema().decode(ok)[0].timestamp == datetime(1, 1, 1, 0, 1, tzinfo=UTC)


def test_non_utc_fixed_offset_objects_are_normalised():
    # msgspec returns datetime.timezone.utc for +00:00; a different offset object is converted.
    [event] = SCHEMA.decode(body_of(valid_event(timestamp="2026-02-16T10:30:00+01:00")))
    assert event.timestamp.tzinfo is UTC
    assert event.timestamp.utcoffset() == timezone(timedelta(0)).utcoffset(None)


@settings(max_examples=300, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(REFERENCE_BODY) - 1), st.integers(0, 255)), max_size=4
    ),
    tail=st.binary(max_size=8),
)
def test_corrupted_bodies_only_ever_raise_batch_rejected(flips, tail):
    body = bytearray(REFERENCE_BODY)
    for position, value in flips:
        body[position] = value
    body = bytes(body) + tail
    for schema in (SCHEMA, SMALL):
        try:
            schema.decode(body)
        except BatchRejected as error:
            assert error.details
            assert all(detail.isprintable() for detail in error.details)


@pytest.mark.slow
@settings(max_examples=5_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies())
def test_fast_path_and_explain_agree_on_many_more_batches(body):
    explained = SMALL.explain(body)
    try:
        SMALL.decode(body)
    except BatchRejected as error:
        assert (error.error, error.details) == (explained.error, explained.details) != ("", [])
        assert explained.details
    else:
        assert explained.details == []


# Rejections that say what is wrong (issue 19: each got a misleading message before) --------


def test_a_leap_second_is_named_not_called_a_non_iso_timestamp():
    body = body_of(valid_event(timestamp="2016-12-31T23:59:60Z"))
    assert details(body) == [
        "Event 0: timestamp has a leap second (:60), which cannot be stored; "
        "send :59.999 or the next second"
    ]


def test_seven_and_nine_digit_fractions_are_accepted_and_rounded_to_microseconds():
    for fraction in ("1234567", "123456789"):
        [event] = SCHEMA.decode(body_of(valid_event(timestamp=f"2026-02-16T10:30:00.{fraction}Z")))
        assert event.timestamp == datetime(2026, 2, 16, 10, 30, 0, 123457, tzinfo=UTC)


@pytest.mark.parametrize(
    ("escape", "lone", "where"),
    [(rb"\ud800", "\\ud800", 25), (rb"\udc00", "\\udc00", 25), (rb"x\ud800\u0041", "\\ud800", 26)],
)
def test_a_lone_surrogate_is_named_not_called_an_unexpected_end_of_hex_escape(escape, lone, where):
    body = b'{"events":[{"eventName":"' + escape + b'","timestamp":"2026-02-16T10:30:00Z"}]}'
    [detail] = details(body)
    expected = f"JSON is malformed: lone UTF-16 surrogate {lone} at byte {where}: strings must"
    assert detail.startswith(expected), detail


def test_an_escaped_backslash_before_u_d800_is_plain_text_not_a_surrogate():
    body = body_of(valid_event(eventName="\\ud800"))
    assert b'"\\\\ud800"' in body
    [event] = SCHEMA.decode(body)
    assert "\\ud800" in msgspec.json.encode(event).decode()
