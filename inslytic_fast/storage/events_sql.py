"""The DuckDB SQL that turns commit log event lines into the ``events`` relation, and back out.

Both readers of the log feed DuckDB event lines (event_lines.py), never records as written:
the roller COPYs these rows to Parquet and query.py reads the same SELECT over the log tail, so
a record reads the same before and after its roll. The columns are event_columns.py's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import duckdb

from .. import event_columns
from ..log.format import MAX_RECORD_BYTES
from .purges import Purge

HIVE_TYPES_SQL = "{'project': 'VARCHAR', 'date': 'DATE'}"
# Rows per Parquet row group, rolls and compactions alike. DuckDB's default (122,880) made the
# writer hold a whole 64 MiB segment's rows (~250 MB); 16,384 bounds it, and finer row-group
# statistics on ``timestamp`` (events arrive roughly in time order) prune time ranges better.
PARQUET_ROW_GROUP_ROWS = 16_384
# DuckDB's default ZSTD level (3): level 1 measured no cheaper, and wrote files twice the size
# (bench/micro_storage.py roll_cpu).
PARQUET_OPTIONS_SQL = f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {PARQUET_ROW_GROUP_ROWS})"
# read_json's buffer is sized to the longest line it reads (json_buffer_bytes), but not below
# this: a 1 MiB read is already cheap per byte.
MIN_JSON_BUFFER_BYTES = 1024 * 1024


def sql_string(value: str | os.PathLike[str]) -> str:
    return "'" + os.fspath(value).replace("'", "''") + "'"


def sql_files(paths: Path | str | list[str]) -> str:
    """One path, or a list of them, as a DuckDB file list."""
    if isinstance(paths, list):
        return "[" + ", ".join(sql_string(p) for p in paths) + "]"
    return sql_string(paths)


def connect_duckdb(
    *,
    threads: int | None = None,
    temp_dir: Path | None = None,
    memory_limit: str | None = None,
    temp_limit: str | None = None,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection that reads and prints timestamps in UTC, and prints
    nothing else: DuckDB's progress bar goes to stdout (a TTY or not) once a statement runs
    past 2 s, which put bars into `query`'s piped results and the roller's into the
    server's output."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET enable_progress_bar = false")
    con.execute("SET enable_progress_bar_print = false")  # stays off if a caller enables it
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    if temp_dir is not None:
        con.execute(f"SET temp_directory = {sql_string(temp_dir)}")
    if memory_limit is not None:
        con.execute(f"SET memory_limit = {sql_string(memory_limit)}")
    if temp_limit is not None:
        con.execute(f"SET max_temp_directory_size = {sql_string(temp_limit)}")
    return con


def json_buffer_bytes(longest_line: int) -> int:
    """read_json's maximum_object_size for lines of at most ``longest_line`` bytes. DuckDB
    allocates two buffers of it up front: 64 MiB (MAX_RECORD_BYTES) for every read cost the
    roller 128 MiB of RSS, and an out-of-memory error under a tighter memory limit."""
    return max(MIN_JSON_BUFFER_BYTES, min(MAX_RECORD_BYTES, longest_line + 1))


def events_from_ndjson_sql(
    ndjson_path: Path | str | list[str], longest_line: int = MAX_RECORD_BYTES
) -> str:
    """SELECT turning event lines into the stored columns of ``events`` rows (the columns
    and their log fields: event_columns.py)."""
    source = (
        f"read_json({sql_files(ndjson_path)}, format='newline_delimited', "
        f"maximum_object_size={json_buffer_bytes(longest_line)}, "
        f"columns={event_columns.EVENT_LINE_COLUMNS_SQL})"
    )
    return event_columns.events_select_sql(source)


def without_purged(select: str, purges: Iterable[Purge]) -> str:
    """``select`` (rows of the events relation) minus the events purge tombstones cover."""
    purged = " OR ".join(
        f"(project = {sql_string(p.project)} AND epoch_us(received_at) <= {p.received_before_us})"
        for p in purges
    )
    if not purged:
        return select
    return f"SELECT * FROM ({select}) WHERE NOT ({purged})"


# Written to a rolled file: the stored columns; the project is its hive directory, as the
# date is.
_ROLLED_COLUMNS_SQL = ", ".join(
    f'"{name}"' for name in event_columns.STORED_COLUMN_NAMES if name != "project"
)


def copy_events_sql(
    ndjson: str | list[str], out: Path, purges: list[Purge], longest_line: int = MAX_RECORD_BYTES
) -> str:
    """COPY one piece of event lines to a Parquet file.

    Not sorted: an ORDER BY "timestamp" cost the roll and, far more, compaction CPU and memory
    (bench/micro_storage.py). Events arrive roughly in time order, so small row groups'
    statistics prune time ranges without it.
    """
    select = without_purged(events_from_ndjson_sql(ndjson, longest_line), purges)
    return (
        f"COPY (SELECT {_ROLLED_COLUMNS_SQL} FROM ({select})) "
        f"TO {sql_string(out)} {PARQUET_OPTIONS_SQL}"
    )


def merge_parquet_sql(inputs: list[Path], out: Path) -> str:
    """COPY the rows of ``inputs`` (older files may lack newer columns) into one file."""
    files = sql_files([os.fspath(path) for path in inputs])
    return (
        f"COPY (SELECT * FROM read_parquet({files}, union_by_name=true)) TO "
        f"{sql_string(out)} {PARQUET_OPTIONS_SQL}"
    )
