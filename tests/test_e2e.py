"""End to end against a real ``inslytic-fast serve`` process over real sockets."""

from __future__ import annotations

import gzip
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import orjson
import pytest

from .adversarial_helpers import TICK_DEADLINE_S, poll_until
from .conftest import EXAMPLE_EVENT, LISTENING_RE, cli


def event(i: int = 0, **overrides) -> dict:
    return {**EXAMPLE_EVENT, "eventName": f"e2e_{i}", **overrides}


def test_health_needs_no_auth(shared_server):
    status, headers, body = shared_server.request("GET", "/health")
    assert (status, body) == (200, b'{"status":"ok"}')
    assert headers["content-type"] == "application/json"


def test_first_run_prints_a_working_key_and_a_curl_line(shared_server):
    out = shared_server.stdout()
    assert 'created project "default"' in out
    assert "curl -i -X POST" in out and shared_server.first_run_key in out


def test_the_reference_example_is_accepted(shared_server):
    status, headers, body = shared_server.ingest([EXAMPLE_EVENT], shared_server.first_run_key)
    assert status == 202, body
    assert orjson.loads(body) == {"accepted": 1}
    assert int(headers["x-ratelimit-limit"]) == 1000
    assert 0 <= int(headers["x-ratelimit-remaining"]) < 1000
    assert 1 <= int(headers["x-ratelimit-reset"]) <= 60
    assert headers["access-control-allow-origin"] == "*"


def test_the_reference_validation_example(shared_server):
    bad = {k: v for k, v in EXAMPLE_EVENT.items() if k not in ("eventName", "timestamp")}
    status, _, body = shared_server.ingest([bad], shared_server.first_run_key)
    assert status == 400
    assert orjson.loads(body) == {
        "error": "Validation failed",
        "details": ["Event 0: eventName is required", "Event 0: timestamp is required"],
    }


def test_invalid_json_is_a_400_that_says_where(shared_server):
    status, _, body = shared_server.request(
        "POST", "/v1/ingest", b'{"events": [', key=shared_server.first_run_key
    )
    answer = orjson.loads(body)
    assert status == 400 and answer["error"] == "Invalid JSON"
    assert answer["details"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "Missing API key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Bearer scheme"),
        ({"Authorization": "Bearer "}, "Missing API key"),
        ({"Authorization": "Bearer ik_live_nope"}, "Invalid API key"),
    ],
)
def test_auth_failures_are_401_with_www_authenticate(shared_server, headers, message):
    status, resp_headers, body = shared_server.request(
        "POST", "/v1/ingest", {"events": [EXAMPLE_EVENT]}, headers=headers
    )
    assert status == 401
    assert resp_headers["www-authenticate"] == "Bearer"
    assert message in orjson.loads(body)["error"]


def test_gzip_and_deflate_bodies_are_accepted(shared_server):
    payload = orjson.dumps({"events": [event(1), event(2)]})
    for encoding, data in (
        ("gzip", gzip.compress(payload)),
        ("deflate", zlib.compress(payload)),
        ("deflate", _raw_deflate(payload)),  # raw deflate, as some clients send
    ):
        status, _, body = shared_server.request(
            "POST",
            "/v1/ingest",
            data,
            headers={"Content-Encoding": encoding},
            key=shared_server.first_run_key,
        )
        assert (status, orjson.loads(body)) == (202, {"accepted": 2}), encoding


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


def test_unknown_encodings_and_media_types_are_415(shared_server):
    key = shared_server.first_run_key
    body = orjson.dumps({"events": [EXAMPLE_EVENT]})
    status, _, _ = shared_server.request(
        "POST", "/v1/ingest", body, headers={"Content-Encoding": "br"}, key=key
    )
    assert status == 415
    status, _, _ = shared_server.request(
        "POST", "/v1/ingest", body, headers={"Content-Type": "application/xml"}, key=key
    )
    assert status == 415


def test_send_beacon_text_plain_is_accepted(shared_server):
    status, _, _ = shared_server.request(
        "POST",
        "/v1/ingest",
        {"events": [EXAMPLE_EVENT]},
        headers={"Content-Type": "text/plain;charset=UTF-8"},
        key=shared_server.first_run_key,
    )
    assert status == 202


def test_a_gzip_bomb_stops_at_the_decompressed_cap(make_server):
    server = make_server("--max-decompressed-bytes", "100000")
    bomb = gzip.compress(b" " * 10_000_000)  # ~10 KB on the wire, 10 MB inflated
    status, _, body = server.request(
        "POST",
        "/v1/ingest",
        bomb,
        headers={"Content-Encoding": "gzip"},
        key=server.first_run_key,
    )
    assert status == 413, body


