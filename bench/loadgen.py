"""HTTP/1.1 load generator on raw asyncio (uvloop) protocols: keep-alive, optional pipelining.

Run by the bench runner as ``python -m bench.loadgen SPEC_JSON``, one process per generator
core. It prints a progress JSON line to stdout every second and a final ``{"result": ...}``
line; request latencies (seconds, float64) go to ``spec["latency_path"]`` as raw bytes so the
runner can merge several generator processes exactly.

Two loops:
- closed: every connection keeps ``pipeline`` requests in flight and sends the next one the
  moment a response completes (maximum throughput; latency is only indicative).
- open: requests are due at a fixed rate whatever the server does; a due request goes out on
  the first connection with room and its latency is measured from the time it was *due*, not
  sent. A slow server therefore shows up as latency, instead of slowing the generator down
  and hiding it (coordinated omission).

The hot path does nothing but slice bytes: requests are pre-encoded (bench/payloads.py) and a
response is parsed with two ``find`` calls (the header block end and Content-Length).
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import resource
import socket
import sys
import time
from collections import deque

from .payloads import MESSAGE_SERIAL_DIGITS, build_requests, message_serial_offsets

PROGRESS_INTERVAL_S = 1.0
# After the window closes, responses still in flight are awaited this long so the count of
# accepted events (needed for "time until queryable") is exact; a server that takes longer
# has failed the run anyway.
DRAIN_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# libuv timers tick in whole milliseconds, so the open-loop ticker sleeps only when the next
# request is due further away than this and yields to the loop (without sleeping) otherwise.
TIMER_RESOLUTION_S = 0.001
CONTENT_LENGTH = b"\r\ncontent-length:"
CONTENT_LENGTH_TITLE = b"\r\nContent-Length:"
RETRY_AFTER = b"\r\nretry-after:"
# Answers after which a client should wait before its next request (the API reference: 429
# and 503 carry Retry-After); an SDK does, so the generator does too on that connection.
BACK_OFF_STATUSES = (b"429", b"503")


def retry_after_seconds(head: bytes) -> float:
    """Retry-After of a response head in seconds; 1 s if absent or an HTTP-date."""
    at = head.lower().find(RETRY_AFTER)
    if at < 0:
        return 1.0
    end = head.find(b"\r\n", at + len(RETRY_AFTER))
    value = head[at + len(RETRY_AFTER) : end if end > 0 else len(head)].strip()
    return float(value) if value.isdigit() else 1.0


class ProtocolFailure(Exception):
    """The server sent something this generator cannot frame (no Content-Length)."""


class Connection(asyncio.Protocol):
    __slots__ = (
        "gen",
        "transport",
        "buffer",
        "in_flight",
        "request_index",
        "closed",
        "idle",
        "resume_at",
        "resume_handle",
    )

    def __init__(self, gen: Generator, first_request: int) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        # Start times of the requests on the wire, oldest first: HTTP/1.1 answers in order.
        self.in_flight: deque[float] = deque()
        self.request_index = first_request
        self.closed = False
        self.idle = False  # queued in Generator.idle (open loop), so never queued twice
        self.resume_at = 0.0  # perf_counter time before which this connection sends nothing
        self.resume_handle: asyncio.TimerHandle | None = None

    # Protocol interface

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        # Parse straight from ``data`` when nothing is buffered (the usual case: whole
        # responses per read), so a response costs no copy and no allocation.
        buffer = self.buffer
        if buffer:
            buffer += data
            data = bytes(buffer)
        now = time.perf_counter()
        gen = self.gen
        in_flight = self.in_flight
        pos = 0
        size = len(data)
        while True:
            head_end = data.find(b"\r\n\r\n", pos)
            if head_end < 0:
                break
            at = data.find(CONTENT_LENGTH, pos, head_end)
            if at < 0:
                at = data.find(CONTENT_LENGTH_TITLE, pos, head_end)
                if at < 0:
                    at = bytes(data[pos:head_end]).lower().find(CONTENT_LENGTH)
                    if at < 0:
                        gen.errors += 1  # unframeable (no Content-Length): give up on it
                        self.transport.close()
                        return
                    at += pos
            line_end = data.find(b"\r\n", at + 17, head_end)
            body_end = head_end + 4 + int(data[at + 17 : line_end if line_end > 0 else head_end])
            if body_end > size:
                break
            if in_flight:
                status = data[pos + 9 : pos + 12]
                gen.on_response(status, now - in_flight.popleft(), now)
                if status in BACK_OFF_STATUSES:
                    self.resume_at = now + retry_after_seconds(bytes(data[pos:head_end]))
            pos = body_end
        if pos < size:
            self.buffer = bytearray(data[pos:])
        elif buffer:
            self.buffer = bytearray()
        gen.refill(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.gen.on_connection_lost(self)

    # Sending

    def send(self, started_at: float) -> None:
        gen = self.gen
        index = self.request_index
        self.request_index = index + 1
        self.in_flight.append(started_at)
        request = gen.requests[index % gen.request_count]
        if gen.serial_offsets is not None:
            request = gen.with_new_message_ids(request, index % gen.request_count)
        self.transport.write(request)


class Generator:
    def __init__(self, spec: dict, requests: list[bytes]) -> None:
        self.spec = spec
        self.requests = requests
        self.request_count = len(requests)
        # 202 for /v1/ingest, 200 for the Segment routes.
        self.ok_status = str(spec.get("ok_status", 202)).encode()
        # Segment: fresh messageIds per request (payloads.MESSAGE_SERIAL_DIGITS).
        self.serial_offsets = (
            [message_serial_offsets(r) for r in requests] if spec.get("segment") else None
        )
        self.serial = 0
        self.depth = max(1, int(spec.get("pipeline", 1)))
        self.rate = spec.get("rate")  # requests/s for this process; None -> closed loop
        self.connections: list[Connection] = []
        self.sending = False
        self.scheduling = False  # open loop: new requests still come due
        self.measuring = False
        self.window_start = float("inf")
        self.window_end = float("inf")
        # Counters: "total" ones span warmup and drain (events the server must store);
        # the others only count responses that completed inside the measured window.
        self.total_ok = 0
        self.total_requests = 0
        self.ok = 0
        self.statuses: dict[str, int] = {}
        self.errors = 0
        self.unanswered = 0
        self.latencies = array.array("d")
        self.send_lag = array.array("d")
        # Open loop: due times not yet sent, connections with room, and the schedule.
        self.due: deque[float] = deque()
        self.idle: deque[Connection] = deque()
        self.next_due = 0.0
        self.interval = 0.0
        self.drained: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def with_new_message_ids(self, request: bytes, variant: int) -> bytes:
        self.serial += 1
        digits = b"%012x" % self.serial
        fresh = bytearray(request)
        for offset in self.serial_offsets[variant]:
            fresh[offset : offset + MESSAGE_SERIAL_DIGITS] = digits
        return bytes(fresh)

    # Callbacks from connections

    def on_response(self, status: bytes, latency: float, now: float) -> None:
        self.total_requests += 1
        if status == self.ok_status:
            self.total_ok += 1
        if self.rate is None:
            # Closed loop: what completed inside the window.
            counted = self.measuring and now <= self.window_end
        else:
            # Open loop: every request that came due inside the window, however late it is
            # answered, so a backlog at the end of the window is not silently dropped.
            counted = self.window_start <= now - latency < self.window_end
        if counted:
            if status == self.ok_status:
                self.ok += 1
            else:
                key = status.decode("latin-1")
                self.statuses[key] = self.statuses.get(key, 0) + 1
            self.latencies.append(latency)

    def refill(self, conn: Connection) -> None:
        if not self.sending or conn.closed:
            self._maybe_drained()
            return
        if conn.resume_at:
            wait = conn.resume_at - time.perf_counter()
            if wait > 0:  # honouring Retry-After: nothing on this connection until then
                if conn.resume_handle is None:
                    conn.resume_handle = self.loop.call_later(wait, self._resume, conn)
                return
            conn.resume_at = 0.0
        in_flight = conn.in_flight
        if self.rate is None:
            while len(in_flight) < self.depth:
                conn.send(time.perf_counter())
            return
        due = self.due
        while due and len(in_flight) < self.depth:
            intended = due.popleft()
            now = time.perf_counter()
            conn.send(intended)
            if self.window_start <= intended < self.window_end:
                self.send_lag.append(now - intended)
        if len(in_flight) < self.depth and not conn.idle:
            conn.idle = True
            self.idle.append(conn)
        if not self.scheduling:
            self._maybe_drained()

    def _resume(self, conn: Connection) -> None:
        conn.resume_handle = None
        self.refill(conn)

    def on_connection_lost(self, conn: Connection) -> None:
        lost = len(conn.in_flight)
        conn.in_flight.clear()
        if self.measuring:
            self.errors += max(1, lost)
        if self.sending:
            self.loop.create_task(self._replace(conn))
        else:
            self._maybe_drained()

    async def _replace(self, conn: Connection) -> None:
        try:
            fresh = await self._connect(conn.request_index)
        except OSError:
            if self.measuring:
                self.errors += 1
            await asyncio.sleep(0.1)
            if self.sending:
                self.loop.create_task(self._replace(conn))
            return
        self.connections[self.connections.index(conn)] = fresh
        self.refill(fresh)

    # Open-loop schedule

    def _tick(self) -> None:
        if not self.scheduling:
            return
        now = time.perf_counter()
        due = self.due
        while self.next_due <= now:
            due.append(self.next_due)
            self.next_due += self.interval
        idle = self.idle
        while due and idle:
            conn = idle.popleft()
            conn.idle = False
            if not conn.closed:
                self.refill(conn)
        wait = self.next_due - time.perf_counter()
        if wait > TIMER_RESOLUTION_S:
            self.loop.call_later(wait - TIMER_RESOLUTION_S / 2, self._tick)
        else:
            self.loop.call_soon(self._tick)

    def _spin(self) -> None:
        # Keep the loop polling without sleeping, so this CPU never goes idle (see --spin).
        if self.sending:
            self.loop.call_soon(self._spin)

    # Phases

    async def _connect(self, first_request: int) -> Connection:
        spec = self.spec
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: Connection(self, first_request), spec["host"], spec["port"]
            ),
            CONNECT_TIMEOUT_S,
        )
        return conn

    def _maybe_drained(self) -> None:
        if self.drained is None or self.drained.done() or self.due:
            return
        if all(conn.closed or not conn.in_flight for conn in self.connections):
            self.drained.set_result(None)

    async def run(self) -> dict:
        self.loop = asyncio.get_running_loop()
        spec = self.spec
        count = int(spec["connections"])
        # Spread the connections over the request variants so they do not send in lockstep.
        stride = max(1, self.request_count // max(1, count))
        self.connections = [await self._connect(i * stride) for i in range(count)]
        start_at = spec.get("start_at")
        if start_at == "stdin":
            # Several generator processes start together: report ready, get a shared start.
            sys.stdout.write(json.dumps({"ready": True}) + "\n")
            sys.stdout.flush()
            start_at = sys.stdin.readline()  # blocking is fine: nothing is in flight yet
        clock_offset = time.time() - time.perf_counter()
        start = float(start_at or time.time()) - clock_offset
        warmup = float(spec["warmup"])
        duration = float(spec["duration"])
        await asyncio.sleep(max(0.0, start - time.perf_counter()))

        self.sending = True
        begin = time.perf_counter()
        if self.rate is None:
            for conn in self.connections:
                self.refill(conn)
        else:
            self.interval = 1.0 / float(self.rate)
            self.next_due = begin
            self.scheduling = True
            for conn in self.connections:
                conn.idle = True
                self.idle.append(conn)
            self._tick()

        if spec.get("spin"):
            self._spin()
        progress_task = self.loop.create_task(self._progress(begin, warmup + duration))
        await asyncio.sleep(max(0.0, begin + warmup - time.perf_counter()))
        usage_start = resource.getrusage(resource.RUSAGE_SELF)
        self.window_start = time.perf_counter()
        self.window_end = self.window_start + duration
        self.measuring = True
        await asyncio.sleep(max(0.0, self.window_end - time.perf_counter()))
        usage_end = resource.getrusage(resource.RUSAGE_SELF)
        window = time.perf_counter() - self.window_start
        # Closed loop: stop sending. Open loop: stop scheduling, but requests that came due
        # in the window and are still queued go out now and are measured like the rest.
        self.scheduling = False
        if self.rate is None:
            self.sending = False
        progress_task.cancel()
        backlog = len(self.due)

        self.drained = self.loop.create_future()
        self._maybe_drained()
        try:
            await asyncio.wait_for(asyncio.shield(self.drained), DRAIN_TIMEOUT_S)
            drained = True
        except TimeoutError:
            drained = False
        self.sending = False
        # Whatever is still unanswered gets the time it has waited so far: a lower bound.
        given_up = time.perf_counter()
        waiting = list(self.due) + [t for conn in self.connections for t in conn.in_flight]
        for started in waiting:
            if self.rate is None or self.window_start <= started < self.window_end:
                self.latencies.append(given_up - started)
                self.unanswered += 1
        self.measuring = False
        for conn in self.connections:
            if conn.transport is not None:
                conn.transport.close()

        with open(spec["latency_path"], "wb") as out:
            self.latencies.tofile(out)
        cpu = (usage_end.ru_utime - usage_start.ru_utime) + (
            usage_end.ru_stime - usage_start.ru_stime
        )
        lag = sorted(self.send_lag)
        return {
            "window_s": window,
            "ok": self.ok,
            "statuses": self.statuses,
            "errors": self.errors,
            "unanswered": self.unanswered,
            "responses": len(self.latencies),
            "total_ok": self.total_ok,
            "total_requests": self.total_requests,
            "drained": drained,
            "open_loop_backlog_at_end": backlog,
            "send_lag_p99_ms": round(lag[int(len(lag) * 0.99)] * 1e3, 3) if lag else None,
            "loadgen_cpu_s": round(cpu, 3),
            "loadgen_cpu_util": round(cpu / window, 3) if window > 0 else None,
        }

    async def _progress(self, begin: float, total: float) -> None:
        last_requests = 0
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            line = {
                "progress": {
                    "elapsed_s": round(time.perf_counter() - begin, 2),
                    "of_s": total,
                    "responses": self.total_requests - last_requests,
                    "non_202": self.total_requests - self.total_ok,
                    "total_ok": self.total_ok,
                    "errors": self.errors,
                }
            }
            last_requests = self.total_requests
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m bench.loadgen SPEC_JSON  (started by `python -m bench`)")
        return 2
    spec = json.loads(argv[0])
    if spec.get("cpus"):
        try:
            os.sched_setaffinity(0, set(spec["cpus"]))
        except (AttributeError, OSError):
            pass  # the runner reports pinning as it requested it; best effort here
    requests, _ = build_requests(
        spec["host"],
        spec["port"],
        spec["key"],
        int(spec["events_per_request"]),
        seed=int(spec["seed"]),
        use_gzip=bool(spec.get("gzip")),
        segment=bool(spec.get("segment")),
    )
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    result = runner(Generator(spec, requests).run())
    sys.stdout.write(json.dumps({"result": result}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
