"""Auto-compress (issue 15) against hand-set baselines at the same budget and the same training
epochs, and the search's cost with one and two workers.

Run from the repository root (Torch-Pruning is the optional `bench` extra:
`.venv/bin/pip install -e '.[bench]'`, i.e. torch-pruning==1.6.1):

    .venv/bin/python -m benchmarks.auto_compress --part lenet --seeds 3      # LeNet-300-100
    .venv/bin/python -m benchmarks.auto_compress --part conv4                # Conv4, reduced
    .venv/bin/python -m benchmarks.auto_compress --part cost                 # 1 vs 2 workers
    .venv/bin/python -m benchmarks.auto_compress --part all --quick          # smoke test, < 1 min

Every row starts from the same dense model: the zoo architecture built with seed s, trained
`--pre-epochs` epochs (Adam 1e-3, batch 128: the train step's defaults) on seed s's split of the
data (`core.data.split`, as a job splits it). Each compressed model is then trained
F = `--finetune-epochs` + `--final-epochs` epochs (a fresh Adam 1e-3, batch 128, shuffling
seed s + 1 for every method alike): the epochs the auto step spends on its winner. The small
dense model trains `--pre-epochs` + F epochs from scratch. So every row has the same total
training epochs.

Budgets (what `core.budget.model_cost` measures; an accepted model is at or below the goal):
* LeNet-300-100: `total_params` 27,000 (every stored value of the dense-format model; ~10x
  smaller than 266,610);
* Conv4: `macs` = 1/8 of the dense model's MACs per sample, and `latency_ms` = half the dense
  model's onnxruntime latency at batch 256 (`worker.onnx_tools.ort_latency_ms` on the ONNX
  `core.export.export_onnx` writes, as the export and measure steps time it; `--threads`
  intra-op threads).

Rows (the single methods through core's public API, with the step's defaults):
* `pcn` / `pcn-out`: input-based PCN of the step's `layers: auto` (and output-based pruning);
* `lowrank`: output-perturbation scores on 512 calibration images, no blocking;
* `channel_prune` (`-r16`: `round_to` 16, latency budgets only): L1, global;
  each is asked for the absolute target (`select.target` / `target: {kind: N}`) when core
  supports it ("absolute" in the route column); otherwise its ratio or common dims is fitted
  with `core.budget.fit_to_budget` so the measured cost lands at or just below the budget
  ("fitted"); the "best single method" is the one with the best mean validation accuracy;
* `tp-group-l2` / `tp-group-l2-global`: Torch-Pruning's MagnitudePruner with
  GroupMagnitudeImportance(p=2) (group L2), one pruning ratio for every layer / one global
  ranking of all groups, the output layer ignored, the ratio fitted the same way;
* `small-dense`: an MLP `[a, a/3]` (LeNet) or a uniformly narrowed Conv4 trained from scratch,
  the largest one within the budget;
* `auto`: the auto step on the same dense model (uploaded from this script's checkpoint to a
  `slimline up` stack), `{"op": "auto", "budget": ..., "trials": 24, "finetune_epochs": 1,
  "final_epochs": 5}`; the downloaded winner is measured like every other row.

Conv4 runs at a reduced scale (the 2-core VM trains a full 54k-image epoch in ~90 s): a fixed
`--conv4-subset` of the 60k training images (uploaded as a dataset for the auto run; the job
splits it as this script does), the first `--conv4-test` test images, fewer epochs, one seed.

The search-cost part runs the LeNet auto job (seed 0) on a full stack (PostgreSQL, Redis, S3)
with one and then two `slimline worker` processes (`--cost-threads` torch threads each) and one
hand-set job (the best single method's step + F epochs) on one worker: wall time, and the
search's compute (the sum of its trials' `wall_s`).

Markdown tables are printed; JSON goes to `benchmarks/out/auto_compress_<part>.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import dump_results, run_meta
from benchmarks.pcn_conv4 import narrow_spec
from core import data, models, pcn_select
from core import lowrank as core_lowrank
from core.budget import costs, fit_to_budget, model_cost
from core.channel_prune import ChannelPruneConfig, channel_prune
from core.configs import LowRankConfig
from core.errors import SpecError
from core.export import export_onnx
from core.lowrank import (
    block_shapes,
    layer_positions,
    layer_scores,
    lowrank_layers,
    lowrank_plan,
    lowrank_transform,
    select_ranks,
)
from core.models import get_layer, layer_weight
from core.pca import collect_input_stats
from core.pcn_auto import auto_layers
from core.pcn_output import pcn_transform
from core.train import TrainConfig, evaluate, train

SHAPE = [1, 28, 28]
LATENCY = "latency_ms"
OUT_DIR = Path("benchmarks/out")
TP_HINT = ("Torch-Pruning is the optional 'bench' extra: .venv/bin/pip install -e '.[bench]' "
           "(torch-pruning==1.6.1)")
SINGLE = ("pcn", "pcn-out", "lowrank", "channel_prune", "channel_prune-r16")
METHODS = (*SINGLE, "tp-group-l2", "tp-group-l2-global", "small-dense")
TERMINAL = ("succeeded", "failed", "canceled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=["lenet", "conv4", "cost", "all"], default="lenet")
    p.add_argument("--seeds", type=int, default=3, help="LeNet seeds 0..N-1")
    p.add_argument("--conv4-seeds", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny smoke scale (< 1 min a part)")
    p.add_argument("--pre-epochs", type=int, default=3, help="dense epochs before compressing")
    p.add_argument("--conv4-pre-epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1, help="the auto step's default")
    p.add_argument("--final-epochs", type=int, default=5, help="the auto step's default")
    p.add_argument("--conv4-final-epochs", type=int, default=3)
    p.add_argument("--lenet-budget", type=int, default=27_000, help="total_params")
    p.add_argument("--conv4-mac-fraction", type=float, default=1 / 8)
    p.add_argument("--conv4-latency-fraction", type=float, default=0.5)
    p.add_argument("--latency-batch", type=int, default=256)
    p.add_argument("--latency-repeats", type=int, default=10)
    p.add_argument("--conv4-subset", type=int, default=20_000,
                   help="training images of the reduced Conv4 dataset (10%% become validation)")
    p.add_argument("--conv4-test", type=int, default=5000, help="first N test images")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--budgets", nargs="+", choices=["macs", "latency"],
                   default=["macs", "latency"], help="the Conv4 budgets to run")
    p.add_argument("--reuse-dense", action="store_true",
                   help="load the dense checkpoint an earlier run saved instead of training")
    p.add_argument("--keep-other-setups", action="store_true",
                   help="keep the part's existing JSON rows of the setups not run now")
    p.add_argument("--keep-other-methods", action="store_true",
                   help="--keep-other-setups, and the existing rows of the setups run now "
                        "whose method is not run now (with --reuse-dense: the same starting "
                        "model)")
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--auto", choices=["if-available", "on", "off"], default="if-available",
                   help="run the auto step (if-available: when this checkout has the op)")
    p.add_argument("--cost-workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cost-threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--threads", type=int, default=2, help="torch threads (training)")
    p.add_argument("--ort-threads", type=int, default=2,
                   help="onnxruntime intra-op threads for latencies (and the embedded stack's "
                        "worker threads: the measure step times with the worker's threads)")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--out-dir", default=str(OUT_DIR))
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.conv4_seeds = min(args.seeds, 1), 1
        args.pre_epochs = args.conv4_pre_epochs = 1
        args.finetune_epochs, args.final_epochs, args.conv4_final_epochs = 1, 0, 0
        args.conv4_subset, args.conv4_test = 500, 200
        args.latency_batch, args.latency_repeats = 64, 3
        if args.methods == list(METHODS):  # one of each kind of cut is enough to smoke-test
            args.methods = ["pcn-out", "lowrank", "channel_prune", "tp-group-l2",
                            "small-dense"]
        args.trials = min(args.trials, 4)
        args.cost_workers = args.cost_workers[:1]
    return args


# ---- scale ----------------------------------------------------------------------------------

@dataclass
class Scale:
    """Sizes that shrink under --quick."""

    pcn_samples: int = 5000
    lowrank_samples: int = 512
    lenet_train: int = 0  # 0: the whole split
    lenet_test: int = 0
    fit_evals: int = 24
    latency_evals: int = 8
    latency_tol: float = 0.05

    @classmethod
    def of(cls, args: argparse.Namespace) -> Scale:
        if not args.quick:
            return cls()
        return cls(pcn_samples=300, lowrank_samples=8, lenet_train=2000, lenet_test=1000,
                   fit_evals=8, latency_evals=3, latency_tol=0.2)


# ---- data -----------------------------------------------------------------------------------

_FMNIST: dict[str, tuple[data.ArrayDataset, data.ArrayDataset]] = {}


def fashion_mnist(args: argparse.Namespace) -> tuple[data.ArrayDataset, data.ArrayDataset]:
    if args.data_dir not in _FMNIST:
        _FMNIST[args.data_dir] = data.fashion_mnist(args.data_dir)
    return _FMNIST[args.data_dir]


def lenet_splits(seed: int, args: argparse.Namespace, scale: Scale) -> data.Splits:
    """Seed s's split of the full Fashion-MNIST, as a job on `fashion-mnist` gets it."""
    train_set, test_set = fashion_mnist(args)
    s = data.split(train_set, test_set, seed)
    tr = s.train.subset(torch.arange(scale.lenet_train)) if scale.lenet_train else s.train
    te = s.test.subset(torch.arange(scale.lenet_test)) if scale.lenet_test else s.test
    val = s.val.subset(torch.arange(min(len(s.val), 500))) if scale.lenet_train else s.val
    return data.Splits(tr, val, te)