def test_routes_404_405_and_cors_preflight(shared_server):
    status, _, body = shared_server.request("GET", "/nope")
    assert (status, orjson.loads(body)) == (404, {"error": "Not found"})
    status, headers, _ = shared_server.request("GET", "/v1/ingest")
    assert status == 405 and headers["allow"] == "POST, OPTIONS"
    status, headers, _ = shared_server.request("POST", "/health", b"{}")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = shared_server.request(
        "OPTIONS",
        "/v1/ingest",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == "*"
    assert headers["access-control-allow-methods"] == "POST, OPTIONS"
    assert "Authorization" in headers["access-control-allow-headers"]
    assert int(headers["access-control-max-age"]) > 0


def test_cors_allowlist_echoes_only_listed_origins(make_server):
    server = make_server("--cors-origins", "https://app.example")
    _, headers, _ = server.request("GET", "/health", headers={"Origin": "https://app.example"})
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["vary"] == "Origin"
    _, headers, _ = server.request("GET", "/health", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_openapi_document_is_served(shared_server):
    status, _, body = shared_server.request("GET", "/openapi.json")
    doc = orjson.loads(body)
    assert status == 200 and doc["openapi"].startswith("3.1")
    assert "/v1/ingest" in doc["paths"] and "/health" in doc["paths"]


def test_rate_limit_429_with_retry_after_and_nothing_spent_by_bad_batches(make_server):
    server = make_server("--events-per-minute", "5")
    key = server.first_run_key
    assert server.ingest([event(i) for i in range(3)], key)[0] == 202
    bad = [event(9), {"eventName": 5}]
    assert server.ingest(bad, key)[0] == 400  # all or nothing: no tokens spent
    status, headers, body = server.ingest([event(i) for i in range(3)], key)
    assert status == 429
    assert orjson.loads(body)["error"] == "Rate limit exceeded"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-remaining"] == "2"
    status, headers, _ = server.ingest([event(7), event(8)], key)
    assert status == 202 and headers["x-ratelimit-remaining"] == "0"


def test_pipelined_requests_over_a_real_socket_are_answered_in_order(shared_server):
    key = shared_server.first_run_key
    requests = b""
    for i in range(20):
        body = orjson.dumps({"events": [event(i)] * (i % 3 + 1)})
        requests += (
            b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        ) % (key.encode(), len(body), body)
        if i == 10:
            requests += b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((shared_server.host, shared_server.port), timeout=30) as sock:
        sock.sendall(requests)
        received = b""
        while received.count(b"HTTP/1.1 ") < 21:
            chunk = sock.recv(65536)
            assert chunk, "connection closed early"
            received += chunk
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in received.split(b"HTTP/1.1 ")[1:]]
    expected = [b'{"accepted":%d}' % (i % 3 + 1) for i in range(11)]
    expected += [b'{"status":"ok"}']
    expected += [b'{"accepted":%d}' % (i % 3 + 1) for i in range(11, 20)]
    assert [b[: len(e)] for b, e in zip(bodies, expected, strict=True)] == expected


def test_oversized_content_length_is_refused_before_the_body(shared_server):
    with socket.create_connection((shared_server.host, shared_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_sigterm_drains_and_exits_zero(make_server):
    server = make_server()
    assert server.ingest([EXAMPLE_EVENT], server.first_run_key)[0] == 202
    assert server.stop() == 0


def test_second_start_does_not_print_a_key_again(make_server, tmp_path):
    server = make_server(data_dir=tmp_path / "again")
    assert server.first_run_key
    assert server.stop() == 0
    server.start()
    assert server.first_run_key is None
    assert "created project" not in server.stdout()


def test_port_in_use_is_one_clear_line_and_exit_2(shared_server, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inslytic_fast",
            "serve",
            "--port",
            str(shared_server.port),
            "--data-dir",
            str(tmp_path / "d"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_first_start_on_a_busy_port_does_not_lose_the_first_run_key(
    shared_server, make_server, tmp_path, workers
):
    data_dir = tmp_path / "fresh"
    busy = cli(
        "serve", "--workers", workers, "--port", str(shared_server.port),
        data_dir=data_dir, check=False,
    )  # fmt: skip
    assert busy.returncode == 2 and "address already in use" in busy.stderr
    assert "ik_" not in busy.stdout
    server = make_server("--workers", workers, data_dir=data_dir)
    assert server.first_run_key, server.stdout()
    assert server.ingest([EXAMPLE_EVENT], server.first_run_key)[0] == 202


def test_unwritable_data_dir_is_one_clear_line_and_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = cli("serve", "--port", "0", data_dir=blocker / "sub", check=False)
    assert proc.returncode == 2
    assert "not writable" in proc.stderr and "Traceback" not in proc.stderr


def test_startup_line_names_address_data_dir_and_version(shared_server):
    line = next(ln for ln in shared_server.stderr().splitlines() if LISTENING_RE.search(ln))
    assert "inslytic-fast 0." in line and str(shared_server.data_dir.resolve()) in line
    assert "durability fsync" in line


def test_serve_help_lists_every_option():
    proc = cli("serve", "--help")
    for flag in ("--host", "--port", "--data-dir", "--config", "--durability", "BENCHMARKS ONLY"):
        assert flag in " ".join(proc.stdout.split())


def test_the_roller_process_does_not_outlive_a_killed_server(make_server):
    server = make_server("--workers", "1")
    pid = server.proc.pid
    children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert children, "the roller runs as a child process"
    server.kill()
    # The roller notices its parent is gone on its own poll, then ends (its exit is reaped by init).
    poll_until(
        lambda: not any(Path(f"/proc/{c}/cmdline").exists() for c in children), TICK_DEADLINE_S
    )


def _interrupt(pids: list[int]) -> None:
    """SIGINT to each; one that exited since the tree was read needs none."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            pass


def _process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return tree


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_clean_stop_leaves_every_acknowledged_event_in_parquet(make_server, workers, how):
    import duckdb

    from inslytic_fast.log.format import list_segments, scan_records
    from inslytic_fast.storage.query import run_query

    server = make_server("--workers", workers, "--events-per-minute", "0")
    names = []
    for i in range(30):
        batch = [event(i * 3 + j) for j in range(3)]
        assert server.ingest(batch, server.first_run_key)[0] == 202
        names += [e["eventName"] for e in batch]
    if how == "Ctrl-C":  # a terminal signals the whole foreground process group at once
        _interrupt(_process_tree(server.proc.pid))
        assert server.proc.wait(timeout=30) == 0
    else:
        assert server.stop() == 0

    segments = [p for segs in list_segments(server.data_dir / "log").values() for p in segs]
    assert [p for p in segments if scan_records(p.read_bytes())[0]] == []
    parquet = str(server.data_dir / "events" / "**" / "*.parquet")
    rows = duckdb.sql(f"SELECT event_name FROM read_parquet('{parquet}')").fetchall()
    assert sorted(r[0] for r in rows) == sorted(names)
    # Rolled by the final roll, or (the log sealed at close and the background roller got to it
    # before it was stopped) by the background roller: either way all of it, nothing left.
    stderr = server.stderr()
    final = re.search(r"rolled (\d+) events? to Parquet before exit", stderr)
    assert final is None or 0 <= int(final.group(1)) <= len(names)
    assert "final roll failed" not in stderr and "left for the next start" not in stderr

    server.start()  # nothing is rolled twice: the restart's log is empty
    assert run_query(server.data_dir, "SELECT count(*) FROM events")[1] == [(len(names),)]
    assert server.stop() == 0


def test_ctrl_c_while_workers_are_starting_is_a_clean_stop(tmp_path):
    data_dir = tmp_path / "data"
    cmd = [sys.executable, "-m", "inslytic_fast", "serve", "--workers", "2", "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        # The roller and the first worker exist: the worker is still importing its modules.
        deadline = time.monotonic() + 30
        while len(_process_tree(proc.pid)) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.005)
        tree = _process_tree(proc.pid)
        assert len(tree) >= 3, "the supervisor never started its children"
        _interrupt(tree)  # a terminal signals the whole foreground process group at once
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert b"listening on" not in err  # it stopped before it served ...
    assert b"ik_" not in out and not (data_dir / "catalog.json").exists()  # ... with no key


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("Authorization: Bearer ik_live_wrong\r\n", 401),
        ("Authorization: Bearer {key}\r\nContent-Type: text/csv\r\n", 415),
        ("Authorization: Bearer {key}\r\nContent-Encoding: br\r\n", 415),
    ],
)
def test_expect_100_continue_decides_what_it_can_before_inviting_the_body(
    shared_server, headers, status
):
    head = (
        "POST /v1/ingest HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n"
        "Expect: 100-continue\r\n" + headers.format(key=shared_server.first_run_key) + "\r\n"
    )
    with socket.create_connection((shared_server.host, shared_server.port), timeout=30) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer
