"""What the uploader reports: ``<data_dir>/run/lake.json``, read by /ready, /metrics and
``query --lake`` (which takes the node id from it)."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import orjson

from ..observe.metrics import write_snapshot
from ..runtime.data_dir import run_dir

STATUS_FILE = "lake.json"


class UploadStatus(TypedDict):
    node: str  # query --lake on this data dir matches files by it
    pending_files: int
    pending_bytes: int
    lag_seconds: float  # age of the oldest file waiting
    uploaded_files: int
    uploaded_bytes: int
    errors: int
    failing_since: float | None
    last_error: str | None


def _status_path(data_dir: Path) -> Path:
    return run_dir(data_dir) / STATUS_FILE


def write_status(data_dir: Path, status: UploadStatus) -> None:
    path = _status_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_snapshot(path, dict(status))


def read_status(data_dir: Path) -> UploadStatus | None:
    try:
        return orjson.loads(_status_path(data_dir).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None


def degraded_note(status: UploadStatus | None, now: float) -> str | None:
    """/ready's note while upload passes fail; None when uploads go through."""
    since = status.get("failing_since") if status else None
    if status is None or since is None:
        return None
    return (
        f"lake uploads failing for {now - since:.0f} s "
        f"({status['pending_files']} files, {status['pending_bytes']} bytes wait locally): "
        f"{status['last_error']}"
    )
