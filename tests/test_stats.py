"""``inslytic-fast stats``: the parser agrees with prometheus_client, rates and p99 come from the
delta of two scrapes, and the command shows a real server (or its data dir when it is down)."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inslytic_fast.cli import build_parser
from inslytic_fast.cli.stats import CLEAR_AND_HOME, View, fetch, metrics_url
from inslytic_fast.cli.stats_frame import (
    MetricsFormatError,
    Scrape,
    build_frame,
    histogram_quantile,
    interval_quantile,
    parse_metrics,
    render_frame,
)
from inslytic_fast.observe.exposition import render
from inslytic_fast.observe.metrics import (
    LATENCY_BUCKETS,
    Metrics,
    merge,
    process_gauges,
    storage_gauges,
)

from .conftest import EXAMPLE_EVENT

STATS = [sys.executable, "-m", "inslytic_fast", "stats"]
OUTPUT_DEADLINE_S = 20.0


def page(metrics: Metrics, log: dict | None = None, gauges: dict | None = None) -> str:
    snapshot = metrics.snapshot()
    snapshot["log"] = log or {}
    snapshot["gauges"] = gauges or {}
    snapshot["process"] = process_gauges("w0", 0, (log or {}).get("last_sync_latency_s", 0.0))
    storage = {
        "parquet_files": 2,
        "parquet_bytes": 4096,
        "log_pending_bytes": 123,
        "roll_lag_seconds": 1.5,
    }
    return render(merge([snapshot]), storage).decode()


def reference_samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def unreachable_url():
    """A bound socket that does not listen: connecting to it is refused, with no race."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


# Parsing


def test_parser_agrees_with_prometheus_client_on_awkward_labels():
    metrics = Metrics()
    for project in ('quo"te', "back\\slash", "new\nline", "plain"):
        metrics.accepted(project, 3)
    metrics.rejected("rate_limit", 9)
    metrics.response(b"/v1/ingest", 202, 0.0, 0.003)
    text = page(metrics, log={"syncs": 4, "events": 12, "last_sync_latency_s": 0.002})
    assert parse_metrics(text) == reference_samples(text)


def test_every_metric_the_view_reads_is_on_the_page():
    from inslytic_fast.cli import stats_frame as stats

    metrics = Metrics()
    metrics.accepted("shop", 1)
    metrics.rejected("rate_limit", 2)
    metrics.response(b"/v1/ingest", 202, 0.0, 0.001)
    names = {name for name, _ in parse_metrics(page(metrics))}
    wanted = {
        value
        for key, value in vars(stats).items()
        if key.isupper() and isinstance(value, str) and value.startswith(("inslytic_", "process_"))
    }
    wanted |= {f"inslytic_{key}" for key in stats.STORAGE_GAUGES}
    optional = {stats.DISK_FREE}  # read when a server exports it, else a local statvfs
    assert wanted - optional <= names, sorted(wanted - optional - names)


def test_parser_refuses_a_page_that_is_not_metrics():
    with pytest.raises(MetricsFormatError, match="line 1"):
        parse_metrics("<html><body>502 Bad Gateway</body></html>\n")


def test_metrics_url_accepts_base_or_full_url():
    assert metrics_url("http://h:1") == "http://h:1/metrics"
    assert metrics_url("http://h:1/") == "http://h:1/metrics"
    assert metrics_url("http://h:9/metrics") == "http://h:9/metrics"


# Quantiles


def cumulative(hist_counts: list[int]) -> list[tuple[float, float]]:
    out, running = [], 0
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), hist_counts, strict=True):
        running += n
        out.append((bound, running))
    return out


def observed(values: list[float]) -> list[tuple[float, float]]:
    metrics = Metrics()
    for value in values:
        metrics.request_latency[b"/v1/ingest"].observe(value)
    return cumulative(metrics.request_latency[b"/v1/ingest"].counts)


