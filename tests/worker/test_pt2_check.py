"""worker.pt2_check + worker.inspect on `.pt2` archives: honest ones load and convert; hostile
ones are refused by name with a 4xx BEFORE any loader runs, and nothing they carry executes (a
marker file a payload would create never appears)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from tests import upload_bombs as bombs
from tests.import_models import example_input, export_pt2, make
from worker import pt2_check
from worker.inspect import Rejected, inspect_checkpoint

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3


@pytest.fixture(autouse=True)
def _restore_torch_env(monkeypatch):
    """The checks force weights-only loads through the environment: undo it after each test."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pt2")
    return {name: export_pt2(make(name), root / f"{name}.pt2")
            for name in ("mobilenetv2", "resnet18", "vit")}


def inspect(path: Path, tmp_path: Path, options: dict | None = None, **kwargs) -> dict:
    return inspect_checkpoint(path, "pt2", "", tmp_path / "out.safetensors", options=options,
                              graph_output=tmp_path / "g.json", **kwargs)


def refused(path: Path, tmp_path: Path, status: int = 422, **kwargs) -> str:
    with pytest.raises(Rejected) as info:
        inspect(path, tmp_path, **kwargs)
    assert info.value.status == status, info.value.detail
    assert not (tmp_path / "out.safetensors").exists()
    return info.value.detail


