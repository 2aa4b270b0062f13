"""The `analyze` step: the redundancy analyses of seed 001 (ALGORITHMS.md §6) on the current
model, which the step leaves unchanged (every analysis works on copies or reads weights).

Per chosen layer (`layers`: "auto" = `core.pcn_select.auto_layers`, the widest layers; or
names), for each of `kinds`:
* `unit_pruning` (`core.redundancy.unit_pruning`): **validation-split** accuracy vs units
  removed without retraining, for the magnitude, frame-potential (greedy, O(m) update) and random
  (mean ± std over `seeds` orders) orders; units are removed physically (the readers' columns
  too). Layers must be unit groups (`core.pcn_graph.unit_groups`: every layer but the output
  layer in plain zoo models, `stage{s}` streams in a ResNet); others are listed in `skipped`.
  Data: the core's dict (`counts`, per order `[{removed, units_left, accuracy}]`, `random`
  with `accuracy_mean`/`accuracy_std`).
* `spectrum` (`core.spectra.spectrum`): eigenvalues of `W W^T` (conv: `W` as `(C_out, -1)`)
  against the Marchenko–Pastur law for the init variance of the layer, and the same for a fresh
  layer initialised with that scheme (`init_eigenvalues`). The scheme (`init_scheme`,
  `init_source`): the step's `init` when given; else the arch's `init` (the zoo's scheme:
  glorot by default, kaiming for resnet) for a model built by the service; PyTorch's default
  (variance 1/(3 fan_in)) for a model whose lineage starts at an uploaded checkpoint (its
  arch's `init` is only the filled-in default).
* `elbow` (`core.spectra.elbow`, `elbow_accuracy`): residual energy of the best rank-k
  approximation vs k, the knee, and **validation** accuracy with the layer replaced by its
  rank-k projection for k in {1, k/4-ish ranks, the knee, the step's `k`, full rank}.
* `angles` (`core.spectra.principal_angles`): principal angles (degrees) between the top-`k`
  row spaces of the layer and of the same layer of `other_model` (same tenant, same layer
  shapes), plus a random-subspace reference (a seeded Gaussian matrix of the same shape).

A DCTpS layer is analysed as the dense Linear/Conv2d it computes (`alpha * D + S`, on a copy).
Curves: `analysis[kind][layer]` gets `{step, global_epoch, ...data}` (event `analysis`, one per
kind); the step result holds compact summaries; plots `<kind>.png` (worker.analyze_plots).
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from core.dctps import DCTpSConv2d, DCTpSLayer, DCTpSLinear
from core.errors import SpecError
from core.models import get_layer, set_layer
from core.models.zoo import init_weights
from core.pcn_graph import unit_groups
from core.pcn_output import group_units
from core.pcn_select import auto_layers
from core.redundancy import default_counts, unit_pruning
from core.spectra import (
    elbow,
    elbow_accuracy,
    init_variance,
    principal_angles,
    spectrum,
    weight_matrix,
)
from core.train import evaluate
from service.methods.analyze import AnalyzeStep
from worker import analyze_plots  # noqa: F401  (registers the analyze step's plots)
from worker.context import StepContext, dctps_layers, dense_layers, untouched_layers
from worker.registry import handler

SPECTRUM_POINTS = 200  # grid points of the Marchenko–Pastur density kept per layer
PROGRESS_EVERY_S = 0.5
INIT_NOTES = {
    "step": "given by the step's init",
    "arch": "the architecture's init (the zoo's scheme this model was built with)",
    "upload": ("PyTorch's default (variance 1/(3 fan_in)) assumed: the model's lineage starts "
               "at an uploaded checkpoint; set the step's init to override"),
}


def _r(value: float | torch.Tensor) -> float:
    """6 significant digits: enough for plots, keeps events and curves small."""
    return float(f"{float(value):.6g}")


def _rs(values: Any) -> list[float]:
    return [_r(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def dense_view(model: nn.Module) -> nn.Module:
    """`model` itself, or a copy whose DCTpS layers are the dense Linear/Conv2d they compute."""
    names = dctps_layers(model)
    if not names:
        return model
    view = copy.deepcopy(model)
    for name in names:
        layer = get_layer(view, name)
        assert isinstance(layer, DCTpSLayer)
        with torch.no_grad():
            weight = layer.weight_matrix()
        dense: nn.Module
        if isinstance(layer, DCTpSConv2d):
            dense = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                              stride=layer.stride, padding=layer.padding,
                              dilation=layer.dilation, groups=layer.groups,
                              bias=layer.bias is not None, padding_mode=layer.padding_mode)
        else:
            assert isinstance(layer, DCTpSLinear)  # the other DCTpS layer
            dense = nn.Linear(layer.in_features, layer.out_features,
                              bias=layer.bias is not None)
        dense = dense.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if layer.bias is not None and dense.bias is not None:
                dense.bias.copy_(layer.bias)
        set_layer(view, name, dense)
    return view


class Progress:
    """Step progress over kinds x layers (x evaluations), throttled; checks cancellation."""

    def __init__(self, ctx: StepContext, kinds: int) -> None:
        self.ctx, self.kinds = ctx, kinds
        self.kind = 0
        self.base, self.span = 0.0, 1.0 / max(1, kinds)
        self.stage = "analyze"
        self._last = 0.0

    def start(self, kind_index: int, layer_index: int, layers: int, stage: str) -> None:
        self.span = 1.0 / (self.kinds * max(1, layers))
        self.base = (kind_index + layer_index / max(1, layers)) / self.kinds
        self.stage = stage
        self.report(0.0, force=True)

    def report(self, inner: float, force: bool = False) -> None:
        self.ctx.check_cancel()
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self.ctx.reporter.progress(self.base + self.span * min(1.0, inner), self.stage)


def _val_accuracy(ctx: StepContext, progress: Progress, total: int) -> Callable[[nn.Module],
                                                                                 float]:
    done = 0

    def run(model: nn.Module) -> float:
        nonlocal done
        progress.report(done / max(1, total))
        done += 1
        model.to(ctx.device)  # a throwaway copy (unit pruning scores and cuts on the CPU)
        return float(evaluate(model, ctx.splits.val, device=ctx.device)["accuracy"])

    return run


def _layers(model: nn.Module, step: AnalyzeStep) -> list[str]:
    plain = dense_layers(model)
    if step.layers == "auto":
        return auto_layers(model)
    groups = list(unit_groups(model)) if "unit_pruning" in step.kinds else []
    unknown = [n for n in step.layers if n not in plain and n not in groups]
    if unknown:
        valid = list(dict.fromkeys(plain + groups))
        raise SpecError(f"analyze layers {unknown} are not Linear/Conv2d layers"
                        f"{' or unit groups' if groups else ''} of the model; valid: "
                        f"{', '.join(valid)}")
    return list(step.layers)


def _init_scheme(ctx: StepContext, step: AnalyzeStep) -> tuple[str, str]:
    if step.init != "auto":
        return step.init, "step"
    if ctx.input_origin == "upload":
        return "torch", "upload"
    return str((getattr(ctx.model, "slimline_arch", None) or {}).get("init", "torch")), "arch"


def _fresh_layer(layer: nn.Module, scheme: str, generator: torch.Generator) -> nn.Module:
    """A copy of `layer` re-initialised with `scheme` (the zoo's init_weights)."""
    fresh = copy.deepcopy(layer).cpu()
    with torch.no_grad():
        if scheme == "torch":
            bound = (1.0 / weight_matrix(fresh).shape[1]) ** 0.5  # kaiming_uniform(a=sqrt(5))
            cast(torch.Tensor, fresh.weight).uniform_(-bound, bound, generator=generator)
        else:
            init_weights(fresh, scheme, generator)
    return fresh


# ---- the analyses (one layer each) ------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """What every analysis of one analyze step reads."""

    ctx: StepContext
    step: AnalyzeStep
    model: nn.Module  # the dense view of the job's model
    other: nn.Module | None  # the dense view of other_model (angles)
    scheme: tuple[str, str]  # (init scheme, where it came from)
    generator: torch.Generator
    progress: Progress


@dataclass(frozen=True)
class Analysis:
    """One kind: `run(r, layer) -> data`, the result's summary keys (+ `extra_summary`), and
    whether it reads unit groups (unit_pruning) instead of plain Linear/Conv2d layers."""

    run: Callable[[Run, str], dict[str, Any]]
    summary_keys: tuple[str, ...]
    extra_summary: Callable[[dict[str, Any]], dict[str, Any]] = lambda data: {}
    on_groups: bool = False

    def summary(self, data: dict[str, Any]) -> dict[str, Any]:
        return {k: data[k] for k in self.summary_keys if k in data} | self.extra_summary(data)


def _unit_pruning(r: Run, layer: str) -> dict[str, Any]:
    ctx, step, model = r.ctx, r.step, r.model
    group = unit_groups(model)[layer]
    units = group_units(model, group)
    counts = step.counts
    if counts is not None and counts[-1] >= units:
        raise SpecError(f"analyze unit_pruning: layer {layer} has {units} units; counts must "
                        f"be < {units} (at least one unit stays), got {counts}; give counts "
                        "that fit every chosen layer, or leave counts out (0%, 10%, ..., 90%)")
    n_counts = len(counts if counts is not None else default_counts(units))
    evaluate_val = _val_accuracy(ctx, r.progress, (2 + step.seeds) * n_counts)
    seed = ctx.generator.initial_seed()
    # orders and cuts on a CPU copy (the core's greedy order keeps CPU bookkeeping tensors);
    # each pruned copy is moved to the job's device to be evaluated
    source = model if ctx.device.type == "cpu" else copy.deepcopy(model).cpu()
    data = unit_pruning(source, layer, evaluate_val, counts=counts, seeds=step.seeds,
                        generator_seed=seed)
    data["metric"] = "val_accuracy"
    for order in ("magnitude", "frame_potential"):
        data[order] = [p | {"accuracy": _r(p["accuracy"])} for p in data[order]]
    data["random"] = [p | {"accuracy_mean": _r(p["accuracy_mean"]),
                           "accuracy_std": _r(p["accuracy_std"]),
                           "accuracies": _rs(p["accuracies"])} for p in data["random"]]
    data.pop("layer", None)
    return data


def _unit_pruning_summary(data: dict[str, Any]) -> dict[str, Any]:
    out = {o: [p["accuracy"] for p in data[o]] for o in ("magnitude", "frame_potential")}
    out["random_mean"] = [p["accuracy_mean"] for p in data["random"]]
    out["random_std"] = [p["accuracy_std"] for p in data["random"]]
    return out


def _spectrum(r: Run, layer: str) -> dict[str, Any]:
    module = get_layer(r.model, layer)
    scheme = r.scheme
    variance = init_variance(module, scheme[0])
    trained = spectrum(weight_matrix(module).cpu(), variance, points=SPECTRUM_POINTS)
    fresh = spectrum(_fresh_layer(module, scheme[0], r.generator), variance,
                     points=SPECTRUM_POINTS)
    return {"shape": list(trained["shape"]), "init_scheme": scheme[0], "init_source": scheme[1],
            "variance": _r(variance), "lambda_minus": _r(trained["lambda_minus"]),
            "lambda_plus": _r(trained["lambda_plus"]), "zero_mass": _r(trained["zero_mass"]),
            "eigenvalues": _rs(trained["eigenvalues"]),
            "outside": trained["outside"], "outside_fraction": _r(trained["outside_fraction"]),
            "init_eigenvalues": _rs(fresh["eigenvalues"]),
            "init_outside_fraction": _r(fresh["outside_fraction"]),
            "grid": _rs(trained["grid"]), "density": _rs(trained["density"]),
            "dctps": isinstance(get_layer(r.ctx.model, layer), DCTpSLayer)}


def _elbow(r: Run, layer: str) -> dict[str, Any]:
    module = get_layer(r.model, layer)
    curve = elbow(weight_matrix(module).cpu())
    full = int(curve["singular_values"].numel())
    knee = int(curve["knee"])
    ks = sorted({k for k in (1, full // 8, full // 4, full // 2, knee, min(r.step.k, full), full)
                 if 1 <= k <= full} | ({0} if knee == 0 else set()))
    accuracy = elbow_accuracy(r.model, layer, ks, _val_accuracy(r.ctx, r.progress, len(ks)))
    return {"shape": list(weight_matrix(module).shape), "full_rank": full, "knee": knee,
            "knee_residual": _r(curve["residual"][knee]),
            "singular_values": _rs(curve["singular_values"]),
            "residual": _rs(curve["residual"]), "metric": "val_accuracy",
            "ranks": [{"rank": p["rank"], "accuracy": _r(p["accuracy"])} for p in accuracy]}


def _angles(r: Run, layer: str) -> dict[str, Any]:
    step = r.step
    assert r.other is not None  # run_analyze loads other_model when angles is asked for
    mine = weight_matrix(get_layer(r.model, layer)).cpu()
    try:
        theirs = weight_matrix(get_layer(r.other, layer)).cpu()
    except SpecError:
        raise SpecError(f"analyze angles: other_model {step.other_model} has no Linear/Conv2d "
                        f"layer {layer!r}; it needs the same layers with the same shapes (the "
                        "same architecture and edits)") from None
    if mine.shape != theirs.shape:
        raise SpecError(f"analyze angles: layer {layer} is {tuple(mine.shape)} here but "
                        f"{tuple(theirs.shape)} in other_model {step.other_model}; angles need "
                        "the same layer shapes (the same architecture and edits)")
    k = min(step.k, *mine.shape)
    angles = principal_angles(mine, theirs, k)
    noise = torch.randn(mine.shape, generator=r.generator, dtype=torch.float64)
    reference = principal_angles(mine, noise, k)
    return {"shape": list(mine.shape), "k": k, "other_model": step.other_model,
            "angles": _rs(angles), "mean": _r(angles.mean()), "min": _r(angles.min()),
            "max": _r(angles.max()), "random_angles": _rs(reference),
            "random_mean": _r(reference.mean())}


ANALYSES: dict[str, Analysis] = {
    "unit_pruning": Analysis(_unit_pruning, ("units", "counts", "metric"),
                             _unit_pruning_summary, on_groups=True),
    "spectrum": Analysis(
        _spectrum, ("shape", "init_scheme", "init_source", "variance", "lambda_minus",
                    "lambda_plus", "outside", "outside_fraction", "init_outside_fraction"),
        lambda data: {"top_eigenvalue": data["eigenvalues"][0] if data["eigenvalues"]
                      else None}),
    "elbow": Analysis(_elbow, ("shape", "full_rank", "knee", "knee_residual", "metric",
                               "ranks")),
    "angles": Analysis(_angles, ("shape", "k", "mean", "min", "max", "random_mean", "angles")),
}


@handler(AnalyzeStep)
def run_analyze(ctx: StepContext, step: AnalyzeStep) -> dict[str, Any]:
    ctx.reporter.progress(0.0, "analyze: preparing")
    model = dense_view(ctx.model)
    model.eval()
    layers = _layers(model, step)
    other = None
    if "angles" in step.kinds:
        if ctx.fetch_model is None or step.other_model is None:
            raise SpecError("analyze angles needs other_model (a model id of yours)")
        ctx.reporter.progress(0.0, f"analyze: loading other_model {step.other_model}")
        other = dense_view(ctx.fetch_model(step.other_model))
    groups = set(unit_groups(model)) if "unit_pruning" in step.kinds else set()
    # the weight analyses read dense matrices: grouped convs are skipped with the reason
    refused = untouched_layers(model, "analyze")
    plain = set(dense_layers(model)) - set(refused)
    scheme = _init_scheme(ctx, step)
    generator = torch.Generator().manual_seed(ctx.generator.initial_seed() + 1)
    run = Run(ctx, step, model, other, scheme, generator, Progress(ctx, len(step.kinds)))
    details: dict[str, Any] = {"kinds": list(step.kinds), "layers": layers,
                               "metric": "val_accuracy", "validation_samples":
                               len(ctx.splits.val)}
    if "spectrum" in step.kinds:
        details["init"] = {"scheme": scheme[0], "source": scheme[1],
                           "note": INIT_NOTES[scheme[1]]}
    if dctps_layers(ctx.model):
        details["dctps_note"] = ("DCTpS layers are analysed as the dense weight alpha*D + S "
                                 "they compute")
    for kind_index, kind in enumerate(step.kinds):
        analysis = ANALYSES[kind]
        usable = groups if analysis.on_groups else plain
        todo = [n for n in layers if n in usable]
        skipped = {n: ("not a unit group (the output layer's units are the classes)"
                       if analysis.on_groups else refused.get(n, "not a Linear/Conv2d layer"))
                   for n in layers if n not in usable}
        if not todo:
            valid = sorted(usable)
            raise SpecError(f"analyze {kind}: none of the layers {layers} applies; valid: "
                            f"{', '.join(valid)}")
        results: dict[str, dict[str, Any]] = {}
        for layer_index, layer in enumerate(todo):
            run.progress.start(kind_index, layer_index, len(todo),
                               f"analyze: {kind} {layer} ({layer_index + 1}/{len(todo)})")
            results[layer] = analysis.run(run, layer)
        where = {"step": ctx.step_index, "global_epoch": ctx.global_epoch}
        ctx.emit("analysis", where | {"kind": kind, "layers": results})
        details[kind] = {n: analysis.summary(d) for n, d in results.items()}
        if skipped:
            details.setdefault("skipped", {})[kind] = skipped
    return details
