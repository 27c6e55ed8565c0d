"""The package's import rules, read from the source (ARCHITECTURE.md, "Rules that keep it so").

Checked with Python's own parser over every module of ``d2ops/`` (and ``tasks/``, ``pipelines/``),
in-function imports included:

- private names (``_x``) are not used across modules: what two modules need is public;
- no import cycle between d2ops modules;
- imports flow one way, down the layers of ARCHITECTURE.md (:data:`LAYERS`);
- an import inside a function says why it is there (``# lazy: <reason>``: start-up time, an optional or
  heavy dependency, a cycle otherwise); any other import is at the top of its module.

``ruff``'s banned-api rule (pyproject.toml, TID251) keeps ``clearml`` inside ``d2ops/clearml/`` and
``d2ops.cli`` inside ``d2ops/cli/``. The tests themselves may reach a module's private helpers to test them.
"""

from __future__ import annotations

import ast
import re
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


#: Layer of each package, bottom (0) to top, as ARCHITECTURE.md draws them: a module imports its own layer
#: or lower ones. ``clearml/`` sits above ``pipeline/`` and ``serving/`` (it may import every layer below it;
#: nothing below imports it); ``cli/`` above everything, and nothing imports it.
LAYERS = {
    "d2ops": 0, "d2ops.config": 0, "d2ops.reporting": 0, "d2ops.outputs": 0, "d2ops.utils": 0,
    "d2ops.storage": 1, "d2ops.data": 1,
    "d2ops.engine": 2, "d2ops.evaluation": 2, "d2ops.registry": 2, "d2ops.model": 2,
    "d2ops.pipeline": 3, "d2ops.serving": 3,
    "d2ops.clearml": 4,
    "d2ops.cli": 5, "d2ops.testing": 5, "d2ops.__main__": 5,
}  # fmt: skip


def layer(module: str) -> int:
    """The layer of a module: that of its longest package prefix in :data:`LAYERS`."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise AssertionError(f"{module}: not in any layer of LAYERS (add its package)")


def _is_module(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def d2ops_imports(path: Path, here: str | None = None) -> list[tuple[int, str, bool, bool]]:
    """``(line, module, in_function, has_reason)`` for each d2ops module ``path`` imports (``from d2ops.x import
    y`` names module ``d2ops.x.y`` when that is a module, else ``d2ops.x``)."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    found: list[tuple[int, str, bool, bool]] = []

    def reason(node: ast.stmt) -> bool:
        """``# lazy: why`` on the import's line, or on the comment above it (a run of imports shares one)."""
        if "# lazy:" in lines[node.lineno - 1]:
            return True
        row = node.lineno - 2
        while row >= 0 and re.match(r"\s*(from \S+ import|import \S+)", lines[row]):
            row -= 1
        return row >= 0 and lines[row].strip().startswith("# lazy:")

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # annotations only: never imported at run time
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            targets: list[str] = []
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "d2ops":
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    targets.append(full if _is_module(full) else child.module)
            elif isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names if alias.name.split(".")[0] == "d2ops"]
            for target in dict.fromkeys(targets):
                if target != here:
                    found.append((child.lineno, target, in_function, reason(child)))  # type: ignore[arg-type]
            visit(child, inside)

    visit(tree, False)
    return found


PACKAGE = sorted((ROOT / "d2ops").rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): {target for _, target, _, _ in d2ops_imports(path)} for path in PACKAGE}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                strongconnect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return cycles


def test_no_import_cycle_between_d2ops_modules() -> None:
    graph = _graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 150  # the whole package, in-function imports too
    assert not import_cycles(graph), f"import cycles: {import_cycles(graph)}"


def test_the_cycle_check_finds_a_cycle_through_an_in_function_import() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"a"}}) == [["a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_imports_flow_down_the_layers() -> None:
    upward = [
        f"{path.relative_to(ROOT)}:{line}: {_module_name(path)} (layer {layer(_module_name(path))}) imports "
        f"{target} (layer {layer(target)})"
        for path in PACKAGE
        for line, target, _, _ in d2ops_imports(path)
        if layer(target) > layer(_module_name(path))
    ]
    assert not upward, "imports against the layers of ARCHITECTURE.md:\n" + "\n".join(upward)


def test_nothing_in_d2ops_imports_the_cli() -> None:
    users = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for path in PACKAGE
        if not _module_name(path).startswith("d2ops.cli") and _module_name(path) != "d2ops.__main__"
        for line, target, _, _ in d2ops_imports(path)
        if target.startswith("d2ops.cli")
    ]
    assert not users


def test_every_import_inside_a_function_says_why() -> None:
    unexplained = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for path in PACKAGE
        for line, target, in_function, has_reason in d2ops_imports(path)
        if in_function and not has_reason
    ]
    assert not unexplained, "imports inside functions without '# lazy: <reason>' (or move them to the top):\n" + (
        "\n".join(unexplained)
    )


def test_the_import_reader_sees_in_function_imports_and_their_reasons(tmp_path: Path) -> None:
    sample = tmp_path / "probe.py"
    sample.write_text(
        "from d2ops import config\n\n\ndef f():\n    # lazy: torch\n    from d2ops.model.detector import Detector\n"
        "    from d2ops.model import bundle\n\n\ndef g():\n    import d2ops.cli\n"
    )
    assert d2ops_imports(sample, "d2ops.probe") == [
        (1, "d2ops.config", False, False),
        (6, "d2ops.model.detector", True, True),
        (7, "d2ops.model.bundle", True, True),
        (11, "d2ops.cli", True, False),
    ]
    assert layer("d2ops.storage.s3") == 1 and layer("d2ops.cli.serve") == 5 and layer("d2ops") == 0
