"""The lake's structure, checked on its source: who may import whom.

- The writer stays apart: readers (``view``), upkeep (``jobs``), the layout and the status
  file never import the uploader, so reading or compacting the lake cannot start or depend on
  a node's upload loop.
- The object-store client (obstore) is loaded only by ``lake/objectstore.py``, and only when a
  store is built (inside a function, or for the type checker), so the embedded install never
  needs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import inslytic_fast

PACKAGE_DIR = Path(inslytic_fast.__file__).parent
LAKE_DIR = PACKAGE_DIR / "lake"
NOT_THE_WRITER = ("view", "jobs", "layout", "status", "objectstore")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, source: str | None = None, *, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules ``path`` (or ``source`` as if it were at ``path``)
    imports; ``from x import y`` counts x and x.y."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_readers_and_upkeep_never_import_the_uploader():
    for name in NOT_THE_WRITER:
        imported = imports(LAKE_DIR / f"{name}.py")
        assert "inslytic_fast.lake.uploader" not in imported, f"lake/{name}.py imports it"


def test_obstore_is_loaded_only_by_the_object_store_module_and_only_on_demand():
    for path in PACKAGE_DIR.rglob("*.py"):
        uses = {m for m in imports(path) if m == "obstore" or m.startswith("obstore.")}
        if path == LAKE_DIR / "objectstore.py":
            assert uses  # the rule below is about something
            assert not {m for m in imports(path, top_level_only=True) if m.startswith("obstore")}, (
                "obstore imported at the top of lake/objectstore.py"
            )
        else:
            assert not uses, f"{path.relative_to(PACKAGE_DIR)} imports obstore"


def test_the_import_walker_sees_relative_and_nested_imports():
    """The rules above would pass vacuously if the walker missed an import form."""
    view = LAKE_DIR / "view.py"
    broken = view.read_text() + (
        "\ndef late():\n    from .uploader import Uploader\n    import obstore.store\n"
    )
    assert "inslytic_fast.lake.uploader" in imports(view, broken)
    assert "obstore.store" in imports(view, broken)
    assert "obstore.store" not in imports(view, broken, top_level_only=True)
    assert "inslytic_fast.storage.query" in imports(view)  # ..storage.query, resolved
