"""`inslytic-fast lake compact|retention`: upkeep of a cluster's lake, one leader at a time.

Meant for cron or a systemd timer on any one (or every) machine: a run that finds another in
charge (the lease object in the bucket, see inslytic_fast.lake.jobs) exits 0 without work.

Exit codes: 0 ok (or another run is in charge), 1 operational error, 2 usage.
"""

from __future__ import annotations

import argparse
import sys

from ..config import env_or_default, option


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "lake",
        help="compact or apply retention to the cluster's lake (one leader at a time)",
        description=__doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="lake_command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--lake",
        metavar="URL",
        default=env_or_default("lake") or None,
        required=not env_or_default("lake"),
        help=f"s3://BUCKET/PREFIX (env {option('lake').env}); credentials from the AWS environment",
    )
    common.add_argument(
        "--s3-endpoint",
        metavar="URL",
        default=env_or_default("s3_endpoint"),
        help=f"S3 API endpoint (env {option('s3_endpoint').env}); default AWS S3",
    )
    compact = commands.add_parser(
        "compact", parents=[common], help="merge each partition's small objects"
    )
    compact.set_defaults(func=cmd_compact)
    retention = commands.add_parser(
        "retention", parents=[common], help="delete partitions older than --days"
    )
    retention.add_argument(
        "--days", type=int, required=True, help="keep this many days of event dates (>= 1)"
    )
    retention.set_defaults(func=cmd_retention)


def _run(args: argparse.Namespace, job) -> int:
    from inslytic_fast.lake.jobs import LakeJobs, LeaseHeld
    from inslytic_fast.lake.objectstore import LakeError, S3ObjectStore

    try:
        jobs = LakeJobs(S3ObjectStore(args.lake, args.s3_endpoint))
        done = jobs.run(lambda: job(jobs))
    except LeaseHeld as exc:
        print(f"inslytic-fast lake: {exc}; nothing to do here", file=sys.stderr)
        return 0
    except (LakeError, OSError) as exc:
        print(f"inslytic-fast lake: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the object-store client's own errors: unreachable, denied
        print(f"inslytic-fast lake: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    what = "merges" if args.lake_command == "compact" else "objects deleted"
    print(f"{args.lake_command}: {done} {what}")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    return _run(args, lambda jobs: jobs.compact())


def cmd_retention(args: argparse.Namespace) -> int:
    if args.days < 1:
        print("inslytic-fast lake: error: --days must be at least 1", file=sys.stderr)
        return 2
    return _run(args, lambda jobs: jobs.retention(args.days))
