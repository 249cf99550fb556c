"""``GET /metrics``: the merged counters as Prometheus text exposition (version 0.0.4).

metrics.py counts and merges; this module only writes the page: one family per counter,
gauge or histogram, with its HELP and TYPE lines, for the workers' summed snapshot and the
storage gauges.
"""

from __future__ import annotations

import platform
from collections.abc import Callable

from .. import __version__
from .metrics import LATENCY_BUCKETS, REJECT_REASONS

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
        # The counters sit apart from the gauges: a restarted worker carries them over.
        coordinator = merged.get("coordinator", {})
        for key, kind, help_text in COORDINATOR_SERIES:
            if kind == "counter":
                name, value = f"inslytic_{key}_total", coordinator.get(key, 0)
            else:
                name, value = f"inslytic_{key}", gauges.get(key, 0)
            family(name, kind, help_text)
            out.append(f"{name} {value}")
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
