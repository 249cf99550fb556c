"""The ``inslytic-fast`` command: a thin layer that parses, builds objects and hands over."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import data, lake, projects, serve, stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inslytic-fast",
        description="Self-hosted, high-throughput server for the Inslytic Ingestion API.",
    )
    parser.add_argument("--version", action="version", version=f"inslytic-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve.register(subparsers)
    projects.register(subparsers)
    data.register(subparsers)
    stats.register(subparsers)
    lake.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
