"""``python -m bench refusals``: what a refusal past the hard mark costs the server, against
what an accepted request costs it.

Issue 14 asks that overload be refused cheaply: decided on the headers, before the body is
read, at well under a tenth of an accepted request's cost. This measures it on a real server:

- each window runs on a fresh inslytic-fast (one unlimited project) pinned to the first CPU,
  the bench on the others, with the roller lock held from here: nothing rolls, so the roller
  takes no CPU and the backlog only grows;
- **accepted**: the default marks; for ``--duration`` s the clients send requests (a backlog
  past the backpressure mark only holds them, which costs no CPU);
- **refused**: ``--max-unrolled-bytes`` small; the clients fill the log until it refuses
  (slowed on the way by the backpressure mark: that is the design), then for ``--duration`` s
  go on sending.

Every client sends whole requests (headers and body, as an SDK does) back to back over
keep-alive, ignoring Retry-After (the worst client there is), and opens a new connection
only when the server closed the last one.

The server process's own CPU (utime + stime, /proc) over each window, divided by the answers
in it, is the cost per request; the bench's CPU is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from inslytic_fast.storage.layout import EVENTS_DIRNAME, roller_lock

from . import machine, targets
from .payloads import build_requests

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The backlog the log refuses past in this run: small, so the fill takes seconds.
DEFAULT_HARD_MARK_BYTES = 64 * 1024 * 1024
FILL_TIMEOUT_S = 300.0
ANSWER_TIMEOUT_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench refusals",
        description="CPU per refused request (past the hard mark) and per accepted request.",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per window")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--events", type=int, default=100, help="events per request")
    parser.add_argument("--hard-mark-bytes", type=int, default=DEFAULT_HARD_MARK_BYTES)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, help="JSON report (default: bench/results/)")
    return parser


class Answers:
    """Status codes counted by the clients, and connections that ended without an answer."""

    def __init__(self) -> None:
        self.statuses: Counter[int] = Counter()
        self.unanswered = 0
        self.connections = 0

    def total(self) -> int:
        return sum(self.statuses.values())


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One response: its status and whether the server closes the connection after it."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    length = 0
    at = lower.find(b"\r\ncontent-length:")
    if at >= 0:
        length = int(lower[at + 17 : lower.index(b"\r\n", at + 2)])
    await reader.readexactly(length)
    return status, b"\r\nconnection: close" in lower


async def _client(host, port, requests, answers, stop_at, *, stop_on=None) -> None:
    """Send requests back to back, as fast as answers come, ignoring Retry-After; on a new
    connection only when the server closed the last one. Returns early on status ``stop_on``."""
    index = 0
    writer = None
    try:
        while time.monotonic() < stop_at:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
                answers.connections += 1
            writer.write(requests[index % len(requests)])
            index += 1
            try:
                status, closing = await asyncio.wait_for(_read_answer(reader), ANSWER_TIMEOUT_S)
            except (ConnectionError, asyncio.IncompleteReadError):
                answers.unanswered += 1  # reset before a whole answer arrived
                closing = True
            else:
                answers.statuses[status] += 1
                if status == stop_on:
                    return
            if closing:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


def _run_clients(make_client, connections: int) -> None:
    async def all_clients() -> None:
        await asyncio.gather(*(make_client() for _ in range(connections)))

    asyncio.run(all_clients())


def _window(server: targets.Running, requests: list[bytes], args: argparse.Namespace) -> dict:
    """``args.connections`` clients for ``args.duration`` s: the server's CPU and the answers."""
    assert server.pid is not None
    answers = Answers()
    cpu_before, wall_before = machine.cpu_seconds(server.pid), time.monotonic()
    stop_at = wall_before + args.duration
    _run_clients(
        lambda: _client(server.host, server.port, requests, answers, stop_at), args.connections
    )
    cpu_after, wall = machine.cpu_seconds(server.pid), time.monotonic() - wall_before
    cpu = (cpu_after or 0.0) - (cpu_before or 0.0)
    total = answers.total()
    return {
        "statuses": {str(code): n for code, n in sorted(answers.statuses.items())},
        "unanswered": answers.unanswered,
        "connections_opened": answers.connections,
        "answers_per_s": round(total / wall, 1),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_share": round(cpu / wall, 3),
        "server_cpu_us_per_answer": round(cpu / total * 1e6, 1) if total else None,
    }


