"""runtime/durable.py: the one home of write -> fsync -> rename -> fsync(dir), and the rule that
keeps it the only one."""

from __future__ import annotations

import ast
import errno
import os
import stat
from pathlib import Path

import pytest

import inslytic_fast
from inslytic_fast.runtime.durable import (
    fsync_file,
    make_dirs_durable,
    rename_durably,
    write_file_durably,
)

PACKAGE_DIR = Path(inslytic_fast.__file__).parent


class SyscallLog:
    """Records the durability syscalls (fsync of a file or a directory, rename) in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            kind = "fsync_dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync_file"
            self.calls.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def replace(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
            self.calls.append(("replace", str(dst)))
            real_replace(src, dst)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


def test_write_file_durably_syncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "doc.json"
    target.write_bytes(b"old")
    syscalls = SyscallLog(monkeypatch)
    write_file_durably(target, b"new")
    assert syscalls.calls == [
        ("fsync_file", str(tmp_path / "doc.json.tmp")),
        ("replace", str(target)),
        ("fsync_dir", str(tmp_path)),
    ]
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]


def test_write_file_durably_replaces_a_temp_file_a_crash_left(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    (tmp_path / "doc.json.tmp").write_bytes(b"half a document from a killed writer")
    write_file_durably(target, b"whole")
    assert target.read_bytes() == b"whole"
    assert not (tmp_path / "doc.json.tmp").exists()


def test_write_file_durably_sets_the_mode_exactly_from_creation(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)
    try:
        write_file_durably(tmp_path / "secret", b"s", mode=0o640)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "doc.json"
    target.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError) as info:
        write_file_durably(target, b"new", tmp=tmp_path / ".doc.json.1234.tmp")
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.json"]


def test_rename_durably_syncs_the_target_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = tmp_path / "staged.parquet"
    staged.write_bytes(b"PAR1")
    (tmp_path / "partition").mkdir()
    syscalls = SyscallLog(monkeypatch)
    fsync_file(staged)
    rename_durably(staged, tmp_path / "partition" / "out.parquet")
    assert syscalls.calls == [
        ("fsync_file", str(staged)),
        ("replace", str(tmp_path / "partition" / "out.parquet")),
        ("fsync_dir", str(tmp_path / "partition")),
    ]


def test_make_dirs_durable_syncs_the_parent_of_each_directory_it_creates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    syscalls = SyscallLog(monkeypatch)
    make_dirs_durable(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    assert syscalls.calls == [
        ("fsync_dir", str(tmp_path / "a")),
        ("fsync_dir", str(tmp_path / "a" / "b")),
    ]
    make_dirs_durable(tmp_path / "a" / "b" / "c")  # exists: nothing to make durable
    assert len(syscalls.calls) == 2


# -- The rule: no private copies of the durable-write sequence -----------------------------

# Functions that call os.fsync/os.fdatasync themselves: the commit log syncs the segment it
# holds open (and creates segments and quarantine files it then syncs through that fd).
OWN_FD_SYNCS = {
    "fdatasync",
    "quarantine_bytes",
    "recover_segment",
    "ActiveSegment.repair",
    "ActiveSegment._create_successor",
}

# Functions that rename a file into place themselves, each with the reason it is not a
# write_file_durably/rename_durably call.
OWN_RENAMES = {
    # Atomic but deliberately not fsynced: rebuilt or recreated at every start.
    "SharedBudget.__init__",
    "DedupTable.__init__",
    "write_snapshot",
    # A download cache, checked by size against the lake's listing before each use.
    "LakeView._cached",
    # One fsync per file first, a crash step between renames, one fsync per directory after.
    "Roller._roll_segment",
    # A rename into the trash directory, made durable by the fsync of the source directory.
    "drop_dir",
    # The export is fsynced and renamed; its directory is the user's (not fsynced, as before).
    "cmd_export",
}

SYNC_CALLS = {"fsync", "fdatasync"}
RENAME_CALLS = {"replace", "rename"}


def os_calls(tree: ast.Module) -> list[tuple[str, str]]:
    """(qualified function name, os attribute) of every ``os.<attr>`` use in a module."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                visit(child, [*scope, child.name])
                continue
            if (
                isinstance(child, ast.Attribute)
                and isinstance(child.value, ast.Name)
                and child.value.id == "os"
            ):
                found.append((".".join(scope), child.attr))
            visit(child, scope)

    visit(tree, [])
    return found


def private_durable_writes(root: Path) -> list[str]:
    offences = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "durable.py" and path.parent.name == "runtime":
            continue
        for function, attr in os_calls(ast.parse(path.read_text(), str(path))):
            allowed = OWN_FD_SYNCS if attr in SYNC_CALLS else OWN_RENAMES
            if attr in SYNC_CALLS | RENAME_CALLS and function not in allowed:
                offences.append(f"{path.relative_to(root)}: {function or '<module>'} os.{attr}")
    return offences


def test_durable_writes_go_through_durable_py() -> None:
    assert private_durable_writes(PACKAGE_DIR) == []


def test_the_rule_catches_a_private_copy(tmp_path: Path) -> None:
    (tmp_path / "catalog.py").write_text(
        "import os\n"
        "class Catalog:\n"
        "    def save(self, tmp, path, fd):\n"
        "        os.fsync(fd)\n"
        "        os.replace(tmp, path)\n"
    )
    assert private_durable_writes(tmp_path) == [
        "catalog.py: Catalog.save os.fsync",
        "catalog.py: Catalog.save os.replace",
    ]
