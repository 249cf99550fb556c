"""The storage package's structure: readers import the layout and the events SQL, never the
roller's side (roller, roll input, compaction, retention)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STORAGE = Path(__file__).resolve().parent.parent / "inslytic_fast" / "storage"
# What turns the log into Parquet and rewrites it: only the roller (and its process) use these.
WRITER_MODULES = {"roller", "roll_input", "compaction", "retention", "roller_process"}
# Readers and shared definitions: what query, the lake and the CLI build on.
READER_MODULES = ["query", "layout", "events_sql", "purges"]


def storage_imports(source: str) -> set[str]:
    """The inslytic_fast.storage modules ``source`` imports (relative or absolute)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 1:  # from .x import y / from . import x
                found.update([module] if module else [alias.name for alias in node.names])
            elif module.startswith(("inslytic_fast.storage.", "..storage.")) or (
                node.level == 2 and module.startswith("storage.")
            ):
                found.add(module.rsplit(".", 1)[-1])
            elif module == "inslytic_fast.storage" or (node.level == 2 and module == "storage"):
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("inslytic_fast.storage."):
                    found.add(alias.name.rsplit(".", 1)[-1])
    return found


@pytest.mark.parametrize("reader", READER_MODULES)
def test_readers_never_import_the_roller_side(reader):
    imported = storage_imports((STORAGE / f"{reader}.py").read_text())
    assert not imported & WRITER_MODULES, f"storage/{reader}.py imports {imported & WRITER_MODULES}"


@pytest.mark.parametrize(
    "line",
    [
        "from .roller import Roller",
        "from .compaction import choose_inputs",
        "from . import roll_input",
        "from inslytic_fast.storage.retention import retention_cutoff",
        "from ..storage.roller import Roller",
    ],
)
def test_the_import_walk_sees_every_spelling_of_a_forbidden_import(line):
    source = (STORAGE / "query.py").read_text() + "\n" + line + "\n"
    assert storage_imports(source) & WRITER_MODULES