def run_inspector(path: Path, tmp_path: Path) -> dict:
    """The real subprocess protocol the API uses."""
    out = tmp_path / "out.safetensors"
    proc = subprocess.run([sys.executable, "-m", "worker.inspect", "--input", str(path),
                           "--format", "pt2", "--arch", "", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    reply = json.loads(lines[0])
    if not reply["ok"]:
        assert not out.exists()
    return reply


# ---- honest archives --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mobilenetv2", "resnet18", "vit"])
def test_honest_archive_imports_and_matches_the_model(honest, name, tmp_path):
    reply = inspect(honest[name], tmp_path, {"preprocessing": {"mean": [0.5], "std": [0.25]}})
    arch = reply["arch"]
    assert arch["name"] == "graph" and arch["input_shape"] == [1, 28, 28]
    assert arch["num_classes"] == 10
    assert arch["preprocessing"] == {"layout": "NCHW", "mean": [0.5], "std": [0.25]}
    from core import models as zoo

    loaded = zoo.load(tmp_path / "out.safetensors")  # one file rebuilds it
    x = example_input(3)
    with torch.no_grad():
        assert torch.allclose(loaded(x), make(name)(x), atol=1e-5)
    graph = Path(reply["graph"]["path"])
    assert reply["graph"]["sha"] == arch["graph"]
    from core.graph import graph_id

    assert graph_id(json.loads(graph.read_text())) == arch["graph"]


def test_clean_copy_holds_only_checked_entries(honest, tmp_path):
    archive = pt2_check.check_archive(honest["vit"], max_bytes=GiB, max_ratio=100)
    clean = tmp_path / "clean.pt2"
    pt2_check.write_clean_archive(honest["vit"], archive, clean)
    with zipfile.ZipFile(clean) as zf:
        names = zf.namelist()
        assert zf.read("archive/data/sample_inputs/model.pt") == b""
        program = json.loads(zf.read("archive/models/model.json"))
    assert all(n.startswith("archive/") for n in names)
    assert ".data/serialization_id" not in " ".join(names)
    assert all(node["metadata"] == {} for node in program["graph_module"]["graph"]["nodes"])
    with zipfile.ZipFile(honest["vit"]) as zf:  # the original has stack traces
        original = json.loads(zf.read("vit/models/model.json"))
    assert any(node["metadata"] for node in original["graph_module"]["graph"]["nodes"])


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).eval()


def test_static_batch_export_and_options(tmp_path):
    path = export_pt2(tiny_cnn(), tmp_path / "static.pt2", torch.randn(2, 1, 8, 8),
                      dynamic_batch=False)
    reply = inspect(path, tmp_path, {"input_shape": [1, 8, 8], "num_classes": 5})
    assert reply["arch"]["input_shape"] == [1, 8, 8] and reply["arch"]["num_classes"] == 5
    saved = tmp_path / "saved.safetensors"
    (tmp_path / "out.safetensors").rename(saved)
    detail = refused(path, tmp_path, options={"input_shape": [3, 32, 32]})
    assert "input_shape 3,32,32" in detail and "1,8,8" in detail
    # the same checks on the re-uploaded checkpoint of the imported model
    again = tmp_path / "again"
    again.mkdir()
    for options, words in [({"num_classes": 7}, "num_classes 7"),
                           ({"input_shape": [8, 8]}, "input_shape 8,8"),
                           ({"preprocessing": {"mean": [0.1, 0.2, 0.3]}}, "mean has 3 values")]:
        with pytest.raises(Rejected, match=words):
            inspect_checkpoint(saved, "safetensors", "", again / "o.safetensors",
                               options=options)
    reply = inspect_checkpoint(saved, "safetensors", "", again / "o.safetensors",
                               options={"preprocessing": {"mean": [0.5], "std": [2.0]}},
                               graph_output=again / "g.json")
    assert reply["arch"]["preprocessing"]["std"] == [2.0]
    assert reply["graph"]["sha"] == reply["arch"]["graph"]


# ---- pickles: refused, never executed ----------------------------------------------------

def test_pickled_constant_is_refused_and_never_runs(honest, tmp_path):
    marker = tmp_path / "pwned"
    evil = bombs.pt2_pickled_constant(honest["vit"], tmp_path / "evil.pt2", marker)
    reply = run_inspector(evil, tmp_path)
    assert reply["ok"] is False and reply["status"] == 422, reply
    assert "'evil'" in reply["detail"] and "pickled" in reply["detail"]
    assert "torch.export.save" in reply["detail"]
    assert not marker.exists(), "the pickle payload was executed"


def test_pickled_sample_inputs_are_refused_and_never_run(honest, tmp_path):
    marker = tmp_path / "pwned"
    evil = bombs.pt2_pickled_sample_inputs(honest["vit"], tmp_path / "evil.pt2", marker)
    reply = run_inspector(evil, tmp_path)
    assert reply["ok"] is False and reply["status"] == 422, reply
    assert "sample inputs" in reply["detail"] and "weights_only" in reply["detail"]
    assert not marker.exists(), "the pickle payload was executed"


def _replace_expr(program: dict, payload: str) -> None:
    text = json.dumps(program)
    symbol = "Symbol('s77', positive=True, integer=True)"
    assert symbol in text
    program.clear()
    program.update(json.loads(text.replace(json.dumps(symbol)[1:-1], payload, 1)))


def _eval_payload(marker: Path) -> str:
    return (f"Symbol('s77', positive=True, integer=True) + "
            f"__import__('os').system('touch {marker}')")


def test_the_payloads_are_real(honest, tmp_path):
    """Control: plain torch.export.load (no slimline checks) runs every payload."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_FORCE")}
    markers, files = [], []
    for name, build in [("constant", bombs.pt2_pickled_constant),
                        ("sample", bombs.pt2_pickled_sample_inputs),
                        ("sympy", lambda src, dest, marker: bombs.pt2_edit_program(
                            src, dest, lambda p: _replace_expr(p, _eval_payload(marker))))]:
        markers.append(tmp_path / f"{name}.marker")
        files.append(str(build(honest["vit"], tmp_path / f"{name}.pt2", markers[-1])))
    script = ("import sys, torch\n"
              "for f in sys.argv[1:]:\n"
              "    try:\n        torch.export.load(f)\n"
              "    except Exception as e:\n        print(f, e)\n")
    subprocess.run([sys.executable, "-c", script, *files], env=env, capture_output=True,
                   timeout=300, check=False)
    assert [m.exists() for m in markers] == [True, True, True]


def test_symbolic_expression_eval_is_refused(honest, tmp_path):
    """torch's deserializer passes shape expressions to sympy.sympify (eval): one that calls
    os.system is refused by the token check and never evaluated."""
    marker = tmp_path / "pwned"
    evil = bombs.pt2_edit_program(honest["vit"], tmp_path / "evil.pt2",
                                  lambda p: _replace_expr(p, _eval_payload(marker)))
    reply = run_inspector(evil, tmp_path)
    assert reply["ok"] is False and reply["status"] == 422, reply
    assert "__import__" in reply["detail"] and "symbolic shape expression" in reply["detail"]
    assert not marker.exists()


@pytest.mark.parametrize("expr", [
    "Symbol('s0', integer=True)",
    "Mul(Integer(2), Symbol('s0', positive=True, integer=True))",
    "FloorDiv(Add(Symbol('s1'), Integer(-1)), Integer(2))",
    "Float('0.5', precision=53)",
])
def test_plain_sympy_expressions_pass(expr):
    pt2_check.check_sympy_expr(expr)


@pytest.mark.parametrize("expr", [
    "S('1+1')", "Symbol('a').__class__", "sympify('x')", "Symbol(\"x');import os\")",
    "Integer(1)[0]", "lambda: 1", "Symbol('s0') * 2", "Rational('1/2')",
])
def test_other_sympy_expressions_are_refused(expr):
    with pytest.raises(Exception, match="symbolic shape expression"):
        pt2_check.check_sympy_expr(expr)


def test_code_in_names_is_refused(honest, tmp_path):
    """FX generates Python source from placeholder names: a name holding code is refused."""
    def edit(program: dict) -> None:
        graph = program["graph_module"]["graph"]
        graph["inputs"][0]["as_tensor"]["name"] = "x=__import__('os').system('id')"
    evil = bombs.pt2_edit_program(honest["vit"], tmp_path / "evil.pt2", edit)
    detail = refused(evil, tmp_path)
    assert "__import__" in detail and "plain name" in detail


def test_guard_code_is_refused(honest, tmp_path):
    evil = bombs.pt2_edit_program(honest["vit"], tmp_path / "evil.pt2",
                                  lambda p: p.update(guards_code=["import os"]))
    assert "guard code" in refused(evil, tmp_path)


# ---- entries an honest torch.export.save does not write ----------------------------------

@pytest.mark.parametrize(("entry", "words"), [
    ("data/aotinductor/model/model.so", ["AOTInductor", "model.so"]),
    ("data/aotinductor/model/model.wrapper.cpp", ["AOTInductor"]),
    ("model.so", ["AOTInductor"]),
    ("data/executorch/model.pte", ["ExecuTorch"]),
    ("extra/notes.pkl", ["extra file"]),
    ("data/constants/custom_obj_0", ["custom", "never unpickles"]),
    ("data/weights/model.pt", ["pickled weights"]),
    ("models/second.json", ["second program"]),
    ("hello.txt", ["unknown entry", "hello.txt"]),
])
def test_foreign_entries_are_refused_by_name(honest, tmp_path, entry, words):
    evil = bombs.pt2_with_entry(honest["resnet18"], tmp_path / "evil.pt2", entry)
    detail = refused(evil, tmp_path)
    assert all(w in detail for w in words), detail
    assert "re-export" in detail.lower()


@pytest.mark.parametrize(("name", "words"), [
    ("!../evil.txt", ["traversal"]),
    ("!resnet18/../../evil.txt", ["traversal"]),
    ("!/etc/passwd", ["absolute"]),
    ("!C:/evil.txt", ["absolute"]),
    ("!resnet18\\..\\evil.txt", ["backslash"]),
    ("!other/archive_format", ["more than one top-level folder"]),
    ("!resnet18//x", ["empty"]),
    ("!resnet18/a\x01b", ["control"]),
    ("!toplevel", ["not inside"]),
])
def test_unsafe_entry_names_are_refused(honest, tmp_path, name, words):
    evil = bombs.pt2_with_entry(honest["resnet18"], tmp_path / "evil.pt2", name)
    detail = refused(evil, tmp_path)
    assert all(w in detail for w in words), detail
    assert not (tmp_path.parent / "evil.txt").exists()


def test_duplicate_entry_is_refused(honest, tmp_path):
    entries = bombs.read_entries(honest["resnet18"])
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(evil, "w") as zf, pytest.warns(UserWarning):
        for name, data in entries.items():
            zf.writestr(name, data)
        zf.writestr("resnet18/archive_format", b"pt2")
    assert "twice" in refused(evil, tmp_path)


# ---- sizes -------------------------------------------------------------------------------

def test_zip_bomb_is_refused_before_inflating(tmp_path):
    bomb = tmp_path / "bomb.pt2"
    size = bombs.pt2_zip_bomb(bomb, 2 * GiB)
    assert size < 8 * 1024 * 1024
    detail = refused(bomb, tmp_path, max_bytes=4 * GiB, max_ratio=100)
    assert "zip bomb" in detail and "weight_0" in detail
    detail = refused(bomb, tmp_path, status=413, max_bytes=GiB, max_ratio=100)
    assert "SLIMLINE_MAX_DATASET_BYTES" in detail


def test_too_many_entries(honest, tmp_path, monkeypatch):
    monkeypatch.setattr(pt2_check, "MAX_ENTRIES", 50)
    detail = refused(honest["resnet18"], tmp_path, status=413)
    assert "entries" in detail


def test_weight_that_does_not_fit_its_file(honest, tmp_path):
    entries = bombs.read_entries(honest["vit"])
    name = "vit/data/weights/model_weights_config.json"
    config = json.loads(entries[name])
    meta = next(iter(config["config"].values()))["tensor_meta"]
    meta["sizes"][0] = {"as_int": 10_000_000}
    entries[name] = json.dumps(config).encode()
    evil = bombs.write_entries(tmp_path / "evil.pt2", entries)
    assert "does not fit" in refused(evil, tmp_path)


def test_not_a_zip_and_truncated(honest, tmp_path):
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"hello, not a zip")
    assert "not a zip" in refused(junk, tmp_path, status=415)
    half = tmp_path / "half.pt2"
    half.write_bytes(honest["vit"].read_bytes()[: honest["vit"].stat().st_size // 2])
    assert "truncated" in refused(half, tmp_path)


# ---- what the converter refuses --------------------------------------------------------------

def test_custom_op_is_refused_by_name(tmp_path):
    @torch.library.custom_op("slimtest::scale", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @scale.register_fake
    def _(x):
        return torch.empty_like(x)

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.ops.slimtest.scale(x))

    path = export_pt2(Custom(), tmp_path / "custom.pt2", torch.randn(2, 4))
    detail = refused(path, tmp_path)
    assert "op slimtest::scale is not supported" in detail


def test_unsupported_aten_op_is_refused_by_name(tmp_path):
    class Cumsum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.cumsum(x, 1))

    path = export_pt2(Cumsum(), tmp_path / "cumsum.pt2", torch.randn(2, 4))
    assert "cumsum" in refused(path, tmp_path)


def test_graph_without_a_floating_input_is_refused(tmp_path):
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.fc = nn.Linear(4, 3)

        def forward(self, idx):
            return self.fc(self.emb(idx).mean(1))

    program = torch.export.export(Embed(), (torch.randint(0, 10, (2, 5)),))
    path = tmp_path / "ints.pt2"
    torch.export.save(program, str(path))
    detail = refused(path, tmp_path)
    assert "float" in detail.lower() or "embedding" in detail, detail
