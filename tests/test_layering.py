"""Import direction (DESIGN.md, docs/internals.md), read from the source with `ast`:

* core/ imports only the standard library, torch, numpy, safetensors and core itself, and has no
  import cycle (imports inside functions count: they hold cycles together);
* the service layer (service/) imports nothing from api/, worker/ or cli/, nor torch or core, at any
  depth (inside functions too);
* api/ imports neither torch nor core nor worker nor cli/;
* worker/ never imports api/ or cli/ (the program package cli/ is imported by nothing).

Every import counts: module level, inside functions and classes, under `if TYPE_CHECKING:`, and
`importlib.import_module("...")` / `__import__("...")` with a literal name. The checkers are
tested on small synthetic packages at the end of this file, so a check that silently finds
nothing cannot pass.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)
SERVICE_LAYER = "service"
PROGRAMS = ("api", "worker", "cli")  # what the service layer must never import


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name (relative imports resolved)
    names: tuple[str, ...]  # `from module import names`; () for `import module`
    line: int
    in_function: bool

    def targets(self) -> list[str]:
        """The dotted names this import may load: the module, and module.name for each name."""
        return [self.module, *(f"{self.module}.{n}" for n in self.names if n != "*")]


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(package: str, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` inside `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = parts[:len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*base, module] if module else base)


class _Imports(ast.NodeVisitor):
    def __init__(self, package: str) -> None:
        self.package = package
        self.depth = 0  # functions (and lambdas) around the current node
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(Import(alias.name, (), node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = resolve(self.package, node.level, node.module)
        self.found.append(Import(module, tuple(a.name for a in node.names), node.lineno,
                                 self.depth > 0))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (name in ("import_module", "__import__") and node.args
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            self.found.append(Import(node.args[0].value, (), node.lineno, self.depth > 0))
        self.generic_visit(node)


def imports_in(root: Path, path: Path) -> list[Import]:
    name = module_name(root, path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    visitor = _Imports(package)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor.found


def package_files(root: Path, package: str) -> dict[str, Path]:
    return {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}


def matches(name: str, banned: set[str]) -> str | None:
    """The entry of `banned` that `name` is, or is inside (`core` bans `core.models.zoo`)."""
    return next((b for b in sorted(banned) if name == b or name.startswith(b + ".")), None)


def violations(root: Path, package: str, banned: set[str] | None = None,
               allowed_top: set[str] | None = None, include_functions: bool = True
               ) -> list[str]:
    """`file:line imports X` for each import of a banned name (or, with `allowed_top`, of any
    top-level package outside it)."""
    found: list[str] = []
    for path in package_files(root, package).values():
        for imp in imports_in(root, path):
            if imp.in_function and not include_functions:
                continue
            where = f"{path.relative_to(root)}:{imp.line}"
            if allowed_top is not None and imp.module.split(".")[0] not in allowed_top:
                found.append(f"{where} imports {imp.module}")
            for target in imp.targets() if banned else ():
                if matches(target, banned or set()):
                    found.append(f"{where} imports {target}"
                                 + (" (inside a function)" if imp.in_function else ""))
                    break
    return found


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports (at any depth). `from a.b import c` is the
    module a.b.c when that is a module, else a.b; `import a.b.c` is the deepest existing module."""
    modules = package_files(root, package)

    def deepest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for imp in imports_in(root, path):
            if imp.module.split(".")[0] != package:
                continue
            subs = [t for t in imp.targets()[1:] if t in modules]
            rest = len(subs) < len(imp.names)  # some names are attributes of imp.module
            targets = subs + ([deepest(imp.module)] if rest or not imp.names else [])
            graph[name] |= {t for t in targets if t is not None and t != name}
    return graph


