"""Structural rules of the ingest path, checked by reading the modules' source (ast), so a
change that breaks one fails here rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

import inslytic_fast

PACKAGE_DIR = Path(inslytic_fast.__file__).parent
# The decision (admission.py and what it reads a request with) is pure: it neither stores,
# answers nor counts; Ingestor (pipeline.py) carries it out.
DECISION_MODULES = ("ingest/admission.py", "ingest/body.py", "ingest/credentials.py",
                    "ingest/errors.py")  # fmt: skip
NOT_FOR_DECISIONS = ("inslytic_fast.log", "inslytic_fast.http.responses", "inslytic_fast.observe")


def imports_of(relative: str) -> set[str]:
    """The absolute names of the modules ``relative`` imports (relative imports resolved)."""
    path = PACKAGE_DIR / relative
    package = ["inslytic_fast", *Path(relative).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_decision_neither_stores_nor_answers_nor_counts():
    for relative in DECISION_MODULES:
        for name in imports_of(relative):
            assert not name.startswith(NOT_FOR_DECISIONS), f"{relative} imports {name}"


def test_the_error_type_depends_on_nothing_in_the_package():
    assert not {n for n in imports_of("ingest/errors.py") if n.startswith("inslytic_fast")}


def test_refusals_are_built_by_the_named_constructors_of_ingest_errors():
    """``IngestError(...)`` is called in errors.py only (its subclasses call it through
    ``super().__init__``): a status written out anywhere else is a second source of truth."""
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path == PACKAGE_DIR / "ingest" / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name == "IngestError":
                    offenders.append(f"{path.relative_to(PACKAGE_DIR)}:{node.lineno}")
    assert offenders == []
