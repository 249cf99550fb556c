"""/metrics parses as Prometheus text and counts what was sent; /ready flips when it must."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inslytic_fast import __version__
from inslytic_fast.observe.exposition import render
from inslytic_fast.observe.metrics import (
    REJECT_REASONS,
    Metrics,
    merge,
    process_gauges,
    storage_gauges,
)

from .adversarial_helpers import TICK_DEADLINE_S, poll_until
from .conftest import EXAMPLE_EVENT, cli, free_port
from .storage_helpers import LogOnLoop, open_log


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(server) -> dict[tuple[str, tuple], float]:
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(body.decode())


def test_metrics_render_merges_workers_and_parses(tmp_path):
    a, b = Metrics(), Metrics()
    a.accepted("shop", 10)
    b.accepted("shop", 5)
    b.rejected("rate_limit", 7)
    a.response(b"/v1/ingest", 202, 0.0, 0.002)
    b.response(b"/v1/ingest", 202, 0.0, 0.004)
    b.response(b"/health", 200, 0.0, 0.0001)
    snaps = []
    for m, worker, last_sync in ((a, "w0", 0.01), (b, "w1", 0.02)):
        snap = m.snapshot()
        snap["log"] = {"syncs": 2, "events": 30, "last_sync_latency_s": last_sync}
        snap["gauges"] = {"open_connections": 1}
        snap["process"] = process_gauges(worker, 1, last_sync)
        snaps.append(snap)
    got = samples(render(merge(snaps), storage_gauges(tmp_path)).decode())
    assert got[("inslytic_events_accepted_total", (("project", "shop"),))] == 15
    assert got[("inslytic_events_rejected_total", (("reason", "rate_limit"),))] == 7
    key = ("inslytic_http_requests_total", (("route", "/v1/ingest"), ("status", "202")))
    assert got[key] == 2
    # Latency by route: the /health probe is not among the ingest observations.
    assert got[("inslytic_http_request_duration_seconds_count", (("route", "/v1/ingest"),))] == 2
    assert got[("inslytic_http_request_duration_seconds_count", (("route", "/health"),))] == 1
    assert (
        got[("inslytic_log_syncs_total", ())] == 4 and got[("inslytic_log_events_total", ())] == 60
    )
    assert got[("inslytic_log_last_sync_seconds", (("worker", "w1"),))] == 0.02
    assert got[("inslytic_open_connections", ())] == 2
    for worker in ("w0", "w1"):  # per process, each with its own start time
        assert got[("process_resident_memory_bytes", (("worker", worker),))] > 0
        assert got[("process_start_time_seconds", (("worker", worker),))] > 1.7e9
    [build] = [labels for name, labels in got if name == "inslytic_build_info"]
    assert dict(build)["version"] == __version__


def test_every_reject_reason_and_route_is_a_series_from_the_start(tmp_path):
    page = render(merge([Metrics().snapshot()]), storage_gauges(tmp_path)).decode()
    got = samples(page)
    for reason in REJECT_REASONS:
        assert got[("inslytic_batches_rejected_total", (("reason", reason),))] == 0
    for reason in ("rate_limit", "overload"):
        assert got[("inslytic_events_rejected_total", (("reason", reason),))] == 0
    assert got[("inslytic_http_request_duration_seconds_count", (("route", "/v1/ingest"),))] == 0
    assert "inslytic_log_events_per_sync" not in page  # a lifetime average hides the present


def test_counters_match_what_was_sent(make_server):
    server = make_server("--workers", "1", "--events-per-minute", "10")
    key = server.first_run_key
    for _ in range(3):
        assert server.ingest([EXAMPLE_EVENT] * 2, key)[0] == 202
    assert server.ingest([EXAMPLE_EVENT] * 9, key)[0] == 429
    assert server.ingest([{"eventName": 1}], key)[0] == 400
    assert server.ingest([EXAMPLE_EVENT], "ik_live_wrong")[0] == 401
    for head, status in (
        (b"Content-Length: 999999999\r\n", b"413"),
        (b"X-Filler: " + b"a" * 20_000 + b"\r\n", b"431"),
    ):
        with socket.create_connection((server.host, server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 " + status)
    got = scrape(server)
    # Refused by the HTTP layer, before the app saw them: still ingest refusals.
    assert got[("inslytic_batches_rejected_total", (("reason", "body"),))] == 1
    assert got[("inslytic_batches_rejected_total", (("reason", "headers"),))] == 1
    for status in ("413", "431"):
        key = ("inslytic_http_requests_total", (("route", "/v1/ingest"), ("status", status)))
        assert got[key] == 1
    assert got[("inslytic_events_accepted_total", (("project", "default"),))] == 6
    assert got[("inslytic_batches_rejected_total", (("reason", "rate_limit"),))] == 1
    assert got[("inslytic_events_rejected_total", (("reason", "rate_limit"),))] == 9
    assert got[("inslytic_batches_rejected_total", (("reason", "validation"),))] == 1
    assert got[("inslytic_batches_rejected_total", (("reason", "auth"),))] == 1
    ok = ("inslytic_http_requests_total", (("route", "/v1/ingest"), ("status", "202")))
    assert got[ok] == 3
    assert got[("inslytic_log_events_total", ())] == 6
    syncs = got[("inslytic_log_syncs_total", ())]
    assert syncs >= 1
    # The commit latency histogram counts every sync, each somewhere between 0 and 10 s.
    assert got[("inslytic_log_sync_duration_seconds_count", ())] == syncs
    assert got[("inslytic_log_sync_duration_seconds_bucket", (("le", "10.0"),))] == syncs
    assert 0 < got[("inslytic_log_sync_duration_seconds_sum", ())] < syncs * 10
    assert got[("process_resident_memory_bytes", (("worker", "w0"),))] > 10_000_000


def test_metrics_sum_over_workers(make_server):
    server = make_server("--workers", "2", "--events-per-minute", "0")
    key = server.first_run_key
    sent = 0
    for _ in range(40):  # new connections land on both workers
        assert server.ingest([EXAMPLE_EVENT], key)[0] == 202
        sent += 1
    accepted = ("inslytic_events_accepted_total", (("project", "default"),))

    def summed() -> dict | None:  # snapshots are written on each worker's 1 s tick
        got = scrape(server)
        return got if got.get(accepted) == sent else None

    got = poll_until(summed, TICK_DEADLINE_S, interval=0.2)
    # Histograms add up across workers too: one observation per sync of either worker.
    syncs = got[("inslytic_log_syncs_total", ())]
    assert got[("inslytic_log_sync_duration_seconds_count", ())] == syncs >= 2


def test_ready_is_200_when_serving_and_503_while_draining(make_server):
    server = make_server("--workers", "1", "--shutdown-timeout", "5")
    status, _, body = server.request("GET", "/ready")
    assert (status, orjson.loads(body)) == (200, {"status": "ready"})
    # A balancer's keep-alive connection, and a request held open so the drain has to wait.
    probe = server.connection()
    probe.request("GET", "/ready")
    assert probe.getresponse().read() == b'{"status":"ready"}'
    held = server.connection()
    held.putrequest("POST", "/v1/ingest")
    held.putheader("Authorization", f"Bearer {server.first_run_key}")
    held.putheader("Content-Length", "1000")
    held.endheaders()
    held.send(b"{")
    server.proc.send_signal(signal.SIGTERM)
    poll_until(lambda: "draining" in server.stderr(), TICK_DEADLINE_S, interval=0.02)
    probe.request("GET", "/ready")
    resp = probe.getresponse()
    answer = orjson.loads(resp.read())
    assert resp.status == 503 and answer["details"] == ["shutting down"]
    assert resp.getheader("Connection") == "close"
    held.close()
    assert server.proc.wait(20) == 0


def test_ready_and_ingest_answer_503_when_the_disk_is_short(make_server):
    server = make_server("--workers", "1", "--min-free-bytes", str(1 << 60))
    status, headers, body = server.request("GET", "/ready")
    assert status == 503 and "disk full" in orjson.loads(body)["details"][0]
    assert headers["retry-after"]
    status, headers, body = server.ingest([EXAMPLE_EVENT], server.first_run_key)
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert server.request("GET", "/health")[0] == 200, "liveness stays up"


# -- /metrics token and port (issue 8) -----------------------------------------------------


def get(host: str, port: int, path: str, token: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_a_metrics_token_is_required_when_set(make_server):
    server = make_server("--workers", "1", env={"INSLYTIC_METRICS_TOKEN": "s3cret-token"})
    status, headers, body = server.request("GET", "/metrics")
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert b"Authorization: Bearer" in body and b"s3cret" not in body
    assert server.request("GET", "/metrics", key="wrong")[0] == 401
    status, _, body = server.request("GET", "/metrics", key="s3cret-token")
    assert status == 200 and b"inslytic_events_accepted_total" in body
    # Nothing else needs it, and the API's own keys still work as before.
    assert server.request("GET", "/health")[0] == 200
    assert server.ingest([EXAMPLE_EVENT], server.first_run_key)[0] == 202


@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_port_serves_metrics_alone_and_the_api_port_does_not(make_server, workers):
    port = free_port()
    server = make_server(
        "--workers", workers, "--metrics-port", str(port), "--events-per-minute", "0"
    )
    assert f"metrics on port {port}" in server.stderr()
    assert server.ingest([EXAMPLE_EVENT] * 3, server.first_run_key)[0] == 202
    assert server.request("GET", "/metrics")[0] == 404
    assert get(server.host, port, "/v1/ingest")[0] == 404
    assert get(server.host, port, "/health")[0] == 404

    def counted() -> bool:  # with 2 workers the other worker's count arrives with its 1 s tick
        status, headers, body = get(server.host, port, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        got = samples(body.decode())
        return got.get(("inslytic_events_accepted_total", (("project", "default"),))) == 3

    poll_until(counted, TICK_DEADLINE_S, interval=0.2)


def test_stats_sends_the_metrics_token(make_server):
    port = free_port()
    env = {"INSLYTIC_METRICS_TOKEN": "tok-123"}
    server = make_server("--workers", "1", "--metrics-port", str(port), env=env)
    url = f"http://{server.host}:{port}"
    refused = cli("stats", "--once", "--json", "--interval", "0.2", "--url", url, check=False)
    assert "HTTP 401" in refused.stdout + refused.stderr
    ok = cli(
        "stats", "--once", "--json", "--interval", "0.2", "--url", url, env={**os.environ, **env}
    )
    frame = orjson.loads(ok.stdout.splitlines()[-1])
    assert frame.get("error") is None, frame


def test_metrics_port_in_use_is_a_clear_startup_error(make_server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cli(
            "serve", "--port", "0", "--metrics-port", str(port), "--workers", "1",
            data_dir=tmp_path / "d", check=False,
        )  # fmt: skip
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in proc.stderr


def test_roll_lag_is_the_age_of_the_oldest_unrolled_event_not_of_an_empty_segment(tmp_path):
    received_at = time.time() - 100

    async def main():
        log = open_log(tmp_path, clock=lambda: received_at)
        # An idle server: its active segment is empty, however long ago it was created.
        hour_ago = time.time() - 3600
        os.utime(log.segment_path, (hour_ago, hour_ago))
        assert storage_gauges(tmp_path)["roll_lag_seconds"] == 0
        assert await LogOnLoop(log).append("shop", "b0", 2) is None
        os.utime(log.segment_path)  # written just now, holding an event received 100 s ago
        lag = storage_gauges(tmp_path)["roll_lag_seconds"]
        assert 100 <= lag < 3600
        await log.close()

    asyncio.run(asyncio.wait_for(main(), timeout=30))


def _counters(got: dict) -> dict:
    """Every sample Prometheus must see as a counter, bar the per-process ones (a restarted
    process resets those, which its process_start_time_seconds tells)."""
    return {
        key: value
        for key, value in got.items()
        if key[0].endswith(("_total", "_count", "_bucket", "_sum"))
        and not key[0].startswith("process_")
    }


def _worker_pid(server, worker: str) -> int | None:
    for pid in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == f"inslytic-{worker}":
                return int(pid)
        except OSError:
            continue
    return None


class CounterWatch:
    """Scrapes a server (a new connection each time: any worker answers) and keeps every
    counter sample that went down since the scrape before."""

    def __init__(self, server) -> None:
        self.server = server
        self.previous: dict = {}
        self.drops: list = []

    def scrape(self) -> dict:
        got = scrape(self.server)
        counters = _counters(got)
        self.drops.extend(
            (k, self.previous[k], v)
            for k, v in counters.items()
            if v < self.previous.get(k, float("-inf"))
        )
        self.previous.update(counters)
        return got


def kill_worker_until_restarted(watch: CounterWatch, worker: str, send, check=None) -> float:
    """SIGKILL ``worker`` and poll (``send`` a request, then scrape) until its supervisor has
    restarted it and ``check(old_start)`` holds; returns the killed process's start time."""
    started = ("process_start_time_seconds", (("worker", worker),))
    old_start = watch.scrape()[started]
    os.kill(_worker_pid(watch.server, worker), signal.SIGKILL)

    def restarted() -> bool:
        try:  # a connection queued on the killed worker's socket is reset
            send()
            got = watch.scrape()
        except ConnectionError:
            return False
        if got.get(started, old_start) == old_start:
            return False
        return check is None or check(old_start)

    poll_until(restarted, timeout=60)  # the supervisor restarts it after a backoff
    return old_start


def test_counters_never_go_down_across_scrapes_or_a_killed_worker(make_server):
    server = make_server("--workers", "2", "--events-per-minute", "0")
    key = server.first_run_key
    watch = CounterWatch(server)
    scrape_and_compare = watch.scrape

    sent = 0
    for _ in range(40):
        assert server.ingest([EXAMPLE_EVENT], key)[0] == 202
        sent += 1
        scrape_and_compare()
    accepted = ("inslytic_events_accepted_total", (("project", "default"),))
    # Both workers' counts published (each on its tick): the victim's are in every sum.
    poll_until(lambda: scrape_and_compare()[accepted] == sent, TICK_DEADLINE_S)

    kill_worker_until_restarted(watch, "w0", lambda: server.ingest([EXAMPLE_EVENT], key))
    for _ in range(20):
        assert server.ingest([EXAMPLE_EVENT], key)[0] == 202
        scrape_and_compare()
    assert watch.drops == [], watch.drops[:10]
