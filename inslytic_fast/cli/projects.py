"""`inslytic-fast projects ...`: create projects and manage their API keys.

There is no dashboard in a self-hosted install, so this is where keys come from. Every command
edits ``<data_dir>/catalog.json`` under a lock (see inslytic_fast.ingest.catalog); a running
server picks the change up within a second or two, no restart.

A plaintext key is printed exactly once, as the last line of stdout of ``create`` and
``rotate-key`` (``KEY=$(inslytic-fast projects create shop | tail -n1)``), and nowhere else.

Exit codes: 0 ok, 1 operational error (duplicate or unknown name, unreadable catalog), 2 usage.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from inslytic_fast.cluster.coordinator import PASSWORD_ENV
from inslytic_fast.config import option
from inslytic_fast.ingest.catalog import NAME_RULE, valid_project_name
from inslytic_fast.ingest.keys import KEY_PREFIX, shown
from inslytic_fast.units import parse_duration

from .project_commands import (
    EVENTS_DIR,
    cmd_create,
    cmd_delete,
    cmd_list,
    cmd_revoke_key,
    cmd_rotate_key,
    cmd_set_limit,
    cmd_set_origins,
)

# Long enough to roll a new key through a deploy and the clients' config in a working day
# across time zones; short enough that a key meant to die does not linger for weeks.
DEFAULT_KEEP_OLD_FOR_SECONDS = 86_400
# A grace period longer than a year is a second permanent key; revoke-key that instead.
MAX_KEEP_OLD_FOR_SECONDS = 366 * 86_400
# Far above what one node ingests (~10^8 events/minute); larger values are typos.
MAX_EVENTS_PER_MINUTE = 10**12


# Argument types (argparse turns their ArgumentTypeError into exit 2) ------------------------


def _project_name(text: str) -> str:
    if not valid_project_name(text):
        raise argparse.ArgumentTypeError(f"invalid project name {shown(text)}: use {NAME_RULE}")
    return text


def _positive_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= MAX_EVENTS_PER_MINUTE:
        raise argparse.ArgumentTypeError(
            f"invalid limit {shown(text)}: a whole number of events per minute from 1 to "
            f"{MAX_EVENTS_PER_MINUTE}, or 'unlimited'"
        )
    return value


def _create_limit(text: str) -> int:
    """N or 'unlimited' (stored as 0). A literal 0 is refused: it reads like 'blocked'."""
    return 0 if text == "unlimited" else _positive_limit(text)


def _set_limit(text: str) -> int | None:
    """N, 'unlimited' (0) or 'default' (None: follow the server's --events-per-minute)."""
    return None if text == "default" else _create_limit(text)


def _duration(text: str) -> int:
    try:
        seconds = int(parse_duration(text))  # the units of serve's durations
    except ValueError:
        seconds = -1
    if seconds < 0:
        raise argparse.ArgumentTypeError(
            f"invalid duration {shown(text)}: seconds, or a number with s, m, h or d "
            "(e.g. 86400, 24h)"
        )
    if seconds > MAX_KEEP_OLD_FOR_SECONDS:
        raise argparse.ArgumentTypeError(
            f"duration {shown(text)} is over a year; "
            "revoke the old key later with revoke-key instead"
        )
    return seconds


_ORIGIN_RE = re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s?#]+$")


def _origin(text: str) -> str:
    if text == "any" or _ORIGIN_RE.match(text):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is not an origin: scheme://host[:port] with nothing after it "
        "(e.g. https://shop.example.com), or 'any'"
    )


# Parser ------------------------------------------------------------------------------------

