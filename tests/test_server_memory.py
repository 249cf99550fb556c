"""DuckDB stays out of the serving processes: only the roller (and short-lived children: the
dedup rebuild at start, the final roll at stop) load it. Imported and used, it keeps tens of
MB resident, which the issue-14 budget (the whole tree <= 200 MB) cannot give every worker.

Checked on real servers through /proc/<pid>/maps: a loaded extension module is mapped there.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.machine import ROLLER_COMM, process_tree

from .adversarial_helpers import poll_until
from .conftest import EXAMPLE_EVENT, cli

ROLLER_START_DEADLINE_S = 60.0


def maps_duckdb(pid: int) -> bool:
    """Whether DuckDB's extension module (``_duckdb.cpython-*.so``) is mapped into the process.
    By file name: a data dir's path may say duckdb too (this file's test names do)."""
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:  # gone meanwhile (the resource tracker, a finished child)
        return False
    names = {Path(line.split()[-1]).name for line in lines if len(line.split()) >= 6}
    return any(name.startswith("_duckdb.") and name.endswith(".so") for name in names)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def by_name(server) -> dict[int, str]:
    return {pid: comm(pid) for pid in process_tree(server.proc.pid)}


@pytest.mark.parametrize("workers", [1, 2])
def test_duckdb_is_loaded_by_the_roller_and_by_no_serving_process(make_server, workers):
    server = make_server("--workers", str(workers))
    key = server.first_run_key
    for n in range(3):
        retry_key = {"Idempotency-Key": f"k{n}"}
        assert server.ingest([EXAMPLE_EVENT] * 10, key, headers=retry_key)[0] == 202
    # The check sees DuckDB where it is: in the roller, once it has started rolling.
    roller = poll_until(
        lambda: [pid for pid, name in by_name(server).items() if name == ROLLER_COMM],
        ROLLER_START_DEADLINE_S,
    )
    poll_until(lambda: all(maps_duckdb(pid) for pid in roller), ROLLER_START_DEADLINE_S)
    processes = by_name(server)
    serving = [pid for pid, name in processes.items() if name != ROLLER_COMM]
    workers_seen = [name for name in processes.values() if name.startswith("inslytic-w")]
    assert len(workers_seen) == (workers if workers > 1 else 0)
    assert [(pid, cmdline(pid)) for pid in serving if maps_duckdb(pid)] == []
    # A restart rebuilds the dedup table from what was stored (in a child): still none here,
    # and a retried batch is still answered as the first time.
    assert server.stop(signal.SIGTERM) == 0
    server.start()
    status, _, body = server.ingest([EXAMPLE_EVENT] * 10, key, headers={"Idempotency-Key": "k0"})
    assert (status, body) == (202, b'{"accepted":10}')
    processes = by_name(server)
    assert [(pid, name) for pid, name in processes.items()
            if name != ROLLER_COMM and maps_duckdb(pid)] == []  # fmt: skip
    assert server.stop(signal.SIGTERM) == 0
    rows = cli("query", "SELECT count(*) FROM events", "--format", "csv", data_dir=server.data_dir)
    assert rows.stdout.split() == ["count_star()", "30"]


def test_the_command_line_imports_no_duckdb_until_a_command_queries():
    # `serve` and every spawned child (workers, roller, jobs) import the CLI module first.
    probe = "import sys, inslytic_fast.__main__; print('duckdb' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout.strip() == "False"


def test_a_failed_dedup_rebuild_is_a_startup_error(make_server, tmp_path):
    data_dir = tmp_path / "data"
    server = make_server(data_dir=data_dir)
    assert server.ingest([EXAMPLE_EVENT], server.first_run_key)[0] == 202
    assert server.stop() == 0  # the final roll writes the event's Parquet file
    rolled = next((data_dir / "events").rglob("*.parquet"))
    (rolled.parent / "damaged.parquet").write_bytes(b"not parquet at all")
    proc = cli("serve", "--port", "0", data_dir=data_dir, check=False)
    assert proc.returncode == 2
    assert "cannot open the dedup table" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_server_alone_has_one_child_the_roller_and_no_resource_tracker(make_server):
    """multiprocessing's spawn started its resource tracker (an interpreter of ~13 MB that
    lives as long as the server) for the roller and the one-off jobs; they are plain child
    interpreters now (runtime/children.SpawnedChild). The dedup rebuild's child has exited
    by the time the server listens."""
    server = make_server("--workers", "1")
    assert server.ingest([EXAMPLE_EVENT], server.first_run_key)[0] == 202

    def children() -> list[str]:
        return sorted(name for pid, name in by_name(server).items() if pid != server.proc.pid)

    poll_until(lambda: children() == [ROLLER_COMM], ROLLER_START_DEADLINE_S)
    assert not [pid for pid in process_tree(server.proc.pid) if "resource_tracker" in cmdline(pid)]
