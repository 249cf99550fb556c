"""Process plumbing: worker names, following the parent, the open-file limit, the event loop."""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import signal
from collections.abc import Callable


def worker_ids(count: int) -> list[str]:
    return [f"w{i}" for i in range(count)]


def worker_index(worker_id: str) -> int:
    """w3 -> 3: a worker's owner number in shared tables (0 for any other name)."""
    digits = worker_id.lstrip("w")
    return int(digits) if digits.isdigit() else 0


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_NAME = 15  # the 15-character name `top` and `ps -o comm` show


def follow_parent(parent_pid: int, name: str) -> None:
    """A child of the supervisor gets SIGTERM when the supervisor dies, even by SIGKILL, so no
    orphan keeps the port and the data dir (Linux prctl; elsewhere the tick's getppid check).
    It is also named (``inslytic-w0``, ``inslytic-roller``) for operators."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def resident_bytes() -> int | None:
    """This process's resident set now (Linux /proc), or None where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def raise_open_file_limit(wanted: int) -> None:
    """Each connection is a file descriptor; lift the soft limit toward the hard one."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed; None lets asyncio.Runner use its default."""
    try:
        import uvloop  # not installed on Windows (pyproject's marker)
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop
