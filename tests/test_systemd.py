"""systemd integration, against real sockets: Type=notify readiness over a datagram socket, and
socket activation (a listening socket passed as fd 3 with LISTEN_PID/LISTEN_FDS)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from .conftest import LISTENING_RE

READY_DEADLINE_S = 60.0


def receive(sock: socket.socket) -> str:
    sock.settimeout(READY_DEADLINE_S)
    return sock.recv(4096).decode()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_readiness_and_stopping_reach_the_notify_socket(make_server, tmp_path, workers):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(path))
        server = make_server("--workers", workers, env={"NOTIFY_SOCKET": str(path)})
        # The server is already listening when the manager hears READY=1 (and only once).
        ready = receive(manager)
        assert "READY=1" in ready.split("\n"), ready
        assert server.request("GET", "/health")[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        assert receive(manager) == "STOPPING=1"
        assert server.proc.wait(timeout=60) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_socket_passed_by_systemd_is_the_one_served(tmp_path, workers):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    # As systemd does: fd 3, and LISTEN_PID naming the process that will serve (exec keeps it).
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
        "os.execv(sys.executable, [sys.executable, '-m', 'inslytic_fast', *sys.argv[2:]])"
    )
    err_path = tmp_path / "stderr.log"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", launcher, str(listener.fileno()), "serve", "--workers", workers,
             "--port", "1", "--data-dir", str(tmp_path / "data")],
            stdout=subprocess.DEVNULL, stderr=err, pass_fds=(listener.fileno(),),
        )  # fmt: skip
    listener.close()  # the server holds its own copy
    try:
        deadline = time.monotonic() + READY_DEADLINE_S
        while not (match := LISTENING_RE.search(err_path.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        assert int(match.group(2)) == port  # not --port 1: that would need root
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
