"""What runs on the commit log's sync thread: the active segment's file work, and the job loop.

One dedicated thread runs the ``os.writev`` and ``os.fdatasync`` of each group commit (both
release the GIL), so the event loop keeps parsing while the disk works. The thread runs almost
no Python: each line of Python there is a GIL hand-off with the loop, which is why records
arrive already framed (writer.py) and a job is one tuple.

``ActiveSegment`` is the writer's end of the log format (format.py): it appends to the newest
segment of one worker, syncs it, rotates to a successor created durably, and after a failed
write cuts the segment back to its last durable size. The loop reads its fields only while no
job runs, except ``tick``, which takes a racy but harmless snapshot (single attribute loads).
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..runtime.durable import fsync_dir, make_dirs_durable
from .format import SALVAGE_SUFFIX, list_segments, parse_segment_name, recover_segment, segment_name

# Buffers per writev call: Linux's UIO_MAXIOV (what sysconf("SC_IOV_MAX") reports there).
IOV_MAX = 1024

# (on_done, event count) of each batch in a group commit.
Waiter = tuple[Callable[[BaseException | None], None], int]


def fdatasync(fd: int) -> None:
    # Looked up at call time so tests can inject faults by monkeypatching os.fdatasync.
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


class ActiveSegment:
    """The segment one worker appends to, and the successors it rotates to."""

    __slots__ = (
        "data_dir",
        "log_dir",
        "worker_id",
        "_clock",
        "fd",
        "path",
        "seq",
        "size",
        "durable_size",
        "opened_at",
        "rotations",
    )

    def __init__(
        self, data_dir: Path, log_dir: Path, worker_id: str, clock: Callable[[], float]
    ) -> None:
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.worker_id = worker_id
        self._clock = clock
        self.fd = -1
        self.path: Path | None = None
        self.seq = 0
        self.size = 0  # bytes written to the segment
        self.durable_size = 0  # bytes of it known to be on disk (synced)
        self.opened_at = 0.0  # clock() when the segment was opened, for rotation by age
        self.rotations = 0

    def open(self) -> None:
        """Recover the tail, seal what was there, open a new segment durably. Before serving."""
        make_dirs_durable(self.log_dir)
        for stale in self.log_dir.glob(f"{self.worker_id}-*{SALVAGE_SUFFIX}"):
            stale.unlink()  # a recovery rewrite that a crash interrupted: the original is whole
        mine = list_segments(self.log_dir).get(self.worker_id, [])
        # Only the newest segment can have a torn tail: older ones were fully synced before
        # their successor was created. The roller salvages those as it reads.
        newest = parse_segment_name(mine[-1].name) if mine else None
        if newest is not None and recover_segment(self.data_dir, mine[-1]) == 0:
            # The empty successor a clean close left (or a rotation a crash cut short): it
            # already seals its predecessor, so it becomes the active segment.
            fd = os.open(mine[-1], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._use(fd, mine[-1], newest[1])
        else:
            self.seq = newest[1] if newest is not None else 0
            self._use(*self._create_successor())

    # -- Sync thread --------------------------------------------------------------------------

    def write(self, parts: list[bytes], size: int) -> None:
        """writev the framed records (``size`` bytes in all), finishing short writes."""
        # One writev per IOV_MAX parts: almost always one, whose size is already known.
        chunks = [parts[i : i + IOV_MAX] for i in range(0, len(parts), IOV_MAX)]
        for chunk in chunks:
            written = os.writev(self.fd, chunk)
            self.size += written
            if written < (size if len(chunks) == 1 else sum(map(len, chunk))):
                self._finish_short_write(chunk, written)

    def _finish_short_write(self, parts: list[bytes], written: int) -> None:
        # Rare: a signal or a nearly full disk. A real failure raises from os.write.
        rest = memoryview(b"".join(parts))[written:]
        while rest:
            n = os.write(self.fd, rest)
            self.size += n
            rest = rest[n:]

    def drop_unsynced(self) -> None:
        """After a failed write or sync: drop the unacknowledged bytes from the page cache at
        once (the repair makes the cut durable)."""
        if self.fd >= 0:
            try:
                os.ftruncate(self.fd, self.durable_size)
            except OSError:
                pass

    def rotate(self) -> None:
        old_fd = self.fd
        self._use(*self._create_successor())
        os.close(old_fd)
        self.rotations += 1

    def repair(self) -> None:
        """Cut the damaged segment back to its last durable size and start a new segment."""
        if self.fd >= 0:
            os.ftruncate(self.fd, self.durable_size)
            os.fsync(self.fd)
            if self.durable_size == 0:
                # Nothing acknowledged in it: keep writing to it rather than leave an empty
                # segment behind per failed write (1,122 in 40 s on a full disk).
                self.size = 0
                return
            os.close(self.fd)
            self.fd = -1
        self.size = self.durable_size
        self._use(*self._create_successor())

    # -- Lifecycle (loop thread, no job running) ----------------------------------------------

    def close(self) -> None:
        os.close(self.fd)
        self.fd = -1

    def seal(self) -> None:
        """Create the closed segment's (empty) successor: a segment with a successor is sealed,
        so the roll on the way out converts it, instead of the next start."""
        fd, _, _ = self._create_successor()
        os.close(fd)

    def _create_successor(self) -> tuple[int, Path, int]:
        """The successor of the current segment, created durably: (fd, path, seq)."""
        # Sequence numbers follow the wall clock in microseconds so a name is never reused
        # after the roller deleted every older segment (Parquet files are named after it).
        seq = max(self.seq + 1, time.time_ns() // 1000)
        path = self.log_dir / segment_name(self.worker_id, seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.fsync(fd)
            fsync_dir(self.log_dir)
        except BaseException:
            os.close(fd)
            raise
        return fd, path, seq

    def _use(self, fd: int, path: Path, seq: int) -> None:
        self.fd = fd
        self.path = path
        self.seq = seq
        self.size = 0
        self.durable_size = 0
        self.opened_at = self._clock()


# Job kinds executed by the sync thread.
JOB_WRITE = 0  # optionally rotate, then write the group and fdatasync
JOB_REPAIR = 1  # cut the damaged segment back to its durable offset, open a new segment

# (kind, framed records as writev parts, their size in bytes, their batches, rotate first)
Job = tuple[int, list[bytes], int, list[Waiter], bool]
# Called on the loop when a job is done: (kind, bytes, waiters, error or None, seconds).
JobDone = Callable[[int, int, list[Waiter], BaseException | None, float], None]

_STOP = None


class SyncThread:
    """The thread that runs the jobs, one at a time, and reports each back on the loop."""

    __slots__ = ("_segment", "_fsync", "_loop", "_on_done", "_jobs", "_thread")

    def __init__(
        self,
        segment: ActiveSegment,
        *,
        fsync: bool,
        loop: asyncio.AbstractEventLoop,
        on_done: JobDone,
    ) -> None:
        self._segment = segment
        self._fsync = fsync
        self._loop = loop
        self._on_done = on_done
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._main, name=f"commitlog-{segment.worker_id}", daemon=True
        )
        self._thread.start()

    def write(self, parts: list[bytes], size: int, waiters: list[Waiter], rotate: bool) -> None:
        self._jobs.put((JOB_WRITE, parts, size, waiters, rotate))

    def repair(self) -> None:
        self._jobs.put((JOB_REPAIR, [], 0, [], False))

    def stop(self) -> None:
        """End the thread once the jobs already queued are done (``join`` waits for that)."""
        self._jobs.put(_STOP)

    def join(self) -> None:
        self._thread.join()

    def _main(self) -> None:
        jobs = self._jobs
        segment = self._segment
        fsync = self._fsync
        call_soon_threadsafe = self._loop.call_soon_threadsafe
        on_done = self._on_done
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            kind, parts, size, waiters, rotate = job
            started = time.perf_counter()
            error: BaseException | None = None
            try:
                if kind == JOB_REPAIR:
                    segment.repair()
                else:
                    if rotate:
                        segment.rotate()
                    if parts:
                        segment.write(parts, size)
                        if fsync:
                            fdatasync(segment.fd)
                        segment.durable_size = segment.size
            except BaseException as exc:  # noqa: BLE001 - every failure must reach the callbacks
                error = exc
                if kind == JOB_WRITE:
                    segment.drop_unsynced()
            latency = time.perf_counter() - started
            try:
                call_soon_threadsafe(on_done, kind, size, waiters, error, latency)
            except RuntimeError:
                return  # loop closed under us: nobody is waiting any more
