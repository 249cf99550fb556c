"""``inslytic-fast stats``: a live view of a running server, what ``top`` is for a process.

It scrapes ``GET /metrics`` once per interval and turns two successive scrapes into rates
(events/s per project, rejects/s by reason, syncs/s), the interval's p99 request latency (from
the histogram buckets' delta, as Prometheus' ``histogram_quantile`` does) and the storage gauges.
With no server to scrape it walks the data dir for the storage figures alone, so an operator
still sees the backlog of a box whose server is down.

The pieces without I/O (parsing, the frame, its text) are in ``stats_frame``; here are only
what touches the network, the clock, the data dir and stdout: ``fetch``, ``View``, ``run``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from ..config import env_or_default, option
from ..observe.metrics import storage_gauges
from ..units import parse_duration
from .stats_frame import MetricsFormatError, Scrape, build_frame, parse_metrics, render_frame

DATA_DIR = option("data_dir")
METRICS_TOKEN_ENV = option("metrics_token").env
DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_INTERVAL_S = 1.0
# Below this the view mostly measures its own scrapes (each one walks the server's data dir).
MIN_INTERVAL_S = 0.05
# A scrape slower than this is as good as down for a once-a-second view.
SCRAPE_TIMEOUT_S = 2.0
# ANSI: clear the screen, then cursor home (what `watch` and `top` do on every refresh).
CLEAR_AND_HOME = "\x1b[2J\x1b[H"

# I/O: scraping, the data dir, the terminal


def metrics_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/metrics") else url + "/metrics"


def fetch(
    url: str, timeout: float = SCRAPE_TIMEOUT_S, token: str = ""
) -> tuple[Scrape | None, str | None]:
    """One scrape, or None and why it failed (in words for the operator)."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
        at = time.monotonic()
        return Scrape(at, parse_metrics(body.decode("utf-8", "replace"))), None
    except urllib.error.HTTPError as exc:
        return None, f"HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        return None, getattr(reason, "strerror", None) or str(reason)
    # Timeouts, resets, a truncated answer, a page that is not metrics.
    except (OSError, http.client.HTTPException, MetricsFormatError) as exc:
        return None, str(exc) or type(exc).__name__


def disk_free(data_dir: Path) -> int | None:
    try:
        return shutil.disk_usage(data_dir).free
    except OSError:
        return None


class View:
    """The command's state: where to scrape, the previous scrape, how to print a frame."""

    __slots__ = ("url", "token", "data_dir", "interval", "as_json", "tty", "out", "previous")

    def __init__(
        self, url: str, data_dir: Path, interval: float, as_json: bool, out, token: str = ""
    ) -> None:
        self.url = url
        self.token = token
        self.data_dir = data_dir
        self.interval = interval
        self.as_json = as_json
        self.out = out
        self.tty = out.isatty() and not as_json
        self.previous: Scrape | None = None

    def scrape(self) -> tuple[Scrape | None, str | None]:
        return fetch(metrics_url(self.url), token=self.token)

    def frame(self, current: Scrape | None, error: str | None) -> dict:
        local = self.data_dir if self.data_dir.is_dir() else None
        storage = storage_gauges(local) if current is None and local is not None else None
        frame = build_frame(
            self.previous,
            current,
            url=self.url,
            error=error,
            storage=storage,
            data_dir=local,
            disk_free=None if local is None else disk_free(local),
        )
        if current is not None:
            self.previous = current
        return frame

    def show(self, frame: dict) -> None:
        if self.as_json:
            self.out.write(orjson.dumps(frame).decode() + "\n")
        elif self.tty:
            self.out.write(CLEAR_AND_HOME + render_frame(frame, self.interval))
        else:
            self.out.write(render_frame(frame, self.interval, limit=None) + "\n")
        self.out.flush()


def run(args: argparse.Namespace) -> int:
    if not args.interval >= MIN_INTERVAL_S:
        print(f"inslytic-fast: error: --interval must be >= {MIN_INTERVAL_S}", file=sys.stderr)
        return 2
    if not args.url.startswith(("http://", "https://")):
        print(
            f"inslytic-fast: error: --url must start with http:// or https://, got {args.url!r}",
            file=sys.stderr,
        )
        return 2
    view = View(args.url, args.data_dir, args.interval, args.json, sys.stdout, args.metrics_token)
    try:
        if args.once:
            return _once(view)
        _live(view)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # `stats | head`: the reader is gone. Point stdout at /dev/null so the interpreter's
        # final flush does not report the same broken pipe again (Python's signal docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _once(view: View) -> int:
    """Two scrapes one interval apart, so the single frame has rates."""
    current, error = view.scrape()
    if current is not None:
        view.previous = current
        time.sleep(view.interval)
        current, error = view.scrape()
    frame = view.frame(current, error)
    view.show(frame)
    if current is None and frame["data_dir"] is None:
        print(
            f"inslytic-fast: error: server not reachable at {view.url} ({error}) "
            f"and no data dir at {view.data_dir}",
            file=sys.stderr,
        )
        return 1
    return 0


def _live(view: View) -> None:
    next_at = time.monotonic()
    while True:
        current, error = view.scrape()
        view.show(view.frame(current, error))
        # Paced on a fixed schedule, so a slow scrape does not stretch every later interval.
        next_at = max(next_at + view.interval, time.monotonic())
        time.sleep(next_at - time.monotonic())


def _interval(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (e.g. 1, 0.5, 500ms, 2s)"
        ) from None
    return seconds  # run() refuses 0 and less, in one line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stats",
        help="live view of a running server (events/s, rejects, p99, commit, storage)",
        description="A live view of a running server, refreshed every --interval seconds: "
        "events/s per project, rejects by reason, p99 request latency, syncs/s and events per "
        "sync, roll lag and disk use. Reads the server's /metrics; with the server down it "
        "shows the storage figures of --data-dir. Ctrl-C quits.",
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"the server's base URL (or its /metrics URL) (default: {DEFAULT_URL})",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env_or_default("data_dir")),
        help=f"data directory for free disk space, and for the storage figures when the "
        f"server is not reachable (default: ${DATA_DIR.env} or {DATA_DIR.default})",
    )
    parser.add_argument(
        "--interval",
        type=_interval,
        default=DEFAULT_INTERVAL_S,
        metavar="DURATION",
        help=f"time between refreshes: seconds, or 500ms, 2s, 1m (default: {DEFAULT_INTERVAL_S:g})",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one frame (two scrapes one interval apart) and exit; exit 1 when there is "
        "neither a server nor a data dir to read",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object per frame instead of text"
    )
    parser.add_argument(
        "--metrics-token",
        default=env_or_default("metrics_token"),
        metavar="TOKEN",
        help="bearer token of a server started with --metrics-token "
        f"(default: ${METRICS_TOKEN_ENV}, the variable the server reads too)",
    )
    parser.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m inslytic_fast.cli.stats``: the command on its own."""
    parser = argparse.ArgumentParser(prog="inslytic-fast")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["stats", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