# For --help: plain text (the module docstring is reStructuredText for the code's readers).
DESCRIPTION = (
    "There is no dashboard in a self-hosted install, so this is where keys come from. Every "
    "command edits <data_dir>/catalog.json under a lock; a running server picks the change up "
    "within a second or two, no restart."
)
EPILOG = (
    "A plaintext key is printed exactly once, as the last line of stdout of create and "
    "rotate-key (KEY=$(inslytic-fast projects create shop | tail -n1)). Exit codes: 0 ok, 1 "
    "operational error (duplicate or unknown name, unreadable catalog), 2 usage."
)


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "projects",
        help="create projects and manage their API keys",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="projects_command", metavar="COMMAND", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"data directory holding catalog.json (default: env {option('data_dir').env} or "
        f"{option('data_dir').default})",
    )
    common.add_argument(
        "--coordinator",
        metavar="URL",
        default=None,
        help=f"edit the cluster's catalog in this Redis/Valkey (redis://HOST:PORT/DB) instead of "
        f"the data dir's; every node serves the change within 2 s (default: env "
        f"{option('coordinator').env}; password from env {PASSWORD_ENV})",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    create = commands.add_parser(
        "create",
        parents=[common],
        help="create a project and print its API key (shown only this once)",
    )
    create.add_argument(
        "name",
        type=_project_name,
        metavar="NAME",
        help=f"{NAME_RULE}; events go under events/project=NAME/",
    )
    create.add_argument(
        "--events-per-minute",
        type=_create_limit,
        default=None,
        metavar="N|unlimited",
        help="this project's rate limit (default: the server's --events-per-minute)",
    )
    create.set_defaults(func=cmd_create)

    listing = commands.add_parser("list", parents=[common], help="list projects and their keys")
    listing.set_defaults(func=cmd_list)

    set_limit = commands.add_parser(
        "set-limit", parents=[common], help="change a project's rate limit"
    )
    set_limit.add_argument("name", type=_project_name, metavar="NAME")
    set_limit.add_argument(
        "limit",
        type=_set_limit,
        metavar="N|unlimited|default",
        help="events per minute; 'default' follows the server's --events-per-minute",
    )
    set_limit.set_defaults(func=cmd_set_limit)

    set_origins = commands.add_parser(
        "set-origins",
        parents=[common],
        help="the sites whose pages may send with this project's keys",
        description=(
            "A request with an Origin header naming another site gets 403, beacons included "
            "(the server enforces it; browsers do not for beacons). 'any' lifts the list "
            "(then only --cors-origins applies). Requests without Origin (servers, SDKs) are "
            "not affected."
        ),
    )
    set_origins.add_argument("name", type=_project_name, metavar="NAME")
    set_origins.add_argument(
        "origins", nargs="+", type=_origin, metavar="ORIGIN|any",
        help="e.g. https://shop.example.com (scheme://host[:port], as browsers send it)",
    )  # fmt: skip
    set_origins.set_defaults(func=cmd_set_origins)

    rotate = commands.add_parser(
        "rotate-key",
        parents=[common],
        help="issue a new key; old keys keep working for a grace period",
    )
    rotate.add_argument("name", type=_project_name, metavar="NAME")
    rotate.add_argument(
        "--keep-old-for",
        type=_duration,
        default=DEFAULT_KEEP_OLD_FOR_SECONDS,
        metavar="DURATION",
        help="how long the current keys stay valid, in seconds or with s/m/h/d "
        f"(default {DEFAULT_KEEP_OLD_FOR_SECONDS} = 24h; 0 revokes them now)",
    )
    rotate.set_defaults(func=cmd_rotate_key)

    revoke = commands.add_parser(
        "revoke-key", parents=[common], help="revoke one key at once, by its prefix"
    )
    revoke.add_argument("name", type=_project_name, metavar="NAME")
    revoke.add_argument(
        "prefix",
        metavar="PREFIX",
        help=f"the key's prefix as `projects list` shows it ({KEY_PREFIX}XXXX), or the whole key",
    )
    revoke.set_defaults(func=cmd_revoke_key)

    delete = commands.add_parser(
        "delete", parents=[common], help="delete a project and its keys (its data stays)"
    )
    delete.add_argument("name", type=_project_name, metavar="NAME")
    delete.add_argument(
        "--purge",
        action="store_true",
        help=f"also remove its stored events (<data_dir>/{EVENTS_DIR}/project=NAME/ and those "
        "still in the commit log; safe while the server runs); with --coordinator, in the "
        "cluster's lake and on every node (needs --lake)",
    )
    delete.add_argument(
        "--lake",
        metavar="URL",
        default=None,
        help=f"with --purge --coordinator: the cluster's lake, s3://BUCKET/PREFIX (default: env "
        f"{option('lake').env})",
    )
    delete.add_argument(
        "--s3-endpoint",
        metavar="URL",
        default=None,
        help=f"S3 API endpoint of --lake (default: env {option('s3_endpoint').env}, else AWS S3)",
    )
    delete.set_defaults(func=cmd_delete)
    return parser
