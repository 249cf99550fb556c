"""Event schema: the fast batch decoder and the log encoder, with the explainer behind them.

Two passes share one definition of what is valid:

* ``Schema.decode`` is the happy path: ONE msgspec decoder call turns the whole request body into
  a list of ``Event`` Structs (types, required fields, lengths, enum and timezone checks all run
  in C).  Two follow-ups: a pass over the raw event spans for the per-event byte cap, only when
  the body is large enough to hold an oversized event (on bodies that large it runs first and
  also counts the events, so nothing is built for a body with too many or too large events),
  and a loop that converts offset timestamps to UTC.
* ``Schema.explain`` runs only after ``decode`` failed: explain.py lists every problem, deciding
  each with the very same field types (fields.py), so both passes accept exactly the same
  batches (a hypothesis property in tests/test_schema.py checks it).

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
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Protocol, cast

import msgspec
from msgspec import UNSET, Meta, Raw

from .errors import IngestError
from .explain import ECHOED_KEY_CHARS, MAX_ERROR_DETAILS, VALIDATION_FAILED, Explainer, snippet
from .fields import (
    DECODE_FAILURES,
    DEVICE_TYPES,
    MAX_EVENTS_CEILING,
    DecodedEvent,
    EventLimits,
    FieldSpec,
    OutOfRangeTimestamp,
    build_event_struct,
    event_fields,
    filled_slots,
    to_utc,
)

__all__ = [
    "DEVICE_TYPES",
    "ECHOED_KEY_CHARS",
    "MAX_ERROR_DETAILS",
    "MAX_EVENTS_CEILING",
    "BatchRejected",
    "EventLimits",
    "FieldSpec",
    "Schema",
    "event_fields",
]


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


class _BadEventCount(Exception):
    """Raised on the fast path when the events array is empty or longer than max_events."""


class _OversizedEvent(Exception):
    """Raised on the fast path when an event is larger than max_event_bytes."""


class _Batch(Protocol):
    """What decode reads of the batch Struct built from the limits."""

    events: list[DecodedEvent]


class _SlottedBatch(Protocol):
    events: msgspec.Struct  # the EventSlots Struct built from the limits


class _RawEvents(msgspec.Struct):
    events: list[Raw]


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
        "_explainer",
    )

    def __init__(self, limits: EventLimits = EventLimits()) -> None:  # noqa: B008 - frozen value
        self.limits = limits
        self.fields = event_fields(limits)
        self.Event = build_event_struct(self.fields, limits)
        # Types built at run time for msgspec (the Event class comes from the limits): values
        # to mypy, which checks them as type expressions; _Batch declares what is read.
        events_list = list[self.Event]  # type: ignore[name-defined]
        events_type = Annotated[events_list, Meta(min_length=1, max_length=limits.max_events)]
        batch = msgspec.defstruct("Batch", [("events", events_type)], gc=False, module=__name__)
        self._batch_decoder = cast("msgspec.json.Decoder[_Batch]", msgspec.json.Decoder(batch))
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
        self._raw_events_decoder = msgspec.json.Decoder(_RawEvents)
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
        self._slotted_batch_decoder = cast(
            "msgspec.json.Decoder[_SlottedBatch]", msgspec.json.Decoder(slotted_batch)
        )
        self._explainer = Explainer(
            self.fields, limits, self.Event, self._batch_decoder, event_slots
        )

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
                raw_events = filled_slots(msgspec.structs.astuple(slots))
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
                    event.timestamp = to_utc(timestamp)
        except (
            *DECODE_FAILURES,
            _BadEventCount,
            _OversizedEvent,
            OutOfRangeTimestamp,
        ) as fast_error:
            rejection = self.explain(body)
            if not rejection.details:  # the passes disagree (a bug or a decoder edge such as a
                # nesting depth right at the recursion limit): still answer with something useful
                rejection = BatchRejected(
                    VALIDATION_FAILED, [f"events could not be decoded: {snippet(str(fast_error))}"]
                )
            raise rejection from None
        return events

    def encode_events(self, events: list[Any]) -> bytes:
        """The events as one JSON array (the commit log's record format; see the module doc)."""
        return self._encoder.encode(events)

    def explain(self, body: bytes) -> BatchRejected:
        """List every problem of every event (empty details only if the body is valid)."""
        error, details = self._explainer.explain(body)
        return BatchRejected(error, details)