def conv4_arrays(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """The reduced Conv4 dataset as uint8 arrays: `--conv4-subset` training images drawn with
    a fixed generator (seed 12345) from the 60k, and the first `--conv4-test` test images."""
    train_set, test_set = fashion_mnist(args)
    pick = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(12345))
    pick = pick[:args.conv4_subset].sort().values

    def u8(x: torch.Tensor) -> np.ndarray:
        return (x[:, 0] * 255).round().to(torch.uint8).numpy()

    return {"x_train": u8(train_set.x[pick]), "y_train": train_set.y[pick].numpy(),
            "x_test": u8(test_set.x[:args.conv4_test]),
            "y_test": test_set.y[:args.conv4_test].numpy()}


def conv4_splits(arrays: dict[str, np.ndarray], seed: int) -> data.Splits:
    """What a job on the uploaded arrays gets: `from_arrays`, then `split` by the job's seed."""
    train_set, test_set = data.from_arrays(arrays, num_classes=10)
    return data.split(train_set, test_set, seed)


# ---- costs ----------------------------------------------------------------------------------

def onnx_latency(model: nn.Module, args: argparse.Namespace, repeats: int | None = None
                 ) -> float:
    """onnxruntime ms per batch of `--latency-batch` on the model's ONNX export (median)."""
    from worker.onnx_tools import ort_latency_ms

    with tempfile.TemporaryDirectory(prefix="auto-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        export_onnx(model, SHAPE, path)
        return ort_latency_ms(path, SHAPE, args.latency_batch, args.ort_threads,
                              repeats=repeats or args.latency_repeats, budget_s=6.0)


def round_robin_latency(nets: list[nn.Module], args: argparse.Namespace, repeats: int
                        ) -> list[float]:
    """Median ms per batch of each net's ONNX, timed in turns so load hits all alike."""
    from worker.onnx_tools import input_name, ort_session

    x = np.random.default_rng(0).random((args.latency_batch, *SHAPE)).astype(np.float32)
    times: list[list[float]] = [[] for _ in nets]
    with tempfile.TemporaryDirectory(prefix="auto-bench-") as tmp:
        sessions = []
        for i, net in enumerate(nets):
            path = Path(tmp) / f"m{i}.onnx"
            export_onnx(net, SHAPE, path)
            sessions.append(ort_session(path, args.ort_threads))
        for turn in range(repeats + 3):
            for session, ts in zip(sessions, times, strict=True):
                start = time.perf_counter()
                session.run(None, {input_name(session): x})
                if turn >= 3:
                    ts.append(1000 * (time.perf_counter() - start))
    return [statistics.median(ts) for ts in times]


class PairedLatency:
    """A model's latency measured in turns with the dense model's (dense, model, dense, ...),
    reported as `reference_ms * median(model) / median(dense)`: the share of the dense model's
    time, so load that drifts during a long run (other jobs on the machine) cancels out.
    `reference_ms` is the dense latency the budget was set from."""

    def __init__(self, dense: nn.Module, args: argparse.Namespace, reference_ms: float):
        from worker.onnx_tools import ort_session

        self.args, self.reference_ms = args, reference_ms
        self.tmp = tempfile.TemporaryDirectory(prefix="auto-bench-")
        path = Path(self.tmp.name) / "dense.onnx"
        export_onnx(dense, SHAPE, path)
        self.dense = ort_session(path, args.ort_threads)
        self.last: dict[str, float] = {}

    def __call__(self, model: nn.Module) -> float:
        from worker.onnx_tools import input_name, ort_session

        x = np.random.default_rng(0).random((self.args.latency_batch, *SHAPE)).astype(np.float32)
        path = Path(self.tmp.name) / "model.onnx"
        export_onnx(model, SHAPE, path)
        sessions = [self.dense, ort_session(path, self.args.ort_threads)]
        times: list[list[float]] = [[], []]
        for turn in range(self.args.latency_repeats + 2):
            for session, ts in zip(sessions, times, strict=True):
                start = time.perf_counter()
                session.run(None, {input_name(session): x})
                if turn >= 2:
                    ts.append(1000 * (time.perf_counter() - start))
        dense_ms, model_ms = (statistics.median(ts) for ts in times)
        self.last = {"model_ms": model_ms, "dense_ms": dense_ms, "ratio": model_ms / dense_ms}
        return self.reference_ms * model_ms / dense_ms


@dataclass
class Budget:
    kind: str
    goal: float
    meter: PairedLatency | None = None  # latency budgets: how a model's latency is measured

    def spec(self, batch: int) -> dict[str, Any]:
        """The auto step's `budget`."""
        if self.kind == LATENCY:
            return {LATENCY: round(self.goal, 3), "batch_size": batch}
        return {self.kind: int(self.goal)}


def cost_fn(budget: Budget, args: argparse.Namespace) -> Callable[[nn.Module], float]:
    if budget.kind == LATENCY:
        meter = budget.meter
        return meter if meter is not None else (lambda m: onnx_latency(m, args))
    return lambda m: float(model_cost(m, budget.kind, SHAPE))


def fit(build: Callable[[float], nn.Module], budget: Budget, lo: float, hi: float,
        args: argparse.Namespace, scale: Scale, *, integer: bool = False, what: str = ""
        ) -> tuple[nn.Module, float, float, int]:
    """(model, knob, measured cost, evaluations) of the largest knob within the budget."""
    latency = budget.kind == LATENCY
    result = fit_to_budget(build, cost_fn(budget, args), budget.goal, lo, hi, what=what,
                           tol=scale.latency_tol if latency else 0.01,
                           max_evals=scale.latency_evals if latency else scale.fit_evals,
                           integer=integer)
    return result.built, result.knob, result.cost, len(result.trials)


# ---- the cuts -------------------------------------------------------------------------------

@dataclass
class Cut:
    model: nn.Module
    route: str  # "absolute" | "fitted <knob>" | "from scratch"
    knob: Any
    spec: dict[str, Any] | None  # the equivalent job step
    cost: float | None = None  # the budget kind, as measured while fitting
    evaluations: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Cutter:
    """Cuts of one dense model to one budget; caches the statistics and scores the cuts of the
    same dense model share (PCA, low-rank scores)."""

    def __init__(self, dense: nn.Module, splits: data.Splits, seed: int,
                 args: argparse.Namespace, scale: Scale):
        self.dense, self.splits, self.seed, self.args, self.scale = dense, splits, seed, args, \
            scale
        order = torch.randperm(len(splits.train),
                               generator=torch.Generator().manual_seed(2000 + seed))
        self.calib = splits.train.subset(order[:max(scale.pcn_samples, scale.lowrank_samples)])
        self._stats: Any = None
        self._scores: Any = None

    # -- pcn --
    def pcn_stats(self) -> tuple[list[str], Any]:
        if self._stats is None:
            layers = auto_layers(self.dense)
            top_k = max(layer_weight(self.dense, n).shape[1] for n in layers)
            stats = collect_input_stats(self.dense, layers, self.calib,
                                        samples=self.scale.pcn_samples, top_k=top_k,
                                        max_rows=100_000,
                                        generator=torch.Generator().manual_seed(self.seed))
            self._stats = (layers, stats)
        return self._stats

    def pcn(self, budget: Budget, output_based: bool) -> Cut:
        layers, stats = self.pcn_stats()
        output = "auto" if output_based else None
        spec: dict[str, Any] = {"op": "pcn", "layers": layers, "output_based": output_based}
        absolute_error = "latency is measured, not a pcn target"
        if budget.kind != LATENCY:
            target = {budget.kind: int(budget.goal)}
            try:
                to_budget = getattr(pcn_select, "pcn_transform_to_budget", None)
                if to_budget is not None:  # the pcn step's size targets (per-layer dims)
                    model, report = to_budget(self.dense, stats, budget.kind, int(budget.goal),
                                              layers, output=output, input_shape=SHAPE)
                else:
                    model, report = pcn_select.pcn_transform_to_target(
                        self.dense, stats, target, layers, output=output,
                        val_dataset=self.splits.val)
                return Cut(model, "absolute",
                           [r["dims"] for r in report["input"].values()],
                           spec | {"select": {"target": target}},
                           extra={"dims": {n: r["dims"] for n, r in report["input"].items()},
                                  "output_keep": {g: r["keep"]
                                                  for g, r in report["output"].items()}})
            except SpecError as exc:
                absolute_error = str(exc)
        dims_of = {n: int(stats[n].dim) for n in layers}

        def build(d: float) -> nn.Module:
            select = {"per_layer": {n: {"dims": max(1, min(int(d), dims_of[n]))}
                                    for n in layers}}
            return pcn_transform(self.dense, stats, select, layers, output=output)[0]

        model, knob, cost, evals = fit(build, budget, 1, max(dims_of.values()), self.args,
                                       self.scale, integer=True, what="pcn")
        per_layer = {n: {"dims": max(1, min(int(knob), dims_of[n]))} for n in layers}
        return Cut(model, "fitted common dims", int(knob),
                   spec | {"select": {"dims": int(knob)}, "per_layer": per_layer}, cost, evals,
                   note=f"absolute target: {absolute_error[:160]}")

    # -- lowrank --
    def lowrank_scores(self) -> tuple[list[str], Any, torch.Tensor]:
        if self._scores is None:
            layers = lowrank_layers(self.dense, "all")
            inputs = self.calib.x[:self.scale.lowrank_samples]
            start = time.perf_counter()
            scores = layer_scores(self.dense, layers, "none", "output_perturbation", inputs)
            self._scores = (layers, scores, inputs)
            print(f"  lowrank scores: {time.perf_counter() - start:.1f} s", flush=True)
        return self._scores

    def lowrank(self, budget: Budget) -> Cut:
        layers, scores, inputs = self.lowrank_scores()
        absolute_error = "latency is measured, not a lowrank target"
        if budget.kind != LATENCY:
            target = {budget.kind: int(budget.goal)}
            try:
                fit_ranks = getattr(core_lowrank, "fit_ranks", None)
                if fit_ranks is not None:  # lowrank_plan's absolute route, on cached scores
                    ranks = fit_ranks(self.dense, layers, "none", scores, budget.kind,
                                      budget.goal, SHAPE)[0]
                    plan = {n: {"blocking": "none", "ranks": r} for n, r in ranks.items()}
                else:
                    config = LowRankConfig(target=target, samples=self.scale.lowrank_samples)
                    plan = lowrank_plan(self.dense, config, input_shape=SHAPE, inputs=inputs)
                model = lowrank_transform(self.dense, plan)[0]
                return Cut(model, "absolute", [sum(p["ranks"]) for p in plan.values()],
                           {"op": "lowrank", "target": target},
                           extra={"ranks": {n: p["ranks"] for n, p in plan.items()}})
            except SpecError as exc:
                absolute_error = str(exc)
        shapes = {n: block_shapes(get_layer(self.dense, n), "none") for n in layers}
        by_macs = budget.kind in ("macs", LATENCY)
        weights = layer_positions(self.dense, layers, SHAPE) if by_macs else None

        def build(log_ratio: float) -> nn.Module:  # the ratio spans decades: bisect its log
            ranks = select_ranks(scores, shapes, 10 ** log_ratio, weights)
            return lowrank_transform(self.dense, {n: {"blocking": "none", "ranks": r}
                                                  for n, r in ranks.items()})[0]

        model, log_knob, cost, evals = fit(build, budget, -4.0, 0.0, self.args, self.scale,
                                           what="lowrank")
        knob = 10 ** log_knob
        key = "mac_ratio" if by_macs else "param_ratio"
        return Cut(model, f"fitted {key}", knob, {"op": "lowrank", "target": {key: knob}}, cost,
                   evals, note=f"absolute target: {absolute_error[:160]}")

    # -- channel_prune --
    def channel_prune(self, budget: Budget, round_to: int) -> Cut:
        absolute_error = "latency is measured, not a channel_prune target"
        spec: dict[str, Any] = {"op": "channel_prune", "criterion": "l1", "scope": "global",
                                "round_to": round_to}
        if budget.kind != LATENCY:
            target = {budget.kind: int(budget.goal)}
            try:
                model, report = channel_prune(
                    self.dense, ChannelPruneConfig(target=target, round_to=round_to))
                return Cut(model, "absolute", report.get("ratio"), spec | {"target": target},
                           extra={"kept": {g: r["kept"] for g, r in report["groups"].items()}})
            except SpecError as exc:
                absolute_error = str(exc)
        key = "mac_ratio" if budget.kind in ("macs", LATENCY) else "param_ratio"

        def build(ratio: float) -> nn.Module:
            config = ChannelPruneConfig(target={key: min(1.0, ratio)}, round_to=round_to)
            return channel_prune(self.dense, config)[0]

        model, knob, cost, evals = fit(build, budget, 0.05, 1.0, self.args, self.scale,
                                       what="channel_prune")
        return Cut(model, f"fitted {key}", knob, spec | {"target": {key: knob}}, cost, evals,
                   note=f"absolute target: {absolute_error[:160]}")

    # -- Torch-Pruning --
    def tp(self, budget: Budget, global_pruning: bool) -> Cut:
        tp = _tp()
        last = [m for m in self.dense.modules() if isinstance(m, nn.Linear)][-1]
        index = list(self.dense.modules()).index(last)

        def build(keep: float) -> nn.Module:
            net = copy.deepcopy(self.dense)
            ignored = [list(net.modules())[index]]
            pruner = tp.pruner.MagnitudePruner(
                net, torch.zeros(1, *SHAPE), importance=tp.importance.GroupMagnitudeImportance(p=2),
                global_pruning=global_pruning, pruning_ratio=min(0.99, 1 - keep),
                ignored_layers=ignored)
            pruner.step()
            return net

        model, knob, cost, evals = fit(build, budget, 0.03, 1.0, self.args, self.scale,
                                       what="Torch-Pruning")
        return Cut(model, "fitted keep = 1 - pruning_ratio", knob, None, cost, evals,
                   note="global ranking" if global_pruning else "one ratio for every layer")

    # -- small dense from scratch --
    def small_dense(self, budget: Budget) -> Cut:
        arch = models.model_arch(self.dense)
        generator_seed = self.seed
        if arch["name"] in ("lenet300", "mlp"):
            def build(a: float) -> nn.Module:
                spec = {"name": "mlp", "widths": [int(a), max(1, round(a / 3))],
                        "input_shape": SHAPE, "num_classes": 10, "init": arch.get("init")}
                spec = {k: v for k, v in spec.items() if v is not None}
                return models.build(spec, generator=torch.Generator().manual_seed(generator_seed))

            model, knob, cost, evals = fit(build, budget, 1, 300, self.args, self.scale,
                                           integer=True, what="the small MLP")
            return Cut(model, "from scratch", model.slimline_arch["widths"],
                       {"model": {"arch": model.slimline_arch}}, cost, evals)

        def build_conv(s: float) -> nn.Module:
            return models.build(narrow_spec(s), generator=torch.Generator().manual_seed(
                generator_seed))

        model, knob, cost, evals = fit(build_conv, budget, 0.01, 1.0, self.args, self.scale,
                                       what="the narrow Conv4")
        spec = narrow_spec(knob)
        return Cut(model, "from scratch", spec["channels"] + spec["fc"], {"model": {"arch": spec}},
                   cost, evals)

    def cut(self, method: str, budget: Budget) -> Cut:
        if method == "pcn":
            return self.pcn(budget, output_based=False)
        if method == "pcn-out":
            return self.pcn(budget, output_based=True)
        if method == "lowrank":
            return self.lowrank(budget)
        if method == "channel_prune":
            return self.channel_prune(budget, 1)
        if method == "channel_prune-r16":
            return self.channel_prune(budget, 16)
        if method.startswith("tp-group-l2"):
            return self.tp(budget, global_pruning=method.endswith("-global"))
        if method == "small-dense":
            return self.small_dense(budget)
        raise ValueError(method)


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as exc:
        raise SystemExit(f"torch_pruning is not installed: {TP_HINT}") from exc
    return torch_pruning


# ---- training -------------------------------------------------------------------------------

def train_config(epochs: int) -> TrainConfig:
    """The train step's defaults (and the auto step's fine-tuning): Adam 1e-3, batch 128."""
    return TrainConfig(epochs=epochs, optimizer="adam", lr=1e-3, batch_size=128)


def train_dense(arch: dict[str, Any], splits: data.Splits, epochs: int, seed: int
                ) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The zoo model built and shuffled with `seed` (a job's `seed` builds it the same way)."""
    model = models.build(arch, generator=torch.Generator().manual_seed(seed))
    hist = train(model, splits, train_config(epochs), generator=torch.Generator().manual_seed(seed))
    return model.eval(), hist


def costs_of(model: nn.Module) -> dict[str, int]:
    return costs(model, SHAPE)


def run_row(setup: str, method: str, seed: int, cutter: Cutter, budget: Budget,
            epochs: int, pre_epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """One baseline: cut (or build) to the budget, train, measure."""
    row: dict[str, Any] = {"setup": setup, "method": method, "seed": seed,
                           "budget": {"kind": budget.kind, "goal": budget.goal}}
    start = time.perf_counter()
    try:
        cut = cutter.cut(method, budget)
    except SpecError as exc:
        row["error"] = str(exc)
        print(f"  {method}: cannot meet the budget: {exc}", flush=True)
        return row
    row.update({"route": cut.route, "knob": cut.knob, "step_spec": cut.spec,
                "fit_evaluations": cut.evaluations, "note": cut.note, **cut.extra,
                "prune_s": time.perf_counter() - start})
    model = cut.model
    scratch = cut.route == "from scratch"
    row["costs"] = costs_of(model)
    if budget.kind == LATENCY:
        row["costs"][LATENCY] = cut.cost if cut.cost is not None else \
            cost_fn(budget, args)(model)
        if budget.meter is not None:  # again: the fit's last measure may be another knob's
            again = budget.meter(model)
            row["latency_paired"] = dict(budget.meter.last) | {"again_ms": again}
    row["cost"] = row["costs"][budget.kind]
    row["within_budget"] = row["cost"] <= budget.goal
    row["val_after_cut"] = None if scratch else evaluate(model, cutter.splits.val)["accuracy"]
    start = time.perf_counter()
    hist = train(model, cutter.splits, train_config(pre_epochs + epochs if scratch else epochs),
                 generator=torch.Generator().manual_seed(seed if scratch else seed + 1))
    row["train_s"] = time.perf_counter() - start
    row["epochs"] = f"{pre_epochs + epochs}" if scratch else f"{pre_epochs} + {epochs}"
    row["history"] = hist
    row["val_accuracy"] = hist[-1]["val_accuracy"] if hist else \
        evaluate(model, cutter.splits.val)["accuracy"]
    row["test_accuracy"] = evaluate(model.eval(), cutter.splits.test)["accuracy"]
    row["_model"] = model
    print(f"  {method}: {cut.route} knob {cut.knob} cost {row['cost']:,.2f} "
          f"(budget {budget.goal:,.2f}) val after cut {row['val_after_cut']} -> test "
          f"{row['test_accuracy']:.4f} ({row['prune_s']:.0f} s cut, "
          f"{time.perf_counter() - start:.0f} s training)",
          flush=True)
    return row


# ---- the auto step through the service --------------------------------------------------------

def auto_available() -> bool:
    from service.spec import AVAILABLE_OPS

    return "auto" in AVAILABLE_OPS


def _stack_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMLINE_")}
    env["SLIMLINE_WORKER_THREADS"] = str(threads)
    return env


@contextlib.contextmanager
def embedded_stack(threads: int) -> Iterator[str]:
    """`slimline up` (SQLite, filesystem broker, one worker) in a temporary home."""
    from tests.stack.conftest import SLIMLINE, free_port, spawn, stop, wait_ready

    with tempfile.TemporaryDirectory(prefix="auto-bench-") as tmp:
        port = free_port()
        proc = spawn([SLIMLINE, "up", "--home", f"{tmp}/home", "--host", "127.0.0.1",
                      "--port", str(port)], _stack_env(threads), Path(tmp) / "up.log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, [proc], timeout=120)
            yield url
        finally:
            stop(proc)


@contextlib.contextmanager
def full_stack(workers: int, threads: int) -> Iterator[str]:
    """PostgreSQL, Redis, an S3 endpoint, `slimline api` and `workers` x `slimline worker`
    (cpu,gpu queues, concurrency 1, `threads` torch threads each); as benchmarks.job_overhead."""
    import subprocess

    import boto3
    import psycopg
    from moto.server import ThreadedMotoServer

    from tests.stack.conftest import REPO, SLIMLINE, free_port, spawn, stop, wait_ready

    name = f"slimline_bench_{uuid.uuid4().hex[:8]}"
    admin = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port)
    s3.start()
    procs: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="auto-bench-") as tmp:
        try:
            endpoint = f"http://127.0.0.1:{s3_port}"
            boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="x",
                         aws_secret_access_key="x", region_name="us-east-1"
                         ).create_bucket(Bucket="bench")
            env = _stack_env(threads)
            env.update({"SLIMLINE_HOME": f"{tmp}/home",
                        "SLIMLINE_DATABASE_URL":
                            f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
                        "SLIMLINE_BROKER_URL": "redis://127.0.0.1:6379/15",  # tests: 1..14
                        "SLIMLINE_STORAGE_URL": "s3://bench/objects",
                        "SLIMLINE_S3_ENDPOINT_URL": endpoint, "SLIMLINE_AUTH": "off",
                        "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                        "AWS_DEFAULT_REGION": "us-east-1"})
            subprocess.run([SLIMLINE, "db", "upgrade"], env=env, cwd=REPO, check=True,
                           capture_output=True)
            port = free_port()
            procs = [spawn([SLIMLINE, "api", "--port", str(port)], env, Path(tmp) / "api.log")]
            procs += [spawn([SLIMLINE, "worker", "--queues", "cpu,gpu", "--concurrency", "1"],
                            env, Path(tmp) / f"worker{i}.log") for i in range(workers)]
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, procs, timeout=120)
            yield url
        finally:
            for p in procs:
                stop(p)
            s3.stop()
            with psycopg.connect(admin, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Service:
    """A few calls of the REST API (httpx)."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(60.0, read=600.0))

    def upload_model(self, path: Path) -> str:
        with open(path, "rb") as f:
            r = self.http.post("/v1/models", files={"file": (path.name, f)},
                               data={"name": path.stem})
        r.raise_for_status()
        return str(r.json()["id"])

    def upload_dataset(self, arrays: dict[str, np.ndarray], name: str) -> str:
        with tempfile.TemporaryDirectory(prefix="auto-bench-") as tmp:
            path = Path(tmp) / f"{name}.npz"
            np.savez(path, **arrays)
            with open(path, "rb") as f:
                r = self.http.post("/v1/datasets", files={"file": (path.name, f)},
                                   data={"name": name})
        r.raise_for_status()
        return str(r.json()["id"])

    def run(self, spec: dict[str, Any], poll_s: float = 2.0) -> dict[str, Any]:
        r = self.http.post("/v1/jobs", json=spec)
        if r.status_code >= 400:
            raise RuntimeError(f"job refused ({r.status_code}): {r.text[:600]}")
        job = r.json()
        while job["status"] not in TERMINAL:
            time.sleep(poll_s)
            job = self.http.get(f"/v1/jobs/{job['id']}").json()
        return dict(job)

    def trials(self, job_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/jobs/{job_id}/trials")
        if r.status_code != 200:
            return []
        body = r.json()
        items = body.get("items", body) if isinstance(body, dict) else body
        out = []
        for t in items:  # a trial is a child job: its own timestamps too
            child = self.http.get(f"/v1/jobs/{t['id']}") if t.get("id") else None
            if child is not None and child.status_code == 200:
                t = t | {k: child.json().get(k) for k in
                         ("created_at", "started_at", "finished_at")}
            out.append(t)
        return out

    def download(self, model_id: str, path: Path) -> nn.Module:
        r = self.http.get(f"/v1/models/{model_id}/file")
        r.raise_for_status()
        path.write_bytes(r.content)
        return models.load(path)


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value).timestamp() if value else None


def job_wall(job: dict[str, Any]) -> float | None:
    created, finished = _ts(job.get("created_at")), _ts(job.get("finished_at"))
    return None if created is None or finished is None else finished - created


def max_concurrency(trials: list[dict[str, Any]]) -> int:
    """The most trials running at one moment (from the child jobs' start/finish times)."""
    events = []
    for t in trials:
        a, b = _ts(t.get("started_at")), _ts(t.get("finished_at"))
        if a is not None and b is not None:
            events += [(a, 1), (b, -1)]
    running = best = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        running += step
        best = max(best, running)
    return best


def auto_result(job: dict[str, Any]) -> dict[str, Any]:
    """The auto step's own record in the job result (`result["auto"]`, or its step's)."""
    result = job.get("result") or {}
    found = result.get("auto")
    if found is None:
        found = next((s.get("auto", s) for s in result.get("steps") or []
                      if s.get("op") == "auto"), {})
    return dict(found)


def run_auto(service: Service, model_id: str, dataset: str, seed: int, budget: Budget,
             args: argparse.Namespace, final_epochs: int, workdir: Path, pre_epochs: int
             ) -> dict[str, Any]:
    """One auto job on a trained model: its winner, test accuracy, trials and timings; the
    winner downloaded and measured with this script's own cost functions."""
    step = {"op": "auto", "budget": budget.spec(args.latency_batch), "trials": args.trials,
            "finetune_epochs": args.finetune_epochs, "final_epochs": final_epochs}
    spec = {"model": model_id, "dataset": dataset, "seed": seed, "steps": [step]}
    started = time.perf_counter()
    job = service.run(spec)
    client_s = time.perf_counter() - started
    row: dict[str, Any] = {"method": "auto", "seed": seed, "job_id": job["id"],
                           "status": job["status"], "spec": spec, "client_wall_s": client_s,
                           "job_wall_s": job_wall(job),
                           "budget": {"kind": budget.kind, "goal": budget.goal}}
    if job["status"] != "succeeded":
        error = job.get("error") or job.get("error_message") or job["status"]
        row["error_detail"] = error
        row["error"] = (f"auto {job['status']}: {error.get('code')}: {error.get('message')}"
                        if isinstance(error, dict) else f"auto {job['status']}: {error}")
        print(f"  auto: job {job['status']}: {row['error']}", flush=True)
        return row
    result = job["result"]
    auto = auto_result(job)
    trials = service.trials(job["id"])
    walls = [float(t["wall_s"]) for t in trials if isinstance(t.get("wall_s"), (int, float))]
    winner = auto.get("winner", auto)
    row.update({"auto": auto, "winner": winner, "val_accuracy": winner.get("val_accuracy"),
                "test_accuracy": (result.get("after") or {}).get("accuracy"),
                "trials": trials, "n_trials": len(trials),
                "trials_wall_s": sum(walls) if walls else None,
                "compute_s": auto.get("compute_s"), "search_wall_s": auto.get("wall_s"),
                "reason": auto.get("reason"),
                "phases": {ph: sum(1 for t in trials if t.get("phase") == ph)
                           for ph in sorted({str(t.get("phase")) for t in trials})},
                "max_concurrent_trials": max_concurrency(trials),
                "epochs": f"{pre_epochs} + {args.finetune_epochs + final_epochs}",
                "route": f"auto ({len(trials)} trials)", "knob": winner.get("method")})
    model_id_out = result.get("model_id")
    if model_id_out:
        model = service.download(model_id_out, workdir / f"auto-{job['id']}.safetensors")
        row["costs"] = costs_of(model)
        if budget.kind == LATENCY:
            row["costs"][LATENCY] = cost_fn(budget, args)(model)
            if budget.meter is not None:  # again: the fit's last measure may be another knob's
                again = budget.meter(model)
                row["latency_paired"] = dict(budget.meter.last) | {"again_ms": again}
        row["cost"] = row["costs"][budget.kind]
        row["within_budget"] = row["cost"] <= budget.goal
        row["_model"] = model
    print(f"  auto: winner {row['winner']} test {row['test_accuracy']} cost {row.get('cost')} "
          f"({len(trials)} trials, job {row['job_wall_s']} s)", flush=True)
    return row


def want_auto(args: argparse.Namespace) -> bool:
    if args.auto == "off":
        return False
    available = auto_available()
    if args.auto == "on" and not available:
        raise SystemExit("--auto on: this checkout has no 'auto' op")
    if not available:
        print("(the auto step is not in this checkout: its rows are skipped)", flush=True)
    return available


# ---- summaries ------------------------------------------------------------------------------

def _mean(values: list[float]) -> float:
    return statistics.fmean(values)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setup, method): n, mean/min/max test and val accuracy, mean cost, routes."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setup"], r["method"]), []).append(r)
    out = []
    for (setup, method), rs in groups.items():
        ok = [r for r in rs if r.get("test_accuracy") is not None]
        s: dict[str, Any] = {"setup": setup, "method": method, "n": len(ok),
                             "errors": [r["error"] for r in rs if "error" in r]}
        if ok:
            test = [r["test_accuracy"] for r in ok]
            s.update({"test": {"mean": _mean(test), "min": min(test), "max": max(test)},
                      "val": _mean([r["val_accuracy"] for r in ok if r.get("val_accuracy")
                                    is not None] or [float("nan")]),
                      "cost": _mean([float(r["cost"]) for r in ok if r.get("cost") is not None]
                                    or [float("nan")]),
                      "costs": {k: _mean([float(r["costs"][k]) for r in ok if "costs" in r])
                                for k in ok[0].get("costs", {})},
                      "within_budget": all(r.get("within_budget", True) for r in ok),
                      "routes": sorted({str(r.get("route")) for r in ok}),
                      "knobs": [r.get("knob") for r in ok],
                      "epochs": ok[0].get("epochs"),
                      "val_after_cut": _mean([r["val_after_cut"] for r in ok])
                      if all(r.get("val_after_cut") is not None for r in ok) else None})
        out.append(s)
    for setup in {s["setup"] for s in out}:
        singles = [s for s in out if s["setup"] == setup and s["method"] in SINGLE and s["n"]]
        if singles:
            max(singles, key=lambda s: s["val"])["best_single"] = True
    return out


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, kind: str) -> str:
    if v is None:
        return "–"
    return f"{v:,.1f} ms" if kind == LATENCY else f"{v:,.0f}"


