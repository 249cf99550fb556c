"""Shared code of the adversarial tests: raw-socket exchanges, request builders, process probes.

Everything here talks to a real server process (tests.conftest.ServerProcess) over real
sockets, or reads what it left on disk; nothing is mocked.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from inslytic_fast.storage.query import run_query

from .protocol_helpers import split_responses

# Long enough for a commit (fsync) on a loaded CI box, short enough that a hung test says so.
EXCHANGE_TIMEOUT_S = 10.0
# Deadlines of polls for what another process or a worker's 1 s tick brings about (a catalog
# reload, a published metrics snapshot, /ready, a log line): a second or two on a quiet machine,
# many more on a shared 2-core CI box. Polled, so a pass still takes only as long as it needs.
TICK_DEADLINE_S = 30.0
# ... and for a roll: the roller process (importing DuckDB first when it has just started)
# turning sealed segments into Parquet, under the same load.
ROLL_DEADLINE_S = 60.0


def event(name: str, **fields) -> dict:
    """A valid event whose eventName identifies it in later queries."""
    return {
        "eventName": name,
        "timestamp": "2026-02-16T10:30:00.000Z",
        "anonymousId": "anon-adv",
        "sessionId": "sess-adv",
        "consentGiven": True,
        **fields,
    }


def batch_body(names: list[str]) -> bytes:
    return orjson.dumps({"events": [event(n) for n in names]})


def ingest_request(key: str, body: bytes, extra: bytes = b"", *, close: bool = False) -> bytes:
    """A well-formed POST /v1/ingest with a Content-Length body."""
    connection = b"Connection: close\r\n" if close else b""
    return (
        b"POST /v1/ingest HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer %b\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%b%b\r\n%b"
        % (key.encode(), len(body), connection, extra, body)
    )


class Exchange:
    """What one raw connection got back."""

    def __init__(self, data: bytes, closed: bool, reset: bool, seconds: float) -> None:
        self.data = data
        self.closed = closed  # the server closed (EOF or reset) before our timeout
        self.reset = reset
        self.seconds = seconds

    def responses(self) -> list[tuple[int, dict[str, str], bytes]]:
        return split_responses(self.data)

    def statuses(self) -> list[int]:
        return [status for status, _, _ in self.responses()]


def exchange(
    host: str,
    port: int,
    data: bytes,
    *,
    shut_wr: bool = False,
    timeout: float = EXCHANGE_TIMEOUT_S,
    stop_after: int | None = None,
) -> Exchange:
    """Send ``data`` (from a thread, so a server that answers early and stops reading cannot
    deadlock us), read until the server closes, ``timeout`` passes, or ``stop_after``
    complete responses arrived."""
    sock = socket.create_connection((host, port), timeout=timeout)
    started = time.monotonic()

    def send() -> None:
        try:
            sock.sendall(data)
            if shut_wr:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed first: its answer is what we check

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    closed = reset = False
    deadline = started + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                break
            except ConnectionResetError:
                closed = reset = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
            if stop_after is not None and count_complete(bytes(received)) >= stop_after:
                break
    finally:
        sock.close()
        sender.join(timeout)
    return Exchange(bytes(received), closed, reset, time.monotonic() - started)


_STATUS_LINE = re.compile(rb"HTTP/1\.1 \d{3} ")


def count_complete(data: bytes) -> int:
    """Complete responses at the start of ``data`` (each has Content-Length, or is a 204)."""
    count = 0
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return count
        match = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
        length = int(match.group(1)) if match else 0
        if len(rest) < length:
            return count
        data = rest[length:]
        count += 1
    return count


def stored_count(data_dir: Path, name_like: str) -> int:
    """Events whose event_name matches the SQL LIKE pattern (works while the server runs)."""
    _, rows = run_query(
        data_dir, "SELECT count(*) FROM events WHERE event_name LIKE ?", [name_like]
    )
    return rows[0][0]


def stored_names(data_dir: Path, name_like: str) -> list[str]:
    _, rows = run_query(
        data_dir, "SELECT event_name FROM events WHERE event_name LIKE ? ORDER BY 1", [name_like]
    )
    return [row[0] for row in rows]


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0])
    return out


def open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a process, from /proc/<pid>/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return 1 << 62 if soft == "unlimited" else int(soft)
    raise AssertionError("no 'Max open files' line")


def poll_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05):
    """Call ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def metric(server, name: str) -> float:
    """One unlabelled sample of the server's /metrics page."""
    status, _, body = server.request("GET", "/metrics")
    assert status == 200
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def killed_at_fsync(when: int) -> list[str]:
    """A command prefix that SIGKILLs the command on entering its ``when``-th fsync or
    fdatasync: with write -> fsync -> rename -> fsync(dir), every rename is followed by one,
    so the kills cover each moment between two durable steps."""
    return [
        "strace", "-f", "-qq", "-o", "/dev/null",
        "-e", "trace=fsync,fdatasync",
        "-e", f"inject=fsync,fdatasync:signal=SIGKILL:when={when}",
    ]  # fmt: skip
