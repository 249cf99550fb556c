"""HTTP/1.1 on httptools: bytes in, response bytes out, in request order.

One ``HttpProtocol`` per connection. It only moves bytes: it parses, enforces the wire limits,
hands each complete request to the ``App`` together with a ``ResponseSlot``, and writes the
slots' bytes strictly in request order, even when an earlier ingest is still committing
(pipelining). Nothing is raised out of a protocol callback: a parse error becomes a 400, an
unexpected error a logged 500, and the connection is closed.

Memory per connection is bounded even against a client that pipelines requests and never
reads the answers: while the unsent output is over the transport's high-water mark (or
``max_pipelined`` answers are owed) parsing stops, not only reading. Input is parsed in slices
of ``PARSE_SLICE`` bytes; requests completed in a slice while the output is blocked wait as
parsed ``Request`` objects, and the rest of the read waits unparsed, until the client reads.
Worst case per connection: the high-water mark + the answers owed (``max_pipelined`` x the
largest answer) + one read (256 KiB) + one slice's requests; the total is that times
``max_connections``. A client that leaves output unsent for ``send_timeout`` is aborted.

Timeouts are not timers per request: the server's 1 s tick calls ``check_timeouts`` on every
connection, which compares the phase's start with the cached clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, cast

from ..observe.logs import log_access
from ..observe.metrics import INGEST_ROUTE, OTHER_ROUTE, PROTOCOL_REJECT_REASONS, ROUTES
from .parsing import BODY, HEADERS, IDLE, LINGER, RequestParser
from .request import Request
from .responses import error_body
from .slot import ResponseSlot

KNOWN_ROUTES = frozenset(ROUTES)

if TYPE_CHECKING:
    from .app import App
    from .state import ServerState

log = logging.getLogger("inslytic_fast.protocol")

LINGER_SECONDS = 2.0  # Apache's lingering close waits up to 2 s (MAX_SECS_TO_LINGER)

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# asyncio's and uvloop's default; set explicitly because the memory bound above is built on it.
WRITE_HIGH_WATER = 64 * 1024
# One header cap's worth: at most ~900 of the smallest requests (18 bytes) are parsed ahead of a
# blocked output, ~150 KB of Request objects; a read of a big body costs 16 feeds instead of 1.
PARSE_SLICE = 16 * 1024


class HttpProtocol(RequestParser):
    """One connection: the requests ``RequestParser`` completes go to the app, their answers
    go out in request order, and reading stops while the client does not take them."""

    __slots__ = (
        "metrics",
        "responses",
        "pending",
        "read_paused",
        "write_paused",
        "linger_on_close",
        "access_log",
        "trusted_proxies",
        "peer",
        "max_pipelined",
        "resume_below",
        "send_timeout",
        "deferred",
        "unparsed",
        "parsing",
        "write_paused_since",
        "unsent_seen",
        "send_progress_at",
        "holding",
    )

    def __init__(self, app: App, state: ServerState) -> None:
        super().__init__(app, state)
        settings = state.settings
        self.metrics = state.metrics
        self.responses = app.responses
        self.pending: deque[ResponseSlot] = deque()
        self.read_paused = False
        self.write_paused = False
        self.linger_on_close = False
        # Backpressure: a complete request held back (App.backpressure); reading stops too.
        self.holding = False
        self.access_log = settings.access_log
        self.trusted_proxies = state.trusted_proxies
        self.peer = "-"
        # Copied once so the hot path does not chase settings attributes.
        self.max_pipelined = settings.max_pipelined
        self.resume_below = max(1, settings.max_pipelined // 2)
        self.send_timeout = settings.send_timeout
        # Parsed while the output was blocked: requests, and a protocol error's answer after them.
        self.deferred: deque[tuple[Request, bool] | ResponseSlot] = deque()
        self.unparsed: memoryview | None = None  # the rest of a read, parsed once output drains
        self.parsing = False  # inside the parser (or dispatching): flush must not re-enter it
        self.write_paused_since = 0.0
        self.unsent_seen = 0  # the write buffer's size at the last tick
        self.send_progress_at = 0.0  # when the tick last saw the write buffer shrink or empty

    # Protocol interface

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        # The server listens on stream sockets only: the transport reads and writes.
        transport = cast(asyncio.Transport, base_transport)
        self.transport = transport
        state = self.state
        if len(state.connections) >= state.settings.max_connections or state.draining:
            transport.write(
                self.responses.render(
                    503,
                    error_body("Service Unavailable", ["too many open connections"]),
                    b"Retry-After: 1\r\n",
                    close=True,
                )
            )
            transport.close()
            self.transport = None
            return
        state.connections.add(self)
        state.metrics.connections_opened += 1
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.access_log:
            peer = transport.get_extra_info("peername")
            self.peer = peer[0] if peer else "-"
        self.phase_since = state.now

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        self.transport = None
        self.pending.clear()
        self.deferred.clear()
        self.unparsed = None
        self.body_parts = []

    def data_received(self, data: bytes) -> None:
        self.metrics.bytes_received += len(data)
        if self.closing:
            return  # answered with close (or lingering after an error): input is discarded
        if self.unparsed is not None or len(data) > PARSE_SLICE:
            if self.unparsed is not None:  # a read already under way when reading paused
                data = bytes(self.unparsed) + data
            self.unparsed = memoryview(data)
            self._parse_unparsed()
            return
        self.parsing = True
        try:
            self._feed(data)
        finally:
            self.parsing = False

    def eof_received(self) -> bool:
        # Half-close: finish answering what was sent, then close (keep our side open till then).
        self.closing = True
        self._close_when_flushed()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_since = self.state.now
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._parse_unparsed()

    def on_message_complete(self) -> None:
        if self.discarding:  # answered on its headers (parsing.py); its body is dropped
            self.discarding = False
            self.url = b""
            self.phase = IDLE
            self.phase_since = self.state.now
            return
        request = self.request
        parts = self.body_parts
        request.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.body_parts = []
        self.url = b""  # an error before the next request's first byte names no route
        request.keep_alive = keep_alive = (
            self.parser.should_keep_alive() and not self.state.draining
        )
        self.phase = IDLE
        self.phase_since = self.state.now
        # Read now: the parser may have moved on by the time a deferred request is answered.
        keep_alive_10 = (
            self.asks_keep_alive and keep_alive and self.parser.get_http_version() == "1.0"
        )
        if not keep_alive:
            self.closing = True
        if not self.deferred and not self.holding:
            delay = self.app.backpressure(request)
            if delay > 0.0:
                # Slow this client down rather than refuse it: its request waits (deferred),
                # its connection is not read, and the roll gets the CPU meanwhile.
                self.holding = True
                asyncio.get_running_loop().call_later(delay, self._end_hold)
        if self.deferred or self._output_blocked():
            self.deferred.append((request, keep_alive_10))
            if self.holding and not self.read_paused:
                self._update_reading()
        else:
            self._dispatch(request, keep_alive_10)

    def _invite_body(self) -> None:
        if not self.pending and not self.deferred and self.transport is not None:
            # curl waits 1 s for this before sending a body over 1 KiB; nothing earlier is
            # owed on this connection, so the interim answer cannot jump the response order.
            self.transport.write(CONTINUE_100)

    def _output_blocked(self) -> bool:
        """Enough is owed to this client (or it is held back): answer nothing more for now."""
        return self.holding or self.write_paused or len(self.pending) > self.max_pipelined

    def _end_hold(self) -> None:
        self.holding = False
        if self.transport is not None:
            self._parse_unparsed()  # handles the held request, then reads on

    def _dispatch(self, request: Request, keep_alive_10: bool) -> None:
        keep_alive = request.keep_alive
        slot = ResponseSlot(self, monotonic(), request if self.access_log else None)
        slot.keep_alive_10 = keep_alive_10
        self.pending.append(slot)
        try:
            self.app.handle(request, slot)
        except Exception:
            log.exception("unexpected error handling %s %r", request.method.decode(), request.path)
            slot.respond(
                500,
                self.responses.render(
                    500, error_body("Internal Server Error"), close=not keep_alive
                ),
            )
        if len(self.pending) > self.max_pipelined and not self.read_paused:
            self._update_reading()

    def _parse_unparsed(self) -> None:
        """Answer what was deferred and parse what is left of a read, a slice at a time, for as
        long as the output is not blocked; then read again once nothing is left over."""
        if self.parsing or self.transport is None:
            return  # the loop below, further up the stack, carries on by itself
        self.parsing = True
        try:
            deferred = self.deferred
            while True:
                while deferred and not self._output_blocked() and self.transport is not None:
                    item = deferred.popleft()
                    if isinstance(item, ResponseSlot):  # a protocol error, answered in turn
                        self.pending.append(item)
                        self.flush()
                    else:
                        self._dispatch(*item)
                view = self.unparsed
                if view is None:
                    break
                if deferred or self._output_blocked() or self.transport is None:
                    break
                if self.closing:
                    self.unparsed = None  # after a "Connection: close" request: not ours
                    break
                self.unparsed = view[PARSE_SLICE:] if len(view) > PARSE_SLICE else None
                self._feed(view[:PARSE_SLICE])
        finally:
            self.parsing = False
        self._update_reading()

    def log_access(self, request: Request, status: int, size: int, seconds: float) -> None:
        client = self.peer
        if request.forwarded_for is not None and self.trusted_proxies:
            client = self.trusted_proxies.client(client, request.forwarded_for)
        log_access(
            client, request.method, request.path, status, size, seconds, request.project or "-"
        )

    # Output, in request order

    def flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        pending = self.pending
        while pending:
            data = pending[0].data
            if data is None:
                break
            pending.popleft()
            transport.write(data)
        if self.deferred or self.unparsed is not None:
            if not self.parsing and not self._output_blocked():
                self._parse_unparsed()
        elif self.closing:
            if not pending:
                self._close_when_flushed()
        elif self.read_paused and len(pending) < self.resume_below:
            self._update_reading()

    def _close_when_flushed(self) -> None:
        if (
            self.pending
            or self.deferred
            or self.unparsed is not None
            or self.transport is None
            or self.phase == LINGER
        ):
            return
        if self.linger_on_close:
            self._linger()
        else:
            self.transport.close()

    def _fail(self, status: int, message: str, details: list[str] | None = None) -> None:
        """Answer a protocol-level error after what is owed, then close the connection."""
        self.closing = True
        self.linger_on_close = True
        self.error_status = 0
        self.error_details = None
        self.body_parts = []
        self.unparsed = None
        now = monotonic()
        slot = ResponseSlot(self, now)
        slot.data = self.responses.error(status, message, details, close=True)
        # Counted under the route the request was for, when its URL got that far: a 413 or
        # 431 on /v1/ingest is an ingest refusal like any other.
        path = self.url.partition(b"?")[0]
        route = path if path in KNOWN_ROUTES else OTHER_ROUTE
        self.metrics.response(route, status, now, now)
        if route == INGEST_ROUTE and status in PROTOCOL_REJECT_REASONS:
            self.metrics.rejected(PROTOCOL_REJECT_REASONS[status])
        if self.access_log:  # a malformed request is logged with what of it was parsed
            method = self.request.method if self.phase == BODY else b""
            log_access(self.peer, method, path, status, len(slot.data), 0.0, "-")
        if self.deferred:
            self.deferred.append(slot)  # answered after the requests parsed before the error
            return
        self.pending.append(slot)
        self.flush()

    def _answer_early(self, route: bytes, status: int, data: bytes, *, close: bool = True) -> None:
        """Send the refusal decided before the body, after what is owed, and close: the client
        may send the body anyway, which the lingering close reads and discards. Without
        ``close`` the parser reads on and drops the body (parsing.py, ``discarding``)."""
        if close:
            self.closing = True
            self.linger_on_close = True
            self.body_parts = []
            self.phase = IDLE
            self.unparsed = None
        slot = ResponseSlot(self, monotonic(), self.request if self.access_log else None)
        slot.route = route
        if self.deferred:  # answered after the requests parsed before this one
            slot.data = data
            self.metrics.response(route, status, slot.started, slot.started)
            self.deferred.append(slot)
            return
        self.pending.append(slot)
        slot.respond(status, data)

    def _linger(self) -> None:
        """Shut our write side and drain input for a moment: closing a socket that still has
        unread input sends RST, and the client would lose the error we just wrote."""
        transport = self.transport
        if transport is None:
            return
        self.phase = LINGER
        self.phase_since = self.state.now
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            transport.close()
            return
        if self.read_paused:
            transport.resume_reading()
            self.read_paused = False

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.phase == LINGER:
            return
        should_pause = (
            self.write_paused
            or len(self.pending) > self.max_pipelined
            or bool(self.deferred)
            or self.unparsed is not None
        )
        if should_pause and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()
        elif not should_pause and self.read_paused and len(self.pending) < self.resume_below:
            self.read_paused = False
            transport.resume_reading()

    # Called by the server's 1 s tick

    def check_timeouts(self, now: float) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._send_stalled(transport, now):
            transport.abort()  # close() would wait for the unsent bytes forever
            return
        settings = self.state.settings
        phase = self.phase
        elapsed = now - self.phase_since
        if phase == LINGER:
            if elapsed >= LINGER_SECONDS:
                transport.close()
        elif self.pending or self.deferred:
            return  # we owe answers: the wait is ours (or the unread output's, checked above)
        elif phase == IDLE:
            if self.closing:
                transport.close()
            elif elapsed >= settings.keepalive_timeout:
                transport.close()  # RFC 9112 s9.8: an idle connection may just be closed
        elif phase == HEADERS:
            if elapsed >= settings.header_timeout:
                self._fail(408, "Request Timeout", ["request headers not received in time"])
        elif elapsed >= settings.body_timeout:
            self._fail(408, "Request Timeout", ["request body stalled"])

    def _send_stalled(self, transport: asyncio.Transport, now: float) -> bool:
        """Output the client has not taken for ``send_timeout``: over the high-water mark all
        that time (a reader trickling a byte at a time), or not shrinking at all (nginx's
        send_timeout)."""
        unsent = transport.get_write_buffer_size()
        if unsent == 0 or unsent < self.unsent_seen or self.unsent_seen == 0:
            self.send_progress_at = now
        self.unsent_seen = unsent
        if unsent == 0:
            return False
        if self.write_paused and now - self.write_paused_since >= self.send_timeout:
            return True
        return now - self.send_progress_at >= self.send_timeout

    # Called by the server's drain

    def is_idle(self) -> bool:
        """Between requests and owing no answer: closing it now cuts nothing off."""
        return not self.pending and self.phase == IDLE

    def shutdown(self, *, abort: bool = False) -> None:
        """Close the connection if it is idle; a busy one keeps going (while the server
        drains, its last answer says Connection: close). ``abort`` (the drain's deadline has
        passed) drops it whatever it is doing, unsent output included."""
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
        elif self.is_idle():
            transport.close()
