"""``inslytic-fast stats`` without I/O: Prometheus text -> samples -> a frame -> text.

Read top to bottom: ``parse_metrics`` (text -> samples), ``build_frame`` (two scrapes -> one
frame, a plain dict that is also the ``--json`` output), ``render_frame`` (frame -> text).
The Prometheus text is parsed here rather than with ``prometheus_client``: that is a test-only
dependency and the format's sample lines are simple.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import time
from pathlib import Path

QUANTILE = 0.99
# Rows per table on a terminal: enough for a busy box, short enough to keep the summary on screen.
MAX_TABLE_ROWS = 20

# Metric names, as inslytic_fast.observe.exposition.render() writes them.
EVENTS_ACCEPTED = "inslytic_events_accepted_total"
BATCHES_REJECTED = "inslytic_batches_rejected_total"
EVENTS_REJECTED = "inslytic_events_rejected_total"
REQUESTS = "inslytic_http_requests_total"
LATENCY_BUCKET = "inslytic_http_request_duration_seconds_bucket"
LOG_SYNCS = "inslytic_log_syncs_total"
LOG_EVENTS = "inslytic_log_events_total"
LOG_SYNC_ERRORS = "inslytic_log_sync_errors_total"
LAST_SYNC = "inslytic_log_last_sync_seconds"
INGEST_LABEL = ("route", "/v1/ingest")
OPEN_CONNECTIONS = "inslytic_open_connections"
RSS = "process_resident_memory_bytes"
CPU = "process_cpu_seconds_total"
# Optional: a server that exports its data dir's free space wins over a local statvfs.
DISK_FREE = "inslytic_disk_free_bytes"
STORAGE_GAUGES = ("log_pending_bytes", "roll_lag_seconds", "parquet_files", "parquet_bytes")

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]


# Parsing the exposition format


_SAMPLE_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?\s*$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class MetricsFormatError(ValueError):
    """The page is not Prometheus text (a proxy's HTML error page, a wrong --url)."""


def parse_metrics(text: str) -> Samples:
    """Sample lines of the Prometheus text format -> {(name, sorted labels): value}."""
    samples: Samples = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _SAMPLE_RE.match(line)
        if match is None:
            raise MetricsFormatError(f"line {lineno} is not a sample: {line[:80]!r}")
        name, label_text, value_text = match.groups()
        labels = _parse_labels(label_text or "", lineno)
        try:
            value = float(value_text)
        except ValueError:
            raise MetricsFormatError(f"line {lineno}: bad value {value_text!r}") from None
        samples[(name, labels)] = value
    return samples


def _parse_labels(text: str, lineno: int) -> Labels:
    labels = []
    pos = 0
    while pos < len(text):
        match = _LABEL_RE.match(text, pos)
        if match is None:
            raise MetricsFormatError(f"line {lineno}: bad labels {text!r}")
        value = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group()], match.group(2))
        labels.append((match.group(1), value))
        pos = match.end()
    return tuple(sorted(labels))


# From scrapes to a frame


class Scrape:
    __slots__ = ("at", "samples")

    def __init__(self, at: float, samples: Samples) -> None:
        self.at = at  # monotonic seconds
        self.samples = samples


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {
        dict(labels).get(label, ""): value for (n, labels), value in samples.items() if n == name
    }


def total(samples: Samples, name: str) -> float:
    return sum(value for (n, _), value in samples.items() if n == name)


