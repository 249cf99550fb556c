"""Counters for ``GET /metrics`` in the Prometheus text exposition format (version 0.0.4).

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

ROUTES = (b"/v1/ingest", b"/health", b"/ready", b"/metrics", b"/openapi.json")
OTHER_ROUTE = b"other"


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
        self.responses: dict[tuple[bytes, bytes], int] = {}
        self.request_latency = Histogram(LATENCY_BUCKETS)
        self.events_accepted: dict[str, int] = {}
        self.batches_accepted: dict[str, int] = {}
        self.batches_rejected: dict[str, int] = {}  # by reason
        self.events_rejected: dict[str, int] = {}  # by reason, where the count is known
        self.bytes_received = 0
        self.connections_opened = 0

    def response(self, route: bytes, data: bytes, started: float, now: float) -> None:
        key = (route, data[9:12])  # the status code digits of "HTTP/1.1 NNN"
        self.responses[key] = self.responses.get(key, 0) + 1
        self.request_latency.observe(now - started)

    def accepted(self, project: str, count: int) -> None:
        self.events_accepted[project] = self.events_accepted.get(project, 0) + count
        self.batches_accepted[project] = self.batches_accepted.get(project, 0) + 1

    def rejected(self, reason: str, events: int = 0) -> None:
        self.batches_rejected[reason] = self.batches_rejected.get(reason, 0) + 1
        if events:
            self.events_rejected[reason] = self.events_rejected.get(reason, 0) + events

    def snapshot(self) -> dict:
        return {
            "responses": [[r.decode(), s.decode(), n] for (r, s), n in self.responses.items()],
            "request_latency": self.request_latency.snapshot(),
            "events_accepted": self.events_accepted,
            "batches_accepted": self.batches_accepted,
            "batches_rejected": self.batches_rejected,
            "events_rejected": self.events_rejected,
            "bytes_received": self.bytes_received,
            "connections_opened": self.connections_opened,
        }


def _sum_into(total: dict, part: dict) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def _empty_latency() -> dict:
    return {"counts": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0}


def _add_histogram(into: dict, part: dict) -> None:
    into["counts"] = [a + b for a, b in zip(into["counts"], part["counts"], strict=True)]
    into["sum"] += part["sum"]
    into["count"] += part["count"]


def merge(snapshots: Iterable[dict]) -> dict:
    """Sum snapshots of several workers (counters and histograms add up)."""
    merged: dict = {
        "responses": {},
        "request_latency": _empty_latency(),
        "commit_latency": _empty_latency(),
        "events_accepted": {},
        "batches_accepted": {},
        "batches_rejected": {},
        "events_rejected": {},
        "bytes_received": 0,
        "connections_opened": 0,
        "log": {},
        "gauges": {},
    }
    for snap in snapshots:
        for route, status, n in snap["responses"]:
            key = (route, status)
            merged["responses"][key] = merged["responses"].get(key, 0) + n
        _add_histogram(merged["request_latency"], snap["request_latency"])
        if "commit_latency" in snap:  # a worker's snapshot always has it; tests' may not
            _add_histogram(merged["commit_latency"], snap["commit_latency"])
        for name in ("events_accepted", "batches_accepted", "batches_rejected", "events_rejected"):
            _sum_into(merged[name], snap[name])
        merged["bytes_received"] += snap["bytes_received"]
        merged["connections_opened"] += snap["connections_opened"]
        log_part = dict(snap.get("log", {}))
        latest = log_part.pop("last_sync_latency_s", 0.0)
        _sum_into(merged["log"], log_part)
        merged["log"]["last_sync_latency_s"] = max(
            latest, merged["log"].get("last_sync_latency_s", 0.0)
        )
        _sum_into(merged["gauges"], snap.get("gauges", {}))
    return merged


def process_gauges(connections: int) -> dict:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "open_connections": connections,
        "resident_memory_bytes": _rss_bytes(),
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
# record's receive time is when the segment's oldest event arrived (commitlog.py, framing).
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


# Cluster mode's limiter, per node (summed over its workers); see inslytic_fast.globallimit.
COORDINATOR_SERIES = (
    ("coordinator_up", "gauge", "Workers of this node that reach the coordinator."),
    ("coordinator_grants", "counter", "Token grants taken from the coordinator."),
    ("coordinator_calls_failed", "counter", "Coordinator calls that failed on a serving loop."),
    (
        "coordinator_local_admissions",
        "counter",
        "Batches admitted from a local share of the limit while the coordinator was unreachable.",
    ),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(merged: dict, storage: dict) -> bytes:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("inslytic_http_requests_total", "counter", "HTTP responses by route and status.")
    for (route, status), n in sorted(merged["responses"].items()):
        labels = f'route="{_escape(route)}",status="{status}"'
        out.append(f"inslytic_http_requests_total{{{labels}}} {n}")

    def histogram(name: str, help_text: str, hist: dict) -> None:
        family(name, "histogram", help_text)
        cumulative = 0
        for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), hist["counts"], strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        out.append(f"{name}_sum {hist['sum']}")
        out.append(f"{name}_count {hist['count']}")

    histogram(
        "inslytic_http_request_duration_seconds",
        "From a complete request to its response being queued for writing.",
        merged["request_latency"],
    )
    family("inslytic_events_accepted_total", "counter", "Events stored durably, by project.")
    for project, n in sorted(merged["events_accepted"].items()):
        out.append(f'inslytic_events_accepted_total{{project="{_escape(project)}"}} {n}')
    family("inslytic_batches_accepted_total", "counter", "Batches stored durably, by project.")
    for project, n in sorted(merged["batches_accepted"].items()):
        out.append(f'inslytic_batches_accepted_total{{project="{_escape(project)}"}} {n}')
    family(
        "inslytic_batches_rejected_total",
        "counter",
        "Ingest requests refused, by reason (auth, validation, body, rate_limit, overload).",
    )
    for reason, n in sorted(merged["batches_rejected"].items()):
        out.append(f'inslytic_batches_rejected_total{{reason="{reason}"}} {n}')
    family(
        "inslytic_events_rejected_total",
        "counter",
        "Events in refused batches whose size was known (rate_limit, overload).",
    )
    for reason, n in sorted(merged["events_rejected"].items()):
        out.append(f'inslytic_events_rejected_total{{reason="{reason}"}} {n}')
    family("inslytic_received_bytes_total", "counter", "Bytes read from client sockets.")
    out.append(f"inslytic_received_bytes_total {merged['bytes_received']}")
    family("inslytic_connections_opened_total", "counter", "Client connections accepted.")
    out.append(f"inslytic_connections_opened_total {merged['connections_opened']}")
    log_stats = merged["log"]
    for key, kind, help_text in (
        ("syncs", "counter", "Group-commit write+fdatasync rounds."),
        ("events", "counter", "Events made durable by the commit log."),
        ("bytes", "counter", "Framed bytes written to the commit log."),
        ("sync_errors", "counter", "Failed writes or syncs (each failed its batches with 503)."),
        ("refused", "counter", "Appends refused (overload, disk short, unsound log)."),
    ):
        name = f"inslytic_log_{key}_total"
        family(name, kind, help_text)
        out.append(f"{name} {log_stats.get(key, 0)}")
    family(
        "inslytic_log_events_per_sync",
        "gauge",
        "Average events per sync since start (group-commit efficiency).",
    )
    syncs = log_stats.get("syncs", 0)
    out.append(f"inslytic_log_events_per_sync {log_stats.get('events', 0) / syncs if syncs else 0}")
    family("inslytic_log_last_sync_seconds", "gauge", "Latest sync's duration (worst worker).")
    out.append(f"inslytic_log_last_sync_seconds {log_stats.get('last_sync_latency_s', 0.0)}")
    histogram(
        "inslytic_log_sync_duration_seconds",
        "Group commits: writev + fdatasync of one group, as the sync thread timed it.",
        merged["commit_latency"],
    )
    for key, help_text in (
        ("log_pending_bytes", "Commit-log bytes not yet rolled to Parquet."),
        ("roll_lag_seconds", "Age of the oldest event not yet rolled to Parquet (0: none)."),
        ("parquet_files", "Parquet files in the data set."),
        ("parquet_bytes", "Bytes of Parquet in the data set."),
    ):
        name = f"inslytic_{key}"
        family(name, "gauge", help_text)
        out.append(f"{name} {storage[key]}")
    gauges = merged["gauges"]
    family("inslytic_open_connections", "gauge", "Open client connections.")
    out.append(f"inslytic_open_connections {gauges.get('open_connections', 0)}")
    if "coordinator_up" in gauges:  # serve --coordinator
        for key, kind, help_text in COORDINATOR_SERIES:
            name = f"inslytic_{key}_total" if kind == "counter" else f"inslytic_{key}"
            family(name, kind, help_text)
            out.append(f"{name} {gauges.get(key, 0)}")
    family("process_resident_memory_bytes", "gauge", "Resident memory of the serving processes.")
    out.append(f"process_resident_memory_bytes {gauges.get('resident_memory_bytes', 0)}")
    family("process_cpu_seconds_total", "counter", "CPU seconds of the serving processes.")
    out.append(f"process_cpu_seconds_total {gauges.get('cpu_seconds', 0.0)}")
    return ("\n".join(out) + "\n").encode()


def write_snapshot(path: Path, snapshot: dict) -> None:
    """Atomic replace (no fsync: a lost snapshot after a power cut costs one second of stats)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(snapshot))
    os.replace(tmp, path)


def read_snapshots(run_dir: Path, skip: str) -> list[dict]:
    out = []
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return out
    for name in names:
        if name.startswith("metrics-") and name.endswith(".json") and name != skip:
            try:
                out.append(orjson.loads((run_dir / name).read_bytes()))
            except (OSError, orjson.JSONDecodeError):
                continue  # being replaced right now, or a worker that is gone
    return out
