"""Counters for ``GET /metrics`` (written as Prometheus text by exposition.py).

Everything is counted per request or per batch on the event loop (plain ints in dicts, no
locks, no per-event work), the way Vector counts per stage. With ``--workers N`` each worker
writes a snapshot of its counters to ``<data_dir>/run/metrics-<worker>.json`` once a second, and
whichever worker answers a scrape sums the others' snapshots with its own live counters.
"""

from __future__ import annotations

import os
import re
import resource
import time
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path

import orjson

from ..ingest.segment import SEGMENT_PATHS
from ..runtime.process import resident_bytes

# Seconds; the request buckets resolve sub-millisecond answers and multi-second fsync stalls.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

INGEST_ROUTE = b"/v1/ingest"
ROUTES = (
    INGEST_ROUTE, *SEGMENT_PATHS, b"/health", b"/ready", b"/metrics", b"/openapi.json",
)  # fmt: skip
OTHER_ROUTE = b"other"
ALL_ROUTES = (*ROUTES, OTHER_ROUTE)


class Histogram:
    __slots__ = ("bounds", "counts", "total", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def snapshot(self) -> dict:
        return {"counts": self.counts, "sum": self.total, "count": self.count}


# Every reason an ingest request is refused for, so each series exists (at 0) from the start:
# a rate() over a series that appears only with its first refusal misses that refusal.
REJECT_REASONS = (
    "auth",  # 401
    "body",  # 413 (too large as sent or inflated), 415, 400 bad compression
    "headers",  # 431
    "malformed",  # 400: broken HTTP framing
    "timeout",  # 408
    "validation",  # 400: invalid JSON or events
    "rate_limit",  # 429, and 413 for a batch over the whole per-minute limit
    "overload",  # 503: the log cannot take events now
)
# Refusals whose event count is known (the body was decoded).
EVENT_REJECT_REASONS = ("rate_limit", "overload")
# Protocol-level errors, by status, as rejection reasons of the ingest route.
PROTOCOL_REJECT_REASONS = {400: "malformed", 408: "timeout", 413: "body", 431: "headers"}


class Metrics:
    """One process's counters. Keys are plain strings so snapshots are JSON."""

    __slots__ = (
        "responses",
        "request_latency",
        "events_accepted",
        "batches_accepted",
        "batches_rejected",
        "events_rejected",
        "bytes_received",
        "connections_opened",
    )

    def __init__(self) -> None:
        self.responses: dict[tuple[bytes, int], int] = {}
        # By route, so a flood of /health probes does not dilute the ingest percentiles.
        self.request_latency = {route: Histogram(LATENCY_BUCKETS) for route in ALL_ROUTES}
        self.events_accepted: dict[str, int] = {}
        self.batches_accepted: dict[str, int] = {}
        self.batches_rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.events_rejected = dict.fromkeys(EVENT_REJECT_REASONS, 0)
        self.bytes_received = 0
        self.connections_opened = 0

    def response(self, route: bytes, status: int, started: float, now: float) -> None:
        key = (route, status)
        self.responses[key] = self.responses.get(key, 0) + 1
        try:
            histogram = self.request_latency[route]
        except KeyError:  # a route the app names beyond ALL_ROUTES (not client-chosen)
            histogram = self.request_latency[route] = Histogram(LATENCY_BUCKETS)
        histogram.observe(now - started)

    def accepted(self, project: str, count: int) -> None:
        self.events_accepted[project] = self.events_accepted.get(project, 0) + count
        self.batches_accepted[project] = self.batches_accepted.get(project, 0) + 1

    def rejected(self, reason: str, events: int = 0) -> None:
        self.batches_rejected[reason] = self.batches_rejected.get(reason, 0) + 1
        if events:
            self.events_rejected[reason] = self.events_rejected.get(reason, 0) + events

    def snapshot(self) -> dict:
        """Counters as JSON-able data; ``add_snapshots`` sums such snapshots key by key."""
        responses: dict[str, dict[str, int]] = {}
        for (route, status), n in self.responses.items():
            responses.setdefault(route.decode(), {})[str(status)] = n
        return {
            "responses": responses,
            "request_latency": {
                route.decode(): hist.snapshot() for route, hist in self.request_latency.items()
            },
            "events_accepted": dict(self.events_accepted),
            "batches_accepted": dict(self.batches_accepted),
            "batches_rejected": dict(self.batches_rejected),
            "events_rejected": dict(self.events_rejected),
            "bytes_received": self.bytes_received,
            "connections_opened": self.connections_opened,
        }


def add_snapshots(into: dict, part: dict) -> dict:
    """Add ``part`` into ``into`` (returned): numbers add, lists add element-wise (histogram
    buckets), dicts add key by key. Per-process figures live under ``process``, keyed by
    worker, so adding snapshots of different workers keeps each one's own."""
    for key, value in part.items():
        have = into.get(key)
        if have is None:
            into[key] = _copy(value)
        elif isinstance(value, dict):
            add_snapshots(have, value)
        elif isinstance(value, list):
            into[key] = [a + b for a, b in zip(have, value, strict=True)]
        elif key in _NOT_SUMMED:
            into[key] = value
        else:
            into[key] = have + value
    return into


# Gauges and maxima inside ``log`` stats: the newest figure, never a sum.
_NOT_SUMMED = frozenset(("last_sync_latency_s", "max_sync_latency_s"))


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return list(value)
    return value


def merge(snapshots: Iterable[dict]) -> dict:
    """Sum the snapshots of several workers (counters and histograms add up)."""
    merged: dict = {}
    for snap in snapshots:
        add_snapshots(merged, snap)
    return merged


def carried_totals(snapshot: dict) -> dict:
    """What a restarted worker carries over from its predecessor's last snapshot: the
    counters (so the sum over workers never goes down), not the dead process's gauges."""
    return {key: value for key, value in snapshot.items() if key not in ("process", "gauges")}


PROCESS_STARTED_AT = time.time()


def process_gauges(worker_id: str, connections: int, last_sync_latency_s: float) -> dict:
    """This process's own figures, under its worker id (``process`` in a snapshot)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        worker_id: {
            "open_connections": connections,
            "resident_memory_bytes": _rss_bytes(),
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "start_time_seconds": PROCESS_STARTED_AT,
            "last_sync_latency_s": last_sync_latency_s,
        }
    }


def _rss_bytes() -> int:
    rss = resident_bytes()
    if rss is None:  # no /proc: the peak is the figure there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss


def storage_gauges(data_dir: Path) -> dict:
    """Parquet files and bytes, unrolled log bytes: a directory walk per scrape."""
    files = size = 0
    for root, dirs, names in os.walk(data_dir / "events"):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if name.endswith(".parquet"):
                files += 1
                try:
                    size += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:
                    pass
    log_bytes = 0
    oldest = None
    try:
        with os.scandir(data_dir / "log") as entries:
            for entry in entries:
                if entry.name.endswith(".log"):
                    st = entry.stat()
                    log_bytes += st.st_size
                    if st.st_size == 0:
                        continue  # an empty active segment waits for nothing, however old
                    received = _first_record_received_at(entry.path, st.st_mtime)
                    oldest = received if oldest is None else min(oldest, received)
    except FileNotFoundError:
        pass
    return {
        "parquet_files": files,
        "parquet_bytes": size,
        "log_pending_bytes": log_bytes,
        "roll_lag_seconds": 0.0 if oldest is None else max(0.0, time.time() - oldest),
    }


# The commit log's record envelope opens {"p":"<project>","r":<received_at_us>: the first
# record's receive time is when the segment's oldest event arrived (log/format.py, framing).
_RECEIVED_AT = re.compile(rb'\{"p":"(?:[^"\\]|\\.)*","r":(\d+),')
_FIRST_RECORD_PEEK_BYTES = 512


def _first_record_received_at(path: str, fallback: float) -> float:
    """Unix time at which the oldest event in a log segment was received (one small read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_FIRST_RECORD_PEEK_BYTES)
    except OSError:
        return fallback
    match = _RECEIVED_AT.match(head, 12)  # after the record header: magic, length, crc32
    return int(match.group(1)) / 1_000_000 if match else fallback


def write_snapshot(path: Path, snapshot: dict) -> None:
    """Atomic replace (no fsync: a lost snapshot after a power cut costs one second of stats)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(snapshot))
    os.replace(tmp, path)


def read_snapshots(run_dir: Path, skip: str) -> list[dict]:
    out: list[dict] = []
    try:
        names = os.listdir(run_dir)
    except OSError:  # gone, or not a directory: this scrape sums what this worker has
        return out
    for name in names:
        if name.startswith("metrics-") and name.endswith(".json") and name != skip:
            try:
                out.append(orjson.loads((run_dir / name).read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue  # being replaced right now, or a worker that is gone
    return out