def table(summary: list[dict[str, Any]], setups: dict[str, dict[str, Any]]) -> str:
    head = ("| setup | method | n | route | size (knob) | total params | MACs | budget cost "
            "(x budget) | epochs | val after cut % | final val % | test % mean [min, max] |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in summary:
        setup = setups[s["setup"]]
        kind, goal = setup["kind"], setup["goal"]
        name = s["method"] + (" **(best single)**" if s.get("best_single") else "")
        if not s["n"]:
            reason = (str((s["errors"] or ["no result"])[0]).splitlines() or [""])[0][:90]
            lines.append(f"| {s['setup']} | {name} | 0 | cannot reach: {reason} |"
                         + " – |" * 8)
            continue
        knobs = s["knobs"]
        knob = _knob(knobs[0]) + ("" if len({json.dumps(k) for k in knobs}) == 1 else ", …")
        test = s["test"]
        lines.append(
            f"| {s['setup']} | {name} | {s['n']} | {', '.join(s['routes'])} | {knob} | "
            f"{s['costs'].get('total_params', 0):,.0f} | {s['costs'].get('macs', 0):,.0f} | "
            f"{_num(s['cost'], kind)} ({s['cost'] / goal:.3f}"
            f"{'' if s['within_budget'] else ', OVER'}) | {s['epochs']} | "
            f"{_pct(s['val_after_cut'])} | {_pct(s['val'])} | {_pct(test['mean'])} "
            f"[{_pct(test['min'])}, {_pct(test['max'])}] |")
    return "\n".join(lines)


def _knob(k: Any) -> str:
    if isinstance(k, float):
        return f"{k:.4g}"
    if isinstance(k, list):
        return "-".join(map(str, k))
    return "–" if k is None else str(k)


def schedule_text(args: argparse.Namespace, pre: int, final: int) -> str:
    f = args.finetune_epochs + final
    return (f"dense {pre} epochs (Adam 1e-3, batch 128) -> compress to the budget -> {f} epochs "
            f"(= auto finetune_epochs {args.finetune_epochs} + final_epochs {final}; fresh Adam "
            f"1e-3, batch 128); small dense: {pre + f} epochs from scratch; every row "
            f"{pre + f} epochs in all")


def write(part: str, args: argparse.Namespace, rows: list[dict[str, Any]],
          setups: dict[str, dict[str, Any]], started: float, complete: bool,
          extra: dict[str, Any]) -> str:
    summary = summarize(rows)
    text = table(summary, setups)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    suffix = "_quick" if args.quick else ""
    meta = run_meta(args, complete=complete, runtime=time.perf_counter() - started,
                    setups=setups, **extra)
    dump_results(Path(args.out_dir) / f"auto_compress_{part}{suffix}.json", meta, summary,
                 clean, text)
    return text


# ---- parts ----------------------------------------------------------------------------------

def ckpt_dir(args: argparse.Namespace) -> Path:
    d = Path(args.out_dir) / ("auto_compress_quick" if args.quick else "auto_compress")
    d.mkdir(parents=True, exist_ok=True)
    return d


def part_lenet(args: argparse.Namespace, scale: Scale) -> str:
    started = time.perf_counter()
    budget = Budget("total_params", float(args.lenet_budget))
    setup = "lenet300-total_params"
    setups = {setup: {"kind": budget.kind, "goal": budget.goal, "model": "lenet300",
                      "schedule": schedule_text(args, args.pre_epochs, args.final_epochs)}}
    methods = [m for m in args.methods if m != "channel_prune-r16"]
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {"scale": "full: 54k/6k/10k split per seed" if not args.quick
                             else "quick smoke"}
    epochs = args.finetune_epochs + args.final_epochs
    print(f"LeNet-300-100, budget total_params {budget.goal:,.0f}; "
          f"{setups[setup]['schedule']}", flush=True)
    for seed in range(args.seeds):
        splits = lenet_splits(seed, args, scale)
        t = time.perf_counter()
        dense, hist = train_dense({"name": "lenet300"}, splits, args.pre_epochs, seed)
        models.save(dense, ckpt_dir(args) / f"dense-lenet300-s{seed}.safetensors")
        dense_row = {"setup": setup, "method": f"dense ({args.pre_epochs} epochs)", "seed": seed,
                     "route": "–", "knob": None, "costs": costs_of(dense), "history": hist,
                     "epochs": args.pre_epochs, "train_s": time.perf_counter() - t,
                     "val_accuracy": hist[-1]["val_accuracy"],
                     "test_accuracy": evaluate(dense, splits.test)["accuracy"]}
        dense_row["cost"] = dense_row["costs"][budget.kind]
        rows.append(dense_row)
        print(f"seed {seed}: dense test {dense_row['test_accuracy']:.4f}", flush=True)
        longer = copy.deepcopy(dense)  # the reference: dense trained as long as every row
        t = time.perf_counter()
        more = train(longer, splits, train_config(epochs),
                     generator=torch.Generator().manual_seed(seed + 1))
        rows.append(dense_row | {
            "method": f"dense ({args.pre_epochs} + {epochs} epochs)", "history": more,
            "epochs": f"{args.pre_epochs} + {epochs}", "train_s": time.perf_counter() - t,
            "val_accuracy": more[-1]["val_accuracy"],
            "test_accuracy": evaluate(longer.eval(), splits.test)["accuracy"]})
        cutter = Cutter(dense, splits, seed, args, scale)
        for method in methods:
            rows.append(run_row(setup, method, seed, cutter, budget, epochs, args.pre_epochs,
                                args))
            write("lenet", args, rows, setups, started, False, extra)
    if want_auto(args):
        with embedded_stack(args.ort_threads) as url:
            service = Service(url)
            for seed in range(args.seeds):
                model_id = service.upload_model(
                    ckpt_dir(args) / f"dense-lenet300-s{seed}.safetensors")
                row = run_auto(service, model_id, "fashion-mnist", seed, budget, args,
                               args.final_epochs, ckpt_dir(args), args.pre_epochs)
                rows.append(row | {"setup": setup})
                write("lenet", args, rows, setups, started, False, extra)
    text = write("lenet", args, rows, setups, started, True, extra)
    return f"### LeNet-300-100, total_params <= {budget.goal:,.0f}\n\n{text}"


def load_or_train_dense(name: str, splits: data.Splits, epochs: int, seed: int,
                        args: argparse.Namespace) -> tuple[nn.Module, list[dict[str, Any]], bool]:
    """The dense model of `seed`: with --reuse-dense the checkpoint an earlier run saved (the
    same training is deterministic), else trained now and saved. (model, history, reused)."""
    path = ckpt_dir(args) / f"dense-{name}-s{seed}.safetensors"
    if args.reuse_dense and path.exists():
        model = models.load(path).eval()
        return model, [{"epoch": epochs,
                        "val_accuracy": evaluate(model, splits.val)["accuracy"]}], True
    model, hist = train_dense({"name": name}, splits, epochs, seed)
    models.save(model, path)
    return model, hist, False


def carried_rows(part: str, args: argparse.Namespace, running: set[str]
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """With --keep-other-setups: the rows (and setups) of the setups this run does not run,
    from the part's existing JSON."""
    path = Path(args.out_dir) / f"auto_compress_{part}{'_quick' if args.quick else ''}.json"
    if not (args.keep_other_setups or args.keep_other_methods) or not path.exists():
        return [], {}
    saved = json.loads(path.read_text())
    setups = {k: v | {"carried_over_from": saved["meta"]["date_utc"]}
              for k, v in saved["meta"].get("setups", {}).items() if k not in running}
    rows = [r for r in saved["runs"] if r["setup"] in setups]
    if args.keep_other_methods:  # the rest of the setups run now; dense and auto rows are new
        rerun = set(args.methods) | {"auto"}
        rows += [r | {"carried_over_from": saved["meta"]["date_utc"]} for r in saved["runs"]
                 if r["setup"] in running and r["method"] not in rerun
                 and not str(r["method"]).startswith("dense")]
    return rows, setups


def part_conv4(args: argparse.Namespace, scale: Scale) -> str:
    started = time.perf_counter()
    arrays = conv4_arrays(args)
    final = args.conv4_final_epochs
    epochs = args.finetune_epochs + final
    running = {f"conv4-{b}" for b in args.budgets}
    rows, setups = carried_rows("conv4", args, running)
    extra: dict[str, Any] = {"scale": f"reduced: {args.conv4_subset} training images (seed-12345 "
                                      f"draw from the 60k; 10% of them validation), first "
                                      f"{args.conv4_test} test images, {args.conv4_seeds} seed(s)"}
    auto = want_auto(args)
    for seed in range(args.conv4_seeds):
        splits = conv4_splits(arrays, seed)
        t = time.perf_counter()
        dense, hist, reused = load_or_train_dense("conv4", splits, args.conv4_pre_epochs, seed,
                                                  args)
        dense_costs: dict[str, Any] = dict(costs_of(dense))
        dense_latency = onnx_latency(dense, args, repeats=max(args.latency_repeats, 20))
        dense_costs[LATENCY] = dense_latency
        budgets: dict[str, Budget] = {}
        if "macs" in args.budgets:
            budgets["conv4-macs"] = Budget("macs", float(int(dense_costs["macs"]
                                                             * args.conv4_mac_fraction)))
        if "latency" in args.budgets:
            budgets["conv4-latency"] = Budget(LATENCY,
                                              dense_latency * args.conv4_latency_fraction,
                                              PairedLatency(dense, args, dense_latency))
        dense_test = evaluate(dense, splits.test)["accuracy"]
        for name, b in budgets.items():
            setups.setdefault(name, {"kind": b.kind, "goal": b.goal, "model": "conv4",
                                     "schedule": schedule_text(args, args.conv4_pre_epochs,
                                                               final),
                                     "latency": {"batch": args.latency_batch,
                                                 "threads": args.ort_threads,
                                                 "dense_ms": dense_latency,
                                                 "measured": "in turns with the dense model "
                                                             "(PairedLatency)"}})
            rows.append({"setup": name, "method": f"dense ({args.conv4_pre_epochs} epochs)",
                         "seed": seed, "route": "reused checkpoint" if reused else "–",
                         "knob": None, "costs": dense_costs, "cost": dense_costs[b.kind],
                         "epochs": str(args.conv4_pre_epochs), "history": hist,
                         "train_s": time.perf_counter() - t,
                         "val_accuracy": hist[-1]["val_accuracy"], "test_accuracy": dense_test})
        print(f"seed {seed}: dense test {dense_test:.4f}, {dense_costs['macs']:,} MACs, "
              f"{dense_latency:.1f} ms at batch {args.latency_batch}; budgets "
              f"{ {k: round(b.goal, 2) for k, b in budgets.items()} }", flush=True)
        cutter = Cutter(dense, splits, seed, args, scale)
        for name, b in budgets.items():
            print(f"{name}: {setups[name]['schedule']}", flush=True)
            for method in args.methods:
                if method == "channel_prune-r16" and b.kind != LATENCY:
                    continue
                rows.append(run_row(name, method, seed, cutter, b, epochs,
                                    args.conv4_pre_epochs, args))
                write("conv4", args, rows, setups, started, False, extra)
        if auto:
            with embedded_stack(args.ort_threads) as url:
                service = Service(url)
                dataset_id = service.upload_dataset(arrays, f"fmnist-{args.conv4_subset}")
                model_id = service.upload_model(ckpt_dir(args) / f"dense-conv4-s{seed}"
                                                ".safetensors")
                for name, b in budgets.items():
                    row = run_auto(service, model_id, dataset_id, seed, b, args, final,
                                   ckpt_dir(args), args.conv4_pre_epochs)
                    rows.append(row | {"setup": name})
                    write("conv4", args, rows, setups, started, False, extra)
        # every latency-budget model again, all timed in turns with the dense one
        lat_rows = [r for r in rows if r["setup"] == "conv4-latency" and "_model" in r
                    and r["seed"] == seed]
        if lat_rows:
            ms = round_robin_latency([dense] + [r["_model"] for r in lat_rows], args,
                                     repeats=max(5, args.latency_repeats))
            extra.setdefault("latency_recheck", []).append(
                {"seed": seed, "dense_ms": ms[0],
                 "rows": {r["method"]: v for r, v in zip(lat_rows, ms[1:], strict=True)}})
    text = write("conv4", args, rows, setups, started, True, extra)
    recheck = "\n".join(
        f"* seed {c['seed']}, all latency models re-timed in turns: dense {c['dense_ms']:.1f} ms;"
        " " + ", ".join(f"{m} {v:.1f} ms ({v / c['dense_ms']:.2f} of dense)"
                        for m, v in c["rows"].items())
        for c in extra.get("latency_recheck", []))
    return f"### Conv4 (reduced scale)\n\n{text}\n\n{recheck}"


def part_cost(args: argparse.Namespace, scale: Scale) -> str:
    """The LeNet auto search (seed 0) with 1 and 2 workers, and one hand-set job."""
    started = time.perf_counter()
    if not want_auto(args):
        return "### Search cost\n\n(skipped: no auto step in this checkout)"
    budget = Budget("total_params", float(args.lenet_budget))
    ckpt = ckpt_dir(args) / "dense-lenet300-s0.safetensors"
    if not ckpt.exists():
        splits = lenet_splits(0, args, scale)
        models.save(train_dense({"name": "lenet300"}, splits, args.pre_epochs, 0)[0], ckpt)
    hand = hand_set_step(args)
    epochs = args.finetune_epochs + args.final_epochs
    rows: list[dict[str, Any]] = []
    for workers in args.cost_workers:
        with full_stack(workers, args.cost_threads) as url:
            service = Service(url)
            model_id = service.upload_model(ckpt)
            row = run_auto(service, model_id, "fashion-mnist", 0, budget, args,
                           args.final_epochs, ckpt_dir(args), args.pre_epochs)
            rows.append(row | {"setup": "cost", "workers": workers})
            if workers == 1:
                job = service.run({"model": model_id, "dataset": "fashion-mnist", "seed": 0,
                                   "steps": [hand, {"op": "train", "epochs": epochs}]})
                rows.append({"setup": "cost", "method": f"hand-set {hand['op']}",
                             "workers": 1, "job_id": job["id"], "status": job["status"],
                             "spec": hand, "job_wall_s": job_wall(job),
                             "test_accuracy": ((job.get("result") or {}).get("after") or {})
                             .get("accuracy")})
    lines = ["| run | workers x threads | job wall s | trials | trial compute s (sum wall_s) "
             "| max concurrent trials | test % |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['workers']} x {args.cost_threads} | "
                     f"{_f(r.get('job_wall_s'))} | {r.get('n_trials', '–')} | "
                     f"{_f(r.get('trials_wall_s'))} | {r.get('max_concurrent_trials', '–')} | "
                     f"{_pct(r.get('test_accuracy'))} |")
    autos = {r["workers"]: r for r in rows if r["method"] == "auto" and r.get("job_wall_s")}
    if 1 in autos and 2 in autos:
        lines.append(f"\nspeed-up from the second worker: "
                     f"{autos[1]['job_wall_s'] / autos[2]['job_wall_s']:.2f}x (job wall time)")
    text = "\n".join(lines)
    meta = run_meta(args, complete=True, runtime=time.perf_counter() - started,
                    hand_set=hand)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    dump_results(Path(args.out_dir) / f"auto_compress_cost{'_quick' if args.quick else ''}.json",
                 meta, None, clean, text)
    return f"### Search cost (LeNet-300-100, seed 0)\n\n{text}"


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:,.1f}"


def hand_set_step(args: argparse.Namespace) -> dict[str, Any]:
    """The best single method's step from the LeNet part's JSON (its seed-0 spec), else
    lowrank with the absolute total_params target."""
    path = Path(args.out_dir) / f"auto_compress_lenet{'_quick' if args.quick else ''}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        best = next((s["method"] for s in saved["summary"] if s.get("best_single")), None)
        for r in saved["runs"]:
            if r["method"] == best and r["seed"] == 0 and r.get("step_spec"):
                return dict(r["step_spec"])
    return {"op": "lowrank", "target": {"total_params": args.lenet_budget}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scale = Scale.of(args)
    if any(m.startswith("tp-") for m in args.methods):
        _tp()  # fail fast, before any training
    started = time.perf_counter()
    parts = ["lenet", "conv4", "cost"] if args.part == "all" else [args.part]
    texts = []
    for part in parts:
        texts.append({"lenet": part_lenet, "conv4": part_conv4, "cost": part_cost}[part](
            args, scale))
        print("\n" + texts[-1] + "\n", flush=True)
    if len(texts) > 1:
        print("\n\n".join(texts))
    print(f"\nruntime {time.perf_counter() - started:.0f} s; JSON under {args.out_dir}/")


if __name__ == "__main__":
    main()