def test_p99_interpolates_inside_the_bucket_the_rank_falls_in():
    # 100 observations, all in (0.01, 0.025]: rank 99 is 99 % of the way through that bucket.
    buckets = observed([0.02] * 100)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.01 + (0.025 - 0.01) * 0.99)


def test_p99_at_a_bucket_edge_is_that_bucket_bound():
    # 990 fast and 10 slow: rank 990 is exactly the fast bucket's full count.
    buckets = observed([0.0007] * 990 + [0.3] * 10)
    fast_bound = next(b for b in LATENCY_BUCKETS if b >= 0.0007)
    assert histogram_quantile(0.99, buckets) == fast_bound


def test_p99_beyond_the_last_bound_is_the_last_bound_and_none_without_data():
    assert histogram_quantile(0.99, observed([60.0] * 5)) == LATENCY_BUCKETS[-1]
    assert histogram_quantile(0.99, observed([])) is None


def test_interval_p99_ignores_what_happened_before_the_previous_scrape():
    metrics = Metrics()
    for _ in range(1000):
        metrics.response(b"/v1/ingest", 202, 0.0, 4.0)
    before = parse_metrics(page(metrics))
    for _ in range(100):
        metrics.response(b"/v1/ingest", 202, 0.0, 0.0007)
    after = parse_metrics(page(metrics))
    fast_bound = next(b for b in LATENCY_BUCKETS if b >= 0.0007)
    assert interval_quantile(0.99, before, after) <= fast_bound
    # Since start the slow requests dominate: the delta is what made the difference.
    since_start = interval_quantile(0.99, {}, after)
    assert since_start > 1.0


# Frames


def test_frame_rates_are_deltas_over_the_measured_interval():
    metrics = Metrics()
    metrics.accepted("shop", 100)
    metrics.rejected("rate_limit", 50)
    first = Scrape(10.0, parse_metrics(page(metrics, log={"syncs": 10, "events": 100})))
    metrics.accepted("shop", 40)
    metrics.accepted("blog", 6)
    metrics.rejected("rate_limit", 20)
    metrics.rejected("validation")
    metrics.response(b"/v1/ingest", 202, 0.0, 0.002)
    second = Scrape(12.0, parse_metrics(page(metrics, log={"syncs": 14, "events": 146})))

    frame = build_frame(first, second, url="http://x")
    assert frame["interval_s"] == 2.0
    assert frame["events_per_s"] == {"shop": 20.0, "blog": 3.0}
    assert frame["events_per_s_total"] == 23.0
    assert frame["events_accepted"] == {"shop": 140, "blog": 6}
    rejected = {reason: rate for reason, rate in frame["rejected_batches_per_s"].items() if rate}
    assert rejected == {"rate_limit": 0.5, "validation": 0.5}
    assert frame["rejected_events_per_s"] == {"rate_limit": 10.0, "overload": 0.0}
    assert frame["syncs_per_s"] == 2.0
    assert frame["events_per_sync"] == 46 / 4
    assert frame["requests_per_s"] == 0.5
    assert frame["p99_latency_s"] is not None
    assert frame["parquet_files"] == 2 and frame["log_pending_bytes"] == 123
    assert frame["roll_lag_s"] == 1.5
    orjson.dumps(frame)  # the --json output: must serialise as is


def test_first_frame_has_gauges_but_unknown_rates():
    metrics = Metrics()
    metrics.accepted("shop", 7)
    frame = build_frame(None, Scrape(1.0, parse_metrics(page(metrics))), url="http://x")
    assert frame["events_accepted"] == {"shop": 7}
    assert frame["events_per_s"] is None and frame["p99_latency_s"] is None
    assert "shop" in render_frame(frame, 1.0)


def test_counter_reset_counts_from_zero():
    metrics = Metrics()
    metrics.accepted("shop", 1000)
    before = Scrape(0.0, parse_metrics(page(metrics, log={"syncs": 50, "events": 1000})))
    restarted = Metrics()
    restarted.accepted("shop", 30)
    after = Scrape(1.0, parse_metrics(page(restarted, log={"syncs": 3, "events": 30})))
    frame = build_frame(before, after, url="http://x")
    assert frame["events_per_s"] == {"shop": 30.0}
    assert frame["events_per_sync"] == 10.0


