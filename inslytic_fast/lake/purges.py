"""Purges in the lake: ``projects delete NAME --purge --coordinator URL --lake URL``.

A cluster holds a project's events in the lake, in each node's waiting Parquet files and in
each node's log. The purge is recorded once, in the lake, as a tombstone ::

    <prefix>/_purges/<NAME>.json      {"project": NAME, "received_before_us": T}

meaning what a node's tombstone means (storage/purges.py): no event of NAME received at or
before T exists any more; T is the purge's time plus the seconds nodes still accept a deleted
key. Each party keeps that promise:

- readers (``query``/``export --lake``, lake/view.py) filter the rows it covers at once, in
  lake objects, this node's waiting files and its log tail alike;
- uploaders (lake/uploader.py) delete a waiting file whose rows it all covers instead of
  uploading it (they re-read tombstones every ``REFRESH_S``);
- lake jobs (lake/jobs.py), every run: delete the objects whose rows it all covers, and
  leave those rows out of what a compaction merges.

An object with rows on both sides of T is kept (readers filter its purged rows): only a
project created again under the same name after T, in the same log segment, makes one.
Tombstones stay, as compaction intents do, so a node that comes back after months still
drops its old files instead of uploading them.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from ..storage.purges import EXPIRY_MARGIN_US, Purge, project_dirs
from .layout import LAKE_EVENTS
from .objectstore import LakeError, ObjectStore

LAKE_PURGES = "_purges"
# How stale an uploader's copy of the tombstones may be: files it uploads meanwhile are
# hidden from readers at once and deleted by the next lake job.
REFRESH_S = 30.0
# Object names that say when their rows were received at the earliest: a rolled file,
# <node>-<worker>-<segment seq: its creation, us>.<n>.parquet, and a compaction output,
# [<node>-]c-<time_ns of the merge>-<8 hex>.parquet (a merge leaves purged rows out).
_SEGMENT_NAME = re.compile(r"-(\d{20})\.\d+\.parquet$")
_COMPACTED_NAME = re.compile(r"(?:^|-)c-(\d{20})-[0-9a-f]{8}\.parquet$")
# Writers racing on one tombstone (two purges of a name at once) retry this often.
RECORD_ATTEMPTS = 10


def tombstone_key(project: str) -> str:
    return f"{LAKE_PURGES}/{project}.json"


def read_lake_purges(store: ObjectStore) -> dict[str, int]:
    """Every tombstone: project -> received_before_us."""
    found: dict[str, int] = {}
    for info in store.list(LAKE_PURGES + "/"):
        try:
            doc = orjson.loads(store.get_bytes(info.key))
        except FileNotFoundError:
            continue
        found[doc["project"]] = int(doc["received_before_us"])
    return found


def record_lake_purge(store: ObjectStore, project: str, received_before_us: int) -> int:
    """Write (or extend, never shorten) ``project``'s tombstone; returns the T it holds."""
    key = tombstone_key(project)
    for _ in range(RECORD_ATTEMPTS):
        current = store.get_with_etag(key)
        etag = None
        if current is not None:
            data, etag = current
            held = int(orjson.loads(data)["received_before_us"])
            if held >= received_before_us:
                return held
        body = orjson.dumps({"project": project, "received_before_us": received_before_us})
        if store.put_if(key, body, etag) is not None:
            return received_before_us
    raise LakeError(f"the lake tombstone of {project!r} kept changing; run the purge again")


def as_local_purges(lake_purges: dict[str, int]) -> list[Purge]:
    """The tombstones as the query's filter takes them (storage.without_purged)."""
    return [Purge(p, before_us, applied=True) for p, before_us in sorted(lake_purges.items())]


def purged_directories(lake_purges: dict[str, int]) -> dict[str, int]:
    """Hive directory name (``project=NAME``, as under events/) -> received_before_us."""
    return {
        directory.name: before_us
        for project, before_us in lake_purges.items()
        for directory in project_dirs(Path(LAKE_EVENTS), project)
    }


def has_objects(store: ObjectStore, project: str) -> bool:
    """Whether the lake holds an object under ``project``'s directory."""
    return any(
        next(iter(store.list(f"{LAKE_EVENTS}/{d.name}/")), None) is not None
        for d in project_dirs(Path(LAKE_EVENTS), project)
    )


def may_hold_covered_rows(key: str, received_before_us: int) -> bool:
    """False when the object's name proves all its rows newer than the bound (with the
    clock-step margin local tombstones use), so a lake job need not download it: the objects
    of a project created again under a purged name are not read by every run forever."""
    name = key.rpartition("/")[2]
    if match := _SEGMENT_NAME.search(name):
        earliest_us = int(match.group(1))
    elif match := _COMPACTED_NAME.search(name):
        earliest_us = int(match.group(1)) // 1000
    else:
        return True
    return earliest_us <= received_before_us + EXPIRY_MARGIN_US


def covers_every_row(path: Path, received_before_us: int) -> bool:
    """Whether each row of the Parquet file ``path`` was received at or before the bound."""
    # Here, not at the top: the uploader (in the serving process) imports this module; it
    # runs this function in a short-lived child (uploader.py), which alone loads DuckDB.
    from ..storage.events_sql import connect_duckdb, sql_string

    con = connect_duckdb(threads=1)
    try:
        row = con.execute(
            f"SELECT max(epoch_us(received_at)) FROM read_parquet({sql_string(path)})"
        ).fetchone()
    finally:
        con.close()
    newest = row[0] if row else None
    return newest is None or newest <= received_before_us
