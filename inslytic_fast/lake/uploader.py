"""Cluster mode's uploader: finished Parquet files leave the node for the lake, exactly once.

``serve --lake s3://bucket/prefix [--s3-endpoint URL]`` runs an uploader beside the roller. It
takes each *finished* file of the local ``events/`` tree (its log segment rolled and gone, no
compaction intent naming it) and stores it under its deterministic name (lake/layout.py). Per
file, each step named for the crash tests (``_step``):

1. ``upload:start`` -- if the object already exists (an upload that finished before a crash) it
   is verified and kept; if it was compacted away in the lake (an intent names it as an
   input), the local copy is a duplicate of rows already there. Otherwise:
2. ``upload:put`` -- one PUT of the whole file, never a multipart upload: a PUT cut off (a
   stop, a crash, the store gone) leaves nothing, where a multipart upload would leave its
   parts (the client cannot abort one it was interrupted in).
3. ``upload:verified`` -- HEAD: size and ETag (the MD5 S3 computes; for an object an earlier
   version sent in parts, the MD5 of the parts' MD5s) must be what this node computed from
   its file. A mismatch keeps the local file and is reported (two nodes with one --node-id
   would do that).
4. ``upload:local_deleted`` -- the local file goes, under the roller's lock (readers pause the
   roller with it, so a reader never loses a file it listed).

A file whose every row a lake purge tombstone covers (lake/purges.py) is deleted instead,
without an upload (``upload:purged``).

A clean stop (SIGTERM, Ctrl-C) calls ``stop`` after the final roll: the thread makes one last
pass, bounded by ``FINAL_PASS_S``, so the roll's files leave with the node. At that deadline
the call in flight is dropped (``StopDeadline`` is the store's ``cancelled``) and the thread
ends before ``stop`` returns; a PUT cut off leaves nothing in the store. What is not uploaded
by then (the store down or slow) stays local and goes up at the next start, by the same
steps, so exactly once as after a crash.

Object store down or slow: files wait locally (the node keeps accepting until
``--min-free-bytes`` or ``--max-unrolled-bytes`` trip, then 503 as without a lake), passes
back off from 1 s to 30 s, and uploads resume by themselves. The uploader's view of the local
tree is only "finished files and their paths" (``finished_files``), so a change of the local
layout changes nothing here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..config import Settings, option
from ..log.format import LOG_DIRNAME, list_segments
from ..runtime.children import run_to_end
from ..runtime.durable import fsync_dir
from ..runtime.filelock import lock_exclusive
from ..storage.layout import (
    EVENTS_DIRNAME,
    INTENTS_DIRNAME,
    ROLLER_LOCK_NAME,
    partition_dirs,
    source_segment,
)
from .layout import lake_listing, object_key
from .objectstore import (
    CallCancelled,
    ObjectInfo,
    ObjectStore,
    S3ObjectStore,
    UploadMismatch,
    file_etags,
)
from .purges import REFRESH_S, covers_every_row, purged_directories, read_lake_purges
from .status import UploadStatus, write_status

log = logging.getLogger("inslytic_fast.lake")

# Between passes: a finished file waits at most this long when all is well.
UPLOAD_INTERVAL_S = 1.0
MAX_BACKOFF_S = 30.0
# The roller holds its lock for a roll (seconds); a local delete waits this long for it.
LOCAL_DELETE_LOCK_WAIT_S = 10.0
# A clean stop's last pass, after the final roll (whose budget is also 10 s): a stop stays
# well inside systemd's and compose's stop timeouts even with the store unreachable.
FINAL_PASS_S = 10.0
# After the deadline: the call in flight notices within the store's poll (objectstore.py) and
# the thread then only records its status; joining waits this long more at most.
STOP_JOIN_SLACK_S = 5.0


class StopDeadline:
    """When a stopping uploader gives up (``time.monotonic()``), shared with its store, which
    drops a call in flight once ``passed()``."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at: float | None = None

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at


# The local side: which files are finished ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFile:
    path: Path
    relative: str  # under events/, POSIX separators: the hive path, e.g. project=p/date=d/x
    size: int
    mtime: float


