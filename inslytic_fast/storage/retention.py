"""Retention: whole ``date=`` partitions dropped once their events are past ``retention_days``.

Rolls name partitions after the UTC date of arrival. A partition written before that layout is
named after its events' own date, so one dated before the cutoff is dropped only once its
newest ``received_at`` is before the cutoff too.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from urllib.parse import unquote

import duckdb

from .events_sql import sql_files
from .layout import partition_dirs


def retention_cutoff(now: float, retention_days: int) -> dt.date:
    """The oldest UTC date kept at ``now`` (seconds since the epoch): older partitions go."""
    today = dt.datetime.fromtimestamp(now, dt.UTC)
    return (today - dt.timedelta(days=retention_days)).date()


def expired_partitions(
    con: duckdb.DuckDBPyConnection, events_dir: Path, cutoff: dt.date
) -> list[Path]:
    """The partitions whose events all arrived before ``cutoff``."""
    expired: list[Path] = []
    for partition in partition_dirs(events_dir):
        try:
            day = dt.date.fromisoformat(unquote(partition.name.removeprefix("date=")))
        except ValueError:
            continue
        if day < cutoff and not _arrived_since(con, partition, cutoff):
            expired.append(partition)
    return expired


def _arrived_since(con: duckdb.DuckDBPyConnection, partition: Path, cutoff: dt.date) -> bool:
    files = [e.path for e in os.scandir(partition) if e.name.endswith(".parquet")]
    if not files:
        return False
    row = con.execute(
        f"SELECT max(received_at) FROM read_parquet({sql_files(files)}, union_by_name=true)"
    ).fetchone()
    newest = None if row is None else row[0]
    return newest is not None and newest.date() >= cutoff
