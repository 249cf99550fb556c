"""The ``projects`` commands: each edits the catalog (``ingest.catalog``) and prints what it did.

The parser is ``cli/projects.py``; an operator's error (unknown name, unreadable catalog)
becomes one line on stderr and exit status 1 (``_run``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from inslytic_fast.cluster.coordinator import CoordinatorCatalog, CoordinatorError
from inslytic_fast.config import env_or_default
from inslytic_fast.ingest.catalog import (
    Catalog,
    CatalogError,
    KeyRecord,
    ProjectError,
    ProjectRecord,
)
from inslytic_fast.ingest.keys import DISPLAY_PREFIX_LENGTH
from inslytic_fast.lake.objectstore import LakeError
from inslytic_fast.log.format import LOG_DIRNAME, list_segments
from inslytic_fast.storage.purges import (
    PURGE_GRACE_S,
    find_purge,
    project_dirs,
    record_purge,
    why_name_is_blocked,
)

# Where the storage layer keeps a project's events: <data_dir>/events/project=<name>/.
EVENTS_DIR = "events"
# A purge removes files under the roller's lock. A roll takes seconds; a compaction pass can
# take longer, and then the roller's next pass removes them instead.
PURGE_LOCK_WAIT_S = 30.0


# Commands ----------------------------------------------------------------------------------


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return args.data_dir
    return Path(env_or_default("data_dir")).expanduser()


def _catalog(args: argparse.Namespace) -> Catalog:
    url = args.coordinator or env_or_default("coordinator")
    if not url:
        return Catalog(_data_dir(args))
    if getattr(args, "purge", False) and not _lake_url(args):
        # Each node has its own events and log: the lake is how a purge reaches them all.
        raise ProjectError(
            "delete --purge --coordinator needs the cluster's --lake (nodes learn of the purge "
            "there); without a lake, delete with --coordinator, then run `delete NAME --purge` "
            "without it on each node"
        )
    return CoordinatorCatalog(url, _data_dir(args))


def _lake_url(args: argparse.Namespace) -> str:
    return getattr(args, "lake", None) or env_or_default("lake")


def _run(command):
    """Turn the errors an operator can act on into one line on stderr and exit status 1."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return command(args, _catalog(args))
        except (CatalogError, ProjectError, CoordinatorError, LakeError) as exc:
            _error(str(exc))
        except OSError as exc:
            # Permission denied, read-only file system, disk full: say which file.
            where = f" {exc.filename}" if exc.filename else ""
            _error(f"{exc.strerror or exc}:{where}".rstrip(":"))
        return 1

    handler.__name__ = command.__name__
    handler.__doc__ = command.__doc__
    return handler


def _error(message: str) -> None:
    print(f"inslytic-fast projects: error: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"inslytic-fast projects: warning: {message}", file=sys.stderr)


def _emit_json(obj) -> None:
    print(json.dumps(obj, separators=(",", ":")))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _human_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _limit_text(events_per_minute: int | None) -> str:
    if events_per_minute is None:
        return "default"
    if events_per_minute == 0:
        return "unlimited"
    return f"{events_per_minute}/min"


def _key_json(key: KeyRecord) -> dict:
    return {"prefix": key.prefix, "created": _iso(key.created), "expires": _iso(key.expires)}


def _project_json(name: str, project: ProjectRecord, now: float) -> dict:
    active = project.active_keys(now)
    return {
        "name": name,
        "events_per_minute": project.events_per_minute,
        "origins": project.origins,
        "created": _iso(project.created),
        "active_keys": len(active),
        "keys": [_key_json(k) for k in active],
    }


def _print_new_key(name: str, key: str) -> None:
    print(f"API key for project {name!r} (shown only this once; store it now):")
    print(key)


@_run
def cmd_create(args: argparse.Namespace, catalog: Catalog) -> int:
    events_dir = catalog.data_dir / EVENTS_DIR
    blocked = why_name_is_blocked(events_dir, args.name)
    if blocked is not None:
        raise ProjectError(blocked)
    if args.name not in catalog.read().projects:
        # A deleted project's events stay (without --purge, or when a purge died before its
        # tombstone): a new project of the same name must not inherit them.
        purge = find_purge(events_dir, args.name)
        if _has_events(catalog.data_dir, args.name, purge.received_before_us if purge else 0):
            raise ProjectError(
                f"a deleted project named {args.name!r} left events in {catalog.data_dir}, "
                f"which a new project of that name would see; remove them first with "
                f"`inslytic-fast projects delete {args.name} --purge`, or choose another name"
            )
    key = catalog.create_project(args.name, args.events_per_minute)
    if args.json:
        _emit_json(
            {
                "name": args.name,
                "events_per_minute": args.events_per_minute,
                "key_prefix": key[:DISPLAY_PREFIX_LENGTH],
                "api_key": key,
            }
        )
        return 0
    print(
        f"Created project {args.name!r} (limit: {_limit_text(args.events_per_minute)}) "
        f"in {catalog.location}."
    )
    _print_new_key(args.name, key)
    return 0


@_run
def cmd_list(args: argparse.Namespace, catalog: Catalog) -> int:
    doc = catalog.read()
    now = time.time()
    rows = [_project_json(name, project, now) for name, project in sorted(doc.projects.items())]
    if args.json:
        _emit_json({"projects": rows})
        return 0
    if not rows:
        print(f"No projects in {catalog.location}. Create one: inslytic-fast projects create NAME")
        return 0
    table = [("NAME", "LIMIT", "KEYS", "CREATED", "KEY PREFIXES")]
    for name, project in sorted(doc.projects.items()):
        active = project.active_keys(now)
        prefixes = ", ".join(
            k.prefix if k.expires is None else f"{k.prefix} (expires {_human_time(k.expires)})"
            for k in active
        )
        table.append(
            (
                name,
                _limit_text(project.events_per_minute),
                str(len(active)),
                _human_time(project.created),
                prefixes or "-",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*padded, row[-1]]))
    return 0


