"""Load with unique event names, a kill at a random moment, then an exact audit of the data.

The audit's promise: every event of every batch that got a 202 is in ``events`` exactly once;
nothing from a batch that got a 4xx is there; a batch whose answer was lost with the process
may or may not be there, but never twice.
"""

from __future__ import annotations

import http.client
import random
import threading
import time

import orjson

from .adversarial_helpers import TICK_DEADLINE_S, poll_until
from .conftest import EXAMPLE_EVENT, cli

INVALID_EVERY = 7  # every 7th batch of a client is invalid and must leave no trace


class LoadClient(threading.Thread):
    def __init__(self, server, key: str, client_id: str, stop: threading.Event, rng) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.key = key
        self.client_id = client_id
        self.stop = stop
        self.rng = rng
        self.acked: list[str] = []  # event names of 202 batches
        self.rejected: list[str] = []  # event names of 4xx batches
        self.unknown: list[str] = []  # sent, answer lost

    def run(self) -> None:
        seq = 0
        conn = None
        while not self.stop.is_set():
            seq += 1
            size = self.rng.choice((1, 1, 5, 50))
            names = [f"{self.client_id}_{seq}_{j}" for j in range(size)]
            events = [{**EXAMPLE_EVENT, "eventName": n} for n in names]
            invalid = seq % INVALID_EVERY == 0
            if invalid:
                events[-1] = {**events[-1], "consentGiven": "yes"}
            body = orjson.dumps({"events": events})
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(
                        self.server.host, self.server.port, timeout=10
                    )
                conn.request(
                    "POST",
                    "/v1/ingest",
                    body=body,
                    headers={
                        "Authorization": f"Bearer {self.key}",
                        "Content-Type": "application/json",
                    },
                )
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                self.unknown.extend(names)
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.01)
                continue
            if resp.status == 202:
                assert not invalid, "an invalid batch was acknowledged"
                self.acked.extend(names)
            elif 400 <= resp.status < 500:
                self.rejected.extend(names)
            else:
                self.unknown.extend(names)  # 503: refused, nothing promised
        if conn is not None:
            conn.close()


def run_load(server, key: str, clients: int, seconds: float, seed: int, min_acked: int = 0):
    """Start clients; after ``seconds``, and once they have ``min_acked`` events acknowledged
    between them (a loaded machine acknowledges fewer a second), the caller kills or stops the
    server, then joins. Event names are unique per (seed, client, batch, index): use a new seed
    for each round."""
    rng = random.Random(seed)
    stop = threading.Event()
    threads = [
        LoadClient(server, key, f"s{seed}c{n}", stop, random.Random(rng.random()))
        for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    poll_until(lambda: sum(len(t.acked) for t in threads) >= min_acked, TICK_DEADLINE_S)
    return threads, stop


def counts_by_name(data_dir) -> dict[str, int]:
    rows = orjson.loads(
        cli(
            "query",
            "SELECT event_name, count(*) AS n FROM events GROUP BY ALL",
            "--format",
            "json",
            data_dir=data_dir,
        ).stdout
    )
    return {row["event_name"]: row["n"] for row in rows}


def audit(data_dir, clients: list[LoadClient], previous: dict[str, int] | None = None) -> dict:
    counts = counts_by_name(data_dir)
    check_counts(counts, clients)
    if previous is not None:
        assert counts == previous, "restart changed the stored events"
    return counts


def check_counts(counts: dict[str, int], clients: list[LoadClient]) -> None:
    """Every acknowledged event stored once, none twice, nothing of a refused batch."""
    acked = [name for c in clients for name in c.acked]
    rejected = [name for c in clients for name in c.rejected]
    missing = [n for n in acked if counts.get(n, 0) == 0]
    doubled = [n for n, k in counts.items() if k > 1]
    leaked = [n for n in rejected if n in counts]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:5]}"
    assert not doubled, f"{len(doubled)} events stored twice, e.g. {doubled[:5]}"
    assert not leaked, f"{len(leaked)} events of rejected batches stored, e.g. {leaked[:5]}"
