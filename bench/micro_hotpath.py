"""Micro-benchmark of the request path in one process: CPU microseconds per request.

Usage:  python bench/micro_hotpath.py [--windows N] [--connections N] [--events N]
                                      [--durability none|fsync] [--ack-at-once]

Prints ONE JSON line, e.g.
  {"bench": "micro_hotpath", "us_per_request_best": ..., "us_per_request_median": ..., ...}

The real server stack (``build_server``: key ring, schema, rate limiter, commit log,
app) on a temp data dir, with the bench's seeded requests fed straight into ``HttpProtocol``
objects over fake transports: no sockets, so the figure is the Python work of parsing, auth,
decode/validate, rate limit, the commit log and the answer, without the kernel's TCP cost.
Each window feeds one request per connection and waits until all are answered; the figure is
process CPU time (loop and sync thread) per request, best and median of 1-second windows.
``--ack-at-once`` replaces the commit log by one that acknowledges immediately (the request
side alone). Pin it to a core (``taskset -c 0``) for steadier numbers; this is what the
commit messages of the hot-path changes quote.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.payloads import build_request, make_body  # noqa: E402
from inslytic_fast.config import Settings  # noqa: E402
from inslytic_fast.http.protocol import HttpProtocol  # noqa: E402
from inslytic_fast.runtime.process import loop_factory  # noqa: E402
from inslytic_fast.runtime.server import build_server  # noqa: E402

REQUEST_VARIANTS = 64


class Window:
    """Counts answers; completes when every connection has been answered."""

    __slots__ = ("remaining", "done")

    def __init__(self) -> None:
        self.remaining = 0
        self.done: asyncio.Future | None = None


class FakeTransport:
    __slots__ = ("window",)

    def __init__(self, window: Window) -> None:
        self.window = window

    def write(self, data: bytes) -> None:
        window = self.window
        window.remaining -= 1
        if window.remaining == 0:
            window.done.set_result(None)

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 9) if name == "peername" else default

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    # Write-buffer bounds (protocol.py): everything is "sent" at once here.
    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class AckAtOnce:
    @staticmethod
    def append(project, events_json, count, on_done, idempotency_key=None) -> None:
        on_done(None)

    @staticmethod
    def unavailable():
        return None  # never refuses

    @staticmethod
    def backpressure_delay() -> float:
        return 0.0  # never behind


async def measure(args, data_dir: Path) -> dict:
    settings = dataclasses.replace(
        Settings(), data_dir=data_dir, durability=args.durability, events_per_minute=0
    )
    with open(os.devnull, "w") as devnull:
        server = build_server(settings, out=devnull)
    # serve() would create it once the port is bound; this bench binds no port.
    key = server.keyring.ensure_default_project()
    loop = asyncio.get_running_loop()
    server.commitlog.start(loop)
    if args.ack_at_once:
        server.app.ingestor.commitlog = AckAtOnce()
    rng = random.Random(1)
    requests = [
        build_request("127.0.0.1", 8080, key, make_body(rng, args.events), False)
        for _ in range(REQUEST_VARIANTS)
    ]
    window = Window()
    connections = []
    for _ in range(args.connections):
        conn = HttpProtocol(server.app, server.state)
        conn.connection_made(FakeTransport(window))
        connections.append(conn)
    per_request: list[float] = []
    sent = 0
    for _ in range(args.windows):
        answered = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        while time.perf_counter() - started < 1.0:
            window.remaining = len(connections)
            window.done = loop.create_future()
            for conn in connections:
                conn.data_received(requests[sent % REQUEST_VARIANTS])
                sent += 1
            await window.done
            answered += len(connections)
        per_request.append((time.process_time() - cpu_started) / answered * 1e6)
    statuses = {str(status): n for (_, status), n in server.state.metrics.responses.items()}
    await server.commitlog.close()
    per_request.sort()
    return {
        "bench": "micro_hotpath",
        "us_per_request_best": round(per_request[0], 2),
        "us_per_request_median": round(per_request[len(per_request) // 2], 2),
        "connections": args.connections,
        "events_per_request": args.events,
        "durability": args.durability,
        "ack_at_once": args.ack_at_once,
        "windows": args.windows,
        "statuses": statuses,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5, help="1-second windows (default 5)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--events", type=int, default=1, help="events per request")
    parser.add_argument("--durability", choices=("none", "fsync"), default="none")
    parser.add_argument("--ack-at-once", action="store_true", help="skip the commit log")
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="micro-hotpath-"))
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            result = runner.run(measure(args, data_dir))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(json.dumps(result))
    return 0 if set(result["statuses"]) == {"202"} else 1


if __name__ == "__main__":
    sys.exit(main())
