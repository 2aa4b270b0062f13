"""Checkpoints written before methods became plug-ins (commit afd6302: one of each edit kind —
pcn_input + pcn_output on LeNet-300-100, pcn_input on a ResNet, lowrank with and without
blocking, dctps, a sparse masked model) still load, and compute what they computed then.
`fixtures/checkpoints_v1/make.py` wrote them (run with that checkout on sys.path)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core import models

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints_v1"
NAMES = ["pcn_lenet300", "pcn_resnet", "lowrank_lenet5", "dctps_conv4", "masked_lenet300"]


@pytest.mark.parametrize("name", NAMES)
def test_an_old_checkpoint_loads_and_computes_the_same(name):
    io = load_file(str(FIXTURES / "io.safetensors"))
    model = models.load(FIXTURES / f"{name}.safetensors")
    with torch.no_grad():
        out = model(io[f"{name}.in"])
    torch.testing.assert_close(out, io[f"{name}.out"], rtol=0, atol=1e-6)
    assert models.read_arch(FIXTURES / f"{name}.safetensors")["name"] == model.slimline_arch["name"]


def test_the_old_masked_checkpoint_keeps_its_masks():
    model = models.load(FIXTURES / "masked_lenet300.safetensors")
    masks = model.slimline_masks
    assert set(masks) == {"fc1", "fc2", "fc3"}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == round(0.2 * total)
