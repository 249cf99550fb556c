"""The ingest decision, in the API's order: auth -> body -> decode/validate -> rate limit.

``Admitter.admit`` (POST /v1/ingest) and ``admit_segment`` (the Segment routes) decide whether
a complete request is accepted: they return an ``Admission`` (or a ``Duplicate``) or raise an
``IngestError``, and touch nothing but the rate-limit bucket they spend from and the dedup
claims they take. Carrying a decision out (the commit log, the answer) is ``Ingestor``'s job
(pipeline.py): PostHog capture's "decisions are pure, side effects at the edge".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, final

from ..http.request import Request
from ..limits.interface import Bucket, Limiter
from ..limits.window import UNLIMITED
from . import errors
from .body import GZIP_MAGIC, check_media_type, decode_body, is_beacon
from .credentials import bearer_token, body_write_key
from .dedup import CLAIMED, IN_FLIGHT, batch_key, message_key
from .errors import MAX_IDEMPOTENCY_KEY_LENGTH, IngestError
from .schema import Schema
from .segment import SegmentCodec, SegmentRejected

if TYPE_CHECKING:
    from datetime import datetime

    from .dedup import Claims, Dedup
    from .keyring import KeyRing, Project
    from .segment import Message


@final
class Admission:
    """An accepted batch, tokens already spent, waiting for the commit log."""

    __slots__ = ("project", "events_json", "count", "bucket", "window", "limit_headers",
                 "segment", "claimed", "idempotency_key")  # fmt: skip

    def __init__(
        self,
        project: str,
        events_json: bytes,
        count: int,
        bucket: Bucket | None,
        limit_headers: bytes,
        segment: bool = False,
        claimed: Claims | None = None,
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


@final
class Duplicate:
    """A retried /v1/ingest batch already stored: answered as the first attempt was."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


@final
class ClaimPending:
    """A decision that waits on the cluster: ``keys`` were claimed on this node
    (``statuses``, ``claimed``) and the coordinator must confirm them (``Dedup.confirm``);
    ``finish`` then makes the decision from the final statuses and claims (it may raise an
    ``IngestError``). Only requests with ids on a node of a cluster get one."""

    __slots__ = ("keys", "statuses", "claimed", "finish")

    def __init__(
        self,
        keys: list[bytes],
        statuses: list[int],
        claimed: Claims,
        finish: Callable[[list[int], Claims], Admission | Duplicate],
    ) -> None:
        self.keys = keys
        self.statuses = statuses
        self.claimed = claimed
        self.finish = finish


def limit_headers(bucket: Bucket, now: float) -> bytes:
    return b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n" % (
        bucket.limit,
        bucket.tokens,
        bucket.reset_in(now),
    )


