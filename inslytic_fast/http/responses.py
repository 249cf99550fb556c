"""Response bytes: status lines and fixed headers built once, a Date header refreshed by the tick.

Every response carries Content-Type: application/json and Content-Length (the ingestion brief),
so SDKs never have to guess how to read an error.
"""

from __future__ import annotations

import http
from email.utils import formatdate
from typing import TYPE_CHECKING

import orjson

from .. import __version__

if TYPE_CHECKING:
    from ..ingest.errors import IngestError

# Built once at import, as uvicorn does, so a response costs one bytes-format call.
STATUS_LINES: dict[int, bytes] = {
    s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode("latin-1")) for s in http.HTTPStatus
}

JSON_CONTENT_TYPE = b"application/json"
# Prometheus 3 refuses a scrape whose Content-Type it cannot parse as an exposition format.
PROMETHEUS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
RATE_LIMIT_HEADERS = b"X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset, Retry-After"


def json_body(obj: object) -> bytes:
    return orjson.dumps(obj)


def error_body(message: str, details: list[str] | None = None) -> bytes:
    if details is None:
        return orjson.dumps({"error": message})
    return orjson.dumps({"error": message, "details": details})


class Responses:
    """Renders responses; holds the per-second Date header and the CORS policy."""

    __slots__ = ("date", "_fixed", "_allow_any_origin", "_origins", "_accepted")

    def __init__(self, cors_origins: tuple[str, ...] = ("*",)) -> None:
        self._allow_any_origin = "*" in cors_origins
        self._origins = frozenset(o.encode("latin-1") for o in cors_origins)
        fixed = b"Server: inslytic-fast/" + __version__.encode() + b"\r\n"
        if self._allow_any_origin:
            fixed += b"Access-Control-Allow-Origin: *\r\n"
        fixed += b"Access-Control-Expose-Headers: " + RATE_LIMIT_HEADERS + b"\r\n"
        self._fixed = fixed
        self.date = b""
        # 202s without per-request headers, by event count; emptied when the Date changes.
        # At most one entry per possible count (the API caps a batch at 1,000 events).
        self._accepted: dict[int, bytes] = {}
        self.tick()

    def tick(self) -> None:
        """Refresh the Date header; the server calls this once a second."""
        self.date = b"Date: " + formatdate(usegmt=True).encode() + b"\r\n"
        self._accepted = {}

    def accepted(
        self, count: int, extra: bytes = b"", *, origin: bytes | None = None, close: bool = False
    ) -> bytes:
        """The 202 for ``count`` stored events; built once a second for the common case
        (no rate-limit headers, keep-alive, any origin), so most 202s format nothing."""
        if extra or close or not self._allow_any_origin:
            return self.render(202, b'{"accepted":%d}' % count, extra, origin=origin, close=close)
        response = self._accepted.get(count)
        if response is None:
            response = self._accepted[count] = self.render(202, b'{"accepted":%d}' % count)
        return response

    def origin_allowed(self, origin: bytes) -> bool:
        """Whether --cors-origins lets a request with this Origin header in (the server
        enforces it: a beacon is not subject to CORS, and nor is curl)."""
        return self._allow_any_origin or origin in self._origins

    def cors(self, origin: bytes | None) -> bytes:
        if self._allow_any_origin:
            return b""
        if origin is not None and origin in self._origins:
            return b"Access-Control-Allow-Origin: " + origin + b"\r\nVary: Origin\r\n"
        return b"Vary: Origin\r\n"

    def render(
        self,
        status: int,
        body: bytes,
        extra: bytes = b"",
        *,
        origin: bytes | None = None,
        close: bool = False,
        head: bool = False,
        content_type: bytes = JSON_CONTENT_TYPE,
    ) -> bytes:
        """One complete response. ``extra`` is pre-rendered header lines, each ending CRLF."""
        if not self._allow_any_origin:
            extra += self.cors(origin)
        if close:
            extra += b"Connection: close\r\n"
        return b"%s%s%sContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
            STATUS_LINES[status],
            self.date,
            self._fixed,
            content_type,
            len(body),
            extra,
            b"" if head else body,
        )

    def error(
        self,
        status: int,
        message: str,
        details: list[str] | None = None,
        extra: bytes = b"",
        *,
        origin: bytes | None = None,
        close: bool = False,
    ) -> bytes:
        return self.render(status, error_body(message, details), extra, origin=origin, close=close)

    def refusal(
        self, error: IngestError, *, origin: bytes | None = None, close: bool = False
    ) -> bytes:
        """The one rendering of an ingest refusal: its status, ``{"error", "details"}`` body,
        Retry-After and the header lines it carries."""
        extra = error.headers
        if error.retry_after is not None:
            extra = b"Retry-After: %d\r\n" % error.retry_after + extra
        return self.render(
            error.status, error_body(error.error, error.details), extra, origin=origin, close=close
        )

    def no_content(self, extra: bytes, *, origin: bytes | None = None) -> bytes:
        """204 for CORS preflight: no body and (RFC 9110 s8.6) no Content-Length either way."""
        if not self._allow_any_origin:
            extra += self.cors(origin)
        return b"%s%s%sContent-Type: %s\r\n%s\r\n" % (
            STATUS_LINES[204],
            self.date,
            self._fixed,
            JSON_CONTENT_TYPE,
            extra,
        )
