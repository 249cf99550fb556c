"""What the operator sees at start-up: the first-run key and the startup line, or why not.

A condition the operator must fix (a port in use, a data dir in use or not writable, a bad
certificate or catalog) is a ``StartupError``: one line, exit code 2, never a traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

import orjson

from .. import __version__
from ..config import Settings
from ..observe.logs import utc_timestamp

# The serving process's logger: the startup line is its first record.
log = logging.getLogger("inslytic_fast.server")


class StartupError(Exception):
    """A condition the operator must fix before the server can start (exit code 2)."""


def announce(
    settings: Settings, host: str, port: int, first_run_key: str | None, out: TextIO
) -> None:
    """On first run the default key with a curl line (stdout), then the one startup line
    (stderr). In that order: whoever waits for the startup line finds the key already written.
    With --log-format json each is one JSON object, like every other line."""
    scheme = "https" if settings.tls_cert else "http"
    as_json = settings.log_format == "json"
    if first_run_key is not None:
        url_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        curl = (
            f"curl -i -X POST {scheme}://{url_host}:{port}/v1/ingest "
            f'-H "Authorization: Bearer {first_run_key}" -H "Content-Type: application/json" '
            '-d \'{"events":[{"eventName":"page_viewed",'
            '"timestamp":"2026-02-16T10:30:00.000Z","anonymousId":"anon-123",'
            '"sessionId":"sess-456","consentGiven":true}]}\''
        )
        # Under systemd stdout is the journal, which keeps it: rotating it is one command.
        rotate = (
            "inslytic-fast projects rotate-key default --keep-old-for 0 "
            f"--data-dir {settings.data_dir}"
        )
        if as_json:
            line = {
                "ts": utc_timestamp(time.time()),
                "level": "warning",
                "logger": log.name,
                "msg": 'first run: created project "default"; its API key is shown only this once',
                "project": "default",
                "api_key": first_run_key,
                "try": curl,
                "rotate": rotate,
            }
            print(orjson.dumps(line).decode(), file=out, flush=True)
        else:
            print(
                'First run: created project "default". Its API key is shown only this once:\n'
                f"  {first_run_key}\n"
                f"Try it:\n  {curl}\n"
                f"If this output is kept (a journal, a CI log), replace the key:\n  {rotate}",
                file=out,
                flush=True,
            )
    durability = settings.durability
    if durability == "none":
        durability = "none (BENCHMARK ONLY: acknowledged events can be lost on a crash)"
    workers = f" workers {settings.workers}" if settings.workers > 1 else ""
    metrics = f" metrics on port {settings.metrics_port}" if settings.metrics_port else ""
    banner = (
        f"inslytic-fast {__version__} listening on {scheme}://{host}:{port} "
        f"data dir {settings.data_dir.resolve()} durability {durability}{workers}{metrics} "
        f"pid {os.getpid()}"
    )
    if as_json:
        fields = {"version": __version__, "url": f"{scheme}://{host}:{port}", "pid": os.getpid()}
        log.warning(banner, extra={"fields": fields})  # warning: shown at every --log-level
    else:
        print(banner, file=sys.stderr, flush=True)


def startup_failed(settings: Settings, message: str) -> int:
    """Report why the server cannot start (one line, JSON with --log-format json); exit 2."""
    if settings.log_format == "json":
        log.error(message)
    else:
        print(f"inslytic-fast: error: {message}", file=sys.stderr)
    return 2
