"""POST /v1/ingest, in the API's order: auth -> body -> decode/validate -> rate limit -> commit.

``admit`` makes the decision and touches nothing but the rate-limit bucket it spends from;
``Ingestor`` carries a decision out: it hands admitted events to the commit log and answers
202 only once the log reports them durable (PostHog capture's "decisions are pure, side effects
at the edge").
"""

from __future__ import annotations

import logging
import zlib
from typing import TYPE_CHECKING, Protocol

from .commitlog import LogUnavailable
from .metrics import Metrics
from .ratelimit import UNLIMITED, RateLimiter, TokenBucket
from .request import Request
from .responses import Responses, error_body
from .schema import BatchRejected, Schema

if TYPE_CHECKING:
    from .auth import KeyRing, Project
    from .commitlog import CommitLog

log = logging.getLogger("inslytic_fast.ingest")

WWW_AUTHENTICATE = b"WWW-Authenticate: Bearer\r\n"
JSON_MEDIA_TYPES = (b"application/json", b"text/plain")  # text/plain: navigator.sendBeacon


class Responder(Protocol):
    def respond(self, data: bytes) -> None: ...


class Rejection:
    """A 4xx decision: nothing stored, no tokens spent (unless the limiter itself refused)."""

    __slots__ = ("status", "body", "headers", "reason", "events")

    def __init__(
        self, status: int, body: bytes, headers: bytes = b"", reason: str = "body", events: int = 0
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers
        self.reason = reason  # for metrics: auth, body, validation, rate_limit
        self.events = events  # events in the batch, where known


class Admission:
    """An accepted batch, tokens already spent, waiting for the commit log."""

    __slots__ = ("project", "events_json", "count", "bucket", "window", "limit_headers")

    def __init__(
        self,
        project: str,
        events_json: bytes,
        count: int,
        bucket: TokenBucket | None,
        limit_headers: bytes,
    ) -> None:
        self.project = project
        self.events_json = events_json
        self.count = count
        self.bucket = bucket
        self.window = bucket.window_start if bucket is not None else 0.0
        self.limit_headers = limit_headers


def bearer_token(authorization: bytes | None) -> bytes | Rejection:
    if authorization is not None and authorization.startswith(b"Bearer "):
        token = authorization[7:].strip()  # what SDKs send: no partition, no lower()
        if token:
            return token
    if authorization is None:
        return _unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":  # RFC 9110 s11.1: auth schemes are case-insensitive
        return _unauthorized("Authorization must use the Bearer scheme")
    token = token.strip()
    if not token:
        return _unauthorized("Missing API key: the Bearer token is empty")
    return token


def _unauthorized(message: str) -> Rejection:
    return Rejection(401, error_body(message), WWW_AUTHENTICATE, "auth")


def check_media_type(content_type: bytes | None) -> Rejection | None:
    # None: curl -d without -H; be lenient, the body decides.
    if content_type is None or content_type == b"application/json":
        return None
    media_type = content_type.partition(b";")[0].strip().lower()
    if media_type in JSON_MEDIA_TYPES:
        return None
    return Rejection(
        415,
        error_body(
            "Unsupported Media Type",
            ["Content-Type must be application/json or text/plain"],
        ),
    )


class BodyTooLarge(Exception):
    pass


def decode_body(body: bytes, content_encoding: bytes | None, limit: int) -> bytes | Rejection:
    """Undo Content-Encoding, inflating at most ``limit`` bytes (a gzip bomb stops at the cap)."""
    if content_encoding is None:
        return body
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
        return Rejection(
            415,
            error_body(
                "Unsupported Content-Encoding",
                ["Content-Encoding must be gzip, deflate or identity"],
            ),
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        return Rejection(400, error_body("Invalid compressed body", [str(exc)]))
    if len(out) > limit:
        return Rejection(
            413,
            error_body(
                "Payload Too Large",
                [f"the decompressed body exceeds {limit} bytes"],
            ),
        )
    if not inflater.eof:
        return Rejection(400, error_body("Invalid compressed body", ["the stream is truncated"]))
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
    ) -> None:
        self.keyring = keyring
        self.schema = schema
        self.limiter = limiter
        self.commitlog = commitlog
        self.responses = responses
        self.metrics = metrics if metrics is not None else Metrics()
        self.default_limit = default_limit
        self.max_decompressed_bytes = max_decompressed_bytes

    def _project(self, req: Request) -> Project | Rejection:
        """Who is sending, and whether the headers allow a body at all."""
        token = bearer_token(req.authorization)
        if type(token) is Rejection:
            return token
        project = self.keyring.lookup(token)
        if project is None:
            return _unauthorized("Invalid API key")
        rejection = check_media_type(req.content_type)
        if rejection is not None:
            return rejection
        return project

    def refuse_before_body(self, req: Request) -> Rejection | None:
        """For ``Expect: 100-continue``: the refusal a request would get whatever its body
        (auth, media type, encoding, an empty rate-limit bucket), or None to invite the body.
        Spends nothing; the request is decided again in full once the body is in."""
        project = self._project(req)
        if type(project) is Rejection:
            return project
        encoding = decode_body(b"", req.content_encoding, 0)
        if type(encoding) is Rejection and encoding.status == 415:
            return encoding
        limit = self._limit_of(project)
        if limit != UNLIMITED:
            now = self.limiter.clock()
            bucket = self.limiter.bucket(project.name, limit, now)
            if not bucket.try_spend(1):
                return self._rate_limited(bucket, limit, 1, now)
            bucket.refund(1, bucket.window_start)
        return None

    def _limit_of(self, project: Project) -> int:
        limit = project.events_per_minute
        return self.default_limit if limit is None else limit

    def _rate_limited(self, bucket: TokenBucket, limit: int, count: int, now: float) -> Rejection:
        reset = bucket.reset_in(now)
        detail = (
            f"this batch costs {count} tokens; {bucket.tokens} of {limit} remain "
            f"until the bucket refills in {reset} s"
        )
        return Rejection(
            429,
            error_body("Rate limit exceeded", [detail]),
            b"Retry-After: %d\r\n" % reset + limit_headers(bucket, now),
            "rate_limit",
            count,
        )

    def admit(self, req: Request) -> Admission | Rejection:
        project = self._project(req)
        if type(project) is Rejection:
            return project
        body = decode_body(req.body, req.content_encoding, self.max_decompressed_bytes)
        if type(body) is Rejection:
            return body
        try:
            events = self.schema.decode(body)
        except BatchRejected as exc:
            return Rejection(400, error_body(exc.error, exc.details), reason="validation")
        count = len(events)
        limit = self._limit_of(project)
        bucket = None
        headers = b""
        if limit != UNLIMITED:
            if count > limit:
                # 429 means "try later"; this batch can never fit in a window. No Retry-After.
                return Rejection(
                    413,
                    error_body(
                        "Batch exceeds the rate limit",
                        [
                            f"this batch of {count} events is more than the project's whole "
                            f"limit of {limit} events per minute, so it can never be accepted; "
                            f"send it in batches of at most {limit} events"
                        ],
                    ),
                    reason="rate_limit",
                    events=count,
                )
            now = self.limiter.clock()
            bucket = self.limiter.bucket(project.name, limit, now)
            if not bucket.try_spend(count):
                return self._rate_limited(bucket, limit, count, now)
            headers = limit_headers(bucket, now)
        return Admission(project.name, self.schema.encode_events(events), count, bucket, headers)

    def refusal(self, rejection: Rejection, req: Request, *, close: bool) -> bytes:
        """Count a rejection and render its response."""
        self.metrics.rejected(rejection.reason, rejection.events)
        return self.responses.render(
            rejection.status, rejection.body, rejection.headers, origin=req.origin, close=close
        )

    def submit(self, req: Request, responder: Responder) -> None:
        decision = self.admit(req)
        responses = self.responses
        if type(decision) is Rejection:
            responder.respond(self.refusal(decision, req, close=not req.keep_alive))
            return
        origin, close = req.origin, not req.keep_alive

        def on_done(error: BaseException | None) -> None:
            if error is None:
                self.metrics.accepted(decision.project, decision.count)
                responder.respond(
                    responses.accepted(
                        decision.count, decision.limit_headers, origin=origin, close=close
                    )
                )
            else:
                responder.respond(self._unavailable(decision, error, origin, close))

        try:
            self.commitlog.append(decision.project, decision.events_json, decision.count, on_done)
        except LogUnavailable as exc:
            responder.respond(self._unavailable(decision, exc, origin, close))

    def _unavailable(
        self, decision: Admission, error: BaseException, origin: bytes | None, close: bool
    ) -> bytes:
        """503 + Retry-After: the events were not stored, so their tokens go back."""
        self.metrics.rejected("overload", decision.count)
        if decision.bucket is not None:
            decision.bucket.refund(decision.count, decision.window)
        retry_after = getattr(error, "retry_after", 1)
        if not isinstance(error, LogUnavailable):
            log.error("commit failed, answering 503: %s", error)
        return self.responses.render(
            503,
            error_body("Service Unavailable", [f"events not stored: {error}"]),
            b"Retry-After: %d\r\n" % retry_after,
            origin=origin,
            close=close,
        )
