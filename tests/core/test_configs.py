import pytest
import torch

from core.configs import DCTpSConfig, LowRankConfig, PCNConfig, PruneConfig
from core.data import synthetic
from core.dctps import dctps_apply
from core.errors import SpecError
from core.lowrank import lowrank_plan, lowrank_transform
from core.models import build
from core.pca import collect_input_stats
from core.pcn import PCNPlan
from core.pcn_output import apply_pcn, pcn_transform, plan_pcn
from core.prune import masks_from_scores, prune_masks, random_scores


def test_from_dict_ignores_only_listed_keys():
    step = {"op": "snip", "sparsity": 0.9, "scope": "global", "init": None, "repair": None,
            "labels": "true", "batches": 1, "batch_size": 100, "rounds": 100,
            "allow_collapse": False}
    config = PruneConfig.from_dict(step)
    assert config.op == "snip" and config.to_dict() == step
    with pytest.raises(SpecError, match="unknown keys"):
        PruneConfig.from_dict({**step, "when": "now"})
    pcn = PCNConfig.from_dict({"op": "pcn", "select": {"threshold": 0.1, "dims": None,
                                                       "energy": None, "target": None},
                               "when": "now", "plateau_delta": None})
    assert pcn.select == {"threshold": 0.1} and pcn.selector() == {"threshold": 0.1}
    with pytest.raises(SpecError):
        DCTpSConfig.from_dict({"op": "dctps", "density": 0.1, "when": "now"})


def test_prune_masks_equals_the_steps():
    model = build({"name": "lenet300"}, generator=torch.Generator().manual_seed(0))
    config = PruneConfig(op="random", sparsity=0.8, scope="layerwise")
    got = prune_masks(model, config, generator=torch.Generator().manual_seed(3))
    want = masks_from_scores(random_scores(model, torch.Generator().manual_seed(3)), 0.8,
                             scope="layerwise")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_lowrank_and_dctps_configs():
    model = build({"name": "lenet300"}, generator=torch.Generator().manual_seed(0))
    config = LowRankConfig.from_dict({"op": "lowrank", "target": {"ranks": {"fc1": 20},
                                      "param_ratio": None, "mac_ratio": None},
                                      "score": "magnitude", "blocking": "none",
                                      "samples": 512, "layers": ["fc1"]})
    plan = lowrank_plan(model, config, input_shape=[1, 28, 28])
    assert plan == {"fc1": {"blocking": "none", "ranks": [20]}}
    lowrank_transform(model, plan)
    ratio = lowrank_plan(model, LowRankConfig(target={"mac_ratio": 0.3}, score="magnitude"),
                         input_shape=[1, 28, 28])
    assert set(ratio) == {"fc1", "fc2", "fc3"}
    report = dctps_apply(model, DCTpSConfig(density=0.1), torch.Generator().manual_seed(0))
    assert report["total_nnz"] == round(0.1 * 266_200)


def test_pcn_plan_is_json_and_apply_reproduces_the_transform():
    arch = {"name": "conv4", "input_shape": [1, 8, 8], "channels": [3, 5, 6, 4], "fc": [12]}
    model = build(arch, generator=torch.Generator().manual_seed(0)).eval()
    train, _ = synthetic("synthetic-tiny", 0)
    stats = collect_input_stats(model, ["conv3", "conv4", "fc1"], train, samples=128)
    config = PCNConfig(select={"dims": 3}, layers=["conv3", "conv4", "fc1"])
    plan = plan_pcn(model, stats, config)
    assert PCNPlan.from_dict(plan.to_dict()) == plan
    new, report = apply_pcn(model, plan, stats)
    ref, ref_report = pcn_transform(model, stats, {"dims": 3}, ["conv3", "conv4", "fc1"])
    assert report == ref_report and new.slimline_arch == ref.slimline_arch
    x = train.x[:4]
    torch.testing.assert_close(new(x), ref(x))
