"""Event schema: msgspec Structs, the fast batch decoder, the thorough explainer, the log encoder.

Two passes share one definition of what is valid:

* ``Schema.decode`` is the happy path: ONE msgspec decoder call turns the whole request body into
  a list of ``Event`` Structs (types, required fields, lengths, enum and timezone checks all run
  in C).  Two follow-ups: a pass over the raw event spans for the per-event byte cap, only when
  the body is large enough to hold an oversized event (on bodies that large it runs first and
  also counts the events, so nothing is built for a body with too many or too large events),
  and a loop that converts offset timestamps to UTC.
* ``Schema.explain`` runs only after ``decode`` failed.  It walks the body event by event and field
  by field and lists every problem in the API reference's style (``"Event 0: eventName is
  required"``).  Every verdict comes from decoding the field with the very same annotated type the
  Struct field has; the looser decoders that run afterwards only pick the wording.  So both passes
  accept exactly the same batches (a hypothesis property in tests/test_schema.py checks it).

Accepted body: a JSON object with an ``events`` array of 1..``max_events`` objects; other top-level
keys and unknown event fields are ignored.  Event fields are listed in ``event_fields`` (the order
of the API reference table, which is also the order problems are reported in).  ``null`` is
accepted for every optional field.  ``eventName``, ``anonymousId`` and ``sessionId`` must not be
empty: an empty name or identifier makes the event useless for analytics, so it is rejected at the
door rather than stored.  Timestamps must carry ``Z`` or an offset (RFC 3339 as msgspec parses it:
``T``/``t``/space separator, 0-9 fractional digits rounded to microseconds); a naive timestamp is
rejected because its instant is unknown.

Log format (``Schema.encode_events``): one JSON array, one object per event, keys camelCase::

    [{"eventName":"page_viewed","timestamp":"2026-02-16T10:30:00Z","anonymousId":"anon-123",
      "sessionId":"sess-456","consentGiven":true,"properties":{"path":"/pricing"},
      "pageUrl":"https://example.com/pricing","pageTitle":"Pricing"}, ...]

* ``eventName``, ``timestamp``, ``anonymousId``, ``sessionId``, ``consentGiven`` are always present.
* ``timestamp`` is UTC, ``YYYY-MM-DDTHH:MM:SS[.ffffff]Z`` (msgspec's RFC 3339 output, fraction only
  when non-zero, always 6 digits then); DuckDB casts it to TIMESTAMPTZ exactly.
* Optional fields are omitted when absent or ``null`` (they equal the default).  ``properties`` is
  an object of string -> string; it is omitted when empty and written as ``null`` when the client
  sent ``null``.  DuckDB's ``read_json`` with ``properties MAP(VARCHAR, VARCHAR)`` reads all three
  "no properties" spellings as NULL; readers treat NULL as an empty map.

Error details (``BatchRejected.details``) hold at most ``MAX_ERROR_DETAILS`` entries: when there are
more problems, the first ``MAX_ERROR_DETAILS - 1`` are listed and the last entry reads
``"... and N more problems"``.  An event larger than ``max_event_bytes`` is reported as such and
not examined further (bounded work: decoding is what the cap protects).  User-supplied property
keys are echoed truncated to ``ECHOED_KEY_CHARS`` characters and escaped like Python's ``repr``;
values are not echoed (the one exception, a field the per-field view cannot explain such as a
duplicated key, quotes msgspec's message cut to 200 printable characters).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Optional

import msgspec
from msgspec import UNSET, Meta, Raw

from ..event_columns import COLUMN_OF_LOG_KEY
from .errors import IngestError

__all__ = [
    "DEVICE_TYPES",
    "ECHOED_KEY_CHARS",
    "MAX_ERROR_DETAILS",
    "BatchRejected",
    "EventLimits",
    "FieldSpec",
    "Schema",
    "event_fields",
]

# The reference's example error body lists problems one per line; 100 lines is plenty to fix a
# batch and keeps a hostile batch (1,000 events x every field wrong) from producing a huge 400.
MAX_ERROR_DETAILS = 100
# Property keys are the only user text echoed back; 40 characters identify a key without letting
# a client make the error response (or a log line) arbitrarily large.
ECHOED_KEY_CHARS = 40
# API reference: deviceType is "desktop" | "mobile" | "tablet".
DEVICE_TYPES = ("desktop", "mobile", "tablet")

# The explainer holds one slot per event (see Schema.__init__); ten times the API's 1,000 keeps
# that table small while leaving room for self-hosters who raise the limit.
MAX_EVENTS_CEILING = 10_000

INVALID_JSON = "Invalid JSON"
VALIDATION_FAILED = "Validation failed"


@dataclass(frozen=True, slots=True)
class EventLimits:
    """Size limits of one batch and of each event field (lengths count Unicode code points)."""

    # API reference: "Accepts up to 1,000 events per request".
    max_events: int = 1000
    # Segment's HTTP tracking API caps one event at 32 KiB; the same cap bounds per-event work here.
    max_event_bytes: int = 32 * 1024
    # eventName: GA4 caps event names at 40 characters; 200 fits any naming scheme
    # ("checkout_step_completed", "Signup Form: Submitted") with a wide margin.
    max_name_length: int = 200
    # anonymousId, sessionId, userId: a UUID is 36 characters; 256 leaves room for prefixed or
    # compound ids (e.g. "tenant:1234:user:..." or a hashed e-mail) without storing documents.
    max_id_length: int = 256
    # pageUrl, referrer: Apache's LimitRequestLine (8190) and nginx's 8 KiB header buffers mean a
    # longer URL could not have been requested from a default-configured web server.
    max_url_length: int = 8192
    # pageTitle, utmSource/Medium/Campaign, browser, os: GA4 keeps 300 characters of a page
    # title and 100 of other values; 1024 stores real titles and UTM values whole.
    max_text_length: int = 1024
    # properties entries: GA4 allows 25 parameters per event; 100 is generous for flat string maps.
    max_properties: int = 100
    # property key: same budget as an event name (GA4: 40 per parameter name).
    max_property_key_length: int = 200
    # property value: same budget as other free text (GA4 keeps 100 characters per value).
    max_property_value_length: int = 1024

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"EventLimits.{name} must be a positive integer, got {value!r}")
        if self.max_events > MAX_EVENTS_CEILING:
            raise ValueError(f"EventLimits.max_events must be at most {MAX_EVENTS_CEILING}")


class BatchRejected(IngestError):
    """A request body the server answers with 400 ``{"error": error, "details": details}``."""

    details: list[str]

    def __init__(self, error: str, details: list[str]) -> None:
        # error: "Invalid JSON" or "Validation failed"; details: at most MAX_ERROR_DETAILS
        # entries, never empty
        super().__init__(400, error, details, reason="validation")

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.error, "details": self.details}

    def __str__(self) -> str:
        return f"{self.error}: {'; '.join(self.details)}"


# --------------------------------------------------------------------------- field definitions

FieldKind = Literal["string", "timestamp", "boolean", "properties", "device_type"]


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One event field as the API accepts it: the source of the Struct, the explainer and
    OpenAPI. Where it is stored (column, SQL type) is event_columns.py's, keyed by ``name``."""

    name: str  # JSON name (camelCase), also the key in the log's event object
    kind: FieldKind
    required: bool
    description: str
    min_length: int = 0  # strings only
    max_length: int | None = None  # strings: characters; properties: entries

    @property
    def attr(self) -> str:
        """The Struct attribute: the events column the field feeds (msgspec renames it back
        to ``name``)."""
        return COLUMN_OF_LOG_KEY[self.name].name


