"""Segment-spec messages -> log events: the decode, the checks and the mapping, without I/O.

The routes (``/v1/batch``, ``/v1/track``, ``/v1/identify``, ``/v1/page``, ``/v1/screen``,
``/v1/group``, ``/v1/alias``) take what the Segment, RudderStack and Jitsu SDKs send. One
msgspec decode per request turns the body into ``Message`` Structs; ``properties``, ``traits``,
``context`` and ``integrations`` stay ``Raw`` (their bytes go to the log verbatim, types and
nesting intact); only the few context fields that have columns are decoded a second time.

Mapping (the README's table says the same): ``type`` -> type; ``track.event``, ``page.name``,
``screen.name`` -> event_name; ``userId`` (a number is stringified), ``anonymousId``,
``messageId``, ``groupId``, ``previousId`` -> their columns; ``context.page.url|title|referrer``
(for a page message also ``properties.url|title|referrer``) -> page_url, page_title, referrer;
``context.campaign.source|medium|name`` -> utm_*; ``context.userAgent`` -> user_agent;
``context.device.type`` -> device_type when it is desktop, mobile or tablet; ``context.os.name``
-> os. session_id and consent_given have no Segment field and stay NULL.

Timestamps (Segment's and PostHog's rule): the client's clock may be wrong, but the gap between
its ``sentAt`` and the server's receipt is the same error, so ``timestamp = timestamp +
(received_at - sentAt)`` once that gap exceeds ``SKEW_TOLERANCE_S`` (below it the gap is
transit time, not a wrong clock). The client's values are kept in ``original_timestamp`` and
``sent_at``. A message without ``timestamp`` happened when it was sent (``sentAt``, corrected,
else received_at). A result more than ``MAX_FUTURE_S`` ahead of received_at or more than
``MAX_PAST_S`` behind it is not believed: received_at stands in (the original is kept).
A timestamp without a zone is read as UTC (what JavaScript's toISOString and these SDKs send
always has one).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec
from msgspec import Meta, Raw

from .errors import IngestError
from .schema import DEVICE_TYPES, EventLimits

SEGMENT_ROUTES: dict[bytes, str | None] = {
    b"/v1/batch": None,
    b"/v1/track": "track",
    b"/v1/identify": "identify",
    b"/v1/page": "page",
    b"/v1/screen": "screen",
    b"/v1/group": "group",
    b"/v1/alias": "alias",
}
# The short paths analytics.js and analytics-next post to (api.segment.io/v1/t, ...).
SEGMENT_SHORT_ROUTES: dict[bytes, str | None] = {
    b"/v1/b": None,
    b"/v1/t": "track",
    b"/v1/i": "identify",
    b"/v1/p": "page",
    b"/v1/s": "screen",
    b"/v1/g": "group",
    b"/v1/a": "alias",
}
# Every path the server answers as Segment intake, with the message type it implies.
SEGMENT_PATHS = {**SEGMENT_ROUTES, **SEGMENT_SHORT_ROUTES}
MESSAGE_TYPES = ("track", "identify", "page", "screen", "group", "alias")

# Below this the sentAt gap is network transit and SDK queueing, not a wrong clock (an SDK
# sets sentAt as it sends; a transcontinental round trip is well under a second).
SKEW_TOLERANCE_S = 1.0
# PostHog drops client timestamps more than 23 h ahead; a day covers every time zone mistake.
MAX_FUTURE_S = 24 * 3600.0
# Older than a year is an uninitialised clock (0001-01-01, 1970-01-01), not an offline queue:
# mobile SDKs keep queued events for days, not years (analytics-ios caps its queue at 1,000).
MAX_PAST_S = 366 * 24 * 3600.0

_Id = Annotated[str, Meta(max_length=256)]
_Name = Annotated[str, Meta(max_length=200)]


class Message(msgspec.Struct, rename="camel", gc=False):
    type: str | None = None
    event: _Name | None = None
    name: _Name | None = None
    user_id: _Id | int | float | None = None
    anonymous_id: _Id | int | float | None = None
    message_id: _Id | None = None
    group_id: _Id | int | float | None = None
    previous_id: _Id | int | float | None = None
    timestamp: datetime | None = None
    sent_at: datetime | None = None
    # Raw cannot sit in a union with None: an absent field is an empty Raw, and a JSON null
    # is Raw(b"null") (see _present).
    properties: Raw = msgspec.field(default_factory=Raw)
    traits: Raw = msgspec.field(default_factory=Raw)
    context: Raw = msgspec.field(default_factory=Raw)
    integrations: Raw = msgspec.field(default_factory=Raw)
    write_key: str | None = None


class Batch(msgspec.Struct, rename="camel", gc=False):
    batch: list[Message]
    sent_at: datetime | None = None
    write_key: str | None = None


class _Page(msgspec.Struct, gc=False):
    url: str | None = None
    title: str | None = None
    referrer: str | None = None


class _Campaign(msgspec.Struct, gc=False):
    source: str | None = None
    medium: str | None = None
    name: str | None = None


class _Device(msgspec.Struct, gc=False):
    type: str | None = None


class _Os(msgspec.Struct, gc=False):
    name: str | None = None


class _Context(msgspec.Struct, rename="camel", gc=False):
    page: _Page | None = None
    campaign: _Campaign | None = None
    user_agent: str | None = None
    device: _Device | None = None
    os: _Os | None = None


class LogEvent(msgspec.Struct, omit_defaults=True, gc=False):
    """One event as the log stores it; the keys are event_columns.py's log keys."""

    type: str
    timestamp: datetime
    eventName: str | None = None  # noqa: N815 - the log's camelCase keys
    anonymousId: str | None = None  # noqa: N815
    userId: str | None = None  # noqa: N815
    messageId: str | None = None  # noqa: N815
    sentAt: datetime | None = None  # noqa: N815
    originalTimestamp: datetime | None = None  # noqa: N815
    groupId: str | None = None  # noqa: N815
    previousId: str | None = None  # noqa: N815
    properties: Raw | None = None
    traits: Raw | None = None
    context: Raw | None = None
    integrations: Raw | None = None
    pageUrl: str | None = None  # noqa: N815
    pageTitle: str | None = None  # noqa: N815
    referrer: str | None = None
    utmSource: str | None = None  # noqa: N815
    utmMedium: str | None = None  # noqa: N815
    utmCampaign: str | None = None  # noqa: N815
    userAgent: str | None = None  # noqa: N815
    deviceType: str | None = None  # noqa: N815
    os: str | None = None


