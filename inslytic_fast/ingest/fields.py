"""The API's event fields: batch limits, the field table, and each field's exact msgspec type.

Both passes of ingest validation, the fast decoder (schema.py) and the explainer (explain.py),
decode with the types built here, so they accept exactly the same batches. Where each field is
stored (its column and SQL type) is event_columns.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Optional, Protocol

import msgspec
from msgspec import UNSET, Meta

from ..event_columns import COLUMN_OF_LOG_KEY

# API reference: deviceType is "desktop" | "mobile" | "tablet".
DEVICE_TYPES = ("desktop", "mobile", "tablet")

# The explainer holds one slot per event (see Schema.__init__); ten times the API's 1,000 keeps
# that table small while leaving room for self-hosters who raise the limit.
MAX_EVENTS_CEILING = 10_000


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


def property_types(limits: EventLimits) -> tuple[Any, Any]:
    key = Annotated[str, Meta(max_length=limits.max_property_key_length)]
    value = Annotated[str, Meta(max_length=limits.max_property_value_length)]
    return key, value


# msgspec gives `datetime.timezone.utc` for "Z", "+00:00" and "-00:00", so an identity check
# finds the (rare) timestamps that still need converting.
Timestamp = Annotated[datetime, Meta(tz=True)]


def field_type(spec: FieldSpec, limits: EventLimits) -> Any:
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
        key, value = property_types(limits)
        # A type built at run time for msgspec (the lengths come from the limits): a value to
        # mypy, which checks it as a type expression.
        mapping = dict[key, value]  # type: ignore[valid-type]
        base = Annotated[mapping, Meta(max_length=limits.max_properties)]
    return base if spec.required else Optional[base]  # noqa: UP045 - a runtime type expression


class DecodedEvent(Protocol):
    """What the ingest path reads of a decoded Event (its class is built from the limits)."""

    timestamp: datetime


def build_event_struct(fields: tuple[FieldSpec, ...], limits: EventLimits) -> type[msgspec.Struct]:
    struct_fields: list[tuple[Any, ...]] = []
    for spec in fields:
        annotated = field_type(spec, limits)
        if spec.required:
            struct_fields.append((spec.attr, annotated))
        elif spec.kind == "properties":
            struct_fields.append((spec.attr, annotated, msgspec.field(default_factory=dict)))
        else:
            struct_fields.append((spec.attr, annotated, None))
    # gc=False: an event holds only str/bool/datetime/dict[str, str], so it can never be part of a
    # reference cycle; skipping GC tracking makes a 1,000-event batch cheaper to create and free.
    event = msgspec.defstruct(
        "Event", struct_fields, rename="camel", omit_defaults=True, gc=False, module=__name__
    )
    encode_names = [f.encode_name for f in msgspec.structs.fields(event)]
    if encode_names != [spec.name for spec in fields]:  # a renamed attribute drifted from its spec
        raise AssertionError(f"Event field names drifted: {encode_names}")
    return event


# Errors that mean "this value is not acceptable" from a msgspec decode of untrusted bytes:
# ValidationError/DecodeError, UnicodeDecodeError (invalid UTF-8 inside a string; msgspec raises it
# as is), RecursionError (nesting deeper than the interpreter's limit).
DECODE_FAILURES = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def filled_slots(slots: tuple) -> tuple:
    """The leading slots an array-like decode filled (elements fill slots in order)."""
    low, high = 0, len(slots)
    while low < high:  # binary search for the first UNSET slot
        middle = (low + high) // 2
        if slots[middle] is UNSET:
            high = middle
        else:
            low = middle + 1
    return slots[:low]


class OutOfRangeTimestamp(Exception):
    """An offset timestamp whose UTC equivalent is before year 1 or after year 9999."""


def to_utc(timestamp: datetime) -> datetime:
    try:
        return timestamp.astimezone(UTC)
    except OverflowError:
        raise OutOfRangeTimestamp from None
