"""Shared by the commit log's tests: a loop runner, the records on disk, fault gates."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import orjson

from inslytic_fast.log.format import list_segments, scan_records


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


def records_on_disk(data_dir: Path) -> list[dict]:
    """Every valid record of every segment, oldest first, decoded."""
    found = []
    for segs in list_segments(data_dir / "log").values():
        for path in segs:
            payloads, _ = scan_records(path.read_bytes())
            found.extend(orjson.loads(bytes(p)) for p in payloads)
    return found


def batches_per_segment(data_dir: Path) -> list[list[str]]:
    """The batch ids (anonymousId) of each of worker w0's segments, oldest first."""
    return [
        [orjson.loads(bytes(p))["e"][0]["anonymousId"] for p in scan_records(s.read_bytes())[0]]
        for s in list_segments(data_dir / "log")["w0"]
    ]


class SyncGate:
    """Wraps os.fdatasync: counts calls, can hold the first one until released, or fail."""

    def __init__(self, monkeypatch, *, hold_first: bool = False) -> None:
        self.calls = 0
        self.fail_with: list[OSError] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold_first:
            self.release.set()
        self._real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", self)

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        if self.fail_with:
            raise self.fail_with.pop(0)
        self._real(fd)


class FsyncGate:
    """Wraps os.fsync (the repair path): holds every call until released."""

    def __init__(self, monkeypatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self._real = os.fsync
        monkeypatch.setattr(os, "fsync", self)

    def __call__(self, fd: int) -> None:
        self.started.set()
        self.release.wait(10)
        self._real(fd)
