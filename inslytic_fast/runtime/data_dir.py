"""The data dir of a serving process tree: writable, locked to one tree, its run dir."""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

from ..log.format import LOG_DIRNAME, list_segments
from ..log.writer import CommitLog
from .startup import StartupError


def check_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"data dir {data_dir} is not writable: {reason}") from None


class DataDirLock:
    """One serving process tree per data dir: two would interleave logs and rolls."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "serve.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise StartupError(
                f"data dir {data_dir} is in use by another inslytic-fast server (pid {holder})"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)


def acquire_data_dir(data_dir: Path) -> DataDirLock:
    return DataDirLock(data_dir)


def seal_orphan_logs(data_dir: Path, active: set[str]) -> None:
    """Seal the last segment of workers that will not run now (an earlier, larger --workers),
    so the roller converts it instead of waiting for a worker that never comes back."""
    for worker_id in list_segments(data_dir / LOG_DIRNAME):
        if worker_id in active:
            continue
        orphan = CommitLog(data_dir, worker_id=worker_id)
        orphan.open()
        asyncio.run(orphan.close())


def run_dir(data_dir: Path) -> Path:
    """Runtime files of a running server: rate-limit table, worker metric snapshots."""
    return data_dir / "run"


def clear_run_dir(data_dir: Path) -> None:
    """Metric snapshots of an earlier run's workers must not be summed into this one's."""
    directory = run_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.glob("metrics-*.json*"):
        path.unlink(missing_ok=True)


def budget_path(data_dir: Path) -> Path:
    """The rate-limit table the workers share (``--workers N`` without a coordinator)."""
    return run_dir(data_dir) / "ratelimit.bin"
