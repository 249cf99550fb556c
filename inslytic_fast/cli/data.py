"""`inslytic-fast query` and `inslytic-fast export`: SQL over the ``events`` relation.

Both read a snapshot of the data directory (Parquet data set + acknowledged records still in
the log) without locks, so they work while the server runs, after a crash, or with no server.

Exit codes: 0 ok, 1 operational error (unreadable data directory, I/O), 2 usage error
(bad option, or SQL that does not parse or bind).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import decimal
import json
import os
import sys
import uuid
from pathlib import Path

import orjson

from inslytic_fast.config import env_or_default, option
from inslytic_fast.event_columns import EVENT_COLUMN_NAMES
from inslytic_fast.runtime.durable import fsync_file

DATA_DIR = option("data_dir")
QUERY_FORMATS = ("table", "csv", "json", "ndjson")
EXPORT_FORMATS = ("parquet", "csv", "ndjson")
EXPORT_EXTENSIONS = {"parquet": "parquet", "csv": "csv", "ndjson": "ndjson"}
# The ingest format for timestamps (RFC 3339, UTC, microseconds), used for text exports.
RFC3339_SQL_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

_ORJSON_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC | orjson.OPT_NON_STR_KEYS


def register(subparsers) -> None:
    query = subparsers.add_parser(
        "query",
        help="run SQL over the events relation",
        description=(
            "Run DuckDB SQL over the relation `events` (Parquet data set plus the acknowledged "
            "events still in the commit log). Works while the server runs and without it. "
            "Columns: " + ", ".join(EVENT_COLUMN_NAMES) + ". Timestamps are UTC."
        ),
        epilog='example: inslytic-fast query "SELECT event_name, count(*) FROM events '
        "WHERE properties_json->>'path' = '/pricing' GROUP BY ALL\"",
    )
    query.add_argument("sql", help="the SQL to run (the relation is called events); - reads stdin")
    _add_data_dir(query)
    _add_lake(query)
    query.add_argument(
        "--format",
        choices=QUERY_FORMATS,
        default="table",
        help="table: aligned text (default); csv; json: one array of row objects; ndjson",
    )
    query.set_defaults(func=cmd_query)

    export = subparsers.add_parser(
        "export",
        help="write events to a file for another system",
        description=(
            "Write the events (optionally one project and a time range on `timestamp`) to "
            "OUT/events.<format>, sorted by timestamp. The file appears atomically."
        ),
    )
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    export.add_argument("--project", help="only this project")
    export.add_argument(
        "--since", type=_timestamp, metavar="T", help="from T inclusive (date or RFC 3339)"
    )
    export.add_argument(
        "--until", type=_timestamp, metavar="T", help="up to T exclusive (date or RFC 3339)"
    )
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="parquet",
        help="parquet (ZSTD, default); csv or ndjson with RFC 3339 timestamps",
    )
    export.add_argument("--force", action="store_true", help="replace an existing export file")
    _add_data_dir(export)
    _add_lake(export)
    export.set_defaults(func=cmd_export)


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        default=Path(env_or_default("data_dir")),
        help=f"data directory (default: ${DATA_DIR.env} or {DATA_DIR.default})",
    )


def _add_lake(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lake",
        metavar="URL",
        default=env_or_default("lake") or None,
        help="s3://BUCKET/PREFIX: read the cluster's lake plus this data dir's events not "
        f"uploaded yet (the data dir may be absent); env {option('lake').env}",
    )
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        default=env_or_default("s3_endpoint"),
        help=f"S3 API endpoint for --lake; env {option('s3_endpoint').env}",
    )
    parser.add_argument(
        "--node-id",
        default=env_or_default("node_id"),
        metavar="NAME",
        help="the node id this data dir serves with (default: the one its server last used, "
        "else the host name, as serve's)",
    )


def _lake_view(args: argparse.Namespace):
    """The lake.LakeView for --lake, or None; raises LakeError on a bad URL or no client."""
    if not args.lake:
        return None
    from inslytic_fast.config import Settings
    from inslytic_fast.lake.objectstore import S3ObjectStore
    from inslytic_fast.lake.status import read_status
    from inslytic_fast.lake.view import LakeView, default_cache_dir

    store = S3ObjectStore(args.lake, args.s3_endpoint)
    status = read_status(args.data_dir)
    node = args.node_id or (status["node"] if status else None)
    node = Settings(node_id=node or "").node
    return LakeView(store, node, args.data_dir, default_cache_dir(args.lake))


def _timestamp(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use a date (2026-02-16) or RFC 3339 (2026-02-16T10:30:00Z)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _error(message: str) -> None:
    print(f"inslytic-fast: error: {message}", file=sys.stderr)


def _check_data_dir(data_dir: Path, lake: str | None = None) -> bool:
    if not data_dir.is_dir() and not lake:
        _error(f"no data directory at {data_dir} (use --data-dir or ${DATA_DIR.env})")
        return False
    return True


def _run(data_dir: Path, sql: str, params=None, args: argparse.Namespace | None = None):
    """run_query with errors turned into (exit code, None)."""
    # DuckDB and the query stack are loaded here, not at the top: `serve` and its spawned
    # workers import this module too (cli/__init__), and DuckDB stays out of serving processes.
    import duckdb

    from inslytic_fast.lake.objectstore import LakeError
    from inslytic_fast.storage.query import SnapshotError, run_query

    # Errors in the user's SQL rather than in the data directory.
    usage_errors = (duckdb.ParserException, duckdb.BinderException, duckdb.CatalogException)
    try:
        lake = _lake_view(args) if args is not None else None
        return 0, run_query(data_dir, sql, params, lake=lake)
    except usage_errors as exc:
        _error(_one_line(exc))
        return 2, None
    except (duckdb.Error, SnapshotError, OSError, LakeError) as exc:
        _error(_one_line(exc))
        return 1, None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# -- query ---------------------------------------------------------------------------------


def cmd_query(args: argparse.Namespace) -> int:
    if not _check_data_dir(args.data_dir, args.lake):
        return 1
    sql = sys.stdin.read() if args.sql == "-" else args.sql
    if not sql.strip():
        _error("empty SQL")
        return 2
    code, result = _run(args.data_dir, sql, None, args)
    if result is None:
        return code
    columns, rows = result
    out = sys.stdout
    try:
        if args.format == "table":
            write_table(out, columns, rows)
        elif args.format == "csv":
            write_csv(out, columns, rows)
        elif args.format == "json":
            out.write(format_json(columns, rows))
        else:
            for row in rows:
                out.write(dumps_json(dict(zip(columns, row, strict=True))))
                out.write("\n")
        out.flush()
    except BrokenPipeError:
        # `inslytic-fast query ... | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 0


def _json_default(value):
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)  # whatever else DuckDB returns (e.g. BIT): its text form beats an error


def format_json(columns: list[str], rows: list[tuple]) -> str:
    """One JSON array of row objects (an empty result is ``[]``)."""
    return dumps_json([dict(zip(columns, row, strict=True)) for row in rows]) + "\n"


def dumps_json(value) -> str:
    try:
        return orjson.dumps(value, default=_json_default, option=_ORJSON_OPTIONS).decode()
    except TypeError:
        # orjson stops at 64-bit integers; DuckDB has HUGEINT/UHUGEINT. The stdlib is slower
        # but exact.
        return json.dumps(value, default=_stdlib_default, separators=(",", ":"))


def _stdlib_default(value):
    if isinstance(value, dt.datetime):
        return text_value(value)
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return _json_default(value)


def text_value(value, null: str = "") -> str:
    """A cell as text: RFC 3339 UTC timestamps, JSON for maps/lists, true/false."""
    if value is None:
        return null
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
            return value.replace(tzinfo=None).isoformat() + "Z"
        return value.isoformat()
    if isinstance(value, (dict, list, tuple)):
        return dumps_json(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def write_csv(out, columns: list[str], rows: list[tuple]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([text_value(v) for v in row])


def _is_numeric_column(values: list) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool) for v in present
    )


def write_table(out, columns: list[str], rows: list[tuple]) -> None:
    """Aligned text: numbers right-aligned, NULL spelled out, a row count at the end."""
    if not columns:
        return
    cells = [[text_value(v, "NULL").replace("\n", "\\n") for v in row] for row in rows]
    numeric = [_is_numeric_column([row[i] for row in rows]) for i in range(len(columns))]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, cell in enumerate(row):
            if len(cell) > widths[i]:
                widths[i] = len(cell)

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(widths[i]) if numeric[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return "  ".join(parts).rstrip()

    out.write(line(list(columns)) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        out.write(line(row) + "\n")
    out.write(f"({len(rows)} row{'s' if len(rows) != 1 else ''})\n")


# -- export --------------------------------------------------------------------------------


def _project_known(data_dir: Path, name: str) -> bool:
    """Whether the key catalog names the project (True when there is no catalog to ask)."""
    from inslytic_fast.ingest.catalog import CatalogError
    from inslytic_fast.ingest.keyring import KeyRing

    keyring = KeyRing(data_dir)
    if not keyring.catalog_path.exists():
        return True
    try:
        keyring.load()
    except CatalogError:
        return True
    return name in keyring.projects


def export_select_sql(fmt: str) -> str:
    """The events columns; text formats carry RFC 3339 timestamps and JSON properties."""
    if fmt == "parquet":
        return ", ".join(f'"{c}"' for c in EVENT_COLUMN_NAMES)
    columns = []
    for name in EVENT_COLUMN_NAMES:
        if name in ("timestamp", "received_at"):
            columns.append(f'strftime("{name}", \'{RFC3339_SQL_FORMAT}\') AS "{name}"')
        elif name == "properties" and fmt == "csv":
            columns.append("CAST(to_json(properties) AS VARCHAR) AS properties")
        else:
            columns.append(f'"{name}"')
    return ", ".join(columns)


def cmd_export(args: argparse.Namespace) -> int:
    from inslytic_fast.storage.events_sql import sql_string  # loads DuckDB: see _run

    if not _check_data_dir(args.data_dir, args.lake):
        return 1
    if args.since and args.until and args.since >= args.until:
        _error("--since must be earlier than --until")
        return 2
    out_dir: Path = args.out
    target = out_dir / f"events.{EXPORT_EXTENSIONS[args.format]}"
    if target.exists() and not args.force:
        _error(f"{target} already exists (use --force to replace it)")
        return 1
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _error(f"cannot create {out_dir}: {exc}")
        return 1
    where, params = [], []
    if args.project:
        where.append("project = ?")
        params.append(args.project)
    if args.since:
        where.append('"timestamp" >= ?')
        params.append(args.since)
    if args.until:
        where.append('"timestamp" < ?')
        params.append(args.until)
    where_sql = ("WHERE " + " AND ".join(where)) if where else ""
    options = {
        "parquet": "FORMAT parquet, COMPRESSION zstd",
        "csv": "FORMAT csv, HEADER true",
        "ndjson": "FORMAT json",
    }[args.format]
    tmp = out_dir / f".{target.name}.{os.getpid()}.tmp"
    sql = (
        f"COPY (SELECT {export_select_sql(args.format)} FROM events {where_sql} "
        f'ORDER BY "timestamp", event_id) TO {sql_string(tmp)} ({options})'
    )
    code, result = _run(args.data_dir, sql, params, args)
    if result is None:
        tmp.unlink(missing_ok=True)
        return code
    count = result[1][0][0] if result[1] else 0
    if count == 0 and args.project and not _project_known(args.data_dir, args.project):
        # A typo would otherwise be an empty file and exit 0. A deleted project's events stay
        # and still export: only a name with neither events nor a catalog entry is refused.
        tmp.unlink(missing_ok=True)
        _error(f"no project named {args.project!r} (inslytic-fast projects list shows them)")
        return 1
    fsync_file(tmp)
    os.replace(tmp, target)
    print(f"exported {count} events to {target}", file=sys.stderr)
    return 0
