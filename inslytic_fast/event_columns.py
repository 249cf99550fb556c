"""The ``events`` relation, declared once: each column, the log field it comes from, and how.

A commit log record is ``{"p","r","b","k"?,"e":[event, ...]}`` (log/format.py); readers see it
as one flat line per event, the envelope's keys and the event's index ``i`` first
(storage/event_lines.py). Every event object uses the camelCase keys below; every key but the
five /v1/ingest requires is optional (absent = NULL). ``/v1/ingest`` writes the API
reference's fields; the Segment-spec routes (segment.py) write the same fields mapped from each
message plus the Segment-only ones.

Everything else is derived from this table: the roller and the log-tail reader
(storage/events_sql.py) turn event lines into the *stored* columns with
``events_select_sql``; the query views add the *derived* ones (``EVENTS_VIEW_COLUMNS_SQL``) and
use ``EVENT_COLUMNS_SQL`` and ``NO_EVENTS_SQL``; DESCRIBE, export and the OpenAPI text read
``EVENT_COLUMNS``; the ingest schema (ingest/schema.py) names its Struct attributes after
``COLUMN_OF_LOG_KEY`` (tests/test_event_columns.py checks its field kinds against the types
here). A column added here flows log -> Parquet -> query with no other change; Parquet files
written before it existed read it as NULL (``union_by_name``).

Types of the JSON columns: ``properties_json``, ``traits``, ``context`` and ``integrations``
hold the client's JSON exactly as sent (numbers, booleans, nesting kept), queryable with
DuckDB's JSON functions (``properties_json->>'$.amount'``). ``properties`` stays the flat
``MAP(VARCHAR, VARCHAR)`` the API reference describes: for a typed value it holds the value's
JSON text (``42``, ``true``, ``{"a":1}``), a string value as itself. It is *derived*: computed
from ``properties_json`` when read, not written to Parquet (building and writing the MAP was a
third of the roll's CPU; the figures are in the commit message). Files rolled before that keep
their stored ``properties``, which the views use as they are.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EventColumn:
    name: str  # column of the events relation
    sql_type: str  # its DuckDB type
    log_key: str | None  # key in a log event object (None: from the record envelope)
    log_type: str | None  # the type read_json reads that key as
    # stored: SQL over one event line (its log keys, the envelope's p/r/b/k/i, `received`,
    # `parsed_ts`); derived: SQL over the stored columns, evaluated when the column is read.
    select: str
    description: str
    stored: bool = True  # written to Parquet; False: derived when read (see the module doc)


def _plain(name: str, sql_type: str, log_key: str, description: str) -> EventColumn:
    return EventColumn(name, sql_type, log_key, sql_type, f'"{log_key}"', description)


# Order = the relation's column order; new columns go at the end (exports and SELECT * keep
# their existing positions).
EVENT_COLUMN_SPECS: tuple[EventColumn, ...] = (
    EventColumn("event_id", "VARCHAR", None, None, "b || printf('%03x', i)",
                "UUIDv7 of the batch with the event's index in the last 3 hex digits."),
    EventColumn("project", "VARCHAR", None, None, "p", "Project the key belongs to."),
    _plain("event_name", "VARCHAR", "eventName",
           "eventName; Segment: track.event, page.name, screen.name."),
    # The ingest schema only admits RFC 3339 UTC timestamps; should one ever fail to parse,
    # received_at stands in so a single bad record can never wedge the roller.
    EventColumn("timestamp", "TIMESTAMPTZ", "timestamp", "VARCHAR",
                "COALESCE(parsed_ts, received)",
                "When the event happened (UTC); Segment: corrected for client clock skew."),
    EventColumn("received_at", "TIMESTAMPTZ", None, None, "received",
                "When the server accepted the batch (UTC)."),
    _plain("anonymous_id", "VARCHAR", "anonymousId", "Anonymous device/session identifier."),
    _plain("session_id", "VARCHAR", "sessionId", "Session identifier."),
    _plain("user_id", "VARCHAR", "userId", "Identified user ID."),
    _plain("consent_given", "BOOLEAN", "consentGiven", "Whether consent was given."),
    EventColumn("properties", "MAP(VARCHAR, VARCHAR)", "properties", "JSON",
                "json_transform(properties_json, '\"MAP(VARCHAR, VARCHAR)\"')",
                "Properties as strings (typed values as their JSON text).", stored=False),
    _plain("page_url", "VARCHAR", "pageUrl", "Full URL of the page."),
    _plain("page_title", "VARCHAR", "pageTitle", "Title of the page."),
    _plain("referrer", "VARCHAR", "referrer", "Referrer URL."),
    _plain("utm_source", "VARCHAR", "utmSource", "UTM source."),
    _plain("utm_medium", "VARCHAR", "utmMedium", "UTM medium."),
    _plain("utm_campaign", "VARCHAR", "utmCampaign", "UTM campaign."),
    _plain("device_type", "VARCHAR", "deviceType", "desktop, mobile or tablet."),
    _plain("browser", "VARCHAR", "browser", "Browser name."),
    _plain("os", "VARCHAR", "os", "Operating system."),
    # Segment-spec messages (NULL for /v1/ingest events unless noted).
    _plain("type", "VARCHAR", "type",
           "Segment message type: track, page, screen, identify, group, alias."),
    _plain("message_id", "VARCHAR", "messageId", "Segment messageId (the dedup key)."),
    EventColumn("sent_at", "TIMESTAMPTZ", "sentAt", "VARCHAR",
                'TRY_CAST("sentAt" AS TIMESTAMPTZ)', "The client's sentAt, as sent."),
    EventColumn("original_timestamp", "TIMESTAMPTZ", "originalTimestamp", "VARCHAR",
                'TRY_CAST("originalTimestamp" AS TIMESTAMPTZ)',
                "The client's timestamp before clock-skew correction, as sent."),
    _plain("group_id", "VARCHAR", "groupId", "group.groupId."),
    _plain("previous_id", "VARCHAR", "previousId", "alias.previousId."),
    EventColumn("properties_json", "JSON", "properties", "JSON",
                "CASE WHEN properties IS NULL THEN '{}'::JSON ELSE properties END",
                "Properties with their JSON types kept (every event, /v1/ingest included)."),
    _plain("traits", "JSON", "traits", "identify/group traits, as sent."),
    _plain("context", "JSON", "context", "Segment context, as sent."),
    _plain("integrations", "JSON", "integrations", "Segment integrations, as sent."),
    _plain("user_agent", "VARCHAR", "userAgent", "context.userAgent."),
    EventColumn("idempotency_key", "VARCHAR", None, None, "k",
                "/v1/ingest: the batch's Idempotency-Key header."),
)  # fmt: skip

# Everything below is derived from EVENT_COLUMN_SPECS.

EVENT_COLUMNS: tuple[tuple[str, str], ...] = tuple((c.name, c.sql_type) for c in EVENT_COLUMN_SPECS)
EVENT_COLUMN_NAMES = tuple(name for name, _ in EVENT_COLUMNS)
# The relation's column list, quoted, in order (SELECT lists of the query views).
EVENT_COLUMNS_SQL = ", ".join(f'"{name}"' for name in EVENT_COLUMN_NAMES)
# A typed, empty events relation: a UNION BY NAME with it gives a column no file has yet its
# type (and NULLs) rather than leaving it out.
NO_EVENTS_SQL = (
    "SELECT "
    + ", ".join(f'CAST(NULL AS {sql_type}) AS "{name}"' for name, sql_type in EVENT_COLUMNS)
    + " WHERE false"
)


def _first_column_per_log_key() -> dict[str, EventColumn]:
    first: dict[str, EventColumn] = {}
    for column in EVENT_COLUMN_SPECS:
        if column.log_key is not None:
            first.setdefault(column.log_key, column)
    return first


# The column each log key feeds first (``properties`` also feeds ``properties_json``): the
# ingest schema names its Struct attributes after it, and read_json reads the key as its
# log_type.
COLUMN_OF_LOG_KEY: dict[str, EventColumn] = _first_column_per_log_key()
# What read_json reads each event line as (storage/event_lines.py): the envelope's keys and the
# event's index, then the event's own; unknown keys are ignored.
EVENT_LINE_COLUMNS_SQL = (
    "{p: 'VARCHAR', r: 'BIGINT', b: 'VARCHAR', k: 'VARCHAR', i: 'INTEGER', "
    + ", ".join(f"'{key}': '{c.log_type or c.sql_type}'" for key, c in COLUMN_OF_LOG_KEY.items())
    + "}"
)
STORED_COLUMN_SPECS = tuple(c for c in EVENT_COLUMN_SPECS if c.stored)
STORED_COLUMN_NAMES = tuple(c.name for c in STORED_COLUMN_SPECS)
# The events relation over rows that have every column, stored or not: a derived column is
# computed where the row lacks it (files rolled before it was derived have it stored).
EVENTS_VIEW_COLUMNS_SQL = ", ".join(
    f'"{c.name}"' if c.stored else f'COALESCE("{c.name}", {c.select}) AS "{c.name}"'
    for c in EVENT_COLUMN_SPECS
)
# The stored columns as rows of the whole relation: the derived ones NULL (then derived by
# EVENTS_VIEW_COLUMNS_SQL).
STORED_AS_EVENT_COLUMNS_SQL = ", ".join(
    f'"{c.name}"' if c.stored else f'CAST(NULL AS {c.sql_type}) AS "{c.name}"'
    for c in EVENT_COLUMN_SPECS
)


def events_select_sql(source: str) -> str:
    """SELECT turning the rows of ``source`` (read_json of event lines with the
    EVENT_LINE_COLUMNS_SQL columns) into the stored columns of ``events`` rows."""
    columns = ",\n            ".join(f'{c.select} AS "{c.name}"' for c in STORED_COLUMN_SPECS)
    return f"""
        WITH typed AS (
            SELECT *,
                CAST(make_timestamp(r) AS TIMESTAMPTZ) AS received,
                TRY_CAST("timestamp" AS TIMESTAMPTZ) AS parsed_ts
            FROM {source}
        )
        SELECT
            {columns}
        FROM typed
    """
