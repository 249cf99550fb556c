"""A mock transport and a scripted app, so the protocol is tested bytes-in / bytes-out."""

from __future__ import annotations

import re

from inslytic_fast.config import Settings
from inslytic_fast.http.protocol import HttpProtocol
from inslytic_fast.http.responses import Responses
from inslytic_fast.http.state import ServerState


class MockTransport:
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.eof_written = False
        self.read_paused = False
        self.unsent = 0  # what a real transport would still hold (a test sets it)
        self.high_water = 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high or 0

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        assert not self.eof_written, "write after write_eof"
        self.buffer += data

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        assert not self.read_paused, "paused twice"
        self.read_paused = True

    def resume_reading(self) -> None:
        assert self.read_paused, "resumed while not paused"
        self.read_paused = False

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class ScriptedApp:
    """Answers each request with its path as body; holds POST /slow until released."""

    def __init__(self) -> None:
        self.responses = Responses()
        self.held = []
        self.requests = []
        self.hold_s = 0.05

    def handle(self, req, slot) -> None:
        self.requests.append(req)
        if req.path == b"/boom":
            raise RuntimeError("boom")
        if req.path == b"/slow":
            self.held.append((req, slot))
            return
        body = b'{"path":"%s","body":%d}' % (req.path, len(req.body))
        slot.respond(200, self.responses.render(200, body, close=not req.keep_alive))

    def refuse_before_body(self, req) -> tuple[bytes, int, bytes] | None:
        """POST /refused is refused on its headers alone (as a wrong key is on /v1/ingest)."""
        if req.path != b"/refused":
            return None
        return b"/refused", 401, self.responses.render(401, b'{"error":"refused"}', close=True)

    def refuse_on_headers(self, req, keeps_connection) -> tuple[bytes, int, bytes] | None:
        """POST /overloaded is refused on its headers, as /v1/ingest is past the hard mark."""
        if req.path != b"/overloaded":
            return None
        return (
            b"/overloaded",
            503,
            self.responses.render(
                503,
                b'{"error":"overloaded"}',
                b"Retry-After: 1\r\n",
                close=not keeps_connection(),
            ),
        )

    def backpressure(self, req) -> float:
        """POST /held is held back this long (as /v1/ingest is past the backpressure mark)."""
        return self.hold_s if req.path == b"/held" else 0.0

    def release(self, index: int = 0) -> None:
        req, slot = self.held.pop(index)
        slot.respond(202, self.responses.render(202, b'{"slow":true}', close=not req.keep_alive))


def make_conn(app=None, **overrides) -> tuple[HttpProtocol, MockTransport, ScriptedApp]:
    app = app or ScriptedApp()
    state = ServerState(Settings(**overrides))
    conn = HttpProtocol(app, state)
    transport = MockTransport()
    conn.connection_made(transport)
    return conn, transport, app


STATUS_RE = re.compile(rb"HTTP/1\.1 (\d{3}) ")


def statuses(data: bytes) -> list[int]:
    return [int(m) for m in STATUS_RE.findall(data)]


def split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse concatenated responses (each must carry Content-Length unless 1xx/204)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode().lower()] = value.strip().decode()
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def get(path: str = "/health", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode()
        + body
    )
