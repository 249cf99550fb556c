"""A place in a connection's response order, filled now or when the commit finishes."""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

from ..observe.metrics import OTHER_ROUTE
from .request import Request

if TYPE_CHECKING:
    from .protocol import HttpProtocol

# RFC 9112 s9.3: an HTTP/1.0 client keeps the connection only if the response says so.
KEEP_ALIVE_HEADER = b"Connection: keep-alive\r\n"


class ResponseSlot:
    """A place in the connection's response order; filled now or when the commit finishes."""

    __slots__ = ("conn", "data", "route", "started", "request", "keep_alive_10")

    def __init__(
        self, conn: HttpProtocol, started: float = 0.0, request: Request | None = None
    ) -> None:
        self.conn = conn
        self.data: bytes | None = None
        self.route = OTHER_ROUTE  # the app names the route it dispatched to
        self.started = started
        self.request = request  # kept only for the access log
        self.keep_alive_10 = False  # an HTTP/1.0 request that asked for keep-alive

    def respond(self, status: int, data: bytes) -> None:
        """Fill the slot with a complete response whose status line says ``status``: the
        metrics and the access log take the status from here, never from the bytes."""
        if self.data is None:
            if self.keep_alive_10 and b"\r\nConnection: close\r\n" not in data:
                status_end = data.index(b"\r\n") + 2
                data = data[:status_end] + KEEP_ALIVE_HEADER + data[status_end:]
            self.data = data
            conn = self.conn
            now = monotonic()
            conn.metrics.response(self.route, status, self.started, now)
            if self.request is not None:
                conn.log_access(self.request, status, len(data), now - self.started)
            conn.flush()
