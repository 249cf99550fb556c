"""The thorough pass: every problem of a batch the fast decoder refused, in the API's words.

``Explainer.explain`` runs only after ``Schema.decode`` failed.  It walks the body event by
event and field by field and lists every problem in the API reference's style (``"Event 0:
eventName is required"``).  Every verdict comes from decoding the field with the very same
annotated type the Struct field has (fields.py); the looser decoders that run afterwards only
pick the wording.  So both passes accept exactly the same batches (a hypothesis property in
tests/test_schema.py checks it).

Error details hold at most ``MAX_ERROR_DETAILS`` entries: when there are more problems, the
first ``MAX_ERROR_DETAILS - 1`` are listed and the last entry reads ``"... and N more
problems"``.  An event larger than ``max_event_bytes`` is reported as such and not examined
further (bounded work: decoding is what the cap protects).  User-supplied property keys are
echoed truncated to ``ECHOED_KEY_CHARS`` characters and escaped like Python's ``repr``; values
are not echoed (the one exception, a field the per-field view cannot explain such as a
duplicated key, quotes msgspec's message cut to 200 printable characters).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Optional, cast

import msgspec
from msgspec import UNSET, Raw

from .fields import (
    DECODE_FAILURES,
    DEVICE_TYPES,
    DecodedEvent,
    EventLimits,
    FieldSpec,
    OutOfRangeTimestamp,
    field_type,
    filled_slots,
    property_types,
    to_utc,
)

# The reference's example error body lists problems one per line; 100 lines is plenty to fix a
# batch and keeps a hostile batch (1,000 events x every field wrong) from producing a huge 400.
MAX_ERROR_DETAILS = 100
# Property keys are the only user text echoed back; 40 characters identify a key without letting
# a client make the error response (or a log line) arbitrarily large.
ECHOED_KEY_CHARS = 40

INVALID_JSON = "Invalid JSON"
VALIDATION_FAILED = "Validation failed"

# What the explainer answers: (error, details); empty details only for a valid body.
Verdict = tuple[str, list[str]]
# One field's check: the messages for its raw JSON value (empty when it is valid).
FieldCheck = Callable[[Raw], list[str]]


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


def snippet(text: str, limit: int = 200) -> str:
    """A decoder message made safe to echo: printable and short."""
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= limit else text[:limit] + "..."


class _Envelope(msgspec.Struct):
    """A body's top level, stopping at Raw so each level can be checked on its own."""

    events: Raw | msgspec.UnsetType = UNSET