def event_fields(limits: EventLimits) -> tuple[FieldSpec, ...]:
    """The event fields in the API reference's order, with lengths taken from ``limits``."""
    ids = limits.max_id_length
    text = limits.max_text_length
    url = limits.max_url_length
    return (
        FieldSpec("eventName", "string", True, "Name of the event.", 1,
                  limits.max_name_length),
        FieldSpec("timestamp", "timestamp", True,
                  "ISO 8601 timestamp with Z or an offset; stored in UTC."),
        FieldSpec("anonymousId", "string", True,
                  "Anonymous device/session identifier.", 1, ids),
        FieldSpec("sessionId", "string", True, "Session identifier.", 1, ids),
        FieldSpec("consentGiven", "boolean", True,
                  "Whether the user has given consent for tracking."),
        FieldSpec("userId", "string", False,
                  "Identified user ID. Null for anonymous events.", 0, ids),
        FieldSpec("properties", "properties", False,
                  "Custom key-value pairs. Defaults to {}.", 0, limits.max_properties),
        FieldSpec("pageUrl", "string", False, "Full URL of the page.", 0, url),
        FieldSpec("pageTitle", "string", False, "Title of the page.", 0, text),
        FieldSpec("referrer", "string", False, "Referrer URL.", 0, url),
        FieldSpec("utmSource", "string", False, "UTM source parameter.", 0, text),
        FieldSpec("utmMedium", "string", False, "UTM medium parameter.", 0, text),
        FieldSpec("utmCampaign", "string", False, "UTM campaign parameter.", 0,
                  text),
        FieldSpec("deviceType", "device_type", False, "Device type."),
        FieldSpec("browser", "string", False, "Browser name.", 0, text),
        FieldSpec("os", "string", False, "Operating system.", 0, text),
    )  # fmt: skip


