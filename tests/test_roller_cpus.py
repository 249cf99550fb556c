"""``serve --roller-cpus``: the roller leaves the server's pin for the CPUs it is given.

Real processes throughout: a server pinned as taskset or systemd's CPUAffinity= would pin it,
its roller found by name under /proc, and the kernel's own answer to sched_setaffinity.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .adversarial_helpers import ROLL_DEADLINE_S
from .conftest import cli

ROLLER_COMM = "inslytic-roller"  # the name the roller gives itself (server.follow_parent)
# The roller is spawned after the startup line and imports DuckDB before it names itself:
# on a loaded machine, and pinned to the one CPU the server was given, that takes a while.
ROLLER_DEADLINE_S = ROLL_DEADLINE_S
# Past CONFIG_NR_CPUS of any Linux build (8192 at most on x86_64, MAXSMP): the kernel drops the
# bit, so the set it is asked for is empty, as when a cgroup cpuset excludes every CPU asked for.
NO_SUCH_CPU = 2**16

USABLE_CPUS = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(
    len(USABLE_CPUS) < 2,
    reason="one usable CPU: there is nowhere to move the roller to",
)


def roller_pid(parent_pid: int) -> int | None:
    """The roller among ``parent_pid``'s children (the server alone, or the supervisor)."""
    children = Path(f"/proc/{parent_pid}/task/{parent_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == ROLLER_COMM:
                return pid
        except FileNotFoundError:
            continue
    return None


def cpus_allowed(pid: int) -> set[str]:
    """``Cpus_allowed_list`` of every thread of ``pid`` (it is per thread, as is affinity)."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found.add(line.split(":", 1)[1].strip())
    return found


def wait_for_roller_cpus(parent_pid: int, expected: str) -> tuple[int | None, set[str]]:
    """Poll until the roller's every thread may run on ``expected`` only, or the deadline."""
    deadline = time.monotonic() + ROLLER_DEADLINE_S
    pid, seen = None, set()
    while time.monotonic() < deadline:
        pid = roller_pid(parent_pid)
        if pid is not None:
            try:
                seen = cpus_allowed(pid)
            except FileNotFoundError:  # restarted under us; look again
                seen = set()
            if seen == {expected}:
                break
        time.sleep(0.05)
    return pid, seen


@needs_two_cpus
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_roller_leaves_the_servers_pin_for_roller_cpus(make_server, workers):
    serving, rolling = USABLE_CPUS[0], USABLE_CPUS[-1]
    server = make_server("--workers", workers, "--roller-cpus", str(rolling), cpus={serving})
    pid, seen = wait_for_roller_cpus(server.proc.pid, str(rolling))
    assert pid is not None, f"no {ROLLER_COMM} under {server.proc.pid}: {server.stderr()}"
    assert seen == {str(rolling)}, server.stderr()
    # Serving stays where the operator pinned it.
    assert cpus_allowed(server.proc.pid) == {str(serving)}
    # Logged right after the move, which may not have reached the file yet.
    logged = f"roller runs on CPUs {rolling} (roller_cpus)"
    deadline = time.monotonic() + ROLLER_DEADLINE_S
    while logged not in server.stderr() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged in server.stderr()


@needs_two_cpus
def test_without_roller_cpus_the_roller_shares_the_servers_pin(make_server):
    serving = USABLE_CPUS[0]
    server = make_server("--workers", "1", cpus={serving})
    pid, seen = wait_for_roller_cpus(server.proc.pid, str(serving))
    assert pid is not None and seen == {str(serving)}, server.stderr()
    assert "roller runs on" not in server.stderr()


def test_a_bad_roller_cpus_is_one_line_and_exit_2(tmp_path):
    proc = cli(
        "serve", "--port", "0", "--roller-cpus", "1,,2", data_dir=tmp_path / "d", check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "inslytic-fast: error: --roller-cpus: roller_cpus has an empty part in '1,,2'"
    ]
    assert not (tmp_path / "d").exists()


MOVE_TO_CPUS = """\
import logging, os, sys
from inslytic_fast.storage.roller_process import move_to_cpus
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
move_to_cpus(tuple(int(cpu) for cpu in sys.argv[1:]))
print(",".join(map(str, sorted(os.sched_getaffinity(0)))))
"""


def move_to_cpus_in_a_child(*cpus: int) -> subprocess.CompletedProcess:
    """The roller's move in a process of its own (it must not re-pin this test process)."""
    return subprocess.run(
        [sys.executable, "-c", MOVE_TO_CPUS, *map(str, cpus)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_cpus_the_kernel_refuses_leave_the_inherited_affinity_and_one_error_line():
    proc = move_to_cpus_in_a_child(NO_SUCH_CPU)
    assert proc.returncode == 0, proc.stderr
    inherited = ",".join(map(str, USABLE_CPUS))
    assert proc.stdout.strip() == inherited
    assert proc.stderr.splitlines() == [
        f"ERROR roller_cpus {NO_SUCH_CPU} refused by the kernel (Invalid argument); "
        f"the roller stays on CPUs {inherited}"
    ]


def test_cpus_the_kernel_drops_silently_are_reported():
    kept = USABLE_CPUS[0]
    proc = move_to_cpus_in_a_child(kept, NO_SUCH_CPU)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(kept)
    assert proc.stderr.splitlines() == [
        f"WARNING roller runs on CPUs {kept} of roller_cpus {kept},{NO_SUCH_CPU} (the kernel left "
        "out the others: outside the cgroup's cpuset, or offline)"
    ]
