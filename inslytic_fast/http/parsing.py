"""One connection's requests parsed, with the wire limits enforced inside the parser callbacks.

``RequestParser`` is the lower half of ``HttpProtocol`` (protocol.py): it feeds bytes to
httptools, builds each ``Request`` from the callbacks and refuses as soon as a limit is passed,
before any more of the request is read: 431 past the header cap, 413 past the body cap (by
Content-Length or by the bytes), 400 for framing a proxy in front could read differently and
for Host trouble, and the app's refusals decided on the headers alone. A refusal raises
``_Reject`` out of the callback, which stops the parser; ``_feed`` turns it into the answer the
subclass sends (``_fail``, ``_answer_early``). What a complete request becomes, and the whole
output side, are the subclass's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import httptools

from .request import Request

if TYPE_CHECKING:
    from .app import App
    from .state import ServerState

log = logging.getLogger("inslytic_fast.protocol")

# Connection phases, for the timeout checks.
IDLE = 0  # waiting for the first byte of a request (keep-alive idle)
HEADERS = 1  # request line / headers arriving
BODY = 2  # body arriving
LINGER = 3  # error answered, write side shut; draining input briefly so the client reads it

# Headers the server looks at; everything else is skipped with one dict miss.
_AUTHORIZATION, _CONTENT_TYPE, _CONTENT_ENCODING, _CONTENT_LENGTH = 1, 2, 3, 4
_TRANSFER_ENCODING, _EXPECT, _ORIGIN, _HOST, _CONNECTION, _IDEMPOTENCY_KEY = 5, 6, 7, 8, 9, 10
_FORWARDED_FOR = 11
_INTERESTING = {
    b"host": _HOST,
    b"connection": _CONNECTION,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"authorization": _AUTHORIZATION,
    b"content-type": _CONTENT_TYPE,
    b"content-encoding": _CONTENT_ENCODING,
    b"content-length": _CONTENT_LENGTH,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"expect": _EXPECT,
    b"origin": _ORIGIN,
    b"idempotency-key": _IDEMPOTENCY_KEY,
}
_SKIPPED = 0
# The spellings clients send (lower case, and Title-Case as curl and most SDKs do), including
# common headers the server ignores: one exact probe per header instead of lower() + probe.
_HEADER_KIND = {
    spelling: kind
    for name, kind in (
        *_INTERESTING.items(),
        *(
            (name, _SKIPPED)
            for name in (
                b"user-agent",
                b"accept",
                b"accept-encoding",
                b"accept-language",
                b"referer",
                b"x-request-id",
                b"keep-alive",
            )
        ),
    )
    for spelling in (name, name.title())
}


# The longest body read and dropped after a refusal on the headers, keeping the connection: a
# full batch of 1,000 typical events is ~500 KB. A longer one is answered with close.
MAX_DISCARDED_BODY_BYTES = 1024 * 1024


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is on the protocol."""


# RFC 9112 s3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host header and to
# any request with more than one.
MISSING_HOST = "an HTTP/1.1 request needs a Host header (RFC 9112 s3.2)"
SEVERAL_HOSTS = "a request may carry only one Host header (RFC 9112 s3.2)"


def error_message(status: int) -> str:
    """The ``error`` of a protocol-level refusal's body."""
    if status == 431:
        return "Request Header Fields Too Large"
    if status == 413:
        return "Payload Too Large"
    if status == 408:
        return "Request Timeout"
    return "Bad Request"