def _string_type(spec: FieldSpec) -> Any:
    return Annotated[str, Meta(min_length=spec.min_length, max_length=spec.max_length)]


def _property_types(limits: EventLimits) -> tuple[Any, Any]:
    key = Annotated[str, Meta(max_length=limits.max_property_key_length)]
    value = Annotated[str, Meta(max_length=limits.max_property_value_length)]
    return key, value


# msgspec gives `datetime.timezone.utc` for "Z", "+00:00" and "-00:00", so an identity check
# finds the (rare) timestamps that still need converting.
Timestamp = Annotated[datetime, Meta(tz=True)]


def _field_type(spec: FieldSpec, limits: EventLimits) -> Any:
    """The exact annotated type of a Struct field (optional fields also accept null)."""
    if spec.kind == "string":
        base = _string_type(spec)
    elif spec.kind == "timestamp":
        base = Timestamp
    elif spec.kind == "boolean":
        base = bool
    elif spec.kind == "device_type":
        base = Literal[DEVICE_TYPES]
    else:  # properties
        key, value = _property_types(limits)
        base = Annotated[dict[key, value], Meta(max_length=limits.max_properties)]
    return base if spec.required else Optional[base]  # noqa: UP045 - a runtime type expression


def _build_event_struct(fields: tuple[FieldSpec, ...], limits: EventLimits) -> type:
    struct_fields: list[tuple[Any, ...]] = []
    for spec in fields:
        field_type = _field_type(spec, limits)
        if spec.required:
            struct_fields.append((spec.attr, field_type))
        elif spec.kind == "properties":
            struct_fields.append((spec.attr, field_type, msgspec.field(default_factory=dict)))
        else:
            struct_fields.append((spec.attr, field_type, None))
    # gc=False: an event holds only str/bool/datetime/dict[str, str], so it can never be part of a
    # reference cycle; skipping GC tracking makes a 1,000-event batch cheaper to create and free.
    event = msgspec.defstruct(
        "Event", struct_fields, rename="camel", omit_defaults=True, gc=False, module=__name__
    )
    encode_names = [f.encode_name for f in msgspec.structs.fields(event)]
    if encode_names != [spec.name for spec in fields]:  # a renamed attribute drifted from its spec
        raise AssertionError(f"Event field names drifted: {encode_names}")
    return event


# --------------------------------------------------------------------------- problem collection


class _Problems:
    """Collects messages up to the detail cap; beyond it only counts (no string formatting)."""

    __slots__ = ("messages", "overflow")

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.overflow = 0

    def add(self, index: int, message: str) -> None:
        if len(self.messages) < MAX_ERROR_DETAILS:
            self.messages.append(f"Event {index}: {message}")
        else:
            self.overflow += 1

    @property
    def total(self) -> int:
        return len(self.messages) + self.overflow

    def details(self) -> list[str]:
        if not self.overflow:
            return self.messages
        # The last kept message makes way for the summary, so the list stays at the cap.
        hidden = self.overflow + 1
        return [*self.messages[: MAX_ERROR_DETAILS - 1], f"... and {hidden} more problems"]


_PLAIN_KEY = re.compile(rf"[A-Za-z0-9_-]{{1,{ECHOED_KEY_CHARS}}}")


def _key_snippet(key: str) -> str:
    """A user-supplied key, escaped like repr and cut to ECHOED_KEY_CHARS characters."""
    if len(key) > ECHOED_KEY_CHARS:
        return f"{key[:ECHOED_KEY_CHARS]!r}..."
    return repr(key)


def _property_label(key: str) -> str:
    """`properties.plan` for plain keys, else a truncated, escaped `properties['...']`."""
    if _PLAIN_KEY.fullmatch(key):
        return f"properties.{key}"
    return f"properties[{_key_snippet(key)}]"


