"""The package's import rules, read from the source (ARCHITECTURE.md, "Rules that keep it so").

Private names (``_x``) are not used across modules: what two modules need is public. Checked with Python's
own parser over every module of ``d2ops/``, ``tasks/`` and ``pipelines/``, in-function imports included.
The tests themselves may reach a module's private helpers to test them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "d2ops").rglob("*.py"), *(ROOT / "tasks").glob("*.py"), *(ROOT / "pipelines").glob("*.py")])


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_uses(path: Path, here: str | None = None) -> list[str]:
    """``file:line: what`` for each private name of another d2ops module that ``path`` (the module ``here``)
    imports or reads."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = here or _module_name(path)
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    modules: set[str] = set()  # local names bound to d2ops modules: `from d2ops import storage`, `import d2ops.x as x`
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "d2ops":
            for alias in node.names:
                if _private(alias.name) and node.module != here:
                    found.append(f"{shown}:{node.lineno}: from {node.module} import {alias.name}")
                elif (ROOT / Path(*node.module.split("."), alias.name)).with_suffix(".py").is_file() or (
                    ROOT / Path(*node.module.split("."), alias.name) / "__init__.py"
                ).is_file():
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "d2ops" and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        named = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
        if named and _private(node.attr):  # type: ignore[union-attr]
            found.append(f"{shown}:{node.lineno}: {node.value.id}.{node.attr}")  # type: ignore[attr-defined]
    return found


def test_no_private_name_is_used_across_modules() -> None:
    assert len(SOURCES) > 40
    found = [use for path in SOURCES for use in private_uses(path)]
    assert not found, "private names used across modules (make them public where two modules need them):\n" + "\n".join(
        found
    )


def test_the_rule_finds_both_spellings(tmp_path: Path) -> None:
    """The check itself: a private name imported by name, and one read off an imported module."""
    sample = tmp_path / "probe.py"
    sample.write_text(
        "from d2ops.storage.s3 import _temp_path\nfrom d2ops import storage\n\n\ndef f():\n    return storage._x\n"
    )
    assert private_uses(sample, "d2ops.probe") == [
        "probe.py:1: from d2ops.storage.s3 import _temp_path",
        "probe.py:6: storage._x",
    ]
