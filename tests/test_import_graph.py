"""The package's import graph, read with ``ast``: no cycle, and no import hidden in a function
where a module-level one would do.

A cycle forces one side to import inside a function (or to import a half-initialised module);
either way the dependency is hidden from a reader of the module's first lines. Only imports
that Python runs count: ``if TYPE_CHECKING:`` blocks are left out (annotations may point both
ways).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import inslytic_fast

PACKAGE_DIR = Path(inslytic_fast.__file__).parent

# The serving stack's modules: every module of the package they use is imported at the top (the
# optional clients, redis and obstore, are imported lazily inside cluster/ and lake/ instead).
MODULE_LEVEL_ONLY = (
    "inslytic_fast.runtime",
    "inslytic_fast.storage.roller_process",
    "inslytic_fast.cli.serve",
)
# Except the roller, imported only where it runs (the roller's own processes, the final roll's
# child): it loads DuckDB, which must stay out of every serving process
# (tests/test_server_memory.py checks that in running servers).
LOADED_IN_CHILDREN_ONLY = {"inslytic_fast.storage.roller"}


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under ``package_dir``."""
    root = package_dir.parent
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(statements: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements Python runs when the module is imported (not in functions)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in statements:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += runtime_imports(node.body)
            found += runtime_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                found += runtime_imports(block)
            for handler in node.handlers:
                found += runtime_imports(handler.body)
        elif isinstance(node, ast.With):
            found += runtime_imports(node.body)
    return found


def imported_modules(
    name: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: dict[str, Path]
) -> set[str]:
    """The package's modules an import statement in module ``name`` loads (relative resolved;
    ``from pkg import mod`` names the submodule ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if node.level == 0:
        base = node.module or ""
    else:
        package = name.split(".") if is_package else name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    found = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        found.add(submodule if submodule in known else base)
    return found & known.keys()


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports when it is imported."""
    known = module_names(package_dir)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in runtime_imports(tree.body):
            edges |= imported_modules(name, is_package, node, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None when the graph is acyclic."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        on_path.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported in on_path:
                return path[path.index(imported) :] + [imported]
            if imported not in done:
                cycle = visit(imported)
                if cycle is not None:
                    return cycle
        path.pop()
        on_path.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle is not None:
                return cycle
    return None


def imports_inside_functions(path: Path, name: str, known: dict[str, Path]) -> list[str]:
    """The package's modules ``path`` imports inside a function, as ``line: module``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = set(map(id, runtime_imports(tree.body)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top_level:
            is_package = path.name == "__init__.py"
            for module in sorted(imported_modules(name, is_package, node, known)):
                found.append(f"{node.lineno}: {module}")
    return found


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE_DIR))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_serving_stack_imports_the_package_at_module_level():
    known = module_names(PACKAGE_DIR)
    hidden = {
        name: found
        for name, path in known.items()
        if name.startswith(MODULE_LEVEL_ONLY)
        and (
            found := [
                line
                for line in imports_inside_functions(path, name, known)
                if line.split(": ")[1] not in LOADED_IN_CHILDREN_ONLY
            ]
        )
    }
    assert hidden == {}


# The checks themselves, on a package made for the purpose.


def write_package(root: Path, modules: dict[str, str]) -> Path:
    package_dir = root / "pkg"
    for relative, source in modules.items():
        path = package_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return package_dir


def server_importing_roller(root: Path, roller_source: str) -> Path:
    """A package whose runtime/server.py imports storage/roller.py at module level."""
    return write_package(
        root,
        {
            "__init__.py": "",
            "runtime/__init__.py": "",
            "runtime/server.py": "from ..storage import roller\n",
            "storage/__init__.py": "",
            "storage/roller.py": roller_source,
        },
    )


def test_a_cycle_through_relative_imports_and_subpackages_is_found(tmp_path):
    roller = "import os\ntry:\n    from ..runtime.server import x\nexcept ImportError:\n    pass\n"
    package_dir = server_importing_roller(tmp_path, roller)
    assert find_cycle(import_graph(package_dir)) == [
        "pkg.runtime.server",
        "pkg.storage.roller",
        "pkg.runtime.server",
    ]


@pytest.mark.parametrize(
    "roller_source",
    [
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..runtime.server import x\n",
        "def f():\n    from ..runtime.server import x\n",
    ],
)
def test_type_checking_and_function_imports_are_not_module_level_edges(tmp_path, roller_source):
    package_dir = server_importing_roller(tmp_path, roller_source)
    assert find_cycle(import_graph(package_dir)) is None


def test_an_import_inside_a_function_is_reported(tmp_path):
    package_dir = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import os\n\n\ndef f():\n    from . import b\n    import json\n",
            "b.py": "",
        },
    )
    known = module_names(package_dir)
    assert imports_inside_functions(package_dir / "a.py", "pkg.a", known) == ["5: pkg.b"]