@_run
def cmd_set_origins(args: argparse.Namespace, catalog: Catalog) -> int:
    origins = None if "any" in args.origins else sorted(set(args.origins))
    catalog.set_origins(args.name, origins)
    if args.json:
        _emit_json({"name": args.name, "origins": origins})
    elif origins is None:
        print(f"Project {args.name!r}: pages on any site --cors-origins allows may send.")
    else:
        print(f"Project {args.name!r}: only pages on {', '.join(origins)} may send.")
    return 0


@_run
def cmd_set_limit(args: argparse.Namespace, catalog: Catalog) -> int:
    catalog.set_limit(args.name, args.limit)
    if args.json:
        _emit_json({"name": args.name, "events_per_minute": args.limit})
    else:
        print(f"Project {args.name!r}: limit is now {_limit_text(args.limit)}.")
    return 0


@_run
def cmd_rotate_key(args: argparse.Namespace, catalog: Catalog) -> int:
    # "Revoke now" is two writes around the output: killed before the key is printed, the
    # command leaves the old keys working (never a project nobody holds a key of).
    revoke_now = args.keep_old_for <= 0
    key, old_keys = catalog.rotate_key(args.name, None if revoke_now else args.keep_old_for)
    if args.json:
        _emit_json(
            {
                "name": args.name,
                "key_prefix": key[:DISPLAY_PREFIX_LENGTH],
                "api_key": key,
                "old_keys": [] if revoke_now else [_key_json(k) for k in old_keys],
            }
        )
    else:
        if revoke_now:
            print("Old keys are revoked now.")
        for old in [] if revoke_now else old_keys:
            assert old.expires is not None  # rotate_key gave each old key its expiry
            print(f"Old key {old.prefix} keeps working until {_human_time(old.expires)}.")
        _print_new_key(args.name, key)
    sys.stdout.flush()
    if revoke_now:
        catalog.revoke_keys(args.name, old_keys)
    return 0


@_run
def cmd_revoke_key(args: argparse.Namespace, catalog: Catalog) -> int:
    revoked, remaining = catalog.revoke_key(args.name, args.prefix)
    if args.json:
        _emit_json({"name": args.name, "revoked": revoked.prefix, "active_keys": remaining})
    else:
        print(f"Revoked key {revoked.prefix} of project {args.name!r}.")
    if remaining == 0:
        _warn(
            f"project {args.name!r} has no active key now; "
            f"issue one with: inslytic-fast projects rotate-key {args.name}"
        )
    return 0