class Explainer:
    """The thorough pass for one set of limits; build once (Schema does), reuse per failure."""

    __slots__ = (
        "limits",
        "_max_event_bytes",
        "_batch_decoder",
        "_envelope_decoder",
        "_raw_decoder",
        "_event_slots_decoder",
        "_event_decoder",
        "_raw_event_decoder",
        "_checks",
    )

    def __init__(
        self,
        fields: tuple[FieldSpec, ...],
        limits: EventLimits,
        event_type: type[msgspec.Struct],
        batch_decoder: msgspec.json.Decoder,
        event_slots_type: type[msgspec.Struct],
    ) -> None:
        self.limits = limits
        self._max_event_bytes = limits.max_event_bytes
        self._batch_decoder = batch_decoder
        # Decoders that stop at Raw so each level can be checked on its own.
        raw_event = msgspec.defstruct(
            "RawEvent", [(spec.name, Raw, UNSET) for spec in fields], module=__name__
        )
        self._envelope_decoder = msgspec.json.Decoder(_Envelope)
        self._raw_decoder = msgspec.json.Decoder(Raw)
        self._event_slots_decoder = msgspec.json.Decoder(event_slots_type)
        # The Event class is built from the limits at run time; DecodedEvent declares what
        # is read of it.
        self._event_decoder = cast(
            "msgspec.json.Decoder[DecodedEvent]", msgspec.json.Decoder(event_type)
        )
        self._raw_event_decoder = msgspec.json.Decoder(raw_event)
        self._checks = [(spec, self._field_check(spec)) for spec in fields]

    def explain(self, body: bytes) -> Verdict:
        """List every problem of every event (empty details only if the body is valid).

        Bounded on hostile input: at most ``max_events`` events are examined, each field is
        decoded by msgspec (no recursion of ours), and work per event is linear in its size.
        """
        try:
            envelope = self._envelope_decoder.decode(body)
        except msgspec.ValidationError:  # valid so far, but not an object: is the rest valid?
            try:
                self._raw_decoder.decode(body)
            except DECODE_FAILURES as error:
                return self._invalid_json(error, body)
            return (VALIDATION_FAILED, ["body must be a JSON object with an events array"])
        except DECODE_FAILURES as error:
            return self._invalid_json(error, body)

        if envelope.events is UNSET:
            return (VALIDATION_FAILED, ["events is required"])
        try:
            slots = self._event_slots_decoder.decode(envelope.events)
        except msgspec.ValidationError:
            return (VALIDATION_FAILED, ["events must be an array"])
        raw_events = filled_slots(msgspec.structs.astuple(slots))
        if not raw_events:
            return (VALIDATION_FAILED, ["events must contain at least 1 event"])
        if len(raw_events) > self.limits.max_events:
            return (
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
            except DECODE_FAILURES as error:
                details = [
                    snippet(
                        f"body is invalid (a repeated key is checked at each occurrence): {error}"
                    )
                ]
        return (VALIDATION_FAILED, details)

    @staticmethod
    def _invalid_json(error: BaseException, body: bytes) -> Verdict:
        body_length = len(body)
        if isinstance(error, RecursionError):
            return (INVALID_JSON, ["JSON is nested too deeply"])
        if isinstance(error, UnicodeDecodeError):
            return (INVALID_JSON, ["JSON is malformed: invalid UTF-8"])
        lone = _LONE_SURROGATE.search(body)
        if lone is not None:  # msgspec says "unexpected end of hex escape" or "truncated"
            return (
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
        return (INVALID_JSON, [snippet(message)])

    def _explain_event(self, index: int, raw_event: Raw, problems: _Problems) -> None:
        if len(raw_event) > self._max_event_bytes:
            # Not examined further: decoding is what the cap protects (a dict of tiny properties
            # costs ~10x its JSON), and the event is refused whatever else is wrong with it.
            problems.add(index, f"event is larger than {self._max_event_bytes} bytes")
            return
        try:
            event = self._event_decoder.decode(raw_event)
        except DECODE_FAILURES as error:
            strict_error = error  # drill down below
        else:  # the common case in a mostly-valid batch: one C call, no per-field work
            try:
                to_utc(event.timestamp)
            except OutOfRangeTimestamp:
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
            problems.add(index, f"is invalid: {snippet(str(strict_error))}")

    # Each check returns the messages for one field's raw JSON value (empty when it is valid).
    # The verdict is always the strict decoder (the Struct field's exact type); looser decoders
    # only choose the wording, and a generic message covers any case they cannot explain.

    def _field_check(self, spec: FieldSpec) -> FieldCheck:
        strict = msgspec.json.Decoder(field_type(spec, self.limits))
        name = spec.name
        invalid = [f"{name} is invalid"]

        if spec.kind == "string":
            loose = msgspec.json.Decoder(str if spec.required else Optional[str])  # noqa: UP045
            not_string = [f"{name} must be a string"]
            empty = [f"{name} must not be empty"]
            too_long = [f"{name} must be at most {spec.max_length} characters"]
            bad_text = [f"{name} must be valid Unicode text"]

            def check_string(raw: Raw) -> list[str]:
                try:
                    strict.decode(raw)
                    return []
                except DECODE_FAILURES:
                    pass
                try:
                    value = loose.decode(raw)
                except msgspec.ValidationError:
                    return not_string
                except DECODE_FAILURES:
                    return bad_text
                if value is not None and len(value) < spec.min_length:
                    return empty
                if (
                    value is not None
                    and spec.max_length is not None
                    and len(value) > spec.max_length
                ):
                    return too_long
                return invalid

            return check_string

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

            def check_timestamp(raw: Raw) -> list[str]:
                try:
                    value = strict.decode(raw)
                except DECODE_FAILURES:
                    pass
                else:
                    try:
                        to_utc(value)
                    except OutOfRangeTimestamp:
                        return out_of_range
                    return []
                try:
                    naive_ok.decode(raw)
                except DECODE_FAILURES:
                    try:
                        if _LEAP_SECOND.match(text.decode(raw)):
                            return leap_second
                    except DECODE_FAILURES:
                        pass
                    return not_iso
                return naive

            return check_timestamp

        if spec.kind == "properties":
            return self._properties_check(strict, invalid)

        wording = {
            "boolean": [f"{name} must be a boolean"],
            "device_type": [f"{name} must be one of {', '.join(DEVICE_TYPES)}"],
        }[spec.kind]

        def check_choice(raw: Raw) -> list[str]:
            try:
                strict.decode(raw)
                return []
            except DECODE_FAILURES:
                return wording

        return check_choice

    def _properties_check(
        self, strict: msgspec.json.Decoder[object], invalid: list[str]
    ) -> FieldCheck:
        limits = self.limits
        entries = msgspec.json.Decoder(Optional[dict[str, Raw]])  # noqa: UP045
        key_type, value_type = property_types(limits)
        value_strict = msgspec.json.Decoder(value_type)
        value_loose = msgspec.json.Decoder(str)
        not_object = ["properties must be an object"]
        bad_text = ["properties must be valid Unicode text"]
        too_many = [f"properties must have at most {limits.max_properties} entries"]

        def check(raw: Raw) -> list[str]:
            try:
                strict.decode(raw)
                return []
            except DECODE_FAILURES:
                pass
            try:
                mapping = entries.decode(raw)
            except msgspec.ValidationError:
                return not_object
            except DECODE_FAILURES:
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
                except DECODE_FAILURES:
                    pass
                try:
                    value = value_loose.decode(raw_value)
                except msgspec.ValidationError:
                    messages.append(f"{_property_label(key)} must be a string")
                    continue
                except DECODE_FAILURES:
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
