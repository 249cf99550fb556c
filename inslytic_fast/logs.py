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


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str | None = None) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


def configure(log_format: str = "text", worker_id: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(worker_id) if log_format == "json" else TextFormatter(worker_id)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)


access_log = logging.getLogger("inslytic_fast.access")
