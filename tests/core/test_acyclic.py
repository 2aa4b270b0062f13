"""core/ has no import cycle: every import of every core module — at module level or inside a
function — is an edge of the module graph, and the graph must be acyclic.

Edges: `import a.b.c` / `from a.b.c import x` from module M adds M -> a.b.c, M -> a.b.c.x when
that is a module (`from core import models`), and M -> every package above a.b.c (importing a
submodule runs its packages' `__init__`) except the packages M itself lives in (those are already
initialising when M runs). Relative imports are resolved against M's package.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "core"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((REPO / PACKAGE).rglob("*.py"))}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The core modules `name` imports anywhere in its file (see module doc)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets.add(mod)
            targets |= {f"{mod}.{alias.name}" for alias in node.names}
    own = set(_ancestors(name)) | ({name} if is_package else set())
    edges: set[str] = set()
    for target in targets:
        for candidate in [*_ancestors(target), target]:
            if candidate in modules and candidate not in own and candidate != name:
                edges.add(candidate)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = core_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [m0, m1, ..., m0], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_core_has_no_import_cycle():
    graph = import_graph()
    assert "core.models" in graph and "core.pcn" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in core/: " + " -> ".join(cycle)


def test_cycle_check_finds_a_cycle():
    cycle = find_cycle({"d": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}})
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_methods_do_not_reach_up_to_checkpoints():
    """`core.models` (the facade with checkpoint I/O) is above every method: no module below
    it imports it (they use core.surgery / core.arch / core.zoo)."""
    graph = import_graph()
    users = sorted(m for m, deps in graph.items()
                   if "core.models" in deps and not m.startswith("core.models"))
    assert users == [], f"{users} import core.models; import core.surgery/arch/zoo instead"
