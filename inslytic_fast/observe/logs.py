"""Log set-up: human-readable lines by default, one JSON object per line for log shippers.

Whatever a client sends can end up in a log line (a path, a header): control characters are
escaped in both formats, so a request cannot forge log lines or move a terminal's cursor.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape(text: str) -> str:
    """Control characters (CR, LF, ESC, ...) as \\xNN; everything else untouched."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class TextFormatter(logging.Formatter):
    def __init__(self, worker_id: str | None = None) -> None:
        worker = f" {worker_id}" if worker_id else ""
        super().__init__(f"%(asctime)s %(levelname)s{worker} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        message = escape(record.getMessage())
        saved = record.msg, record.args
        record.msg, record.args = message, None
        try:
            return super().format(record)  # tracebacks keep their newlines: they are ours
        finally:
            record.msg, record.args = saved


def utc_timestamp(created: float) -> str:
    """``2026-12-01T22:18:00.123Z``: the ``ts`` of a JSON log line."""
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str | None = None) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": utc_timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),  # orjson escapes control characters itself
        }
        if self.worker_id:
            entry["worker"] = self.worker_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        extra = getattr(record, "fields", None)
        if extra:
            entry.update(extra)
        return orjson.dumps(entry).decode()


def configure(log_format: str = "text", worker_id: str | None = None, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(worker_id) if log_format == "json" else TextFormatter(worker_id)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


access_log = logging.getLogger("inslytic_fast.access")
_KEY_IN_PATH = re.compile(r"ik_[A-Za-z0-9_]+")


def log_access(
    client: str,
    method: bytes,
    path: bytes,
    status: int,
    size: int,
    seconds: float,
    project: str,
) -> None:
    """One access-log line: readable in text, and with the same fields as keys in JSON.
    ``status`` is the answer's, as the response slot carries it (never parsed back out of
    the response bytes); ``size`` its length in bytes."""
    path_text = path.decode("latin-1")
    if "ik_" in path_text:  # an SDK misconfigured to put its key in the URL: never log the key
        path_text = _KEY_IN_PATH.sub("ik_[REDACTED]", path_text)
    if len(path_text) > 200:
        path_text = path_text[:200] + "..."
    method_text = method.decode("latin-1") or "-"
    fields = {
        "method": method_text,
        "path": path_text,
        "status": status,
        "bytes": size,
        "duration_ms": round(seconds * 1000, 3),
        "client": client,
        "project": project,
    }
    access_log.info(
        '%s "%s %s" %d %d %.1fms %s',
        client,
        method_text,
        path_text,
        status,
        size,
        seconds * 1000,
        project,
        extra={"fields": fields},
    )


# A failure that recurs on every 1 s tick (a read-only remount, a full disk, a vanished data
# dir) logged a traceback per second per worker; journald's default rate limit then drops the
# lines that matter. One line an episode, a reminder a minute, and one line when it ends.
REPEAT_REMINDER_S = 60.0


class RepeatedFailure:
    """Log a failure that may recur every tick: the first occurrence (with the traceback if
    asked), then at most one reminder per ``every_s`` with the count, then its end."""

    __slots__ = ("logger", "what", "every_s", "clock", "count", "first_at", "logged_at")

    def __init__(
        self, logger: logging.Logger, what: str, every_s: float = REPEAT_REMINDER_S, clock=None
    ) -> None:
        self.logger = logger
        self.what = what
        self.every_s = every_s
        self.clock = clock or time.monotonic
        self.count = 0
        self.first_at = 0.0
        self.logged_at = 0.0

    def failed(self, message: str, *args, exc_info: bool = False) -> None:
        now = self.clock()
        self.count += 1
        if self.count == 1:
            self.first_at = self.logged_at = now
            self.logger.error(message, *args, exc_info=exc_info)
        elif now - self.logged_at >= self.every_s:
            self.logged_at = now
            self.logger.error(
                message + " (%d times in %.0f s)", *args, self.count, now - self.first_at
            )

    def succeeded(self) -> None:
        if self.count > 1:
            self.logger.warning(
                "%s: working again after %d failures in %.0f s",
                self.what,
                self.count,
                self.clock() - self.first_at,
            )
        self.count = 0