def components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle `[a, b, ..., a]` per component: the shortest from its first module."""
    return [_cycle_through(graph, set(c), c[0]) for c in components(graph)]


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start inside `component` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in no cycle of {sorted(component)}")


def describe(graph: dict[str, set[str]]) -> str:
    return "\n".join(f"{len(c)} modules import each other: {', '.join(c)}\n"
                     f"  e.g. {' -> '.join(_cycle_through(graph, set(c), c[0]))}"
                     for c in components(graph))


# ---- the rules ----

def test_core_imports_only_torch_numpy_safetensors_and_itself():
    allowed = STDLIB | {"torch", "numpy", "safetensors", "core"}
    found = violations(REPO, "core", allowed_top=allowed)
    assert not found, "core/ must stay pure torch:\n" + "\n".join(found)


def test_core_has_no_import_cycle():
    graph = module_graph(REPO, "core")
    assert not cycles(graph), "import cycles inside core/ (imports inside functions count):\n" \
                              + describe(graph)


def test_core_methods_do_not_reach_up_to_checkpoint_io():
    """`core.models` (the facade with checkpoint I/O, which imports `core.methods` and so every
    method) sits above every method: no other core module imports it (they use core.surgery,
    core.arch, core.zoo)."""
    graph = module_graph(REPO, "core")
    users = sorted(m for m, deps in graph.items()
                   if "core.models" in deps and not m.startswith("core.models"))
    assert users == [], f"{users} import core.models; import core.surgery/arch/zoo instead"


def test_service_layer_imports_no_program():
    found = violations(REPO, SERVICE_LAYER, set(PROGRAMS))
    assert not found, "the service layer must not import api/, worker/ or cli/:\n" \
                      + "\n".join(found)


def test_service_layer_is_torch_free():
    # not even inside functions: nothing in the service layer needs torch or core
    found = violations(REPO, SERVICE_LAYER, {"torch", "core", "safetensors.torch"})
    assert not found, "the service layer must not import torch or core/:\n" + "\n".join(found)


def test_api_never_imports_torch_core_worker_or_cli():
    found = violations(REPO, "api", {"torch", "core", "worker", "cli", "safetensors.torch"})
    assert not found, "\n".join(found)


def test_worker_never_imports_api_or_cli():
    found = violations(REPO, "worker", {"api", "cli"})
    assert not found, "\n".join(found)


def test_api_process_does_not_load_torch():
    code = "import api.app, sys; api.app.create_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


# ---- the checkers, on synthetic packages ----

def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cycle_checker_reports_a_cycle(tmp_path):
    # pkg.a -> pkg.b (relative) -> pkg.sub.c (relative, inside a function) -> pkg.a (absolute)
    root = write_package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from . import b\n",
        "pkg/b.py": "def f():\n    from .sub.c import thing\n    return thing\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from pkg.a import helper\nthing = 1\n",
        "pkg/d.py": "import pkg.sub.c\n",  # outside the cycle
    })
    graph = module_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.sub.c"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_cycle_checker_accepts_an_acyclic_package(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.a import top\n",
        "pkg/a.py": "from . import b\nfrom .sub import c\ntop = 1\n",
        "pkg/b.py": "def f():\n    from .sub.c import thing\n    return thing\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "import os\nthing = 1\n",
    })
    graph = module_graph(root, "pkg")
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b", "pkg.sub.c"}
    assert cycles(graph) == []


def test_cycle_checker_reports_a_two_module_cycle_through_a_package(tmp_path):
    root = write_package(tmp_path, {
        "pkg/__init__.py": "from pkg.models import build\n",
        "pkg/models/__init__.py": "def build():\n    from pkg.metrics import count\n",
        "pkg/metrics.py": "from pkg.models import build\ncount = 0\n",
    })
    graph = module_graph(root, "pkg")
    assert cycles(graph) == [["pkg.metrics", "pkg.models", "pkg.metrics"]], describe(graph)
    assert "2 modules import each other: pkg.metrics, pkg.models" in describe(graph)


def test_layer_checker_catches_a_program_import_inside_a_function(tmp_path):
    root = write_package(tmp_path, {
        "svc/__init__.py": "",
        "svc/ok.py": "import json\nfrom svc import other\n",
        "svc/cli.py": "def main():\n    from api.app import create_app\n    return create_app\n",
        "svc/lazy.py": "def f():\n    import importlib\n    return importlib.import_module("
                       "'worker.tasks')\n",
    })
    found = violations(root, "svc", set(PROGRAMS))
    assert found == ["svc/cli.py:2 imports api.app (inside a function)",
                     "svc/lazy.py:3 imports worker.tasks (inside a function)"], found
    assert violations(root, "svc", set(PROGRAMS), include_functions=False) == []
    assert violations(root, "svc", {"torch"}) == []


def test_layer_checker_catches_a_submodule_ban(tmp_path):
    root = write_package(tmp_path, {"svc/__init__.py": "from safetensors import torch\n",
                                    "svc/np.py": "from safetensors.numpy import load\n"})
    assert violations(root, "svc", {"safetensors.torch"}) == [
        "svc/__init__.py:1 imports safetensors.torch"]
