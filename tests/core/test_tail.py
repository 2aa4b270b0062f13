"""core.tail: re-running only the part of a model after one layer."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.models import get_layer
from core.tail import HookTailRunner, TailRunner, TailUnavailable, tail_runner
from tests.tiny_models import double_model

ARCHS = {
    "mlp": ({"name": "mlp", "input_shape": [1, 4, 4], "widths": [7, 6], "num_classes": 3},
            ["fc1", "fc2", "fc3"]),
    "conv4": ({"name": "conv4", "input_shape": [2, 8, 8], "channels": [3, 5, 6, 4],
               "fc": [12, 9], "num_classes": 5}, ["conv1", "conv3", "fc2", "fc3"]),
    # stage2.0.conv1 feeds a block whose shortcut comes from upstream: the cached shortcut must
    # be broadcast over the stacked variants
    "resnet": ({"name": "resnet", "input_shape": [3, 8, 8], "depth": 8, "width": 0.25,
                "num_classes": 4}, ["conv1", "stage2.0.conv1", "stage3.0.conv2", "fc"]),
}


def _perturbed_full_forward(model, layer, x, z_new):
    handle = layer.register_forward_hook(lambda *_: z_new)
    try:
        return model(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", sorted(ARCHS))
@pytest.mark.parametrize("runner_cls", [TailRunner, HookTailRunner])
def test_tail_equals_full_forward_with_replaced_layer_output(kind, runner_cls):
    arch, names = ARCHS[kind]
    model = double_model(arch)
    for mod in model.modules():  # keep the signal alive through BatchNorm
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.5, 1.5)
    x = torch.rand(5, *arch["input_shape"], dtype=torch.float64,
                   generator=torch.Generator().manual_seed(0))
    for name in names:
        layer = get_layer(model, name)
        runner = (TailRunner(model, name) if runner_cls is TailRunner
                  else HookTailRunner(model, layer))
        with torch.no_grad():
            y, a, z = runner.prime(x)
            assert torch.allclose(y, model(x))
            assert a.shape[0] == z.shape[0] == 5
            variants = torch.stack([z + 0.3 * torch.randn_like(z) for _ in range(3)])
            out = runner.tail(variants)
            assert out.shape == (3, *y.shape)
            for g in range(3):
                ref = _perturbed_full_forward(model, layer, x, variants[g])
                assert torch.allclose(out[g], ref, atol=1e-12), (kind, name, g)
            assert not torch.allclose(out[0], y)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return self.fc(x)
        return self.fc(-x)


def test_untraceable_model_falls_back_to_hooks():
    model = _Untraceable()
    with pytest.raises(TailUnavailable):
        TailRunner(model, "fc")
    assert isinstance(tail_runner(model, "fc", model.fc), HookTailRunner)
    assert isinstance(tail_runner(nn.Sequential(nn.Linear(3, 2)), "0", None), TailRunner)