def _server(args: argparse.Namespace, server_cpus: set[int] | None, extra: list[str]):
    server = targets.start_inslytic(server_cpus, "fsync", extra)
    assert server.data_dir is not None
    requests, event_bytes = build_requests(
        server.host, server.port, server.key, args.events, seed=args.seed
    )
    return server, requests, event_bytes


@contextlib.contextmanager
def _rolling_held(server: targets.Running) -> Iterator[None]:
    """Hold the roller lock: nothing rolls, so the roller takes no CPU and the backlog grows."""
    assert server.data_dir is not None
    with roller_lock(server.data_dir / EVENTS_DIRNAME, 0) as held:
        if not held:
            raise targets.TargetError("the roller lock was taken before the bench's")
        yield


def measure(args: argparse.Namespace) -> dict:
    cpus = machine.available_cpus()
    server_cpus = {cpus[0]} if len(cpus) > 1 else None
    if server_cpus:
        os.sched_setaffinity(0, set(cpus[1:]))

    # Accepted: a server with the default marks, the roller held off so that the window is
    # the serving process's work alone (a backlog past the backpressure mark only holds
    # requests, which costs no CPU).
    server, requests, event_bytes = _server(args, server_cpus, [])
    try:
        with _rolling_held(server):
            accepted = _window(server, requests, args)
    finally:
        server.stop()

    # Refused: a server with a small hard mark, filled past it with the roller held off.
    hard_mark = ["--max-unrolled-bytes", str(args.hard_mark_bytes)]
    server, requests, _ = _server(args, server_cpus, hard_mark)
    try:
        with _rolling_held(server):
            fill = Answers()
            deadline = time.monotonic() + FILL_TIMEOUT_S
            _run_clients(
                lambda: _client(server.host, server.port, requests, fill, deadline, stop_on=503),
                args.connections,
            )
            if not fill.statuses[503]:
                raise targets.TargetError(f"the log never refused: {dict(fill.statuses)}")
            refused = _window(server, requests, args)
    finally:
        server.stop()
    ratio = None
    if refused["server_cpu_us_per_answer"] and accepted["server_cpu_us_per_answer"]:
        ratio = round(refused["server_cpu_us_per_answer"] / accepted["server_cpu_us_per_answer"], 3)
    return {
        "request_bytes": round(sum(map(len, requests)) / len(requests)),
        "event_bytes": event_bytes,
        "fill_statuses": {str(code): n for code, n in sorted(fill.statuses.items())},
        "refused": refused,
        "accepted": accepted,
        "refusal_cost_ratio": ratio,
        "pinning": {"server_cpus": sorted(server_cpus) if server_cpus else None},
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args)
    report = {
        "scenario": "refusals",
        "command": " ".join(["python -m bench refusals", *(argv or sys.argv[2:])]),
        "events_per_request": args.events,
        "connections": args.connections,
        "window_s": args.duration,
        "hard_mark_bytes": args.hard_mark_bytes,
        "load_average": machine.load_average(),
        "machine": machine.machine_info(),
        **result,
    }
    output = args.output or RESULTS_DIR / time.strftime("%Y-%m-%d-vm-refusals.json", time.gmtime())
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    refused, accepted = result["refused"], result["accepted"]
    print(
        "| window | answers | answers/s | server CPU per answer | server CPU share |\n"
        "|---|---|--:|--:|--:|\n"
        f"| refused (503 on the headers) | {refused['statuses']} "
        f"unanswered {refused['unanswered']} | {refused['answers_per_s']:,} | "
        f"{refused['server_cpu_us_per_answer']} us | {refused['server_cpu_share']:.0%} |\n"
        f"| accepted | {accepted['statuses']} | {accepted['answers_per_s']:,} | "
        f"{accepted['server_cpu_us_per_answer']} us | {accepted['server_cpu_share']:.0%} |\n"
        f"\nrefusal / accepted request: {result['refusal_cost_ratio']}"
    )
    print(f"report: {output}", file=sys.stderr)
    return 0
