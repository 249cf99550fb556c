"""``serve --workers 2``: SO_REUSEPORT workers, global limits, restarts, drain."""

from __future__ import annotations

import http.client
import os
import signal
import threading
import time
from pathlib import Path

import orjson

from .conftest import EXAMPLE_EVENT
from .crash_harness import counts_by_name

RESTART_DEADLINE_S = 30.0


def worker_pids(supervisor_pid: int) -> list[int]:
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    pids = []
    for pid in map(int, children):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            continue
        if name.startswith("inslytic-w"):
            pids.append(pid)
    return pids


def seen_workers(server, attempts: int = 400) -> set[str]:
    seen = set()
    for _ in range(attempts):
        _, headers, _ = server.request("GET", "/health")
        seen.add(headers["x-inslytic-worker"])
        if len(seen) == 2:
            break
    return seen


def test_every_worker_answers_health(make_server):
    server = make_server("--workers", "2")
    assert seen_workers(server) == {"w0", "w1"}
    assert len(worker_pids(server.proc.pid)) == 2
    assert server.stop() == 0


def test_the_limit_is_global_across_workers(make_server):
    server = make_server("--workers", "2", "--events-per-minute", "200")
    key = server.first_run_key
    accepted = []
    lock = threading.Lock()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        body = orjson.dumps({"events": [EXAMPLE_EVENT] * (1 + n % 3)})
        for _ in range(60):
            conn.request(
                "POST",
                "/v1/ingest",
                body=body,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            resp.read()
            if resp.status == 202:
                with lock:
                    accepted.append(1 + n % 3)
            else:
                assert resp.status == 429
        conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # No overshoot; undershoot at most (workers - 1) x grant (200 // 32 = 6) + a batch.
    assert 200 - 6 - 3 <= sum(accepted) <= 200
    assert server.stop() == 0


def test_a_killed_worker_is_restarted_and_loses_nothing_it_acknowledged(make_server):
    server = make_server("--workers", "2", "--events-per-minute", "0")
    key = server.first_run_key
    acked: list[str] = []
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
            try:
                while not stop.is_set():
                    name = f"c{n}_{i}"
                    body = orjson.dumps({"events": [{**EXAMPLE_EVENT, "eventName": name}]})
                    conn.request(
                        "POST",
                        "/v1/ingest",
                        body=body,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 202:
                        acked.append(name)
                    i += 1
            except (OSError, http.client.HTTPException):
                i += 1  # the worker died mid-request: not acknowledged, try again
            finally:
                conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while len(acked) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    before = set(worker_pids(server.proc.pid))
    victim = sorted(before)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + RESTART_DEADLINE_S
    while time.monotonic() < deadline:
        now = set(worker_pids(server.proc.pid))
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the killed worker was not restarted")
    count = len(acked)
    deadline = time.monotonic() + 10
    while len(acked) < count + 100 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join()
    assert "restarting" in server.stderr()
    assert server.stop() == 0
    counts = counts_by_name(server.data_dir)
    assert all(counts.get(name) == 1 for name in acked), (
        "an acknowledged event is missing or doubled"
    )
    assert len(acked) > 300


def test_sigterm_drains_every_worker_and_exits_zero(make_server):
    server = make_server("--workers", "2")
    pids = worker_pids(server.proc.pid)
    assert server.ingest([EXAMPLE_EVENT], server.first_run_key)[0] == 202
    assert server.stop() == 0
    for pid in pids:
        assert (
            not Path(f"/proc/{pid}").exists()
            or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
        )


def test_no_orphans_when_the_supervisor_is_killed(make_server):
    server = make_server("--workers", "2")
    supervisor = server.proc.pid
    children = [
        int(pid)
        for pid in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    ]
    assert len(worker_pids(supervisor)) == 2
    server.kill()
    deadline = time.monotonic() + 15
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.05)
    assert not alive, f"orphans left running: {alive}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
