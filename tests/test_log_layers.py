"""The commit log's layers (LevelDB's log_format / log_writer / log_reader split): readers of the
log import only its format (log/format.py), never the writer and its machinery."""

from __future__ import annotations

import ast
from pathlib import Path

import inslytic_fast

PACKAGE_DIR = Path(inslytic_fast.__file__).parent
WRITER_SIDE = {"writer", "sync_thread", "group_commit", "batch_ids"}
# The modules that build or feed the writer: the server process and the ingest pipeline.
WRITER_CLIENT_DIRS = {"runtime", "ingest"}
# Readers even inside those folders: dedup rebuilds its table from the log tail.
READERS = {"ingest/dedup.py", "log/format.py"}


def log_modules_imported(path: Path) -> set[str]:
    """The log/ modules a file imports (absolute or relative, also under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if "log" in parts:
                rest = parts[parts.index("log") + 1 :]
                if rest:
                    found.add(rest[0])
                else:  # from ..log import writer
                    found.update(alias.name for alias in node.names)
            elif node.level == 1 and path.parent.name == "log":
                found.update([node.module] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[:2] == ["inslytic_fast", "log"] and len(parts) > 2:
                    found.add(parts[2])
    return found


def readers_importing_the_writer(root: Path) -> list[str]:
    offences = []
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        folder = name.split("/")[0]
        if name not in READERS and folder in WRITER_CLIENT_DIRS | {"log"}:
            continue
        for module in sorted(log_modules_imported(path) & WRITER_SIDE):
            offences.append(f"{name} imports log.{module}")
    return offences


def test_readers_import_only_the_log_format() -> None:
    assert readers_importing_the_writer(PACKAGE_DIR) == []


def test_readers_do_use_the_format() -> None:
    # The rule is about something: the roller and query, the lake and the CLI read the log.
    folders = {
        path.relative_to(PACKAGE_DIR).parts[0]
        for path in PACKAGE_DIR.rglob("*.py")
        if "format" in log_modules_imported(path)
    }
    assert {"storage", "lake", "cli"} <= folders


def test_the_rule_catches_a_reader_that_imports_the_writer(tmp_path: Path) -> None:
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "roller.py").write_text(
        "from ..log.format import list_segments\nfrom ..log.writer import CommitLog\n"
    )
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "stats.py").write_text("import inslytic_fast.log.sync_thread\n")
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "format.py").write_text("from . import batch_ids\n")
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "server.py").write_text("from ..log.writer import CommitLog\n")
    assert readers_importing_the_writer(tmp_path) == [
        "cli/stats.py imports log.sync_thread",
        "log/format.py imports log.batch_ids",
        "storage/roller.py imports log.writer",
    ]
