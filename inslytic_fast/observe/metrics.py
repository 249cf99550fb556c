"""Counters for ``GET /metrics`` in the Prometheus text exposition format (version 0.0.4).

Everything is counted per request or per batch on the event loop (plain ints in dicts, no
locks, no per-event work), the way Vector counts per stage. With ``--workers N`` each worker
writes a snapshot of its counters to ``<data_dir>/run/metrics-<worker>.json`` once a second, and
whichever worker answers a scrape sums the others' snapshots with its own live counters.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path

import orjson

from .. import __version__
from ..ingest.segment import SEGMENT_PATHS

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


# Cluster mode's limiter, per node (summed over its workers); see inslytic_fast.limits.globallimit.
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


PROCESS_SERIES = (
    ("resident_memory_bytes", "process_resident_memory_bytes", "gauge", "Resident memory."),
    ("cpu_seconds", "process_cpu_seconds_total", "counter", "User and system CPU seconds."),
    (
        "start_time_seconds",
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch, in seconds.",
    ),
    (
        "last_sync_latency_s",
        "inslytic_log_last_sync_seconds",
        "gauge",
        "Duration of the process's latest group commit.",
    ),
)
_EMPTY_HISTOGRAM = {"counts": [0] * (len(LATENCY_BUCKETS) + 1), "sum": 0.0, "count": 0}

# The lake uploader's status file (inslytic_fast.lake.status), per node.
LAKE_SERIES = (
    ("pending_files", "gauge", "Finished Parquet files waiting to be uploaded to the lake."),
    ("pending_bytes", "gauge", "Bytes of those files."),
    ("lag_seconds", "gauge", "Age of the oldest file waiting for upload (0: none waits)."),
    ("uploaded_files", "counter", "Files uploaded and verified since the node started."),
    ("uploaded_bytes", "counter", "Bytes of those files."),
    ("errors", "counter", "Upload passes that failed (retried with backoff)."),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(merged: dict, storage: dict) -> bytes:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("inslytic_http_requests_total", "counter", "HTTP responses by route and status.")
    for route, by_status in sorted(merged.get("responses", {}).items()):
        for status, n in sorted(by_status.items()):
            labels = f'route="{_escape(route)}",status="{status}"'
            out.append(f"inslytic_http_requests_total{{{labels}}} {n}")

    def histogram(name: str, help_text: str, hists: dict[str, dict], label: str = "") -> None:
        """One family; ``hists`` maps a label value ('' for none) to a histogram snapshot."""
        family(name, "histogram", help_text)
        for value, hist in sorted(hists.items()):
            labels = f'{label}="{_escape(value)}",' if label else ""
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, "+Inf"), hist["counts"], strict=True):
                cumulative += count
                out.append(f'{name}_bucket{{{labels}le="{bound}"}} {cumulative}')
            braces = f"{{{labels[:-1]}}}" if labels else ""
            out.append(f"{name}_sum{braces} {hist['sum']}")
            out.append(f"{name}_count{braces} {hist['count']}")

    histogram(
        "inslytic_http_request_duration_seconds",
        "From a complete request to its response being queued for writing, by route.",
        merged.get("request_latency", {}),
        "route",
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
        "Ingest requests refused, by reason (" + ", ".join(REJECT_REASONS) + ").",
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
    log_stats = merged.get("log", {})
    for key, kind, help_text in (
        ("syncs", "counter", "Group-commit write+fdatasync rounds."),
        (
            "events",
            "counter",
            "Events made durable by the commit log; events per sync (group-commit efficiency) "
            "is rate(inslytic_log_events_total) / rate(inslytic_log_syncs_total).",
        ),
        ("bytes", "counter", "Framed bytes written to the commit log."),
        ("sync_errors", "counter", "Failed writes or syncs (each failed its batches with 503)."),
        ("refused", "counter", "Appends refused (overload, disk short, unsound log)."),
    ):
        name = f"inslytic_log_{key}_total"
        family(name, kind, help_text)
        out.append(f"{name} {log_stats.get(key, 0)}")
    histogram(
        "inslytic_log_sync_duration_seconds",
        "Group commits: writev + fdatasync of one group, as the sync thread timed it.",
        {"": merged.get("commit_latency", _EMPTY_HISTOGRAM)},
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
    lake = storage.get("lake")
    if lake is not None:  # serve --lake
        for key, kind, help_text in LAKE_SERIES:
            name = f"inslytic_lake_{key}_total" if kind == "counter" else f"inslytic_lake_{key}"
            family(name, kind, help_text)
            out.append(f"{name} {lake.get(key, 0)}")
    gauges = merged.get("gauges", {})
    family("inslytic_open_connections", "gauge", "Open client connections.")
    out.append(f"inslytic_open_connections {gauges.get('open_connections', 0)}")
    if "coordinator_up" in gauges:  # serve --coordinator
        for key, kind, help_text in COORDINATOR_SERIES:
            name = f"inslytic_{key}_total" if kind == "counter" else f"inslytic_{key}"
            family(name, kind, help_text)
            out.append(f"{name} {gauges.get(key, 0)}")
    dedup = merged.get("dedup")
    if dedup is not None:
        render_dedup(family, out, dedup, storage.get("dedup", {}), "coordinator_up" in gauges)
    family("inslytic_build_info", "gauge", "Always 1; the labels say what is running.")
    out.append(
        f'inslytic_build_info{{version="{__version__}",python="{platform.python_version()}"}} 1'
    )
    # Per serving process (worker label): each resets when its process restarts, which
    # process_start_time_seconds shows; sum by worker for the whole server.
    processes = sorted(merged.get("process", {}).items())
    for key, name, kind, help_text in PROCESS_SERIES:
        family(name, kind, help_text)
        for worker, figures in processes:
            out.append(f'{name}{{worker="{_escape(worker)}"}} {figures.get(key, 0)}')
    return ("\n".join(out) + "\n").encode()


# Retried messages (kind="message", Segment's messageId) and batches (kind="batch",
# /v1/ingest's Idempotency-Key); see inslytic_fast.ingest.dedup and inslytic_fast.cluster.dedup.
DEDUP_BY_KIND = (
    ("duplicates", "Retries found already stored: answered as the first time, stored once."),
    ("in_flight", "Retries refused with Retry-After: their first attempt was still committing."),
)
DEDUP_CLUSTER_BY_KIND = (
    ("cross_node", "Of the duplicates, those stored by another node (found in the coordinator)."),
)
DEDUP_COORDINATOR = (
    ("failures", "Dedup calls to the coordinator that failed or timed out."),
    ("local_only", "Requests with ids deduplicated on this node only (coordinator unreachable)."),
)


def render_dedup(
    family: Callable[[str, str, str], None],
    out: list[str],
    counters: dict,
    table: dict,
    cluster: bool,
) -> None:
    """The dedup families; ``table``: the gauges of the table the workers share."""
    by_kind = DEDUP_BY_KIND + (DEDUP_CLUSTER_BY_KIND if cluster else ())
    for key, help_text in by_kind:
        name = f"inslytic_dedup_{key}_total"
        family(name, "counter", help_text)
        for kind, n in sorted(counters.get(key, {}).items()):
            out.append(f'{name}{{kind="{kind}"}} {n}')
    family(
        "inslytic_dedup_evictions_total",
        "counter",
        "Entries dropped from the dedup table before the end of the window, to make room.",
    )
    out.append(f"inslytic_dedup_evictions_total {counters.get('table', {}).get('evictions', 0)}")
    if cluster:
        for key, help_text in DEDUP_COORDINATOR:
            name = f"inslytic_dedup_coordinator_{key}_total"
            family(name, "counter", help_text)
            out.append(f"{name} {counters.get('coordinator', {}).get(key, 0)}")
    for key, help_text in (
        (
            "window_seconds",
            "How far back the dedup table recognises a retry: 24 h, or less when it is full "
            "(the age of the last entry dropped for room).",
        ),
        ("table_slots", "Slots of the dedup table (serve --dedup-slots; 16 bytes each)."),
    ):
        name = f"inslytic_dedup_{key}"
        family(name, "gauge", help_text)
        out.append(f"{name} {table.get(key, 0)}")


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
