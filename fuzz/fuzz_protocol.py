"""Atheris target: HttpProtocol.data_received with a mock transport and the real App.

Everything behind the protocol is real (routing, auth header parsing, gzip/deflate, the msgspec
schema, the rate limiter, response rendering) except the key catalog and the commit log, which
are in-memory stand-ins so one input costs microseconds and touches no disk. The commit log
acknowledges every other batch only when the next input byte arrives, so responses are also
fuzzed out of order (pipelining while an ingest is "committing").

Invariants, checked after every input (a violation raises, which atheris reports as a crash):
* nothing escapes a protocol callback (atheris catches any exception);
* the bytes written are a sequence of complete HTTP/1.1 responses, each with Content-Type and
  Content-Length (204 and 100 Continue excepted), never a 500;
* nothing is written after the transport was closed or its write side shut;
* at most one response per request the parser began, plus one error answer.

Run (not in CI; see fuzz/README.md): python fuzz/fuzz_protocol.py -max_total_time=120
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

with atheris.instrument_imports(include=["inslytic_fast"]):
    from inslytic_fast.config import Settings
    from inslytic_fast.http.app import App
    from inslytic_fast.http.openapi import build_openapi
    from inslytic_fast.http.protocol import HttpProtocol
    from inslytic_fast.http.responses import Responses
    from inslytic_fast.http.state import ServerState
    from inslytic_fast.ingest.keyring import Project
    from inslytic_fast.ingest.pipeline import Ingestor
    from inslytic_fast.ingest.schema import EventLimits, Schema
    from inslytic_fast.limits.ratelimit import RateLimiter

KEY = b"ik_live_fuzzfuzzfuzzfuzzfuzzfuzzfuzzfuzz000000"
SETTINGS = Settings(
    max_header_bytes=4096, max_body_bytes=64 * 1024, max_decompressed_bytes=256 * 1024
)


class FakeKeyRing:
    def __init__(self) -> None:
        self.project = Project("fuzz", 50)

    def lookup(self, token: bytes):
        return self.project if token == KEY else None


class FakeCommitLog:
    """A ``CommitSink`` (ingest/pipeline.py): acknowledges at once, or holds the batch until
    ``release`` (every other append)."""

    def __init__(self) -> None:
        self.held = []
        self.appends = 0

    def append(self, project, events_json, count, on_done, idempotency_key=None) -> None:
        self.appends += 1
        if self.appends % 2:
            on_done(None)
        else:
            self.held.append(on_done)

    def backpressure_delay(self) -> float:
        return 0.0

    def unavailable(self):
        return None  # always taking appends: the fuzzed part is the protocol and the app

    def release(self) -> None:
        held, self.held = self.held, []
        for on_done in held:
            on_done(None)


class Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.eof_written = False
        self.paused = False

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is "sent" at once

    def write(self, data: bytes) -> None:
        if self.closed or self.eof_written:
            raise AssertionError("write after close / write_eof")
        self.out += data

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        if self.paused:
            raise AssertionError("paused twice")
        self.paused = True

    def resume_reading(self) -> None:
        if not self.paused:
            raise AssertionError("resumed while not paused")
        self.paused = False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default


def make_app(log: FakeCommitLog) -> App:
    limits = EventLimits()
    responses = Responses()
    ingestor = Ingestor(
        FakeKeyRing(),
        Schema(limits),
        RateLimiter(),
        log,
        responses,
        default_limit=1000,
        max_decompressed_bytes=SETTINGS.max_decompressed_bytes,
    )
    openapi = build_openapi(limits, max_body_bytes=SETTINGS.max_body_bytes, server_version="fuzz")
    return App(ingestor, responses, openapi)


class CountingProtocol(HttpProtocol):
    """Counts the requests the parser began (the protocol has __slots__: no monkeypatching)."""

    __slots__ = ("began",)

    def __init__(self, app, state) -> None:
        self.began = 0
        super().__init__(app, state)

    def on_message_begin(self) -> None:
        self.began += 1
        super().on_message_begin()


# Built once: a Schema and the OpenAPI document take milliseconds; inputs must take microseconds.
APP = make_app(FakeCommitLog())
HEAD_END = b"\r\n\r\n"
LENGTH_RE = re.compile(rb"\r\ncontent-length: (\d+)\r\n", re.I)


def check_responses(data: bytes) -> int:
    """Parse ``data`` as complete responses; return how many (interim 100s excluded)."""
    count = 0
    while data:
        head, sep, rest = data.partition(HEAD_END)
        if not sep:
            raise AssertionError(f"incomplete response head: {data[:200]!r}")
        status = int(head[9:12])
        if not head.startswith(b"HTTP/1.1 "):
            raise AssertionError(f"bad status line: {head[:60]!r}")
        if status == 100:
            data = rest
            continue
        if status >= 500:
            raise AssertionError(f"server error answered: {head[:200]!r} {rest[:300]!r}")
        if b"\r\nContent-Type: " not in head + b"\r\n":
            raise AssertionError(f"no Content-Type: {head!r}")
        match = LENGTH_RE.search(head + b"\r\n")
        if status == 204:
            length = 0
        elif match is None:
            raise AssertionError(f"no Content-Length: {head!r}")
        else:
            length = int(match.group(1))
        if len(rest) < length:
            raise AssertionError("truncated response body")
        data = rest[length:]
        count += 1
    return count


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    if not data:
        return
    # First byte: how many reads the stream is cut into (1-8) and whether the client half-closes.
    pieces = 1 + (data[0] & 7)
    use_eof = bool(data[0] & 8)
    stream = data[1:]
    log = FakeCommitLog()
    APP.ingestor.commitlog = log
    APP.ingestor.admitter.limiter = RateLimiter()
    app = APP
    state = ServerState(SETTINGS)
    conn = CountingProtocol(app, state)
    transport = Transport()
    conn.connection_made(transport)
    step = max(1, len(stream) // pieces)
    # The loop delivers connection_lost right after close(): nothing is read or ticked after it.
    for start in range(0, len(stream), step):
        if transport.closed:
            break
        conn.data_received(stream[start : start + step])
        log.release()
    if use_eof and not transport.closed:
        conn.eof_received()
    log.release()
    for now in (1e9, 2e9):  # every timeout passes: the tick must not raise either
        if transport.closed:
            break
        state.now = now
        conn.check_timeouts(now)
    conn.connection_lost(None)
    log.release()  # a commit finishing after the client left must be harmless
    answered = check_responses(bytes(transport.out))
    if answered > conn.began + 1:
        raise AssertionError(f"{answered} responses for {conn.began} requests")


def seeds() -> list[bytes]:
    import gzip
    import json

    event = {
        "eventName": "page_viewed",
        "timestamp": "2026-02-16T10:30:00.000Z",
        "anonymousId": "a",
        "sessionId": "s",
        "consentGiven": True,
        "properties": {"path": "/"},
    }
    body = json.dumps({"events": [event, event]}).encode()
    auth = b"Authorization: Bearer " + KEY + b"\r\n"
    post = b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\n" + auth
    return [
        b"\x01" + post + b"Content-Length: %d\r\n\r\n" % len(body) + body,
        b"\x0a"
        + post
        + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(body)
        + body
        + b"\r\n0\r\n\r\n"
        + b"GET /health HTTP/1.1\r\n\r\n",
        b"\x00"
        + post
        + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(gzip.compress(body))
        + gzip.compress(body),
        b"\x03OPTIONS /v1/ingest HTTP/1.1\r\nOrigin: http://a\r\n\r\n"
        b"GET /openapi.json HTTP/1.1\r\n\r\n",
        b"\x08" + post + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n{}{}{",
    ]


def main() -> None:
    """libFuzzer flags pass through; the first non-flag argument is the corpus directory
    (default: a directory under the system temp dir). An empty corpus gets the seeds."""
    argv = list(sys.argv)
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    if not dirs:
        dirs = [str(Path(tempfile.gettempdir()) / "inslytic-fuzz-protocol-corpus")]
        argv.append(dirs[0])
    corpus = Path(dirs[0])
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for n, seed in enumerate(seeds()):
            (corpus / f"seed-{n}").write_bytes(seed)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