class RequestParser(asyncio.Protocol):
    """Parses requests and enforces the wire limits; the subclass answers."""

    __slots__ = (
        "app",
        "state",
        "transport",
        "parser",
        "phase",
        "phase_since",
        "request",
        "url",
        "header_bytes",
        "header_read_bytes",
        "body_parts",
        "body_size",
        "chunked",
        "expect_continue",
        "closing",
        "error_status",
        "error_details",
        "early_answer",
        "discarding",
        "content_length",
        "host_headers",
        "asks_keep_alive",
        "max_header_bytes",
        "max_body_bytes",
    )

    def __init__(self, app: App, state: ServerState) -> None:
        settings = state.settings
        self.app = app
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.phase = IDLE
        self.phase_since = state.now
        self.request = Request()
        self.url = b""
        self.header_bytes = 0  # url + header lines, as the parser reports them
        self.header_read_bytes = 0  # bytes read while headers were still incomplete
        self.body_parts: list[bytes] = []
        self.body_size = 0
        self.chunked = False
        self.expect_continue = False
        self.closing = False  # answered with close, or lingering after an error
        self.error_status = 0
        self.error_details: list[str] | None = None
        # (route, status, response): a refusal decided before the body (overload, or before
        # an expected body: Expect: 100-continue)
        self.early_answer: tuple[bytes, int, bytes] | None = None
        # The body of a request already answered on its headers, read and dropped so the
        # connection stays usable (see on_headers_complete).
        self.discarding = False
        self.content_length = -1  # the request's Content-Length; -1: none (chunked or no body)
        self.host_headers = 0
        self.asks_keep_alive = False
        # Copied once so the hot path does not chase settings attributes.
        self.max_header_bytes = settings.max_header_bytes
        self.max_body_bytes = settings.max_body_bytes

    # What the subclass does with what the parser found

    def on_message_complete(self) -> None:
        raise NotImplementedError

    def _invite_body(self) -> None:
        """``Expect: 100-continue`` and nothing refused on the headers: ask for the body."""
        raise NotImplementedError

    def _fail(self, status: int, message: str, details: list[str] | None = None) -> None:
        """Answer a protocol-level error after what is owed, then close the connection."""
        raise NotImplementedError

    def _answer_early(self, route: bytes, status: int, data: bytes, *, close: bool = True) -> None:
        """Send a refusal decided on the headers, after what is owed; close, or (``close``
        false) keep reading while the body is discarded."""
        raise NotImplementedError

    def _close_when_flushed(self) -> None:
        raise NotImplementedError

    def _feed(self, data: bytes | memoryview) -> None:
        if self.phase == HEADERS:
            # Coarse guard across reads: httptools buffers a header line until it is complete,
            # so a never-ending line reaches no callback. Checked only if the headers are still
            # incomplete after this read, when every byte of it was header bytes.
            self.header_read_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request was complete and answered; we speak no other protocol.
            self.closing = True
            self._close_when_flushed()
            return
        except httptools.HttpParserCallbackError:
            early_answer = self.early_answer
            if early_answer is not None:
                self.early_answer = None
                self._answer_early(*early_answer)
            elif self.error_status:
                self._fail(self.error_status, error_message(self.error_status), self.error_details)
            else:
                log.exception("unexpected error in a parser callback")
                self._fail(500, "Internal Server Error")
            return
        except httptools.HttpParserError as exc:
            if self.closing:
                return  # bytes after a "Connection: close" request: not ours to answer
            self._fail(400, "Bad Request", [f"malformed HTTP request: {exc}"])
            return
        except Exception:
            log.exception("unexpected error while parsing")
            self._fail(500, "Internal Server Error")
            return
        if self.phase == HEADERS and self.header_read_bytes > self.max_header_bytes:
            self._fail(431, error_message(431))

    # Parser callbacks (httptools calls them from feed_data)

    def on_message_begin(self) -> None:
        self.phase = HEADERS
        self.phase_since = self.state.now
        self.header_bytes = 0
        self.header_read_bytes = 0
        self.url = b""
        self.request = Request()
        self.body_parts = []
        self.body_size = 0
        self.chunked = False
        self.expect_continue = False
        self.discarding = False
        self.content_length = -1
        self.host_headers = 0
        self.asks_keep_alive = False

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        if self.header_bytes > self.max_header_bytes:
            self.error_status = 431
            raise _Reject

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        if self.header_bytes > self.max_header_bytes:
            self.error_status = 431
            raise _Reject
        which = _HEADER_KIND.get(name)
        if which is None:
            which = _INTERESTING.get(name.lower())
            if which is None:
                return
        elif which == _SKIPPED:
            return
        request = self.request
        if which == _AUTHORIZATION:
            request.authorization = value
        elif which == _CONTENT_TYPE:
            request.content_type = value
        elif which == _CONTENT_ENCODING:
            request.content_encoding = value
        elif which == _CONTENT_LENGTH:
            # llhttp already rejects non-digits, duplicates and CL together with TE.
            length = int(value)
            if length > self.max_body_bytes:
                self.error_status = 413
                raise _Reject
            self.content_length = length
        elif which == _TRANSFER_ENCODING:
            # Only plain "chunked": llhttp accepts ",chunked" and "gzip, chunked", which a proxy in
            # front may read differently (request smuggling); refuse anything else.
            if value.strip().lower() != b"chunked":
                self.error_status = 400
                raise _Reject
            # RFC 9112 s6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing (a
            # 1.0 proxy in front would frame it by Content-Length or by close).
            if self.parser.get_http_version() == "1.0":
                self.error_status = 400
                raise _Reject
            self.chunked = True
        elif which == _EXPECT:
            self.expect_continue = value.strip().lower() == b"100-continue"
        elif which == _HOST:
            self.host_headers += 1
        elif which == _FORWARDED_FOR:
            request.forwarded_for = value
        elif which == _CONNECTION:
            self.asks_keep_alive = b"keep-alive" in value.lower()
        elif which == _ORIGIN:
            request.origin = value
        else:
            request.idempotency_key = value

    def on_headers_complete(self) -> None:
        self.phase = BODY
        self.phase_since = self.state.now
        request = self.request
        request.method = self.parser.get_method()
        url = self.url
        query = url.find(b"?")
        request.path = url if query < 0 else url[:query]
        if self.host_headers != 1:
            if self.host_headers or self.parser.get_http_version() == "1.1":
                self.error_status = 400
                self.error_details = [SEVERAL_HOSTS if self.host_headers else MISSING_HOST]
                raise _Reject
        # Overload past the hard mark: refused here, so its body costs a discard, not a parse.
        refusal = self.app.refuse_on_headers(request, self._keeps_connection_after_refusal)
        if refusal is not None:
            if self.discarding:
                self._answer_early(*refusal, close=False)
                return
            self.early_answer = refusal
            raise _Reject
        if self.expect_continue:
            # Whatever can be decided without the body is decided before inviting it: a client
            # should not upload megabytes to learn its key is wrong.
            refusal = self.app.refuse_before_body(request)
            if refusal is not None:
                self.early_answer = refusal
                raise _Reject
            self._invite_body()

    def _keeps_connection_after_refusal(self) -> bool:
        """Asked only once the log refuses this request (get_http_version alone costs ~0.3 us,
        too much to spend on every request): whether its body is read and dropped on a
        connection kept open, which it then is (``discarding``).

        A new connection per refusal cost the server more than the refusal itself (python -m
        bench refusals), so a body of known, modest length is dropped. A longer or chunked
        body, a client waiting for 100-continue, or an HTTP/1.0 one (its keep-alive is opt-in
        per response) gets the answer with close (the lingering close discards what it sends
        anyway)."""
        self.discarding = (
            0 <= self.content_length <= MAX_DISCARDED_BODY_BYTES
            and not self.expect_continue
            and self.parser.should_keep_alive()
            and self.parser.get_http_version() == "1.1"
            and not self.state.draining
        )
        return self.discarding

    def on_body(self, body: bytes) -> None:
        if self.discarding:  # already answered (Content-Length kept it under the body cap)
            self.phase_since = self.state.now
            return
        self.body_size += len(body)
        if self.body_size > self.max_body_bytes:
            self.error_status = 413
            raise _Reject
        self.body_parts.append(body)
        self.phase_since = self.state.now
