"""Purge tombstones: `projects delete NAME --purge` as a promise every reader and writer keeps.

Removing ``events/project=NAME/`` alone is not a purge while a server runs: the project's events
still in the commit log would be rolled back into that directory, and ``query`` shows the log
tail until then. So a purge is recorded first, durably, as a tombstone::

    <data_dir>/events/_purges/<NAME>.json
    {"project": NAME, "received_before_us": T, "applied": false}

and means: no event of project NAME received at or before T exists any more. The roller drops
such events from every segment it rolls, ``query`` filters them out of the Parquet files and
the log alike, and the files already under ``project=NAME/`` are removed under the roller's
lock (by the CLI at once, or by the roller's next pass), which then marks the tombstone
applied. T is the purge's time plus PURGE_GRACE_S: servers notice the deleted project's keys
only at their next catalog check, and events accepted until then must go too.

A tombstone stays while the log may hold events it covers, and the filter is what keeps them
out. Then it expires (``expired``): once applied, and once every record left in the log was
received after T -- every non-empty segment was created after T, with an hour's margin for a
clock stepped back -- the roller deletes it, so tombstones do not pile up (2,000 of them cost
every query 0.8 s). A project of the same name can be created again once its tombstone is
applied and T has passed; its events are newer than T and untouched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from ..ingest.catalog import DELETED_KEYS_ACCEPTED_FOR_S
from ..log.format import list_segments, parse_segment_name
from ..runtime.durable import fsync_dir, make_dirs_durable, write_file_durably
from .layout import EVENTS_DIRNAME, TRASH_DIRNAME, drop_dir, roller_lock

PURGES_DIRNAME = "_purges"
# Events sent with the deleted project's keys until every server has noticed the deletion.
PURGE_GRACE_S = DELETED_KEYS_ACCEPTED_FOR_S
# Segments are named after the wall clock at their creation; an NTP step back could date a
# record before its segment. An hour covers any step a sane clock takes.
EXPIRY_MARGIN_US = 3600 * 1_000_000


@dataclass(frozen=True, slots=True)
class Purge:
    project: str
    received_before_us: int  # inclusive: events received at or before this are purged
    applied: bool  # the Parquet files that held them are gone


def project_dirs(events_dir: Path, project: str) -> list[Path]:
    """Where ``project``'s Parquet files may be: ``project=NAME``, and for a name equal (in
    any case) to __HIVE_DEFAULT_PARTITION__ also ``project=%5F_...``, as DuckDB's hive writer
    escaped it before the roller named partitions itself."""
    dirs = [events_dir / f"project={project}"]
    if project.lower() == "__hive_default_partition__":
        dirs.append(events_dir / f"project=%5F{project[1:]}")
    return dirs


def purges_dir(events_dir: Path) -> Path:
    return events_dir / PURGES_DIRNAME


def read_purges(events_dir: Path) -> list[Purge]:
    """Every tombstone, sorted by project (a file being replaced is read whole or not at all)."""
    found: list[Purge] = []
    try:
        entries = sorted(os.scandir(purges_dir(events_dir)), key=lambda e: e.name)
    except FileNotFoundError:
        return found
    for entry in entries:
        if not entry.name.endswith(".json"):
            continue  # a write -> rename in progress
        purge = _read(Path(entry.path))
        if purge is not None:
            found.append(purge)
    return found


def _read(path: Path) -> Purge | None:
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return Purge(doc["project"], int(doc["received_before_us"]), bool(doc["applied"]))


def find_purge(events_dir: Path, project: str) -> Purge | None:
    """The tombstone of ``project``: one file read, whatever the number of tombstones."""
    return _read(purges_dir(events_dir) / f"{project}.json")


def expired(purge: Purge, nonempty_segment_seqs: list[int], now: float) -> bool:
    """Whether no event the tombstone covers can exist any more (see the module docstring);
    segment sequence numbers are their creation time in microseconds."""
    safe_after = purge.received_before_us + EXPIRY_MARGIN_US
    return (
        purge.applied
        and now * 1_000_000 > safe_after
        and all(seq > safe_after for seq in nonempty_segment_seqs)
    )


def remove_purge(events_dir: Path, purge: Purge) -> None:
    (purges_dir(events_dir) / f"{purge.project}.json").unlink(missing_ok=True)


def remove_expired_purges(events_dir: Path, log_dir: Path, now: float) -> None:
    """Delete the tombstones nothing in the log needs any more (``expired``); the roller does
    this after each pass."""
    purges = read_purges(events_dir)
    if not purges:
        return
    seqs: list[int] = []
    for segments in list_segments(log_dir).values():
        for path in segments:
            try:
                if path.stat().st_size == 0:
                    continue
            except FileNotFoundError:
                continue  # rolled meanwhile
            parsed = parse_segment_name(path.name)
            if parsed is not None:  # list_segments lists only names it parses
                seqs.append(parsed[1])
    gone = [p for p in purges if expired(p, seqs, now)]
    for purge in gone:
        remove_purge(events_dir, purge)
    if gone:
        fsync_dir(purges_dir(events_dir))


def record_purge(events_dir: Path, project: str, now: float | None = None) -> Purge:
    """Write (or extend) the tombstone of ``project``: durable before this returns."""
    now = time.time() if now is None else now
    before_us = int((now + PURGE_GRACE_S) * 1_000_000)
    previous = find_purge(events_dir, project)
    if previous is not None:
        before_us = max(before_us, previous.received_before_us)
    purge = Purge(project, before_us, applied=False)
    _write(events_dir, purge)
    return purge


def mark_applied(events_dir: Path, purge: Purge) -> Purge:
    done = Purge(purge.project, purge.received_before_us, applied=True)
    _write(events_dir, done)
    return done


def _write(events_dir: Path, purge: Purge) -> None:
    directory = purges_dir(events_dir)
    make_dirs_durable(directory)
    doc = {
        "project": purge.project,
        "received_before_us": purge.received_before_us,
        "applied": purge.applied,
    }
    write_file_durably(directory / f"{purge.project}.json", orjson.dumps(doc))


def why_name_is_blocked(events_dir: Path, project: str, now: float | None = None) -> str | None:
    """Why ``project`` cannot be created again yet (None: it can)."""
    purge = find_purge(events_dir, project)
    if purge is None:
        return None
    now = time.time() if now is None else now
    if not purge.applied:
        return f"project {project!r} is still being purged; try again in a few seconds"
    wait = purge.received_before_us / 1_000_000 - now
    if wait > 0:
        return f"project {project!r} was just purged; its name is free again in {wait:.0f} s"
    return None


def apply_purges_locked(events_dir: Path) -> int:
    """Remove ``project=NAME/`` of every purge not yet applied; the caller holds the roller
    lock. All of it is purgeable: a purged name cannot be created again before this ran."""
    applied = 0
    for purge in read_purges(events_dir):
        if purge.applied:
            continue
        for partition in project_dirs(events_dir, purge.project):
            if partition.exists():
                drop_dir(partition, events_dir / TRASH_DIRNAME)
        mark_applied(events_dir, purge)
        applied += 1
    return applied


def apply_purges_now(data_dir: Path, wait_s: float) -> bool:
    """Apply recorded purges under the roller lock, waiting up to ``wait_s`` for a roller pass
    to finish. False if the lock stayed busy: the roller's next pass applies them then."""
    events_dir = Path(data_dir) / EVENTS_DIRNAME
    with roller_lock(events_dir, wait_s) as mine:
        if mine:
            apply_purges_locked(events_dir)
        return mine
