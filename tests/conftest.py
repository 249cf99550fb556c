"""Fixtures: a real server process (datasette-style) on a temp data dir, and a tiny HTTP client."""

from __future__ import annotations

import functools
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

STARTUP_DEADLINE_S = 30.0
LISTENING_RE = re.compile(r"listening on https?://([\d.]+):(\d+)")
# The first-run key: on a line of its own, or (--log-format json) in the api_key field.
KEY_RE = re.compile(r'^\s+(ik_\S+)\s*$|"api_key":"(ik_[^"]+)"', re.M)

EXAMPLE_EVENT = {
    "eventName": "page_viewed",
    "timestamp": "2026-02-16T10:30:00.000Z",
    "anonymousId": "anon-123",
    "sessionId": "sess-456",
    "consentGiven": True,
    "properties": {"path": "/pricing"},
    "pageUrl": "https://example.com/pricing",
    "pageTitle": "Pricing",
}


def cli(*args: str, data_dir: Path | None = None, check: bool = True, **kw):
    """Run ``python -m inslytic_fast ARGS`` and return the CompletedProcess."""
    cmd = [sys.executable, "-m", "inslytic_fast", *args]
    if data_dir is not None:
        cmd += ["--data-dir", str(data_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stderr}")
    return proc


def free_port() -> int:
    """A port nothing listens on right now (for options such as --metrics-port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``inslytic-fast serve`` as a subprocess on an ephemeral port, output captured to files."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = data_dir
        self.wrapper = wrapper  # a command the server runs under (strace -e inject=...)
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.cpus = cpus  # pinned as taskset -c or systemd's CPUAffinity= would
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.first_run_key: str | None = None
        self._runs = 0

    @property
    def stderr_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-stderr-{self._runs}.log"

    @property
    def stdout_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-stdout-{self._runs}.log"

    def start(self, port: int = 0) -> ServerProcess:
        self._runs += 1
        cmd = [
            *self.wrapper,
            sys.executable,
            "-m",
            "inslytic_fast",
            "serve",
            "--port",
            str(port or 0),
            "--data-dir",
            str(self.data_dir),
            *self.args,
        ]
        pin = functools.partial(os.sched_setaffinity, 0, self.cpus) if self.cpus else None
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=self.env, preexec_fn=pin)
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while time.monotonic() < deadline:
            match = LISTENING_RE.search(self.stderr())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                key = KEY_RE.search(self.stdout())
                self.first_run_key = (key.group(1) or key.group(2)) if key else None
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.02)
        self.kill()
        raise AssertionError(f"server did not start in time: {self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> int:
        # Under a wrapper (strace) the server is the wrapper's child: a SIGKILL of the wrapper
        # alone leaves it running, detached, for the rest of the machine's day.
        wrapped = self._wrapped_pids() if self.wrapper else []
        code = self.stop(signal.SIGKILL)
        for pid in wrapped:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return code

    def _wrapped_pids(self) -> list[int]:
        pid = self.proc.pid
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        headers: dict[str, str] | None = None,
        key: str | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        if isinstance(body, dict):
            body = orjson.dumps(body)
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def ingest(self, events: list[dict], key: str, **kw) -> tuple[int, dict[str, str], bytes]:
        return self.request("POST", "/v1/ingest", {"events": events}, key=key, **kw)


@pytest.fixture
def make_server(tmp_path):
    """Factory: start servers on fresh data dirs; every one is killed at teardown."""
    started: list[ServerProcess] = []

    def factory(*args: str, data_dir: Path | None = None, env=None, cpus=None) -> ServerProcess:
        server = ServerProcess(
            data_dir or tmp_path / f"data{len(started)}", *args, env=env, cpus=cpus
        )
        started.append(server)
        return server.start()

    yield factory
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.kill()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """One long-lived server for read-mostly end-to-end tests (default settings)."""
    data_dir = tmp_path_factory.mktemp("shared") / "data"
    server = ServerProcess(data_dir).start()
    assert server.first_run_key, server.stdout()
    yield server
    if server.proc.poll() is None:
        server.kill()
