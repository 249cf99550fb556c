"""``inslytic-fast serve``: resolve settings, then hand over to the server."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, add_arguments, example_config, resolve


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the ingestion server",
        description="Run the ingestion server. Every flag can also be set with its INSLYTIC_* "
        "environment variable or in a TOML file (--config); flags win over env, env over the file.",
    )
    add_arguments(parser)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print an example TOML config with every setting and its default, then exit",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.print_config:
        sys.stdout.write(example_config())
        return 0
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    try:
        settings = resolve(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"inslytic-fast: error: {exc}", file=sys.stderr)
        return 2
    from ..logs import configure
    from ..server import run as run_server

    configure(settings.log_format)

    return run_server(settings)
