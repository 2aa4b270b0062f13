"""`slimline upload FILE [preprocessing options]` and `slimline import MODULE:FACTORY` (cli/app.py,
cli/local_export.py) against the real API app in-process and the real inspector subprocess."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from cli import app as cli_app
from core import models as zoo

USER_CODE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=10, width=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean((2, 3)))


def build(num_classes=10, width=4):
    return Net(num_classes, width)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))
'''


@pytest.fixture
def user_package(tmp_path, monkeypatch) -> str:
    """A user package `usernet_<id>` in the current directory (its code runs only in the CLI)."""
    name = f"usernet_{tmp_path.name.replace('-', '_')}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield name
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def invoke(args: list[str]):
    return CliRunner().invoke(cli_app.app, args)


def last_line(result) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_import_builds_exports_and_uploads(api, user_package, tmp_path):
    sys.path.insert(0, str(tmp_path))
    torch.manual_seed(0)
    reference = __import__(f"{user_package}.models", fromlist=["build"]).build(5, 6).eval()
    with torch.no_grad():
        reference.bn.running_mean.uniform_(-0.2, 0.2)
    torch.save(reference.state_dict(), tmp_path / "w.pth")
    result = invoke(["import", f"{user_package}.models:build", "--input-shape", "1,8,8",
                     "--weights", "w.pth", "--factory-args", '{"num_classes": 5, "width": 6}',
                     "--mean", "0.5", "--std", "0.2", "--save", "kept.pt2"])
    assert result.exit_code == 0, result.output
    model_id = last_line(result)
    assert "prunability:" in result.output and "methods" in result.output
    assert (tmp_path / "kept.pt2").is_file()

    model = invoke(["download", model_id, "-o", str(tmp_path / "m.safetensors")])
    assert model.exit_code == 0, model.output
    loaded = zoo.load(tmp_path / "m.safetensors")
    arch = loaded.slimline_arch
    assert arch["name"] == "graph" and arch["num_classes"] == 5
    assert arch["input_shape"] == [1, 8, 8]
    assert arch["preprocessing"] == {"layout": "NCHW", "mean": [0.5], "std": [0.2]}
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference(x), atol=1e-5)


@pytest.mark.parametrize(("target", "args", "words"), [
    ("{pkg}.models:nope", [], ["factory not found", "build"]),
    ("{pkg}.missing:build", [], ["cannot import module"]),
    ("{pkg}.models", [], ["MODULE:FACTORY"]),
    ("{pkg}.models:build", ["--factory-args", "{oops"], ["--factory-args"]),
    ("{pkg}.models:build", ["--weights", "w.pth", "--factory-args", '{"width": 3}'],
     ["do not fit", "conv.weight"]),
    ("{pkg}.models:build", ["--input-shape", "3,8,8"], ["does not run", "--input-shape"]),
    ("{pkg}.models:Branchy", ["--input-shape", "1,4,4"], ["torch.export failed", "models.py"]),
])
def test_import_errors_say_what_to_fix(api, user_package, tmp_path, target, args, words):
    sys.path.insert(0, str(tmp_path))
    net = __import__(f"{user_package}.models", fromlist=["build"]).build()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    if "--input-shape" not in args:
        args = [*args, "--input-shape", "1,8,8"]
    result = invoke(["import", target.format(pkg=user_package), *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert all(w in result.output for w in words), result.output


def test_upload_pt2_with_preprocessing_and_refusals(api, tmp_path):
    from tests.import_models import export_pt2, make

    path = export_pt2(make("vit"), tmp_path / "vit.pt2")
    result = invoke(["upload", str(path), "--name", "my vit", "--mean", "0.3", "--std", "0.1",
                     "--num-classes", "10", "--input-shape", "1,28,28"])
    assert result.exit_code == 0, result.output
    assert "prunability:" in result.output and "untouched" in result.output
    model_id = last_line(result)
    status = invoke(["download", model_id, "-o", str(tmp_path / "vit.safetensors")])
    assert status.exit_code == 0, status.output
    assert zoo.read_arch(tmp_path / "vit.safetensors")["preprocessing"]["mean"] == [0.3]

    bad = invoke(["upload", str(path), "--layout", "CHW"])
    assert bad.exit_code == 1 and "'layout'" in bad.output, bad.output
    missing = invoke(["upload", str(tmp_path / "nope.pt2")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"PK\x03\x04 zip, not onnx")
    refused = invoke(["upload", str(junk)])
    assert refused.exit_code == 1 and "UnsupportedFormat" in refused.output, refused.output
