"""``inslytic-fast serve``: resolve settings, then hand over to one server or a supervisor."""

from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, resolve
from ..config_render import add_arguments, effective_config, example_config
from ..observe.logs import configure
from ..runtime.process import raise_open_file_limit
from ..runtime.server import serve_alone
from ..runtime.supervisor import Supervisor


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the ingestion server",
        description="Run the ingestion server. Every flag can also be set with its INSLYTIC_* "
        "environment variable or in a TOML file (--config); flags win over env, env over the file. "
        "PORT and WEB_CONCURRENCY are read too, after INSLYTIC_PORT and INSLYTIC_WORKERS. Sizes "
        "take units (512KiB, 10MiB, 1GiB), durations too (500ms, 30s, 5m).",
    )
    add_arguments(parser)
    parser.add_argument(
        "--print-config",
        nargs="?",
        const="example",
        choices=("example", "effective"),
        metavar="example|effective",
        help="print a TOML config, then exit: 'example' (the default) lists every setting at its "
        "default; 'effective' the settings this command line, environment and --config give, "
        "each with where it came from",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.print_config == "example":
        sys.stdout.write(example_config())
        return 0
    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("func", "command", "config", "print_config")
    }
    try:
        settings = resolve(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"inslytic-fast: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config == "effective":
        sys.stdout.write(effective_config(settings))
        return 0
    configure(settings.log_format, level=settings.log_level)
    # Each connection is a file descriptor; the rest (logs, catalog, DuckDB) fit in 256.
    raise_open_file_limit(settings.max_connections + 256)
    if settings.workers > 1:
        return Supervisor(settings).run()
    return serve_alone(settings)
