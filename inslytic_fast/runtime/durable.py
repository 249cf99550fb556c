"""The one home of durable file writes: write -> fsync -> rename -> fsync(dir).

POSIX makes a file's bytes durable with fsync of the file, and a new name (a rename, a created
file or directory) durable with fsync of the directory holding it; a crash between the two
leaves the old name or the new one, never a torn file. Every path that promises durability
goes through these helpers, so the sequence is written (and reviewed) once.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` survive a power cut (POSIX leaves it to us)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file someone else wrote (DuckDB's staged Parquet, an export) before it is renamed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing the parent of every directory it creates."""
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_dir(directory.parent)


def rename_durably(staged: Path, target: Path) -> None:
    """Publish an already fsynced file: rename it over ``target``, then fsync the directory."""
    os.replace(staged, target)
    fsync_dir(target.parent)


def write_file_durably(
    path: Path, data: bytes, *, tmp: Path | None = None, mode: int | None = None
) -> None:
    """write tmp -> fsync -> rename -> fsync(dir): ``path`` holds the old bytes or the new.

    ``tmp`` (default ``<name>.tmp`` beside ``path``) must be in the same directory; a caller
    whose writers may overlap passes a unique name. One a crash left behind is removed first,
    and the new one is created exclusively (never written through a link someone else made).
    ``mode`` sets the file's permissions from its creation on, exactly (the umask does not
    apply), so a secret is never readable by others. A failed write removes ``tmp`` and
    re-raises.
    """
    if tmp is None:
        tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o666 if mode is None else mode)
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
