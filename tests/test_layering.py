"""Import direction (DESIGN.md): core/ imports only torch/numpy/stdlib; api/ never imports torch,
core or worker; jobs/ (the shared service layer) never imports torch or core at module level."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STDLIB = set(sys.stdlib_module_names)


def top_level_imports(path: Path, module_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def package_imports(pkg: str, module_level_only: bool = False) -> dict[str, set[str]]:
    return {str(p.relative_to(REPO)): top_level_imports(p, module_level_only)
            for p in sorted((REPO / pkg).rglob("*.py"))}


def test_core_is_pure_torch():
    allowed = STDLIB | {"torch", "numpy", "safetensors", "core"}
    for path, mods in package_imports("core").items():
        assert mods <= allowed, f"{path} imports {sorted(mods - allowed)}"


@pytest.mark.parametrize("pkg", ["api"])
def test_api_never_imports_torch_or_core(pkg):
    for path, mods in package_imports(pkg).items():
        bad = mods & {"torch", "core", "worker", "safetensors.torch"}
        assert not bad, f"{path} imports {sorted(bad)}"


def test_service_layer_keeps_torch_out_of_module_level():
    for path, mods in package_imports("jobs", module_level_only=True).items():
        bad = mods & {"torch", "core", "worker", "api"}
        assert not bad, f"{path} imports {sorted(bad)} at module level"


def test_api_process_does_not_load_torch():
    import subprocess

    code = "import api.app, sys; api.app.create_app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=False,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"
