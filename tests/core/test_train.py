import pytest
import torch

from core.data import split, synthetic
from core.errors import Cancelled
from core.models import build
from core.pca import collect_input_stats
from core.pcn import pcn_input_transform
from core.train import TrainConfig, evaluate, train

ARCH = {"name": "mlp", "input_shape": [1, 8, 8], "widths": [32]}


@pytest.fixture(scope="module")
def splits():
    return split(*synthetic("synthetic-tiny", 0), seed=0)


@pytest.mark.parametrize("optimizer, lr", [("adam", 1e-2), ("sgd", 5e-2)])
def test_train_reduces_loss(splits, optimizer, lr):
    torch.manual_seed(0)
    model = build(ARCH)
    before = evaluate(model, splits.train)
    records = []
    config = TrainConfig(epochs=3, optimizer=optimizer, lr=lr, batch_size=32, weight_decay=1e-4,
                         lr_steps=(2,), lr_gamma=0.5)
    history = train(model, splits, config, device="cpu", generator=torch.Generator().manual_seed(0),
                    on_epoch=records.append)
    assert history == records and [r["epoch"] for r in history] == [1, 2, 3]
    assert set(history[0]) >= {"epoch", "loss", "accuracy", "val_loss", "val_accuracy", "wall_s"}
    assert [r["lr"] for r in history] == [lr, lr, lr * 0.5]
    after = evaluate(model, splits.train)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["accuracy"] > 0.5 and not model.training


def test_train_is_deterministic_for_a_generator_seed(splits):
    weights = []
    for _ in range(2):
        model = build(ARCH, generator=torch.Generator().manual_seed(0))
        train(model, splits, TrainConfig(epochs=1, batch_size=50), generator=torch.Generator()
              .manual_seed(5))
        weights.append(model.fc1.weight.detach().clone())
    assert torch.equal(*weights)


def test_cancel_between_batches(splits):
    calls = []

    def should_cancel():
        calls.append(1)
        return len(calls) > 3

    model = build(ARCH)
    with pytest.raises(Cancelled):
        train(model, splits, TrainConfig(epochs=5, batch_size=16), generator=torch.Generator(),
              should_cancel=should_cancel)
    assert len(calls) == 4


def test_max_batches_limits_steps(splits):
    model = build(ARCH)
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    train(model, splits, TrainConfig(epochs=1, batch_size=10, max_batches=2),
          generator=torch.Generator())
    assert seen[:2] == [10, 10] and len(seen) == 2 + 1  # 2 batches + one val batch


def test_pcn_buffers_stay_frozen(splits):
    torch.manual_seed(0)
    model = build(ARCH).eval()
    stats = collect_input_stats(model, ["fc2"], splits.train, samples=200, batch_size=100)
    new, _ = pcn_input_transform(model, stats, {"dims": 8}, ["fc2"])
    U, mu, w = new.fc2.U.clone(), new.fc2.mu.clone(), new.fc2.weight.detach().clone()
    train(new, splits, TrainConfig(epochs=1, batch_size=32, weight_decay=1e-3),
          generator=torch.Generator())
    assert torch.equal(new.fc2.U, U) and torch.equal(new.fc2.mu, mu)
    assert not torch.equal(new.fc2.weight, w)


def test_config_validation_and_dict_round_trip():
    config = TrainConfig(epochs=2, optimizer="sgd", lr_steps=[1])
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"epochs": 1, "warmup": 3})


def test_evaluate_restores_mode(splits):
    model = build(ARCH).train()
    result = evaluate(model, splits.val, batch_size=7)
    assert model.training and 0 <= result["accuracy"] <= 1 and result["loss"] > 0