def test_unreachable_frame_shows_storage_and_says_why():
    storage = {
        "parquet_files": 3,
        "parquet_bytes": 10,
        "log_pending_bytes": 5,
        "roll_lag_seconds": 0,
    }
    frame = build_frame(
        None,
        None,
        url="http://x",
        error="Connection refused",
        storage=storage,
        data_dir=Path("/d"),
        disk_free=2048,
    )
    assert frame["reachable"] is False and frame["parquet_files"] == 3
    text = render_frame(frame, 1.0)
    assert "server not reachable at http://x: Connection refused" in text
    assert "storage figures only, read from /d" in text
    assert "disk free 2.0 KiB" in text
    assert CLEAR_AND_HOME not in text


def test_render_limits_long_tables_on_a_terminal():
    metrics = Metrics()
    for i in range(30):
        metrics.accepted(f"p{i:02}", i + 1)
    frame = build_frame(None, Scrape(0.0, parse_metrics(page(metrics))), url="http://x")
    assert "... 10 more" in render_frame(frame, 1.0, limit=20)
    assert "p00" in render_frame(frame, 1.0, limit=None)


# Against a real server


class CannedHandler(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the status and body its path names: /401, /html."""

    answers = {
        "/401": (401, b'{"error":"Unauthorized"}'),
        "/html": (200, b"<html><body>502 Bad Gateway</body></html>"),
    }

    def do_GET(self):
        status, body = self.answers[self.path]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_fetch_says_why_a_page_is_no_use():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CannedHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert fetch(base + "/401") == (None, "HTTP 401 Unauthorized")
        scrape, error = fetch(base + "/html")
        assert scrape is None and error.startswith("line 1 is not a sample")
    finally:
        server.shutdown()
        server.server_close()
    sock, url = unreachable_url()
    with sock:
        assert fetch(url + "/metrics") == (None, "Connection refused")


def test_view_measures_what_a_real_server_accepted(make_server, tmp_path):
    server = make_server("--workers", "1", "--events-per-minute", "0")
    key = server.first_run_key
    view = View(server.url, server.data_dir, 1.0, as_json=True, out=io.StringIO())
    first, error = view.scrape()
    assert error is None
    view.frame(first, None)
    for _ in range(5):
        assert server.ingest([EXAMPLE_EVENT] * 4, key)[0] == 202
    assert server.ingest([{"eventName": 1}], key)[0] == 400
    second, error = view.scrape()
    assert error is None
    frame = view.frame(second, None)
    assert frame["events_accepted"] == {"default": 20}
    assert frame["events_per_s"]["default"] * frame["interval_s"] == pytest.approx(20)
    assert frame["rejected_batches_per_s"]["validation"] * frame["interval_s"] == pytest.approx(1)
    assert frame["syncs_per_s"] > 0 and frame["events_per_sync"] > 0
    assert frame["p99_latency_s"] is not None
    assert frame["disk_free_bytes"] > 0 and frame["data_dir"] == str(server.data_dir)


def test_once_json_against_a_server_then_storage_only_when_it_is_down(make_server):
    server = make_server("--workers", "1")
    assert server.ingest([EXAMPLE_EVENT] * 3, server.first_run_key)[0] == 202
    args = ["--url", server.url, "--data-dir", str(server.data_dir), "--once", "--json"]
    proc = subprocess.run(
        [*STATS, *args, "--interval", "0.2"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    frame = orjson.loads(proc.stdout)
    assert frame["reachable"] is True
    assert frame["events_accepted"] == {"default": 3}
    assert frame["interval_s"] >= 0.2

    assert server.stop() == 0
    proc = subprocess.run([*STATS, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    frame = orjson.loads(proc.stdout)
    assert frame["reachable"] is False and frame["error"]
    walked = storage_gauges(server.data_dir)
    assert walked["log_pending_bytes"] + walked["parquet_bytes"] > 0
    assert frame["log_pending_bytes"] == walked["log_pending_bytes"]
    assert frame["parquet_files"] == walked["parquet_files"]
    assert frame["parquet_bytes"] == walked["parquet_bytes"]


def test_once_with_neither_server_nor_data_dir_fails_with_one_line(tmp_path):
    sock, url = unreachable_url()
    with sock:
        proc = subprocess.run(
            [*STATS, "--url", url, "--data-dir", str(tmp_path / "none"), "--once"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 1
    assert "server not reachable" in proc.stdout
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("inslytic-fast: error: server not reachable")


@pytest.mark.parametrize(
    ("flag", "value"), [("--interval", "0"), ("--url", "127.0.0.1:8080"), ("--url", "ftp://h")]
)
def test_bad_option_is_a_usage_error_in_one_line(tmp_path, flag, value):
    proc = subprocess.run(
        [*STATS, flag, value, "--data-dir", str(tmp_path), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"inslytic-fast: error: {flag}")
    assert proc.stderr.count("\n") == 1


def read_until(fd: int, needle: bytes, count: int, proc: subprocess.Popen) -> bytes:
    """Read fd until needle was seen count times (poll with deadline)."""
    seen = b""
    deadline = time.monotonic() + OUTPUT_DEADLINE_S
    while seen.count(needle) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            raise AssertionError(f"no {count} x {needle!r} in output: {seen[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # pty closed
                chunk = b""
            seen += chunk
    return seen


@contextlib.contextmanager
def live_view(tmp_path: Path, stdout) -> Iterator[subprocess.Popen]:
    """`stats` against a port nobody serves, refreshing every 0.1 s; killed if still running."""
    sock, url = unreachable_url()
    with sock:
        proc = subprocess.Popen(
            [*STATS, "--url", url, "--data-dir", str(tmp_path), "--interval", "0.1"],
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def test_live_view_on_a_terminal_redraws_and_ctrl_c_exits_0(tmp_path):
    primary, secondary = pty.openpty()
    try:
        with live_view(tmp_path, secondary) as proc:
            os.close(secondary)
            seen = read_until(primary, CLEAR_AND_HOME.encode(), 2, proc)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 0
    finally:
        os.close(primary)
    assert seen.startswith(CLEAR_AND_HOME.encode())
    assert b"server not reachable" in seen
    assert proc.stderr.read() == b""


def test_live_view_into_a_pipe_appends_plain_frames(tmp_path):
    with live_view(tmp_path, subprocess.PIPE) as proc:
        seen = read_until(proc.stdout.fileno(), b"inslytic-fast stats", 3, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    assert b"\x1b" not in seen
    assert proc.stderr.read() == b""


def test_a_reader_that_goes_away_ends_the_view_quietly(tmp_path):
    with live_view(tmp_path, subprocess.PIPE) as proc:
        read_until(proc.stdout.fileno(), b"inslytic-fast stats", 1, proc)
        proc.stdout.close()  # as `stats | head -3` does once it has its lines
        assert proc.wait(timeout=20) == 0
    assert proc.stderr.read() == b""


def test_stats_is_wired_into_the_top_level_command():
    commands = build_parser()._subparsers._group_actions[0].choices
    if "stats" not in commands:
        pytest.skip("inslytic_fast/cli/__init__.py does not register cli.stats yet (lead's file)")
    proc = subprocess.run(
        [sys.executable, "-m", "inslytic_fast", "stats", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "--once" in proc.stdout


def test_the_frame_pieces_do_no_io():
    """stats_frame (parse, frame, render) is tested without a server: it imports no module
    that reaches the network, the file system or a terminal; stats.py does that."""
    import ast

    from inslytic_fast.cli import stats_frame

    tree = ast.parse(Path(stats_frame.__file__).read_text())
    imported = {
        alias.name if isinstance(node, ast.Import) else (node.module or "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "datetime", "math", "re", "time", "pathlib"}, imported
