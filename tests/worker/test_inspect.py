"""worker.inspect: the checkpoint validator the API runs in a subprocess."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core import models as zoo
from core.metrics import param_counts
from worker.inspect import inspect_checkpoint, main

REPO = Path(__file__).resolve().parents[2]
ARCH = {"name": "mlp", "input_shape": [1, 4, 4], "widths": [8]}


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in zoo.build(ARCH).state_dict().items()}


def run_cli(args: list[str], capsys) -> dict:
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # exactly one JSON line
    return json.loads(out[0])


def cli_args(path: Path, fmt: str, out: Path, arch: str = "") -> list[str]:
    return ["--input", str(path), "--format", fmt, "--arch", arch, "--output", str(out)]


def test_valid_safetensors_with_metadata(tmp_path, capsys):
    torch.manual_seed(0)
    model = zoo.build(ARCH)
    src, out = tmp_path / "m.safetensors", tmp_path / "out.safetensors"
    zoo.save(model, src)
    reply = run_cli(cli_args(src, "safetensors", out), capsys)
    assert reply["ok"] is True
    assert reply["arch"] == zoo.normalize_arch(ARCH)
    assert reply["params"] == param_counts(model)
    loaded = zoo.load(out)
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)


def test_valid_pt_state_dict_with_arch(tmp_path, capsys):
    src, out = tmp_path / "m.pt", tmp_path / "out.safetensors"
    torch.save({"state_dict": state()}, src)
    reply = run_cli(cli_args(src, "pt", out, json.dumps({"name": "mlp", "input_shape": [1, 4, 4],
                                                         "widths": [8]})), capsys)
    assert reply["ok"] is True and reply["params"]["total"] == 16 * 8 + 8 + 8 * 10 + 10
    assert zoo.read_arch(out)["widths"] == [8]


def test_truncated_safetensors(tmp_path, capsys):
    src, out = tmp_path / "m.safetensors", tmp_path / "out.safetensors"
    zoo.save(zoo.build(ARCH), src)
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    reply = run_cli(cli_args(src, "safetensors", out), capsys)
    assert reply == {"ok": False, "status": 422, "error": "InvalidCheckpoint",
                     "detail": reply["detail"]}
    assert "truncated" in reply["detail"]
    assert not out.exists()


def test_truncated_pt(tmp_path):
    src = tmp_path / "m.pt"
    torch.save(state(), src)
    src.write_bytes(src.read_bytes()[:100])
    with pytest.raises(Exception, match="truncated"):
        inspect_checkpoint(src, "pt", json.dumps(ARCH), tmp_path / "out.safetensors")


class _Payload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    src, out = tmp_path / "evil.pt", tmp_path / "out.safetensors"
    torch.save({"fc1.weight": _Payload(marker)}, src)
    # through the real subprocess protocol the API uses
    proc = subprocess.run([sys.executable, "-m", "worker.inspect",
                           *cli_args(src, "pt", out, json.dumps(ARCH))],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    reply = json.loads(lines[0])
    assert reply["ok"] is False and reply["status"] == 422
    assert reply["error"] == "InvalidCheckpoint" and "state_dict" in reply["detail"]
    assert not marker.exists(), "the pickle payload was executed"
    assert not out.exists()


def test_wrong_shapes_name_the_key(tmp_path, capsys):
    tensors = state()
    tensors["fc1.weight"] = torch.zeros(3, 16)
    src = tmp_path / "m.safetensors"
    save_file(tensors, str(src))
    reply = run_cli(cli_args(src, "safetensors", tmp_path / "o", json.dumps(ARCH)), capsys)
    assert reply["ok"] is False and reply["status"] == 422
    assert "fc1.weight" in reply["detail"]


def test_nan_weights(tmp_path, capsys):
    tensors = state()
    tensors["fc2.weight"][0, 0] = math.nan
    src = tmp_path / "m.pt"
    torch.save(tensors, src)
    reply = run_cli(cli_args(src, "pt", tmp_path / "o", json.dumps(ARCH)), capsys)
    assert reply["ok"] is False and reply["error"] == "InvalidCheckpoint"
    assert "fc2.weight" in reply["detail"] and "NaN" in reply["detail"]


def test_missing_arch(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    save_file(state(), str(src))  # no metadata
    reply = run_cli(cli_args(src, "safetensors", tmp_path / "o"), capsys)
    assert reply["ok"] is False and reply["status"] == 422
    assert reply["error"] == "MissingArchitecture" and "arch" in reply["detail"]


def test_unknown_arch_and_non_tensor_values(tmp_path, capsys):
    src = tmp_path / "m.pt"
    torch.save(state(), src)
    reply = run_cli(cli_args(src, "pt", tmp_path / "o", '{"name": "nope"}'), capsys)
    assert reply["ok"] is False and "nope" in reply["detail"]
    torch.save({"fc1.weight": 3}, src)
    reply = run_cli(cli_args(src, "pt", tmp_path / "o", json.dumps(ARCH)), capsys)
    assert reply["ok"] is False and "not tensors" in reply["detail"]


def test_unsupported_format(tmp_path, capsys):
    src = tmp_path / "m.tflite"
    src.write_bytes(b"hello")
    reply = run_cli(cli_args(src, "tflite", tmp_path / "o", json.dumps(ARCH)), capsys)
    assert reply["ok"] is False and reply["status"] == 415
    assert reply["error"] == "UnsupportedFormat"
    garbage = tmp_path / "m.onnx"
    garbage.write_bytes(b"hello")
    reply = run_cli(cli_args(garbage, "onnx", tmp_path / "o"), capsys)
    assert reply["ok"] is False and reply["status"] in (415, 422)
