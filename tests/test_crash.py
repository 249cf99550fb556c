"""SIGKILL a real server under concurrent load: no acknowledged event lost or doubled."""

from __future__ import annotations

import os
import random
import signal

import pytest

from .crash_harness import audit, run_load

CI_CYCLES = 2
# A cycle whose kill came before this many acknowledged events proves little.
MIN_ACKED_PER_CYCLE = 101
SLOW_CYCLES = int(os.environ.get("INSLYTIC_CRASH_CYCLES", "200"))


def crash_cycles(make_server, tmp_path, cycles: int, workers: str, seed: int) -> dict:
    rng = random.Random(seed)
    data_dir = tmp_path / f"crash-{workers}"
    server = make_server("--workers", workers, "--events-per-minute", "0", data_dir=data_dir)
    key = server.first_run_key
    all_clients = []
    counts: dict[str, int] = {}
    for cycle in range(cycles):
        seconds = rng.uniform(0.3, 1.2)
        clients, stop = run_load(
            server, key, 6, seconds, seed * 100_000 + cycle, min_acked=MIN_ACKED_PER_CYCLE
        )
        server.stop(signal.SIGKILL)  # with the clients still sending
        stop.set()
        for client in clients:
            client.join(30)
        all_clients += clients
        counts = audit(data_dir, all_clients)  # with no server running
        server.start()
        counts = audit(data_dir, all_clients, previous=counts)  # recovered server, same data
    acked = sum(len(c.acked) for c in all_clients)
    assert acked >= MIN_ACKED_PER_CYCLE * cycles, "the load was too light to prove anything"
    assert server.stop() == 0
    audit(data_dir, all_clients, previous=counts)
    return {"cycles": cycles, "acked_events": acked, "stored": len(counts)}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigkill_under_load_loses_nothing_acknowledged(make_server, tmp_path, workers):
    crash_cycles(make_server, tmp_path, CI_CYCLES, workers, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_many_sigkill_cycles(make_server, tmp_path, workers):
    figures = crash_cycles(make_server, tmp_path, SLOW_CYCLES, workers, seed=2)
    print(f"crash cycles workers={workers}: {figures}")


def test_sigterm_under_load_exits_zero_and_loses_nothing(make_server, tmp_path):
    data_dir = tmp_path / "term"
    server = make_server("--workers", "1", "--events-per-minute", "0", data_dir=data_dir)
    clients, stop = run_load(server, server.first_run_key, clients=6, seconds=1.0, seed=3)
    assert server.stop(signal.SIGTERM) == 0
    stop.set()
    for client in clients:
        client.join(30)
    audit(data_dir, clients)
