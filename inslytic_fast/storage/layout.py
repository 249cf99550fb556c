"""Where rolled events live on disk, and how readers tell a published file from one mid-roll.

Layout under ``<data_dir>/events``::

    project=<p>/date=<YYYY-MM-DD>/<segment>.<i>.parquet   rolled from log segment <segment>;
                                                          date = UTC day the events arrived
    project=<p>/date=<YYYY-MM-DD>/c-<id>.parquet          output of a compaction
    _compactions/<id>.json                                compaction intent (inputs -> output)
    _purges/<project>.json                                purge tombstone (purges.py)
    .staging/                                             scratch: never read, wiped by recover()
    .trash/                                               partitions being dropped
    .roller.lock                                          one roller process at a time

Readers (query.py, the lake uploader) take no lock. They ignore a ``<segment>.*.parquet`` file
while its segment is still in the log (a half-published roll is read from the log, never
twice), and drop the inputs of a compaction intent whose output exists.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypedDict

from ..runtime.durable import fsync_dir, make_dirs_durable
from ..runtime.filelock import lock_exclusive

EVENTS_DIRNAME = "events"
STAGING_DIRNAME = ".staging"
TRASH_DIRNAME = ".trash"
INTENTS_DIRNAME = "_compactions"
COMPACTED_PREFIX = "c-"
ROLLER_LOCK_NAME = ".roller.lock"
# DuckDB spill files; outside .staging, which recover() wipes while the connection lives.
DUCKDB_TEMP_DIRNAME = ".duckdb_tmp"


class CompactionIntent(TypedDict):
    """``_compactions/<id>.json``: written durably before the output appears."""

    partition: str  # relative to the events directory, e.g. "project=shop/date=2026-02-16"
    output: str  # file name of the merged output in that partition
    inputs: list[str]  # file names it replaces


def partition_dir(events_dir: Path, project: str, day: dt.date) -> Path:
    """The directory of ``project``'s events that arrived on UTC ``day``."""
    return events_dir / f"project={project}" / f"date={day.isoformat()}"


def partition_dirs(events_dir: Path) -> list[Path]:
    """Every ``project=*/date=*`` directory."""
    found: list[Path] = []
    try:
        projects = list(os.scandir(events_dir))
    except FileNotFoundError:
        return found
    for project in projects:
        if not project.name.startswith("project=") or not project.is_dir():
            continue
        try:
            dates = list(os.scandir(project.path))
        except FileNotFoundError:
            continue
        found.extend(Path(d.path) for d in dates if d.name.startswith("date=") and d.is_dir())
    return found


def source_segment(parquet_name: str) -> str:
    """The segment stem a rolled Parquet file came from (``c-...`` for compaction outputs)."""
    return parquet_name.split(".", 1)[0]


def compaction_started_ns(parquet_name: str) -> int | None:
    """When the compaction that wrote ``parquet_name`` chose its inputs (None: not compacted)."""
    if not parquet_name.startswith(COMPACTED_PREFIX):
        return None
    try:
        return int(parquet_name[len(COMPACTED_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


def drop_dir(directory: Path, trash_dir: Path) -> None:
    """Delete a partition directory: renamed into trash first, so it vanishes from readers at
    once and recover() finishes the delete after a crash. The caller holds the roller lock."""
    make_dirs_durable(trash_dir)
    doomed = trash_dir / uuid.uuid4().hex
    os.rename(directory, doomed)
    fsync_dir(directory.parent)
    shutil.rmtree(doomed, ignore_errors=True)


@contextlib.contextmanager
def roller_lock(events_dir: Path, wait_s: float) -> Iterator[bool]:
    """The exclusive flock on ``.roller.lock``: True while held, False if another process
    still held it after ``wait_s`` (a roller, the CLI applying purges, or a reader pausing
    the roller for one snapshot)."""
    make_dirs_durable(events_dir)
    fd = os.open(events_dir / ROLLER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        yield lock_exclusive(fd, wait_s)
    finally:
        os.close(fd)  # releases the flock


def wipe_scratch(events_dir: Path) -> None:
    """Empty staging and trash: what a crash left there is never read. Under the roller lock."""
    for scratch in (events_dir / STAGING_DIRNAME, events_dir / TRASH_DIRNAME):
        if scratch.exists():
            for entry in os.scandir(scratch):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
