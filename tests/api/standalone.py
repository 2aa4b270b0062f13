"""Run a downloaded model where slimline cannot be imported: a fresh interpreter (`-I`, from a
temp cwd) whose first act is a `sys.meta_path` finder that refuses `core`, `service`, `worker`,
`api`, `cli` and `tests`. ONNX runs with onnxruntime and numpy only, `.pt2` with plain torch
(`torch.export.load`). Shared by tests/api/test_model_formats.py and
tests/stack/test_downloads.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

_SCRIPT = r'''
import importlib.abc, sys

SLIMLINE = {"core", "service", "worker", "api", "cli", "tests"}


class RefuseSlimline(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in SLIMLINE:
            raise ImportError(f"{name} is part of slimline and must not be importable here")
        return None


sys.meta_path.insert(0, RefuseSlimline())
try:
    import core  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("slimline is importable")

import numpy as np

kind, model_path, x_path, out_path = sys.argv[1:5]
x = np.load(x_path)
if kind == "onnx":
    import onnxruntime as ort

    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
else:
    import torch

    program = torch.export.load(model_path)
    with torch.no_grad():
        logits = program.module()(torch.from_numpy(x)).numpy()
np.save(out_path, logits)
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in SLIMLINE)
print("loaded slimline modules:", leaked)
raise SystemExit(1 if leaked else 0)
'''


def run_standalone(kind: str, model_path: Path, x: np.ndarray, workdir: Path) -> np.ndarray:
    """The logits of the model file at `model_path` ("onnx" or "pt2") on `x`, computed in a
    process that cannot import slimline."""
    workdir.mkdir(parents=True, exist_ok=True)
    script, x_path, out_path = workdir / "run.py", workdir / "x.npy", workdir / "logits.npy"
    script.write_text(_SCRIPT)
    np.save(x_path, x)
    done = subprocess.run([sys.executable, "-I", str(script), kind, str(model_path.resolve()),
                           str(x_path), str(out_path)], cwd=workdir, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return np.load(out_path)
