"""Log formats and escaping, the access log, and HTTPS."""

from __future__ import annotations

import http.client
import logging
import re
import shutil
import socket
import ssl
import subprocess

import orjson
import pytest

from inslytic_fast.observe.logs import JsonFormatter, RepeatedFailure, TextFormatter, escape

from .adversarial_helpers import TICK_DEADLINE_S, poll_until
from .conftest import EXAMPLE_EVENT, cli, free_port


def record(message: str, *args) -> logging.LogRecord:
    return logging.LogRecord("inslytic_fast.test", logging.ERROR, __file__, 1, message, args, None)


def test_escape_neutralises_line_breaks_and_terminal_escapes():
    assert escape("ok /path") == "ok /path"
    assert escape("a\r\nFAKE LINE\x1b[31m") == "a\\x0d\\x0aFAKE LINE\\x1b[31m"


def test_text_lines_cannot_be_forged():
    line = TextFormatter("w0").format(record("bad path %s", "/x\nERROR forged"))
    assert "\n" not in line and "\\x0aERROR forged" in line and " w0 " in line


def test_json_lines_are_one_object_each():
    line = JsonFormatter("w1").format(record("path %s", "/x\n\x1b[2J"))
    entry = orjson.loads(line)
    assert entry["msg"] == "path /x\n\x1b[2J" and "\n" not in line
    assert entry["level"] == "error" and entry["worker"] == "w1" and entry["ts"].endswith("Z")


def test_a_failure_repeating_every_tick_is_one_line_a_minute_and_one_when_it_ends(caplog):
    now = [0.0]
    failure = RepeatedFailure(
        logging.getLogger("inslytic_fast.test"), "the probe", clock=lambda: now[0]
    )
    with caplog.at_level(logging.INFO, logger="inslytic_fast.test"):
        for _ in range(150):  # 150 ticks, one a second
            try:
                raise OSError(30, "Read-only file system")
            except OSError as exc:
                failure.failed("cannot write: %s", exc, exc_info=True)
            now[0] += 1
        failure.succeeded()
        failure.succeeded()  # nothing more to say
        failure.failed("cannot write: %s", "again")  # a new episode is logged at once
    lines = [(r.levelname, r.getMessage(), bool(r.exc_info)) for r in caplog.records]
    assert lines == [
        ("ERROR", "cannot write: [Errno 30] Read-only file system", True),
        ("ERROR", "cannot write: [Errno 30] Read-only file system (61 times in 60 s)", False),
        ("ERROR", "cannot write: [Errno 30] Read-only file system (121 times in 120 s)", False),
        ("WARNING", "the probe: working again after 150 failures in 150 s", False),
        ("ERROR", "cannot write: again", False),
    ]


def test_a_failure_that_keeps_repeating_logs_once_not_every_second(make_server):
    # Workers publish a metrics snapshot into run/ every tick and on every scrape: a file in
    # its place makes that fail again and again, as a read-only remount or a vanished data dir
    # would.
    server = make_server("--workers", "2")
    run_dir = server.data_dir / "run"
    saved = server.data_dir / "run.saved"
    failed, recovered = "cannot write the metrics snapshot", "the metrics snapshot: working again"
    run_dir.rename(saved)
    run_dir.write_bytes(b"")
    # Each worker's first failure, on its next tick.
    poll_until(lambda: server.stderr().count(failed) >= 2, TICK_DEADLINE_S)
    # Then a scrape answered by each worker: a failure again in each (the page of a worker
    # that cannot read run/ shows its own process series only, which says who answered).
    answered: set[str] = set()

    def each_worker_answered() -> bool:
        status, _, body = server.request("GET", "/metrics")
        assert status == 200
        answered.update(re.findall(r'process_start_time_seconds\{worker="(w\d)"\}', body.decode()))
        return answered == {"w0", "w1"}

    poll_until(each_worker_answered, TICK_DEADLINE_S, interval=0)
    assert server.stderr().count(failed) == 2, server.stderr()  # one line per worker
    run_dir.unlink()
    saved.rename(run_dir)
    poll_until(lambda: server.stderr().count(recovered) == 2, TICK_DEADLINE_S)
    assert server.request("GET", "/health")[0] == 200
    assert server.stop() == 0


def test_json_logs_are_json_on_every_line_and_access_entries_carry_fields(make_server):
    server = make_server(
        "--workers", "1", "--access-log", "--log-format", "json",
        "--trusted-proxies", "127.0.0.0/8",
    )  # fmt: skip
    key = server.first_run_key  # read from the JSON first-run line on stdout
    assert server.ingest([EXAMPLE_EVENT], key)[0] == 202
    server.request("GET", "/health?probe=1", headers={"X-Forwarded-For": "203.0.113.9, 10.1.1.1"})
    server.request("GET", "/nope")
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(b"POST /malformed HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert server.stop() == 0
    for stream in (server.stderr(), server.stdout()):  # the banner and the key included
        for line in stream.splitlines():
            orjson.loads(line)
    entries = [orjson.loads(line) for line in server.stderr().splitlines()]
    assert any("listening on" in e["msg"] for e in entries)
    access = {e["path"]: e for e in entries if e["logger"] == "inslytic_fast.access"}
    ingest = access["/v1/ingest"]
    assert (ingest["method"], ingest["status"], ingest["project"]) == ("POST", 202, "default")
    assert ingest["bytes"] > 0 and ingest["duration_ms"] >= 0 and ingest["client"] == "127.0.0.1"
    # The proxy 127.0.0.1 is trusted, 10.1.1.1 is not: the client is the right-most untrusted.
    assert access["/health"]["client"] == "10.1.1.1"
    assert access["/nope"]["status"] == 404
    # Refused by the HTTP layer, logged all the same.
    assert access["/malformed"]["status"] == 400


def test_no_access_log_by_default(shared_server):
    shared_server.request("GET", "/health")
    assert "inslytic_fast.access" not in shared_server.stderr()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_https_with_tls_cert_and_key(make_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    metrics_port = free_port()
    server = make_server(
        "--workers", "1", "--tls-cert", str(cert), "--tls-key", str(key),
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    assert f"listening on https://127.0.0.1:{server.port}" in server.stderr()
    context = ssl.create_default_context(cafile=str(cert))
    for port, path, expected in (
        (server.port, "/health", b'{"status":"ok"}'),
        (metrics_port, "/metrics", b"# HELP inslytic_http_requests_total"),  # HTTPS there too
    ):
        conn = http.client.HTTPSConnection(server.host, port, context=context, timeout=10)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read().startswith(expected)
        conn.close()
    assert server.stop() == 0


def test_tls_flags_go_together_and_bad_files_are_a_clear_error(tmp_path):
    proc = cli("serve", "--tls-cert", "x.pem", data_dir=tmp_path / "d", check=False)
    assert proc.returncode == 2 and "--tls-cert and --tls-key go together" in proc.stderr
    proc = cli(
        "serve",
        "--port",
        "0",
        "--tls-cert",
        "nope.pem",
        "--tls-key",
        "nope.pem",
        data_dir=tmp_path / "d",
        check=False,
    )
    assert proc.returncode == 2 and "cannot load TLS certificate" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_log_level_leaves_out_the_less_severe_lines(make_server):
    quiet = make_server("--workers", "1", "--log-level", "warning")
    assert quiet.stop() == 0
    assert "draining" not in quiet.stderr()  # an INFO line
    chatty = make_server("--workers", "1")
    assert chatty.stop() == 0
    assert "draining" in chatty.stderr()