@_run
def cmd_delete(args: argparse.Namespace, catalog: Catalog) -> int:
    if args.purge and isinstance(catalog, CoordinatorCatalog):
        return _delete_and_purge_cluster(args, catalog)
    events_dir = catalog.data_dir / EVENTS_DIR
    partition = project_dirs(events_dir, args.name)[0]
    exists = args.name in catalog.read().projects
    # `delete NAME --purge` after a plain `delete NAME` removes the data left behind.
    if not exists and not (args.purge and _has_events(catalog.data_dir, args.name)):
        catalog.delete_project(args.name)  # raises "no project named ..."
    if args.purge:
        # The tombstone before the catalog write: a purge killed in between leaves the project
        # (run it again), never a deleted name whose events a new project would see.
        record_purge(events_dir, args.name)
    deleted = False
    reusable_from = None
    if exists:
        try:
            reusable_from = datetime.fromtimestamp(catalog.delete_project(args.name), UTC)
            deleted = True
        except ProjectError:
            pass  # deleted meanwhile by another command
    files_removed = False
    if args.purge:
        from inslytic_fast.storage.purges import apply_purges_now  # duckdb: only for --purge

        files_removed = apply_purges_now(catalog.data_dir, PURGE_LOCK_WAIT_S)
    if args.json:
        _emit_json(
            {
                "name": args.name,
                "deleted": deleted,
                "purged": args.purge,
                "files_removed": files_removed,
                "events_dir": str(partition),
                "name_reusable_from": _iso(reusable_from),
            }
        )
        return 0
    _print_deleted(args.name, reusable_from)
    if args.purge:
        print(
            f"Purged its events: queries no longer show them, and events still in the commit "
            f"log are dropped when they roll. Its files in {partition} "
            + ("are gone." if files_removed else "go with the roller's next pass.")
        )
    elif partition.is_dir():
        print(f"Its events stay in {partition} (delete --purge removes them).")
    return 0


def _print_deleted(name: str, reusable_from: datetime | None) -> None:
    if reusable_from is not None:
        print(
            f"Deleted project {name!r}; its keys stop working within seconds, and the "
            f"name can be created again from {_human_time(reusable_from)}."
        )
    else:
        print(f"Project {name!r} was already deleted.")


def _delete_and_purge_cluster(args: argparse.Namespace, catalog: CoordinatorCatalog) -> int:
    """The purge recorded in the lake (inslytic_fast.lake.purges): readers filter the rows at
    once, nodes drop their waiting files instead of uploading them, lake jobs delete objects."""
    from inslytic_fast.lake.jobs import LakeJobs, LeaseHeld
    from inslytic_fast.lake.objectstore import S3ObjectStore
    from inslytic_fast.lake.purges import has_objects, record_lake_purge

    store = S3ObjectStore(_lake_url(args), args.s3_endpoint or env_or_default("s3_endpoint"))
    exists = args.name in catalog.read().projects
    # `delete NAME --purge` after a plain `delete NAME` removes the data left behind.
    if not exists and not has_objects(store, args.name):
        catalog.delete_project(args.name)  # raises "no project named ..."
    # The tombstone before the catalog write, as on one node: a purge killed in between
    # leaves the project (run it again), never a deleted name with its events still shown.
    record_lake_purge(store, args.name, int((time.time() + PURGE_GRACE_S) * 1_000_000))
    reusable_from = None
    if exists:
        try:
            deleted_until = catalog.delete_project(args.name)
        except ProjectError:
            pass  # deleted meanwhile by another command
        else:
            # Old keys work until the name is free again: the purge covers up to then, and
            # not a moment longer (a project created again then keeps its events).
            record_lake_purge(store, args.name, int(deleted_until * 1_000_000))
            reusable_from = datetime.fromtimestamp(deleted_until, UTC)
    jobs = LakeJobs(store)
    try:
        jobs.run(lambda: 0)  # every lake job run applies the tombstones first
        objects_deleted: int | None = jobs.purged_objects
    except LeaseHeld:
        objects_deleted = None  # the running lake job, or the next one, deletes them
    if args.json:
        _emit_json(
            {
                "name": args.name,
                "deleted": reusable_from is not None,
                "purged": True,
                "lake_objects_deleted": objects_deleted,
                "name_reusable_from": _iso(reusable_from),
            }
        )
        return 0
    _print_deleted(args.name, reusable_from)
    print(
        "Purged its events in the cluster: queries with --lake no longer show them; "
        + (
            f"{objects_deleted} lake objects deleted"
            if objects_deleted is not None
            else "another lake job holds the lease, and it or the next deletes its lake objects"
        )
        + f"; each node deletes its files of {args.name!r} instead of uploading them."
    )
    return 0


def _has_events(data_dir: Path, name: str, received_after_us: int = 0) -> bool:
    """Whether a deleted project left events behind: Parquet files, or records in the log
    received after ``received_after_us`` (a purge's tombstone covers those before)."""
    if any(d.is_dir() for d in project_dirs(data_dir / EVENTS_DIR, name)):
        return True  # once a purge is applied, its directory holds only later events
    record = re.compile(rb'\{"p":' + re.escape(json.dumps(name).encode()) + rb',"r":(\d+),')
    for segments in list_segments(data_dir / LOG_DIRNAME).values():
        for path in segments:
            try:
                with open(path, "rb") as f:
                    if f.seek(0, os.SEEK_END) == 0:
                        continue
                    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                        for match in record.finditer(data):
                            if int(match[1]) > received_after_us:
                                return True
            except FileNotFoundError:
                continue  # rolled meanwhile
    return False