def finished_files(data_dir: Path) -> list[LocalFile]:
    """Parquet files of ``events/`` the roller is done with: their log segment has left the
    log, and no pending compaction intent names them. Oldest first."""
    events_dir = data_dir / EVENTS_DIRNAME
    live = {
        p.name.rsplit(".", 1)[0]
        for segs in list_segments(data_dir / LOG_DIRNAME).values()
        for p in segs
    }
    busy: set[str] = set()
    intents = events_dir / INTENTS_DIRNAME
    if intents.is_dir():
        for entry in os.scandir(intents):
            try:
                intent = orjson.loads(Path(entry.path).read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue  # being written: its compaction has published nothing yet
            busy.add(f"{intent['partition']}/{intent['output']}")
            busy.update(f"{intent['partition']}/{name}" for name in intent["inputs"])
    out = []
    for partition in partition_dirs(events_dir):
        try:
            entries = list(os.scandir(partition))
        except FileNotFoundError:
            continue  # dropped by retention or a purge meanwhile
        for entry in entries:
            if not entry.name.endswith(".parquet") or source_segment(entry.name) in live:
                continue
            relative = Path(entry.path).relative_to(events_dir).as_posix()
            if relative in busy:
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            out.append(LocalFile(Path(entry.path), relative, st.st_size, st.st_mtime))
    out.sort(key=lambda f: f.mtime)
    return out


# The uploader ---------------------------------------------------------------------------------


# (format, level) of the purge check's log lines, for an uploader built without Settings
# (tests, `lake` commands): the configuration's defaults.
DEFAULT_LOG_SETTINGS = (option("log_format").default, option("log_level").default)


class Uploader:
    """Ships finished files to the lake. ``upload_once`` is one pass; ``start`` runs passes on a
    thread with backoff. Counters and the pending backlog go to the status file (status.py)."""

    def __init__(
        self,
        store: ObjectStore,
        data_dir: Path,
        node: str,
        *,
        step_hook: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
        deadline: StopDeadline | None = None,
        log_settings: tuple[str, str] = DEFAULT_LOG_SETTINGS,
    ) -> None:
        self.store = store
        self._log_settings = log_settings  # (format, level) of a child's log lines
        self.data_dir = Path(data_dir)
        self.node = node
        self._step_hook = step_hook
        self._clock = clock
        self.uploaded_files = 0
        self.uploaded_bytes = 0
        self.purged_files = 0
        self.errors = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self._stop = threading.Event()
        self._deadline = deadline or StopDeadline()  # when the final pass ends
        self._thread: threading.Thread | None = None
        self._compacted: set[str] | None = None
        # Hive directory (project=NAME) -> received_before_us of its lake tombstone, and when
        # (time.monotonic()) they were read.
        self._purged: dict[str, int] = {}
        self._purged_read_at: float | None = None

    def _step(self, name: str) -> None:
        if self._step_hook is not None:
            self._step_hook(name)

    # One pass

    def upload_once(self) -> int:
        """Upload every finished file; return how many left the node. Raises on the first
        failure (the pass is retried; files already done stay done)."""
        self._compacted = None  # read lazily, once per pass, only if an object is missing
        files = finished_files(self.data_dir)
        now = time.monotonic()
        stale = self._purged_read_at is None or now - self._purged_read_at >= REFRESH_S
        if files and stale:  # with nothing to send, the store is not asked anything
            self._purged = purged_directories(read_lake_purges(self.store))
            self._purged_read_at = now
        done = 0
        purged = self.purged_files
        for local in files:
            if self._out_of_time():
                break
            if self._ship(local):
                done += 1
        if self.purged_files > purged:
            log.info("lake: deleted %d waiting files a purge covers", self.purged_files - purged)
        return done

    def _out_of_time(self) -> bool:
        return self._deadline.passed()

    def _ship(self, local: LocalFile) -> bool:
        key = object_key(self.node, local.relative)
        self._step("upload:start")
        try:
            if self._purged_entirely(local):
                if not self._delete_local(local.path):
                    return False
                self.purged_files += 1
                self._step("upload:purged")
                return True
            size, etag, etag_in_parts = file_etags(local.path)
        except FileNotFoundError:
            return False  # dropped by retention or a purge since the listing
        found = self.store.head(key)
        if found is None:
            if self._compacted is None:
                self._compacted = lake_listing(self.store)[1]
            if key in self._compacted:
                # Uploaded before, then merged by a lake compaction: its rows are there.
                log.info("lake: %s was uploaded and compacted before; dropping the copy", key)
            else:
                self.store.put_whole_file(key, local.path)
                self._step("upload:put")
                found = self.store.head(key)
                self._check(key, found, size, etag)
                self.uploaded_files += 1
                self.uploaded_bytes += size
        else:
            self._check(key, found, size, etag, etag_in_parts)
        self._step("upload:verified")
        if not self._delete_local(local.path):
            return False
        self._step("upload:local_deleted")
        return True

    def _purged_entirely(self, local: LocalFile) -> bool:
        before_us = self._purged.get(local.relative.split("/", 1)[0])
        if before_us is None:
            return False
        if not local.path.exists():
            raise FileNotFoundError(local.path)
        # Reading the file's newest arrival takes DuckDB: in a short-lived child, so that it is
        # never loaded into the serving process this thread runs in (README "Architecture").
        return run_to_end(
            "inslytic-purge-check", self._log_settings, covers_every_row, local.path, before_us
        )

    def _check(
        self,
        key: str,
        found: ObjectInfo | None,
        size: int,
        etag: str,
        etag_in_parts: str | None = None,
    ) -> None:
        if found is None:
            raise UploadMismatch(f"lake object {key} is missing right after its upload")
        if found.size != size or found.etag not in (etag, etag_in_parts):
            raise UploadMismatch(
                f"lake object {key} is not this node's file (size {found.size} vs {size}, "
                f"ETag {found.etag} vs {etag}); the local copy is kept. Does another node use "
                f"--node-id {self.node!r}?"
            )

    def _delete_local(self, path: Path) -> bool:
        """Under the roller's lock: a reader that paused the roller keeps its files."""
        events_dir = self.data_dir / EVENTS_DIRNAME
        wait = LOCAL_DELETE_LOCK_WAIT_S
        if self._deadline.at is not None:
            wait = max(0.0, min(wait, self._deadline.at - time.monotonic()))
        fd = os.open(events_dir / ROLLER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not lock_exclusive(fd, wait):
                return False  # next pass; the object is verified, so this is cheap
            try:
                os.unlink(path)
            except FileNotFoundError:
                return True
            fsync_dir(path.parent)
            return True
        finally:
            os.close(fd)

    # Status for /ready and /metrics

    def status(self) -> UploadStatus:
        pending = finished_files(self.data_dir)
        now = self._clock()
        return {
            "node": self.node,
            "pending_files": len(pending),
            "pending_bytes": sum(f.size for f in pending),
            "lag_seconds": max(0.0, now - pending[0].mtime) if pending else 0.0,
            "uploaded_files": self.uploaded_files,
            "uploaded_bytes": self.uploaded_bytes,
            "errors": self.errors,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }

    def write_status(self) -> None:
        write_status(self.data_dir, self.status())

    # The thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inslytic-lake", daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, final_pass_s: float = FINAL_PASS_S) -> None:
        """Called once the final roll is done: the thread finishes its pass and makes one more
        over what the roll left, then exits; both end by ``final_pass_s`` from now. The call
        in flight then is dropped (a PUT cut off leaves nothing in the store) and the thread
        ends; what is left waits locally for the next start, which uploads it exactly once."""
        self._deadline.at = time.monotonic() + final_pass_s
        self._purged_read_at = None  # the last pass drops what a purge covers by now
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(final_pass_s + STOP_JOIN_SLACK_S)
        if self._thread.is_alive():  # a call the store cannot drop (a listing): a crash, then
            log.warning("lake: the uploader did not stop in time; the next start resumes")

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            failures = self._pass(failures)
            delay = UPLOAD_INTERVAL_S * 2**failures if failures else UPLOAD_INTERVAL_S
            self._stop.wait(min(delay, MAX_BACKOFF_S))
        # Stopping: the final roll has just written files; send them before the node exits.
        uploaded = self.uploaded_files
        self._pass(failures)
        left = len(finished_files(self.data_dir))
        if left or self.uploaded_files > uploaded:
            log.info(
                "lake: uploaded %d files before exit%s",
                self.uploaded_files - uploaded,
                f"; {left} wait locally for the next start" if left else "",
            )

    def _pass(self, failures: int) -> int:
        """One pass with its outcome recorded; returns the count of failed passes in a row."""
        try:
            self.upload_once()
        except CallCancelled:
            pass  # stopping: what is left waits for the next start (logged by _run)
        except Exception as exc:  # the store, the network, a mismatch: retry later
            failures += 1
            self.errors += 1
            message = f"{type(exc).__name__}: {exc}"
            if self.failing_since is None:
                self.failing_since = self._clock()
            if failures == 1 or message != self.last_error:
                log.error("lake: upload pass failed (%s); files wait locally", message)
            self.last_error = message
        else:
            if failures:
                log.warning("lake: uploads resumed after %d failed passes", failures)
            failures = 0
            self.failing_since = None
            self.last_error = None
        try:
            self.write_status()
        except OSError:
            pass
        return failures


def start_uploader(settings: Settings) -> Uploader:
    """The node's uploader thread (``serve --lake``), started; ``stop()`` it on the way out."""
    uploader = lake_uploader(
        settings.lake,
        settings.s3_endpoint,
        settings.data_dir,
        settings.node,
        log_settings=(settings.log_format, settings.log_level),
    )
    uploader.start()
    return uploader


def lake_uploader(
    lake: str,
    endpoint: str,
    data_dir: Path,
    node: str,
    log_settings: tuple[str, str] = DEFAULT_LOG_SETTINGS,
) -> Uploader:
    """An uploader whose store drops the call in flight at its stop's deadline."""
    deadline = StopDeadline()
    store = S3ObjectStore(lake, endpoint, cancelled=deadline.passed)
    return Uploader(store, data_dir, node, deadline=deadline, log_settings=log_settings)