class SegmentRejected(IngestError):
    """A body answered 400 ``{"error": error, "details": details}``."""

    def __init__(self, error: str, details: list[str]) -> None:
        super().__init__(400, error, details, reason="validation")


class Decoded:
    """A decoded request: its messages and the write key the body carried, if any."""

    __slots__ = ("messages", "sent_at", "write_key")

    def __init__(self, messages: list[Message], sent_at: datetime | None, write_key: str | None):
        self.messages = messages
        self.sent_at = sent_at
        self.write_key = write_key


_JSON_OBJECT_FIELDS = ("properties", "traits", "context", "integrations")
_DECODE_FAILURES = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
_TIMESTAMP_FLOOR = datetime(1, 1, 1, tzinfo=UTC)
_NULL = b"null"


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    if value.tzinfo is UTC:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return _TIMESTAMP_FLOOR  # out of range in UTC: treated as far past (not believed)


def _present(raw: Raw) -> Raw | None:
    size = len(raw)
    return None if size == 0 or (size == 4 and bytes(raw) == _NULL) else raw


def _text(value: str | int | float | None) -> str | None:
    """An id as text: SDKs may send a numeric id (JavaScript numbers are floats: 42.0 -> "42")."""
    if value is None or type(value) is str:
        return value
    if type(value) is float and value.is_integer():
        return str(int(value))
    return str(value)


