"""The house rules, checked: no import cycles, small modules, no private reach across layers.

Read from the source with ``ast``; nothing is imported. An import inside a function is left
out of the cycle check (it runs later, when both modules are loaded: the way to break a cycle
on purpose); one in an ``if TYPE_CHECKING:`` block counts (it is a dependency all the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "modelpool"
#: "well under 600 lines" per module (STYLE.md); a module that grows past it is split.
MAX_LINES = 600
#: The layers above the pool: they use the pool through its public names (and the documented
#: seam ``Pool.start_predict`` / ``probe`` / ``terminate``), never another object's privates.
OUTER = ("server", "integrations", "doctor", "cli.py", "client.py")
#: The pool's internals, which no outer layer imports.
INTERNALS = {
    "modelpool._supervisor",
    "modelpool._dispatch",
    "modelpool._fleet",
    "modelpool._deadlines",
    "modelpool._poller",
    "modelpool._requests",
    "modelpool._handle",
    "modelpool._transport",
    "modelpool._shm",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The modelpool modules ``name`` imports at module level (TYPE_CHECKING included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def target(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join([*base, *([node.module] if node.module else [])])

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in MODULES)
            elif isinstance(node, ast.ImportFrom):
                module = target(node)
                for alias in node.names:
                    full = f"{module}.{alias.name}"
                    if full in MODULES:
                        found.add(full)
                    elif module in MODULES:
                        found.add(module)
            elif isinstance(node, ast.If | ast.Try | ast.With):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    for child in getattr(node, field, []):
                        visit(child.body if isinstance(child, ast.ExceptHandler) else [child])
            elif isinstance(node, ast.ClassDef):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    found.discard(name)
    return found


def test_no_import_cycles() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycles = []
    state: dict[str, str] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph[node]):
            if dep == "modelpool" or node.startswith(dep + "."):
                continue  # a package's own __init__ runs first: importing it is no cycle
            if state.get(dep) == "open":
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by responsibility"


def _outer_modules() -> list[str]:
    return sorted(n for n, p in MODULES.items() if p.relative_to(SRC).parts[0] in OUTER)


@pytest.mark.parametrize("name", _outer_modules())
def test_outer_layers_use_no_internals(name: str) -> None:
    path = MODULES[name]
    imported = _imports(name, path) & INTERNALS
    assert not imported, f"{name} imports the pool's internals {sorted(imported)}"
    tree = ast.parse(path.read_text())
    own = {  # private names this module defines itself (its own classes' methods, attributes)
        n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    } | {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
        if isinstance(n.value, ast.Name) and n.value.id == "self"
    }
    reach = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") or (
            isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
        ):
            continue
        if node.attr in own:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("sys", "os", "signal"):
            continue  # the standard library's documented underscore names (sys._getframe)
        reach.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not reach, f"{name} reaches into private names: " + ", ".join(reach)