def counter_delta(current: float, previous: float) -> float:
    # A counter that went down means the server restarted: it counted `current` since then.
    return current - previous if current >= previous else current


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Quantile from cumulative (upper bound, count) buckets, interpolated linearly inside the
    bucket the rank falls in (Prometheus' histogram_quantile). None when nothing was observed."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound = lower_count = 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                # Above the largest finite bound all we know is "at least that".
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


def _latency_buckets(samples: Samples) -> dict[float, float]:
    """The ingest route's buckets: probes of /health and /ready would dilute its p99."""
    return {
        float(dict(labels)["le"]): value
        for (name, labels), value in samples.items()
        if name == LATENCY_BUCKET and (INGEST_LABEL in labels or len(labels) == 1)
    }


def interval_quantile(q: float, previous: Samples, current: Samples) -> float | None:
    now, before = _latency_buckets(current), _latency_buckets(previous)
    restarted = sum(now.values()) < sum(before.values())
    deltas = [(le, n if restarted else n - before.get(le, 0.0)) for le, n in now.items()]
    return histogram_quantile(q, deltas)


def _rates(current: dict[str, float], previous: dict[str, float], seconds: float) -> dict:
    return {
        key: counter_delta(value, previous.get(key, 0.0)) / seconds
        for key, value in current.items()
    }


def build_frame(
    previous: Scrape | None,
    current: Scrape | None,
    *,
    url: str,
    error: str | None = None,
    storage: dict | None = None,
    data_dir: Path | None = None,
    disk_free: int | None = None,
    wall_time: float | None = None,
) -> dict:
    """One view of the server: rates over previous -> current, gauges from current.

    Without a previous scrape the rates are None (unknown, not zero). Without a current one
    (server not reachable) only ``storage`` (from a walk of the data dir) fills the frame.
    """
    frame: dict = {
        "time": dt.datetime.fromtimestamp(
            time.time() if wall_time is None else wall_time, dt.UTC
        ).isoformat(timespec="seconds"),
        "url": url,
        "reachable": current is not None,
        "error": error,
        "interval_s": None,
        "events_per_s": None,
        "events_per_s_total": None,
        "rejected_batches_per_s": None,
        "rejected_events_per_s": None,
        "requests_per_s": None,
        "p99_latency_s": None,
        "syncs_per_s": None,
        "events_per_sync": None,
        "cpu_percent": None,
        "events_accepted": None,
        "last_sync_s": None,
        "sync_errors": None,
        "open_connections": None,
        "rss_bytes": None,
        "roll_lag_s": None,
        "log_pending_bytes": None,
        "parquet_files": None,
        "parquet_bytes": None,
        "data_dir": None if data_dir is None else str(data_dir),
        "disk_free_bytes": disk_free,
    }
    if current is None:
        if storage is not None:
            _storage_into(frame, storage)
        return frame
    now = current.samples
    frame["events_accepted"] = {
        project: _whole(n) for project, n in by_label(now, EVENTS_ACCEPTED, "project").items()
    }
    last_syncs = by_label(now, LAST_SYNC, "worker").values()  # the slowest worker's
    frame["last_sync_s"] = max(last_syncs) if last_syncs else None
    frame["sync_errors"] = _whole(now.get((LOG_SYNC_ERRORS, ())))
    frame["open_connections"] = _whole(now.get((OPEN_CONNECTIONS, ())))
    frame["rss_bytes"] = _whole(total(now, RSS))  # per worker on the page
    _storage_into(frame, {key: now.get((f"inslytic_{key}", ())) for key in STORAGE_GAUGES})
    if (DISK_FREE, ()) in now:
        frame["disk_free_bytes"] = _whole(now[(DISK_FREE, ())])
    if previous is None or current.at <= previous.at:
        return frame
    seconds = current.at - previous.at
    before = previous.samples
    events = _rates(frame["events_accepted"], by_label(before, EVENTS_ACCEPTED, "project"), seconds)
    syncs = counter_delta(now.get((LOG_SYNCS, ()), 0.0), before.get((LOG_SYNCS, ()), 0.0))
    synced = counter_delta(now.get((LOG_EVENTS, ()), 0.0), before.get((LOG_EVENTS, ()), 0.0))
    frame.update(
        interval_s=seconds,
        events_per_s=events,
        events_per_s_total=sum(events.values()),
        rejected_batches_per_s=_rates(
            by_label(now, BATCHES_REJECTED, "reason"),
            by_label(before, BATCHES_REJECTED, "reason"),
            seconds,
        ),
        rejected_events_per_s=_rates(
            by_label(now, EVENTS_REJECTED, "reason"),
            by_label(before, EVENTS_REJECTED, "reason"),
            seconds,
        ),
        requests_per_s=counter_delta(total(now, REQUESTS), total(before, REQUESTS)) / seconds,
        p99_latency_s=interval_quantile(QUANTILE, before, now),
        syncs_per_s=syncs / seconds,
        events_per_sync=synced / syncs if syncs else None,
        cpu_percent=100.0
        * sum(_rates(by_label(now, CPU, "worker"), by_label(before, CPU, "worker"), 1).values())
        / seconds,
    )
    return frame


def _whole(value: float | None) -> int | float | None:
    # Prometheus values are floats; counts read better (and compare exactly) as ints.
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _storage_into(frame: dict, storage: dict) -> None:
    frame["roll_lag_s"] = storage.get("roll_lag_seconds")
    frame["log_pending_bytes"] = _whole(storage.get("log_pending_bytes"))
    frame["parquet_files"] = _whole(storage.get("parquet_files"))
    frame["parquet_bytes"] = _whole(storage.get("parquet_bytes"))


# Rendering


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.1f} s"