class SegmentCodec:
    """Decoders and the encoder, built once."""

    __slots__ = ("limits", "_batch", "_message", "_context", "_page", "_encoder")

    def __init__(self, limits: EventLimits = EventLimits()) -> None:  # noqa: B008 - frozen
        self.limits = limits
        self._batch = msgspec.json.Decoder(Batch)
        self._message = msgspec.json.Decoder(Message)
        self._context = msgspec.json.Decoder(_Context)
        self._page = msgspec.json.Decoder(_Page)
        self._encoder = msgspec.json.Encoder()

    def decode(self, body: bytes, route_type: str | None) -> Decoded:
        """``route_type`` None: a /v1/batch body; else one message of that type."""
        try:
            if route_type is None:
                batch = self._batch.decode(body)
                decoded = Decoded(batch.batch, batch.sent_at, batch.write_key)
            else:
                message = self._message.decode(body)
                message.type = route_type
                decoded = Decoded([message], message.sent_at, message.write_key)
        except msgspec.ValidationError as exc:
            raise SegmentRejected("Validation failed", [str(exc)]) from None
        except _DECODE_FAILURES as exc:
            raise SegmentRejected("Invalid JSON", [str(exc)[:200]]) from None
        self._check(decoded.messages, route_type is None)
        return decoded

    def _check(self, messages: list[Message], is_batch: bool) -> None:
        limits = self.limits
        if not messages:
            raise SegmentRejected("Validation failed", ["batch must contain at least 1 message"])
        if len(messages) > limits.max_events:
            raise SegmentRejected(
                "Validation failed", [f"batch must contain at most {limits.max_events} messages"]
            )
        problems: list[str] = []
        where = "batch[%d]: " if is_batch else "%.0s"
        for index, message in enumerate(messages):
            kind = message.type
            prefix = where % index
            if kind not in MESSAGE_TYPES:
                problems.append(f"{prefix}type must be one of {', '.join(MESSAGE_TYPES)}")
                continue
            if message.user_id is None and message.anonymous_id is None:
                problems.append(f"{prefix}userId or anonymousId is required")
            if kind == "track" and not message.event:
                problems.append(f"{prefix}event is required for a track message")
            elif kind == "group" and message.group_id is None:
                problems.append(f"{prefix}groupId is required for a group message")
            elif kind == "alias" and message.previous_id is None:
                problems.append(f"{prefix}previousId is required for an alias message")
            for name in _JSON_OBJECT_FIELDS:
                raw = _present(getattr(message, name))
                if raw is not None and bytes(raw)[:1] != b"{":
                    problems.append(f"{prefix}{name} must be an object")
            if len(problems) >= 100:
                break
        if problems:
            raise SegmentRejected("Validation failed", problems[:100])

    def encode(self, messages: list[Message], batch_sent_at: datetime | None, now: float) -> bytes:
        """The messages as the log's event array, timestamps corrected (see the module doc)."""
        received = datetime.fromtimestamp(now, UTC)
        events = [self._map(m, batch_sent_at, received) for m in messages]
        return self._encoder.encode(events)

    def _map(self, message: Message, batch_sent_at: datetime | None, received: datetime):
        sent_at = message.sent_at or batch_sent_at
        if sent_at is not None:
            sent_at = _utc(sent_at)
        original = message.timestamp
        if original is not None:
            original = _utc(original)
        timestamp = corrected_timestamp(original, sent_at, received)
        kind = message.type
        assert kind is not None  # _check refused a message without one
        event = LogEvent(
            kind,
            timestamp,
            eventName=message.event if kind == "track" else message.name,
            anonymousId=_text(message.anonymous_id),
            userId=_text(message.user_id),
            messageId=message.message_id,
            sentAt=sent_at,
            originalTimestamp=original,
            groupId=_text(message.group_id),
            previousId=_text(message.previous_id),
            properties=_present(message.properties),
            traits=_present(message.traits),
            context=_present(message.context),
            integrations=_present(message.integrations),
        )
        page = None
        if event.context is not None:
            try:
                context = self._context.decode(event.context)
            except _DECODE_FAILURES:
                context = None  # an unusual shape: still stored whole in `context`
            if context is not None:
                page = context.page
                campaign = context.campaign
                if campaign is not None:
                    event.utmSource = campaign.source
                    event.utmMedium = campaign.medium
                    event.utmCampaign = campaign.name
                event.userAgent = context.user_agent
                if context.device is not None and context.device.type in DEVICE_TYPES:
                    event.deviceType = context.device.type
                if context.os is not None:
                    event.os = context.os.name
        if kind == "page" and event.properties is not None:
            try:
                from_properties = self._page.decode(event.properties)
            except _DECODE_FAILURES:
                from_properties = None
            if page is None:
                page = from_properties
            elif from_properties is not None:
                page = _Page(
                    page.url or from_properties.url,
                    page.title or from_properties.title,
                    page.referrer or from_properties.referrer,
                )
        if page is not None:
            event.pageUrl = page.url
            event.pageTitle = page.title
            event.referrer = page.referrer
        return event


def corrected_timestamp(
    original: datetime | None, sent_at: datetime | None, received: datetime
) -> datetime:
    """When the message happened, by the server's clock (see the module doc for the rule)."""
    if original is None:
        original = sent_at if sent_at is not None else received
    timestamp = original
    if sent_at is not None:
        skew = received - sent_at
        if abs(skew.total_seconds()) > SKEW_TOLERANCE_S:
            try:
                timestamp = original + skew
            except OverflowError:
                return received
    ahead = (timestamp - received).total_seconds()
    if ahead > MAX_FUTURE_S or ahead < -MAX_PAST_S:
        return received
    return timestamp


__all__ = [
    "MAX_FUTURE_S",
    "MAX_PAST_S",
    "MESSAGE_TYPES",
    "SEGMENT_PATHS",
    "SEGMENT_ROUTES",
    "SEGMENT_SHORT_ROUTES",
    "SKEW_TOLERANCE_S",
    "SegmentCodec",
    "SegmentRejected",
    "corrected_timestamp",
]
