"""POST /v1/ingest, in the API's order: auth -> body -> decode/validate -> rate limit -> commit.

``admit`` makes the decision and touches nothing but the rate-limit bucket it spends from;
``Ingestor`` carries a decision out: it hands admitted events to the commit log and answers
202 only once the log reports them durable (PostHog capture's "decisions are pure, side effects
at the edge").
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import zlib
from typing import TYPE_CHECKING, Protocol

import msgspec

from ..http.request import Request
from ..http.responses import Responses
from ..limits.ratelimit import UNLIMITED, RateLimiter, TokenBucket
from ..log.commitlog import LogUnavailable
from ..observe.metrics import Metrics
from . import errors
from .dedup import CLAIMED, IN_FLIGHT, batch_key, message_key
from .errors import MAX_IDEMPOTENCY_KEY_LENGTH, IngestError
from .schema import Schema
from .segment import SEGMENT_PATHS, SegmentCodec, SegmentRejected

if TYPE_CHECKING:
    from ..log.commitlog import CommitLog
    from .dedup import Dedup
    from .keyring import KeyRing, Project

log = logging.getLogger("inslytic_fast.ingest")

JSON_MEDIA_TYPES = (b"application/json", b"text/plain")  # text/plain: navigator.sendBeacon
SEGMENT_SUCCESS = b'{"success":true}'
# gzip's magic bytes (RFC 1952 s2.3.1): a beacon cannot set Content-Encoding, so a body that
# starts with them is read as gzip (JSON text never starts with 0x1f).
GZIP_MAGIC = b"\x1f\x8b"


class _BodyKey(msgspec.Struct):
    """The write key a body may carry (Segment's ``writeKey``; sendBeacon cannot set headers)."""

    writeKey: str | None = None  # noqa: N815 - the SDKs' spelling


_body_key_decoder = msgspec.json.Decoder(_BodyKey)


class Responder(Protocol):
    """Where an answer goes (the connection's ResponseSlot): its status, and its bytes."""

    def respond(self, status: int, data: bytes) -> None: ...


class Admission:
    """An accepted batch, tokens already spent, waiting for the commit log."""

    __slots__ = ("project", "events_json", "count", "bucket", "window", "limit_headers",
                 "segment", "claimed", "idempotency_key")  # fmt: skip

    def __init__(
        self,
        project: str,
        events_json: bytes,
        count: int,
        bucket: TokenBucket | None,
        limit_headers: bytes,
        segment: bool = False,
        claimed: list | None = None,
        idempotency_key: bytes | None = None,
    ) -> None:
        self.project = project
        self.events_json = events_json  # b"" when every message was a duplicate
        self.count = count
        self.bucket = bucket
        self.window = bucket.window_start if bucket is not None else 0.0
        self.limit_headers = limit_headers
        self.segment = segment  # answered 200 {"success":true}, not 202
        self.claimed = claimed  # dedup slots to settle or release
        self.idempotency_key = idempotency_key


class Duplicate:
    """A retried /v1/ingest batch already stored: answered as the first attempt was."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


def bearer_token(authorization: bytes | None, *, basic: bool = False) -> bytes:
    """The key of an Authorization header; ``basic``: also HTTP Basic with the key as user
    name (Segment's write key: ``base64(key + ":")``). Raises a 401 IngestError."""
    if authorization is not None and authorization.startswith(b"Bearer "):
        token = authorization[7:].strip()  # what SDKs send: no partition, no lower()
        if token:
            return token
    if authorization is None:
        raise errors.unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(b" ")
    if basic and scheme.lower() == b"basic":
        try:
            user = base64.b64decode(token.strip(), validate=True).partition(b":")[0]
        except (binascii.Error, ValueError):
            raise errors.unauthorized(
                "Authorization: Basic credentials are not valid base64"
            ) from None
        if not user:
            raise errors.unauthorized("Missing write key: the Basic user name is empty")
        return user
    if scheme.lower() != b"bearer":  # RFC 9110 s11.1: auth schemes are case-insensitive
        raise errors.unauthorized("Authorization must use the Bearer scheme")
    token = token.strip()
    if not token:
        raise errors.unauthorized("Missing API key: the Bearer token is empty")
    return token


def check_media_type(content_type: bytes | None) -> None:
    """Raise a 415 IngestError unless the body may be JSON."""
    # None: curl -d without -H; be lenient, the body decides.
    if content_type is None or content_type == b"application/json":
        return
    media_type = content_type.partition(b";")[0].strip().lower()
    if media_type not in JSON_MEDIA_TYPES:
        raise errors.unsupported_media_type()


def decode_body(body: bytes, content_encoding: bytes | None, limit: int) -> bytes:
    """Undo Content-Encoding, inflating at most ``limit`` bytes (a gzip bomb stops at the cap);
    raises an IngestError (415 unknown coding, 413 over the cap, 400 broken stream).

    Without Content-Encoding, a body starting with gzip's magic bytes is gzip (see GZIP_MAGIC).
    """
    if content_encoding is None:
        if body[:2] != GZIP_MAGIC:
            return body
        content_encoding = b"gzip"
    encoding = content_encoding.strip().lower()
    if encoding in (b"", b"identity"):
        return body
    if encoding in (b"gzip", b"x-gzip"):
        wbits = 16 + zlib.MAX_WBITS
    elif encoding == b"deflate":
        # RFC 9110 says zlib-wrapped; some clients send raw deflate. The zlib header's
        # first two bytes are a multiple of 31 (RFC 1950 s2.2), raw deflate's usually are not.
        zlib_wrapped = (
            len(body) >= 2 and (body[0] & 0x0F) == 8 and (body[0] << 8 | body[1]) % 31 == 0
        )
        wbits = zlib.MAX_WBITS if zlib_wrapped else -zlib.MAX_WBITS
    else:
        raise errors.unsupported_encoding()
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise errors.invalid_compression(str(exc)) from None
    if len(out) > limit:
        raise errors.inflated_too_large(limit)
    if not inflater.eof:
        raise errors.invalid_compression("the stream is truncated")
    return out


def limit_headers(bucket: TokenBucket, now: float) -> bytes:
    return b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n" % (
        bucket.limit,
        bucket.tokens,
        bucket.reset_in(now),
    )


class Ingestor:
    """Holds what a decision needs and carries decisions out."""

    __slots__ = (
        "keyring",
        "schema",
        "limiter",
        "commitlog",
        "responses",
        "metrics",
        "default_limit",
        "max_decompressed_bytes",
        "segment",
        "dedup",
        "dedup_owner",
        "clock",
    )

    def __init__(
        self,
        keyring: KeyRing,
        schema: Schema,
        limiter: RateLimiter,
        commitlog: CommitLog,
        responses: Responses,
        *,
        default_limit: int,
        max_decompressed_bytes: int,
        metrics: Metrics | None = None,
        segment: SegmentCodec | None = None,
        dedup: Dedup | None = None,
        dedup_owner: int = 0,
        clock=time.time,
    ) -> None:
        self.keyring = keyring
        self.schema = schema
        self.limiter = limiter
        self.commitlog = commitlog
        self.responses = responses
        self.metrics = metrics if metrics is not None else Metrics()
        self.default_limit = default_limit
        self.max_decompressed_bytes = max_decompressed_bytes
        self.segment = segment if segment is not None else SegmentCodec(schema.limits)
        self.dedup = dedup
        self.dedup_owner = dedup_owner
        self.clock = clock  # received time for Segment's clock-skew correction

    # ------------------------------------------------------------------ decisions

    def _header_project(self, req: Request) -> Project:
        """Who is sending by the Authorization header, and whether the headers allow a body."""
        project = self._lookup(req, bearer_token(req.authorization))
        check_media_type(req.content_type)
        return project

    def _project(self, req: Request, header_key: bytes | None, body_key: str | None) -> Project:
        """The project of the request's key: the header's, else the body's; both must agree."""
        if header_key is not None:
            if body_key is not None and body_key.encode() != header_key:
                raise errors.unauthorized(
                    "The key in the body does not match the Authorization header"
                )
            key = header_key
        elif body_key:
            key = body_key.encode()
        else:
            raise errors.unauthorized(
                "Missing API key: send 'Authorization: Bearer <key>' or a writeKey body field"
            )
        return self._lookup(req, key)

    def _lookup(self, req: Request, key: bytes) -> Project:
        project = self.keyring.lookup(key)
        if project is None:
            raise errors.unauthorized("Invalid API key")
        req.project = project.name  # for the access log
        origin = req.origin
        if origin is not None:
            # Enforced here, not only by browsers: a beacon is not subject to CORS, and a
            # key shown in a page must not work from any other site.
            allowed = project.origins  # `projects set-origins`
            if not (
                self.responses.origin_allowed(origin)
                and (allowed is None or origin in allowed)
            ):
                raise errors.origin_not_allowed(origin)
        return project

    def refuse_before_body(self, req: Request) -> IngestError | None:
        """For ``Expect: 100-continue``: the refusal a request would get whatever its body
        (auth, media type, encoding, an empty rate-limit bucket), or None to invite the body.
        Spends nothing; the request is decided again in full once the body is in."""
        if req.authorization is None and _is_beacon(req):
            return None  # the key may be in the body
        try:
            project = self._header_project(req)
            try:
                decode_body(b"", req.content_encoding, 0)
            except IngestError as error:
                if error.status == 415:  # an unknown coding; the empty body's 400 is no verdict
                    raise
            self._refuse_if_bucket_empty(project)
        except IngestError as error:
            return error
        return None

    def _refuse_if_bucket_empty(self, project: Project) -> None:
        """Raise the 429 of a project whose bucket is empty, whatever the body; spends nothing."""
        limit = self._limit_of(project)
        if limit != UNLIMITED:
            now = self.limiter.clock()
            bucket = self.limiter.bucket(project.name, limit, now)
            if not bucket.try_spend(1):
                raise self._rate_limited(bucket, limit, 1, now)
            bucket.refund(1, bucket.window_start)

    def _limit_of(self, project: Project) -> int:
        limit = project.events_per_minute
        return self.default_limit if limit is None else limit

    @staticmethod
    def _rate_limited(bucket: TokenBucket, limit: int, count: int, now: float) -> IngestError:
        reset = bucket.reset_in(now)
        return errors.rate_limited(count, limit, bucket.tokens, reset, limit_headers(bucket, now))

    def _spend(self, project: Project, count: int) -> tuple[TokenBucket | None, bytes]:
        """The bucket spent from and its rate-limit headers; raises 429 (or 413 for a batch
        that can never fit)."""
        limit = self._limit_of(project)
        if limit == UNLIMITED or count == 0:
            return None, b""
        if count > limit:
            raise errors.batch_over_limit(count, limit)
        now = self.limiter.clock()
        bucket = self.limiter.bucket(project.name, limit, now)
        if not bucket.try_spend(count):
            raise self._rate_limited(bucket, limit, count, now)
        return bucket, limit_headers(bucket, now)

    def _header_key_and_body(
        self, req: Request, *, header_required: bool, basic: bool = False
    ) -> tuple[bytes | None, bytes]:
        """The Authorization header's key (None when absent and not required: the body may
        carry one) and the decoded body; headers that decide a refusal decide it first."""
        header_key = None
        if req.authorization is not None or header_required:
            header_key = bearer_token(req.authorization, basic=basic)
        check_media_type(req.content_type)
        if header_key is not None and (
            req.content_encoding is not None or req.body[:2] == GZIP_MAGIC
        ):
            # Inflating costs up to max_decompressed_bytes of work per request (60 KB of gzip
            # -> 20 MB of JSON): a project whose bucket is empty is refused before that. The
            # key as this route reads it (Segment's HTTP Basic too); any other refusal keeps
            # its usual place, after the body is decoded.
            try:
                project = self._lookup(req, header_key)
            except IngestError:
                pass
            else:
                self._refuse_if_bucket_empty(project)
        return header_key, decode_body(req.body, req.content_encoding, self.max_decompressed_bytes)

    def admit(self, req: Request) -> Admission | Duplicate:
        """POST /v1/ingest; raises IngestError."""
        # A beacon (text/plain: sendBeacon cannot set headers) may carry its key in the body.
        content_type = req.content_type
        beacon = (
            content_type is not None
            and content_type != b"application/json"  # the common case, decided in one compare
            and content_type[:10].lower() == b"text/plain"
        )
        header_key, body = self._header_key_and_body(req, header_required=not beacon)
        if beacon:  # also with a header: a body key that disagrees with it is refused
            try:
                body_key = _body_key_decoder.decode(body).writeKey
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                body_key = None  # the schema below explains what is wrong with the body
            project = self._project(req, header_key, body_key)
        else:
            project = self._lookup(req, header_key)
        idempotency_key = req.idempotency_key
        if idempotency_key is not None:
            idempotency_key = idempotency_key.strip()
            if not (
                0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LENGTH
                and idempotency_key.isascii()
                and idempotency_key.decode("ascii").isprintable()
            ):
                raise errors.invalid_idempotency_key()
        events = self.schema.decode(body)  # raises BatchRejected, an IngestError
        count = len(events)
        claimed = None
        if idempotency_key is not None and self.dedup is not None:
            (status,), claimed = self.dedup.claim(
                [batch_key(project.name, idempotency_key)], self.dedup_owner
            )
            if status == IN_FLIGHT:
                raise errors.in_flight(409)
            if status != CLAIMED:
                return Duplicate(status)
        try:
            bucket, headers = self._spend(project, count)
        except IngestError:
            if claimed:
                self.dedup.release(claimed)
            raise
        # Positional: keyword arguments cost ~0.1 us each on this path.
        return Admission(
            project.name,
            self.schema.encode_events(events),
            count,
            bucket,
            headers,
            False,
            claimed,
            idempotency_key,
        )

    def admit_segment(self, req: Request, route_type: str | None) -> Admission:
        """POST /v1/batch and the single-message Segment routes; raises IngestError."""
        header_key, body = self._header_key_and_body(req, header_required=False, basic=True)
        try:
            decoded = self.segment.decode(body, route_type)
        except SegmentRejected:
            if header_key is None:  # unauthenticated: say only that the key is missing
                raise errors.unauthorized(
                    "Missing write key: HTTP Basic user name or writeKey"
                ) from None
            raise
        project = self._project(req, header_key, decoded.write_key)
        messages = decoded.messages
        claimed = None
        if self.dedup is not None:
            messages, claimed = self._new_messages(project.name, messages)
            if messages is None:
                raise errors.in_flight(503)
        try:
            bucket, headers = self._spend(project, len(messages))
        except IngestError:
            if claimed:
                self.dedup.release(claimed)
            raise
        events_json = (
            self.segment.encode(messages, decoded.sent_at, self.clock()) if messages else b""
        )
        return Admission(
            project.name, events_json, len(messages), bucket, headers, segment=True,
            claimed=claimed,
        )  # fmt: skip

    def _new_messages(self, project: str, messages: list) -> tuple[list | None, list]:
        """The messages not stored before (None: one is still being committed elsewhere)."""
        keyed: list = []
        keys: list[bytes] = []
        fresh: list = []
        seen: set[str] = set()
        for message in messages:
            message_id = message.message_id
            if message_id is None:
                fresh.append(message)
            elif message_id not in seen:  # a repeat inside one batch is a duplicate too
                seen.add(message_id)
                keyed.append(message)
                keys.append(message_key(project, message_id))
        if not keys:
            return messages, []
        statuses, claimed = self.dedup.claim(keys, self.dedup_owner)
        if IN_FLIGHT in statuses:
            self.dedup.release(claimed)
            return None, []
        if len(fresh) + len(keyed) == len(messages) and all(s == CLAIMED for s in statuses):
            return messages, claimed
        duplicates = {m.message_id for m, s in zip(keyed, statuses, strict=True) if s != CLAIMED}
        return [m for m in messages if m.message_id not in duplicates], claimed

    # ------------------------------------------------------------------ carrying them out

    def refusal(self, error: IngestError, req: Request, *, close: bool) -> bytes:
        """Count a refusal and render its response."""
        self.metrics.rejected(error.reason, error.events)
        return self.responses.refusal(error, origin=req.origin, close=close)

    def submit(
        self, req: Request, responder: Responder, segment_route: bytes | None = None
    ) -> None:
        try:
            if segment_route is None:
                decision = self.admit(req)
            else:
                decision = self.admit_segment(req, SEGMENT_PATHS[segment_route])
        except IngestError as error:
            responder.respond(error.status, self.refusal(error, req, close=not req.keep_alive))
            return
        responses = self.responses
        origin, close = req.origin, not req.keep_alive
        if type(decision) is Duplicate:
            responder.respond(202, responses.accepted(decision.count, origin=origin, close=close))
            return
        if not decision.count:  # every message was a retry of one already stored
            responder.respond(
                200, responses.render(200, SEGMENT_SUCCESS, origin=origin, close=close)
            )
            return

        def on_done(failure: BaseException | None) -> None:
            if failure is None:
                if decision.claimed:
                    self.dedup.settle(decision.claimed, decision.count)
                self.metrics.accepted(decision.project, decision.count)
                if decision.segment:
                    responder.respond(
                        200,
                        responses.render(
                            200, SEGMENT_SUCCESS, decision.limit_headers, origin=origin, close=close
                        ),
                    )
                else:
                    responder.respond(
                        202,
                        responses.accepted(
                            decision.count, decision.limit_headers, origin=origin, close=close
                        ),
                    )
            else:
                responder.respond(503, self._not_stored(decision, failure, origin, close))

        try:
            self.commitlog.append(
                decision.project,
                decision.events_json,
                decision.count,
                on_done,
                decision.idempotency_key,
            )
        except LogUnavailable as exc:
            responder.respond(503, self._not_stored(decision, exc, origin, close))

    def refuse_on_headers(self, req: Request) -> tuple[int, bytes] | None:
        """503 + Retry-After (closing) when the log could store no batch right now, whatever
        the body holds: decided on the headers, so an overloaded server never reads a body
        only to refuse it. None when the log takes appends."""
        refused = self.commitlog.unavailable()
        if refused is None:
            return None
        error = errors.unavailable(refused, refused.retry_after)
        return error.status, self.refusal(error, req, close=True)

    def _not_stored(
        self, decision: Admission, failure: BaseException, origin: bytes | None, close: bool
    ) -> bytes:
        """503 + Retry-After: the events were not stored, so their tokens and dedup claims go
        back (the client's retry must be stored)."""
        if decision.claimed:
            self.dedup.release(decision.claimed)
        if decision.bucket is not None:
            decision.bucket.refund(decision.count, decision.window)
        if isinstance(failure, LogUnavailable):
            retry_after = failure.retry_after
        else:
            log.error("commit failed, answering 503: %s", failure)
            retry_after = errors.RETRY_AFTER_UNCLASSIFIED
        error = errors.unavailable(failure, retry_after, decision.count)
        self.metrics.rejected(error.reason, error.events)
        return self.responses.refusal(error, origin=origin, close=close)


def _is_beacon(req: Request) -> bool:
    content_type = req.content_type
    return content_type is not None and content_type[:10].lower() == b"text/plain"