def _table(rows: list[tuple[str, str, str]], limit: int | None) -> list[str]:
    shown = rows if limit is None else rows[:limit]
    width = max([len(name) for name, _, _ in shown] + [12])
    lines = [f"  {name:<{width}}  {a:>12}  {b:>14}" for name, a, b in shown]
    if len(shown) < len(rows):
        lines.append(f"  ... {len(rows) - len(shown)} more")
    return lines


def render_frame(frame: dict, interval: float, limit: int | None = MAX_TABLE_ROWS) -> str:
    """The frame as lines of text (no escape codes; the caller clears the screen on a tty)."""
    lines = [f"inslytic-fast stats  {frame['url']}  {frame['time']}  every {interval:g} s"]
    if not frame["reachable"]:
        lines.append(f"server not reachable at {frame['url']}: {frame['error']}")
        if frame["data_dir"] is None:
            lines.append("no data dir to read storage figures from (use --data-dir)")
        else:
            lines.append(f"storage figures only, read from {frame['data_dir']}")
    else:
        lines.append(
            f"ingest   {_num(frame['events_per_s_total'])} events/s  "
            f"{_num(frame['requests_per_s'])} req/s  p99 {_seconds(frame['p99_latency_s'])}  "
            f"conns {_num(frame['open_connections'], 0)}  rss {_bytes(frame['rss_bytes'])}  "
            f"cpu {_num(frame['cpu_percent'], 0)}%"
        )
        errors = frame["sync_errors"]
        lines.append(
            f"commit   {_num(frame['syncs_per_s'])} syncs/s  "
            f"{_num(frame['events_per_sync'])} events/sync  "
            f"last sync {_seconds(frame['last_sync_s'])}"
            + (f"  SYNC ERRORS {errors:.0f}" if errors else "")
        )
    lines.append(
        f"storage  roll lag {_seconds(frame['roll_lag_s'])}  "
        f"log pending {_bytes(frame['log_pending_bytes'])}  "
        f"parquet {_num(frame['parquet_files'], 0)} files {_bytes(frame['parquet_bytes'])}  "
        f"disk free {_bytes(frame['disk_free_bytes'])}"
    )
    if not frame["reachable"]:
        return "\n".join(lines) + "\n"
    rates = frame["events_per_s"] or {}
    accepted = frame["events_accepted"] or {}
    projects = sorted(accepted, key=lambda p: (-rates.get(p, 0.0), -accepted[p], p))
    lines.append(f"  {'project':<12}  {'events/s':>12}  {'accepted':>14}")
    lines += _table(
        [(p, _num(rates.get(p) if rates else None), f"{accepted[p]:,.0f}") for p in projects],
        limit,
    )
    # Every reason is a series from the start; the view lists those that happened.
    batches = {r: rate for r, rate in (frame["rejected_batches_per_s"] or {}).items() if rate}
    if batches:
        events = frame["rejected_events_per_s"] or {}
        lines.append(f"  {'rejected':<12}  {'batches/s':>12}  {'events/s':>14}")
        reasons = sorted(batches, key=lambda r: (-batches[r], r))
        lines += _table(
            [(r, _num(batches[r]), _num(events.get(r)) if r in events else "") for r in reasons],
            limit,
        )
    return "\n".join(lines) + "\n"