class Admitter:
    """Holds what a decision needs and makes decisions."""

    __slots__ = (
        "keyring",
        "schema",
        "limiter",
        "cors_allows",
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
        limiter: Limiter,
        cors_allows: Callable[[bytes], bool],
        *,
        default_limit: int,
        max_decompressed_bytes: int,
        segment: SegmentCodec | None = None,
        dedup: Dedup | None = None,
        dedup_owner: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keyring = keyring
        self.schema = schema
        self.limiter = limiter
        self.cors_allows = cors_allows  # --cors-origins (Responses.origin_allowed)
        self.default_limit = default_limit
        self.max_decompressed_bytes = max_decompressed_bytes
        self.segment = segment if segment is not None else SegmentCodec(schema.limits)
        self.dedup = dedup
        self.dedup_owner = dedup_owner
        self.clock = clock  # received time for Segment's clock-skew correction

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
            if not (self.cors_allows(origin) and (allowed is None or origin in allowed)):
                raise errors.origin_not_allowed(origin)
        return project

    def refuse_before_body(self, req: Request) -> IngestError | None:
        """For ``Expect: 100-continue``: the refusal a request would get whatever its body
        (auth, media type, encoding, an empty rate-limit bucket), or None to invite the body.
        Spends nothing; the request is decided again in full once the body is in."""
        if req.authorization is None and is_beacon(req.content_type):
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
    def _rate_limited(bucket: Bucket, limit: int, count: int, now: float) -> IngestError:
        reset = bucket.reset_in(now)
        return errors.rate_limited(count, limit, bucket.tokens, reset, limit_headers(bucket, now))

    def _spend(self, project: Project, count: int) -> tuple[Bucket | None, bytes]:
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

    def admit(self, req: Request) -> Admission | Duplicate | ClaimPending:
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
            project = self._project(req, header_key, body_write_key(body))
        else:
            assert header_key is not None  # header_required: bearer_token raised otherwise
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
        dedup = self.dedup
        if idempotency_key is None or dedup is None:
            return self._admit_batch(project, events, None, None, None)
        keys = [batch_key(project.name, idempotency_key)]
        statuses, claimed = dedup.claim(keys, self.dedup_owner)
        if dedup.coordinated:
            finish = partial(self._admit_batch, project, events, idempotency_key)
            return ClaimPending(keys, statuses, claimed, finish)
        return self._admit_batch(project, events, idempotency_key, statuses, claimed)

    def _admit_batch(
        self,
        project: Project,
        events: list[Any],
        idempotency_key: bytes | None,
        statuses: list[int] | None,
        claimed: Claims | None,
    ) -> Admission | Duplicate:
        """The rest of ``admit`` once the Idempotency-Key's claim is final (None: no key)."""
        dedup = self.dedup
        if statuses is not None:
            status = statuses[0]
            if status == IN_FLIGHT:
                raise errors.in_flight(409)
            if status != CLAIMED:
                return Duplicate(status)
        count = len(events)
        try:
            bucket, headers = self._spend(project, count)
        except IngestError:
            if claimed and dedup is not None:
                dedup.release(claimed)
            raise
        # Positional: each keyword argument costs measurably on this path (once per request).
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

    def admit_segment(self, req: Request, route_type: str | None) -> Admission | ClaimPending:
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
        messages, sent_at = decoded.messages, decoded.sent_at
        dedup = self.dedup
        if dedup is None:
            return self._admit_messages(project, messages, sent_at, None)
        keyed, keys, unkeyed = self._keyed(project.name, messages)
        if not keys:
            return self._admit_messages(project, messages, sent_at, [])
        statuses, claimed = dedup.claim(keys, self.dedup_owner)
        finish = partial(self._admit_claimed_messages, project, messages, sent_at, keyed, unkeyed)
        if dedup.coordinated:
            return ClaimPending(keys, statuses, claimed, finish)
        return finish(statuses, claimed)

    @staticmethod
    def _keyed(project: str, messages: list[Message]) -> tuple[list[Message], list[bytes], int]:
        """The messages with a messageId (each id once), their dedup keys, and how many
        messages carry no id."""
        keyed: list[Message] = []
        keys: list[bytes] = []
        unkeyed = 0
        seen: set[str] = set()
        for message in messages:
            message_id = message.message_id
            if message_id is None:
                unkeyed += 1
            elif message_id not in seen:  # a repeat inside one batch is a duplicate too
                seen.add(message_id)
                keyed.append(message)
                keys.append(message_key(project, message_id))
        return keyed, keys, unkeyed

    def _admit_claimed_messages(
        self,
        project: Project,
        messages: list[Message],
        sent_at: datetime | None,
        keyed: list[Message],
        unkeyed: int,
        statuses: list[int],
        claimed: Claims,
    ) -> Admission:
        """The rest of ``admit_segment`` once the messageIds' claims are final: the messages
        not stored before, or 503 when one is still being committed elsewhere."""
        if IN_FLIGHT in statuses:
            if self.dedup is not None:
                self.dedup.release(claimed)
            raise errors.in_flight(503)
        if unkeyed + len(keyed) != len(messages) or any(s != CLAIMED for s in statuses):
            duplicates = {
                m.message_id for m, s in zip(keyed, statuses, strict=True) if s != CLAIMED
            }
            messages = [m for m in messages if m.message_id not in duplicates]
        return self._admit_messages(project, messages, sent_at, claimed)

    def _admit_messages(
        self,
        project: Project,
        messages: list[Message],
        sent_at: datetime | None,
        claimed: Claims | None,
    ) -> Admission:
        dedup = self.dedup
        try:
            bucket, headers = self._spend(project, len(messages))
        except IngestError:
            if claimed and dedup is not None:
                dedup.release(claimed)
            raise
        events_json = self.segment.encode(messages, sent_at, self.clock()) if messages else b""
        return Admission(
            project.name, events_json, len(messages), bucket, headers, segment=True,
            claimed=claimed,
        )  # fmt: skip