def _snippet(text: str, limit: int = 200) -> str:
    """A decoder message made safe to echo: printable and short."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


# Errors that mean "this value is not acceptable" from a msgspec decode of untrusted bytes:
# ValidationError/DecodeError, UnicodeDecodeError (invalid UTF-8 inside a string; msgspec raises it
# as is), RecursionError (nesting deeper than the interpreter's limit).
_DECODE_FAILURES = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _filled_slots(slots: tuple) -> tuple:
    """The leading slots an array-like decode filled (elements fill slots in order)."""
    low, high = 0, len(slots)
    while low < high:  # binary search for the first UNSET slot
        middle = (low + high) // 2
        if slots[middle] is UNSET:
            high = middle
        else:
            low = middle + 1
    return slots[:low]


class _BadEventCount(Exception):
    """Raised on the fast path when the events array is empty or longer than max_events."""


class _OversizedEvent(Exception):
    """Raised on the fast path when an event is larger than max_event_bytes."""


class _OutOfRangeTimestamp(Exception):
    """An offset timestamp whose UTC equivalent is before year 1 or after year 9999."""


def _to_utc(timestamp: datetime) -> datetime:
    try:
        return timestamp.astimezone(UTC)
    except OverflowError:
        raise _OutOfRangeTimestamp from None


# --------------------------------------------------------------------------- the schema


class Schema:
    """Decoders and encoder for one set of limits; build once, reuse for every request."""

    __slots__ = (
        "limits",
        "fields",
        "Event",
        "_batch_decoder",
        "_raw_events_decoder",
        "_slotted_batch_decoder",
        "_encoder",
        "_max_event_bytes",
        "_min_event_bytes",
        "_measure_first_above",
        "_envelope_decoder",
        "_raw_decoder",
        "_event_slots_decoder",
        "_event_decoder",
        "_raw_event_decoder",
        "_checks",
    )

    def __init__(self, limits: EventLimits = EventLimits()) -> None:  # noqa: B008 - frozen value
        self.limits = limits
        self.fields = event_fields(limits)
        self.Event = _build_event_struct(self.fields, limits)
        events_type = Annotated[list[self.Event], Meta(min_length=1, max_length=limits.max_events)]
        batch = msgspec.defstruct("Batch", [("events", events_type)], gc=False, module=__name__)
        self._batch_decoder = msgspec.json.Decoder(batch)
        self._encoder = msgspec.json.Encoder()

        # Per-event byte cap. The shortest JSON a valid event can have: required fields only,
        # one-character strings, the shortest timestamp msgspec accepts, `true` (keys can only
        # get longer, through escapes). The other n-1 events of a body take at least that much.
        shortest = self.Event("x", datetime(1, 1, 1, tzinfo=UTC), "x", "x", True)
        self._min_event_bytes = len(self._encoder.encode(shortest))
        self._max_event_bytes = limits.max_event_bytes
        # Above this size no batch of at most max_events events can skip the byte-cap pass, so
        # decode() runs that pass first: it also counts the events, and nothing is built for a
        # body with too many or too large events (see decode).
        self._measure_first_above = (
            limits.max_event_bytes + (limits.max_events - 1) * self._min_event_bytes
        )
        raw_events = msgspec.defstruct("RawEvents", [("events", list[Raw])], module=__name__)
        self._raw_events_decoder = msgspec.json.Decoder(raw_events)
        # An array-like Struct with max_events + 1 slots: msgspec fills the slots in order and
        # skips any further elements without building them, so a 20 MiB array costs no memory
        # (a list[Raw] holds one object per element: ~750 MB for 10 million elements).
        event_slots = msgspec.defstruct(
            "EventSlots",
            [(f"e{i}", Raw, UNSET) for i in range(limits.max_events + 1)],
            array_like=True,
            module=__name__,
        )
        slotted_batch = msgspec.defstruct(
            "SlottedBatch", [("events", event_slots)], module=__name__
        )
        self._slotted_batch_decoder = msgspec.json.Decoder(slotted_batch)
        self._event_slots_decoder = msgspec.json.Decoder(event_slots)

        # The thorough pass: decoders that stop at Raw so each level can be checked on its own.
        envelope = msgspec.defstruct("Envelope", [("events", Raw, UNSET)], module=__name__)
        raw_event = msgspec.defstruct(
            "RawEvent", [(spec.name, Raw, UNSET) for spec in self.fields], module=__name__
        )
        self._envelope_decoder = msgspec.json.Decoder(envelope)
        self._raw_decoder = msgspec.json.Decoder(Raw)
        self._event_decoder = msgspec.json.Decoder(self.Event)
        self._raw_event_decoder = msgspec.json.Decoder(raw_event)
        self._checks = [(spec, self._field_check(spec)) for spec in self.fields]

    # ------------------------------------------------------------------ fast path

    def decode(self, body: bytes) -> list[Any]:
        """Decode and validate a request body; raise BatchRejected listing every problem.

        Returned events have UTC timestamps (offsets converted).
        """
        try:
            cap = self._max_event_bytes
            if len(body) > self._measure_first_above:
                # Measure before building: a list[Event] decoder builds every event before its
                # length check, so 24 MB of valid events (40,000) took ~1.3 s and ~76 MB to
                # reject, and one 20 MiB event of tiny properties builds a dict ~10x its size.
                # The slot pass costs the same as the byte-cap pass it replaces (~4 us more).
                slots = self._slotted_batch_decoder.decode(body).events
                raw_events = _filled_slots(msgspec.structs.astuple(slots))
                if not raw_events or len(raw_events) > self.limits.max_events:
                    raise _BadEventCount
                if max(map(len, raw_events)) > cap:
                    raise _OversizedEvent
                events = self._batch_decoder.decode(body).events
            else:
                events = self._batch_decoder.decode(body).events
                # The other n-1 events take at least _min_event_bytes each: while the body is
                # no longer than the cap plus that, no event can exceed the cap. Otherwise a
                # list[Raw] pass gives every event's byte span; it costs ~0.75 ns per body byte
                # (~400 ns for a 530-byte event, bench/micro_schema.py), and no cheaper exact
                # bound exists (per-event Python work costs more).
                if len(body) > cap + (len(events) - 1) * self._min_event_bytes:
                    if max(map(len, self._raw_events_decoder.decode(body).events)) > cap:
                        raise _OversizedEvent
            # Measured on 1,000 events: this plain loop costs ~27 ns/event, less than a C-level
            # `set(map(attrgetter("timestamp.tzinfo"), events))` scan (~42 ns) or `all(...)`.
            for event in events:
                timestamp = event.timestamp
                if timestamp.tzinfo is not UTC:
                    event.timestamp = _to_utc(timestamp)
        except (
            *_DECODE_FAILURES,
            _BadEventCount,
            _OversizedEvent,
            _OutOfRangeTimestamp,
        ) as fast_error:
            rejection = self.explain(body)
            if not rejection.details:  # the passes disagree (a bug or a decoder edge such as a
                # nesting depth right at the recursion limit): still answer with something useful
                rejection = BatchRejected(
                    VALIDATION_FAILED, [f"events could not be decoded: {_snippet(str(fast_error))}"]
                )
            raise rejection from None
        return events

    def encode_events(self, events: list[Any]) -> bytes:
        """The events as one JSON array (the commit log's record format; see the module doc)."""
        return self._encoder.encode(events)

    # ------------------------------------------------------------------ thorough pass

    def explain(self, body: bytes) -> BatchRejected:
        """List every problem of every event (empty details only if the body is valid).

        Bounded on hostile input: at most ``max_events`` events are examined, each field is
        decoded by msgspec (no recursion of ours), and work per event is linear in its size.
        """
        try:
            envelope = self._envelope_decoder.decode(body)
        except msgspec.ValidationError:  # valid so far, but not an object: is the rest valid?
            try:
                self._raw_decoder.decode(body)
            except _DECODE_FAILURES as error:
                return self._invalid_json(error, body)
            return BatchRejected(
                VALIDATION_FAILED, ["body must be a JSON object with an events array"]
            )
        except _DECODE_FAILURES as error:
            return self._invalid_json(error, body)

        if envelope.events is UNSET:
            return BatchRejected(VALIDATION_FAILED, ["events is required"])
        try:
            slots = self._event_slots_decoder.decode(envelope.events)
        except msgspec.ValidationError:
            return BatchRejected(VALIDATION_FAILED, ["events must be an array"])
        raw_events = _filled_slots(msgspec.structs.astuple(slots))
        if not raw_events:
            return BatchRejected(VALIDATION_FAILED, ["events must contain at least 1 event"])
        if len(raw_events) > self.limits.max_events:
            return BatchRejected(
                VALIDATION_FAILED,
                [f"events must contain at most {self.limits.max_events} events"],
            )

        problems = _Problems()
        for index, raw_event in enumerate(raw_events):
            self._explain_event(index, raw_event, problems)
        details = problems.details()
        if not details:
            # The envelope keeps the last of repeated keys ({"events": 0, "events": [...]}) while
            # the fast decoder checks every occurrence: let it have the final word.
            try:
                self._batch_decoder.decode(body)
            except _DECODE_FAILURES as error:
                details = [
                    _snippet(
                        f"body is invalid (a repeated key is checked at each occurrence): {error}"
                    )
                ]
        return BatchRejected(VALIDATION_FAILED, details)

    @staticmethod
    def _invalid_json(error: BaseException, body: bytes) -> BatchRejected:
        body_length = len(body)
        if isinstance(error, RecursionError):
            return BatchRejected(INVALID_JSON, ["JSON is nested too deeply"])
        if isinstance(error, UnicodeDecodeError):
            return BatchRejected(INVALID_JSON, ["JSON is malformed: invalid UTF-8"])
        lone = _LONE_SURROGATE.search(body)
        if lone is not None:  # msgspec says "unexpected end of hex escape" or "truncated"
            return BatchRejected(
                INVALID_JSON,
                [
                    f"JSON is malformed: lone UTF-16 surrogate {lone[1].decode()} at byte "
                    f"{lone.start(1)}: strings must be valid Unicode (a character beyond U+FFFF "
                    "is escaped as a pair, \\ud83d\\ude00)"
                ],
            )
        message = str(error)
        if message == _MSGSPEC_TRUNCATED:  # say where, as msgspec's other messages do
            message = f"JSON is malformed: unexpected end of input (byte {body_length})"
        return BatchRejected(INVALID_JSON, [_snippet(message)])

    def _explain_event(self, index: int, raw_event: Raw, problems: _Problems) -> None:
        if len(raw_event) > self._max_event_bytes:
            # Not examined further: decoding is what the cap protects (a dict of tiny properties
            # costs ~10x its JSON), and the event is refused whatever else is wrong with it.
            problems.add(index, f"event is larger than {self._max_event_bytes} bytes")
            return
        try:
            event = self._event_decoder.decode(raw_event)
        except _DECODE_FAILURES as error:
            strict_error = error  # drill down below
        else:  # the common case in a mostly-valid batch: one C call, no per-field work
            try:
                _to_utc(event.timestamp)
            except _OutOfRangeTimestamp:
                problems.add(index, _TIMESTAMP_OUT_OF_RANGE)
            return

        try:
            raw_fields = self._raw_event_decoder.decode(raw_event)
        except msgspec.ValidationError:
            problems.add(index, "must be an object")
            return
        found = problems.total
        for spec, check in self._checks:
            raw_value = getattr(raw_fields, spec.name)
            if raw_value is UNSET:
                if spec.required:
                    problems.add(index, f"{spec.name} is required")
                continue
            for message in check(raw_value):
                problems.add(index, message)
        if problems.total == found:  # e.g. a duplicated key whose first value was invalid: the
            # field-by-field view only sees the last value, so quote the decoder instead
            problems.add(index, f"is invalid: {_snippet(str(strict_error))}")

    # Each check returns the messages for one field's raw JSON value (empty when it is valid).
    # The verdict is always the strict decoder (the Struct field's exact type); looser decoders
    # only choose the wording, and a generic message covers any case they cannot explain.

    def _field_check(self, spec: FieldSpec):  # noqa: ANN202 - returns a closure
        strict = msgspec.json.Decoder(_field_type(spec, self.limits))
        name = spec.name
        invalid = [f"{name} is invalid"]

        if spec.kind == "string":
            loose = msgspec.json.Decoder(str if spec.required else Optional[str])  # noqa: UP045
            not_string = [f"{name} must be a string"]
            empty = [f"{name} must not be empty"]
            too_long = [f"{name} must be at most {spec.max_length} characters"]
            bad_text = [f"{name} must be valid Unicode text"]

            def check(raw: Raw) -> list[str]:
                try:
                    strict.decode(raw)
                    return []
                except _DECODE_FAILURES:
                    pass
                try:
                    value = loose.decode(raw)
                except msgspec.ValidationError:
                    return not_string
                except _DECODE_FAILURES:
                    return bad_text
                if value is not None and len(value) < spec.min_length:
                    return empty
                if value is not None and len(value) > spec.max_length:
                    return too_long
                return invalid

            return check

        if spec.kind == "timestamp":
            naive_ok = msgspec.json.Decoder(datetime)
            not_iso = [f"{name} must be an ISO 8601 UTC timestamp"]
            leap_second = [
                f"{name} has a leap second (:60), which cannot be stored; "
                "send :59.999 or the next second"
            ]
            text = msgspec.json.Decoder(str)
            naive = [f"{name} must include a timezone (Z or an offset such as +02:00)"]
            out_of_range = [_TIMESTAMP_OUT_OF_RANGE]

            def check(raw: Raw) -> list[str]:
                try:
                    value = strict.decode(raw)
                except _DECODE_FAILURES:
                    pass
                else:
                    try:
                        _to_utc(value)
                    except _OutOfRangeTimestamp:
                        return out_of_range
                    return []
                try:
                    naive_ok.decode(raw)
                except _DECODE_FAILURES:
                    try:
                        if _LEAP_SECOND.match(text.decode(raw)):
                            return leap_second
                    except _DECODE_FAILURES:
                        pass
                    return not_iso
                return naive

            return check

        if spec.kind == "properties":
            return self._properties_check(strict, invalid)

        wording = {
            "boolean": [f"{name} must be a boolean"],
            "device_type": [f"{name} must be one of {', '.join(DEVICE_TYPES)}"],
        }[spec.kind]

        def check(raw: Raw) -> list[str]:
            try:
                strict.decode(raw)
                return []
            except _DECODE_FAILURES:
                return wording

        return check

    def _properties_check(self, strict: msgspec.json.Decoder, invalid: list[str]):  # noqa: ANN202
        limits = self.limits
        entries = msgspec.json.Decoder(Optional[dict[str, Raw]])  # noqa: UP045
        key_type, value_type = _property_types(limits)
        value_strict = msgspec.json.Decoder(value_type)
        value_loose = msgspec.json.Decoder(str)
        not_object = ["properties must be an object"]
        bad_text = ["properties must be valid Unicode text"]
        too_many = [f"properties must have at most {limits.max_properties} entries"]

        def check(raw: Raw) -> list[str]:
            try:
                strict.decode(raw)
                return []
            except _DECODE_FAILURES:
                pass
            try:
                mapping = entries.decode(raw)
            except msgspec.ValidationError:
                return not_object
            except _DECODE_FAILURES:
                return bad_text
            if mapping is None:  # cannot happen (null is valid); keep the verdict honest
                return invalid
            if len(mapping) > limits.max_properties:
                return too_many  # entries are not examined: the count alone rejects the field
            messages = []
            for key, raw_value in mapping.items():
                try:
                    msgspec.convert(key, key_type)
                except msgspec.ValidationError:
                    messages.append(
                        f"properties key {_key_snippet(key)} must be at most "
                        f"{limits.max_property_key_length} characters"
                    )
                try:
                    value_strict.decode(raw_value)
                    continue
                except _DECODE_FAILURES:
                    pass
                try:
                    value = value_loose.decode(raw_value)
                except msgspec.ValidationError:
                    messages.append(f"{_property_label(key)} must be a string")
                    continue
                except _DECODE_FAILURES:
                    messages.append(f"{_property_label(key)} must be valid Unicode text")
                    continue
                if len(value) > limits.max_property_value_length:
                    messages.append(
                        f"{_property_label(key)} must be at most "
                        f"{limits.max_property_value_length} characters"
                    )
            return messages or invalid

        return check


# msgspec's wording for a body that ends inside a value (it has no byte position).
_MSGSPEC_TRUNCATED = "Input data was truncated"
# An RFC 3339 time whose seconds are 60: valid ISO 8601, but no datetime can hold it.
_LEAP_SECOND = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:60(\.\d+)?([Zz]|[+-]\d\d:?\d\d)?")
# A \uD800-\uDFFF escape that is not half of a pair (after an even run of backslashes, so
# an escaped backslash followed by "ud800" is plain text): msgspec only says "unexpected end
# of hex escape" or "truncated".
_LONE_SURROGATE = re.compile(
    rb"(?<!\\)(?:\\\\)*"
    rb"(\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
    rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2})"
)
_TIMESTAMP_OUT_OF_RANGE = "timestamp is out of range (year 1 to 9999 in UTC)"
