"""The one error type of the ingest path, and the refusals it can say.

Every refusal an ingest request can get (auth, media type, body decoding, validation, the rate
limit, idempotency, the commit log) is an ``IngestError``: the status, the JSON body's ``error``
and ``details``, the Retry-After seconds, any other header lines the answer needs, and the
metrics reason. Helpers raise it; ``Ingestor.submit`` catches it once and
``Responses.refusal`` (http/responses.py) is the one place that turns it into bytes (PostHog
capture's ``CaptureError`` with its single ``IntoResponse``). Raising costs only on the refusing
path: an accepted request passes no ``except`` clause that fires.

The named constructors below are the refusals; a status code written out anywhere else on the
ingest path is a smell.
"""

from __future__ import annotations

WWW_AUTHENTICATE = b"WWW-Authenticate: Bearer\r\n"
# A retry that arrives while its first attempt is still committing: stored-or-not is not known
# yet. The commit takes milliseconds; one second is the smallest Retry-After.
RETRY_AFTER_IN_FLIGHT = 1
# A commit failure the log did not classify (it classifies every write/sync error it sees, so
# this is a bug's answer): retry soon, as after an overload.
RETRY_AFTER_UNCLASSIFIED = 1
# IETF draft-ietf-httpapi-idempotency-key-header leaves the length open; Stripe caps keys at
# 255 characters, which fits a UUID, a hash or a compound id.
MAX_IDEMPOTENCY_KEY_LENGTH = 255


class IngestError(Exception):
    """A refused ingest request: nothing stored, no tokens spent (unless the limiter itself
    refused). ``reason`` is the metrics label (observe/metrics.py REJECT_REASONS); ``events``
    the batch's event count where it is known (counted as rejected events)."""

    def __init__(
        self,
        status: int,
        error: str,
        details: list[str] | None = None,
        *,
        retry_after: int | None = None,
        headers: bytes = b"",
        reason: str = "body",
        events: int = 0,
    ) -> None:
        super().__init__(error, details)
        self.status = status
        self.error = error  # the body's "error"
        self.details = details  # the body's "details", when there are any
        self.retry_after = retry_after  # seconds; None: no Retry-After header
        self.headers = headers  # other header lines the answer needs, each ending CRLF
        self.reason = reason
        self.events = events

    def __str__(self) -> str:
        if not self.details:
            return self.error
        return f"{self.error}: {'; '.join(self.details)}"


# -- auth -------------------------------------------------------------------------------------


def unauthorized(message: str) -> IngestError:
    return IngestError(401, message, headers=WWW_AUTHENTICATE, reason="auth")


def origin_not_allowed(origin: bytes) -> IngestError:
    return IngestError(403, "Origin not allowed", [origin.decode("latin-1")[:200]], reason="auth")


# -- the request's headers and body ----------------------------------------------------------


def unsupported_media_type() -> IngestError:
    return IngestError(
        415, "Unsupported Media Type", ["Content-Type must be application/json or text/plain"]
    )


def unsupported_encoding() -> IngestError:
    return IngestError(
        415, "Unsupported Content-Encoding", ["Content-Encoding must be gzip, deflate or identity"]
    )


def invalid_compression(detail: str) -> IngestError:
    return IngestError(400, "Invalid compressed body", [detail])


def inflated_too_large(limit: int) -> IngestError:
    return IngestError(413, "Payload Too Large", [f"the decompressed body exceeds {limit} bytes"])


def invalid_idempotency_key() -> IngestError:
    return IngestError(
        400,
        "Invalid Idempotency-Key",
        [f"1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters"],
    )


def invalid_batch(error: str, details: list[str]) -> IngestError:
    """A body that is not valid JSON or not a valid batch (the schema's explanation)."""
    return IngestError(400, error, details, reason="validation")


# -- the rate limit --------------------------------------------------------------------------


def rate_limited(count: int, limit: int, left: int, reset: int, headers: bytes) -> IngestError:
    detail = (
        f"this batch costs {count} tokens; {left} of {limit} remain "
        f"until the bucket refills in {reset} s"
    )
    return IngestError(
        429,
        "Rate limit exceeded",
        [detail],
        retry_after=reset,
        headers=headers,
        reason="rate_limit",
        events=count,
    )


def batch_over_limit(count: int, limit: int) -> IngestError:
    """429 means "try later"; this batch can never fit in a window: 413, no Retry-After."""
    return IngestError(
        413,
        "Batch exceeds the rate limit",
        [
            f"this batch of {count} events is more than the project's whole "
            f"limit of {limit} events per minute, so it can never be accepted; "
            f"send it in batches of at most {limit} events"
        ],
        reason="rate_limit",
        events=count,
    )


# -- idempotency and the commit log ----------------------------------------------------------


def in_flight(status: int) -> IngestError:
    """A retry racing its own first attempt: 409 as the Idempotency-Key draft says, or 503
    for the Segment routes (their SDKs retry 5xx and 429 only, and drop a batch on 409)."""
    return IngestError(
        status,
        "Request in progress",
        ["the first attempt of this request is still being stored; retry shortly"],
        retry_after=RETRY_AFTER_IN_FLIGHT,
        reason="conflict",
    )


def unavailable(why: object, retry_after: int, events: int = 0) -> IngestError:
    """503 + Retry-After: the log could not store the events (``why``: its refusal or
    failure); the client's retry must be stored."""
    return IngestError(
        503,
        "Service Unavailable",
        [f"events not stored: {why}"],
        retry_after=retry_after,
        reason="overload",
        events=events,
    )
