"""Unstructured pruning at initialization: score -> select -> apply (seed 004 ch. 3-4).

* score: `snip_scores` (connection sensitivity, Alg. 1 / Eq. 3.6), `magnitude_scores`,
  `random_scores`; `synflow_masks` (Tanaka et al. 2020; iterative, so it selects as it scores).
  Every score function returns `{layer: Tensor}` shaped like the layer's weight.
* select: `core.select.masks_from_scores` keeps exactly kappa = round((1 - sparsity) * n)
  weights, globally or per layer (re-exported here);
* apply and storage: `core.masks` (`apply_masks`, `masked_parameters`, `sparse_state`, ...;
  re-exported here); `core.train.train(..., masks=...)` keeps pruned weights at zero.
* `PruneConfig` (`core.configs`) + `prune_masks(model, config, ...)`: one entry point.
* `sparsity_for_budget(model, n)`: the sparsity whose masks leave the whole model with at most
  `n` non-zero parameters as trained (`trained_nonzero`), computed directly from the prunable
  weight count.
* `as_trained` / `trained_nonzero`: `core.budget`'s `nonzero_params` of the model as training
  can leave it: a zero that training may change (a trainable parameter's, a BatchNorm running
  statistic's; the zoo starts biases at zero) counts as non-zero, a masked weight stays zero.
  Every nonzero_params target is met on this count, so it still holds after fine-tuning.

Only the `weight` of Linear and Conv2d layers is pruned; biases, BatchNorm and PCN layers never.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

from core.applies import register_applies
from core.budget import model_cost
from core.configs import PruneConfig
from core.errors import SpecError
from core.layers import weight_layers
from core.masks import (
    SPARSE_SUFFIXES,
    Masks,
    apply_masks,
    collapsed_layers,
    dense_from_sparse,
    layer_report,
    masked_parameters,
    pack_mask,
    prunable,
    sparse_state,
    unpack_mask,
)
from core.select import SCOPES, keep_count, masks_from_scores
from core.select import check_sparsity as _check_sparsity

__all__ = ["LABELS", "SCOPES", "SPARSE_SUFFIXES", "apply_masks", "collapsed_layers",
           "dense_from_sparse", "keep_count", "layer_report", "magnitude_scores",
           "masked_parameters", "Masks", "masks_from_scores", "pack_mask", "prunable",
           "prune_applies", "prune_masks", "PruneConfig", "random_scores", "Scores",
           "snip_scores", "sparse_state", "sparsity_for_budget", "synflow_masks",
           "as_trained", "trained_nonzero", "unpack_mask"]

Scores = dict[str, torch.Tensor]
LABELS = ("true", "uniform")


@register_applies("snip")
@register_applies("random")
@register_applies("magnitude")
@register_applies("synflow")
def prune_applies(name: str, module: nn.Module) -> str | None:
    """Why the pruning ops cannot mask `module`'s weight (None: they can): they mask the weight
    of plain nn.Linear/nn.Conv2d layers (depthwise convs included), never a compressed layer's."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return None
    return (f"a {type(module).__name__}: pruning masks the weights of plain nn.Linear/"
            "nn.Conv2d layers only")


# ---- scores ----

def _batch_xy(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise SpecError("snip_scores batches must be (x, y) pairs, or x tensors with labels='uniform'")


def snip_scores(model: nn.Module, batches: Iterable[object], *, labels: str = "true",
                device: str | torch.device = "cpu") -> Scores:
    """Connection sensitivity s = |sum_b g_b * w| / sum |.| (seed 004 Eq. 3.5-3.6, 4.3).

    `batches` yields `(x, y)` pairs (or bare `x` tensors for `labels="uniform"`). The loss is the
    *summed* cross-entropy of every batch, so several batches give exactly the scores of one big
    batch: the signed products g * w are accumulated and |.| is taken at the end. `labels=
    "uniform"` is unsupervised SNIP (seed 004 §4.5.2): cross-entropy against the uniform
    distribution over classes; labels are ignored.

    The model is moved to `device` and scored in eval mode (BatchNorm running statistics,
    dropout off), then its train/eval mode is restored. Gradients are taken with
    `torch.autograd.grad`, so no `.grad` is written and no parameter changes. Scores are float64,
    normalised by their global sum (left at zero when every product is zero).
    """
    if labels not in LABELS:
        raise SpecError(f"labels must be one of {LABELS}, got {labels!r}")
    device = torch.device(device)
    model.to(device)
    layers = prunable(model)
    weights = [m.weight for _, m in layers]
    param = next(model.parameters())
    acc = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    was_training = model.training
    needed = [w.requires_grad for w in weights]
    seen = 0
    try:
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                x, y = _batch_xy(batch)
                logits = model(x.to(device=device, dtype=param.dtype))
                if labels == "uniform":
                    target = torch.full_like(logits, 1.0 / logits.shape[1])
                    loss = F.cross_entropy(logits, target, reduction="sum")
                else:
                    if y is None:
                        raise SpecError("labels='true' needs (x, y) batches")
                    loss = F.cross_entropy(logits, y.to(device), reduction="sum")
                grads = torch.autograd.grad(loss, weights)
                for a, g, w in zip(acc, grads, weights, strict=True):
                    a += (g.detach() * w.detach()).double()  # signed; |.| at the end
                seen += len(x)
    finally:
        for w, req in zip(weights, needed, strict=True):
            w.requires_grad_(req)
        model.train(was_training)
    if seen == 0:
        raise SpecError("snip_scores needs at least one non-empty batch")
    return _normalised({name: a.abs() for (name, _), a in zip(layers, acc, strict=True)})


def _normalised(scores: Scores) -> Scores:
    total = sum(float(s.sum()) for s in scores.values())
    if total > 0:
        scores = {name: s / total for name, s in scores.items()}
    return scores


def magnitude_scores(model: nn.Module) -> Scores:
    """|w| per prunable layer; meant for a *trained* model (seed 004 App. 4.B)."""
    return {name: m.weight.detach().abs().clone() for name, m in prunable(model)}


def random_scores(model: nn.Module, generator: torch.Generator) -> Scores:
    """I.i.d. uniform scores (drawn on the CPU from `generator`): global top-k of them is
    random global pruning, per-layer top-k random layerwise pruning."""
    return {name: torch.rand(m.weight.shape, generator=generator, dtype=torch.float64)
            for name, m in prunable(model)}


# ---- SynFlow (data-free, iterative) ----

# Activations that saturate (or squash) positive inputs. SynFlow's linearised network only has
# positive values, where ReLU is the identity; an imported graph's ReLU6 (aten.hardtanh), clamp,
# sigmoid or tanh would saturate the growing signal and zero every gradient (every score 0: the
# selection then keeps the earliest layers and collapses the rest). They run as ReLU instead.
SATURATING = frozenset({"aten.hardtanh.default", "aten.hardtanh_.default", "aten.relu6.default",
                        "aten.clamp.default", "aten.clamp_max.default", "aten.sigmoid.default",
                        "aten.tanh.default", "aten.hardsigmoid.default",
                        "aten.hardsigmoid_.default"})


def linearise_activations(net: nn.Module) -> int:
    """In place, on an imported graph (`torch.fx.GraphModule`; zoo models are left as they
    are): every saturating activation (`SATURATING`; a clamp only when its lower bound is 0 or
    absent, as in ReLU6) becomes `aten.relu`. Returns how many were replaced."""
    if not isinstance(net, fx.GraphModule):
        return 0
    replaced = 0
    for node in net.graph.nodes:
        if node.op != "call_function" or str(node.target) not in SATURATING:
            continue
        if str(node.target).startswith("aten.clamp.") and \
                (node.args[1:2] or [node.kwargs.get("min")])[0] not in (None, 0, 0.0):
            continue
        node.target, node.args, node.kwargs = torch.ops.aten.relu.default, node.args[:1], {}
        replaced += 1
    if replaced:
        net.recompile()
    return replaced


def synflow_masks(model: nn.Module, sparsity: float, input_shape: Iterable[int], *,
                  rounds: int = 100, scope: str = "global",
                  report: dict[str, object] | None = None) -> Masks:
    """SynFlow masks (Tanaka et al. 2020; seed 002 Table E.2: 100 rounds, exponential schedule).

    On a float64 copy in eval mode with every parameter and floating buffer replaced by its
    absolute value (the "linearised" network; an imported graph's saturating activations run as
    ReLU, `linearise_activations`), round k = 1..rounds computes
    R = sum(f(1)) for an all-ones input of `input_shape`, scores |dR/dw * w| of the still-kept
    weights and keeps the top (1 - sparsity)^(k / rounds) fraction of them, so the final round
    keeps exactly kappa. Pruned weights are zeroed in the copy between rounds and never return.
    The model itself is not modified. `report` (a dict, optional) gets `zero_score_layers`: the
    layers whose first-round scores are all 0 (their kept weights are ties, lowest index first).
    """
    _check_sparsity(sparsity)
    if rounds < 1:
        raise SpecError(f"rounds must be >= 1, got {rounds}")
    net = copy.deepcopy(model).double().eval()
    linearise_activations(net)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.abs_()
    layers = prunable(net)
    weights = [m.weight for _, m in layers]
    names = [n for n, _ in layers]
    originals = [w.detach().clone() for w in weights]
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in zip(names, weights, strict=True)}
    x = torch.ones(1, *input_shape, dtype=torch.float64, device=weights[0].device)
    for w in weights:
        w.requires_grad_(True)
    for k in range(1, rounds + 1):
        density = (1.0 - sparsity) ** (k / rounds)
        with torch.no_grad():
            for w, w0, n in zip(weights, originals, names, strict=True):
                w.copy_(w0 * masks[n])
        grads = torch.autograd.grad(net(x).sum(), weights)
        # Pruned weights get -1 (< every real score) so they are never chosen again.
        scores = {n: torch.where(masks[n], (g * w).detach().abs(), -1.0)
                  for n, g, w in zip(names, grads, weights, strict=True)}
        if k == 1 and report is not None:
            # no signal of the all-ones input reaches these layers (e.g. a LayerNorm of the
            # constant input with a zero bias in front of them): their masks are ties
            report["zero_score_layers"] = [n for n in names if float(scores[n].max()) <= 0]
        # The last round asks for `sparsity` itself, so exactly kappa survive.
        masks = masks_from_scores(scores, sparsity if k == rounds else 1.0 - density,
                                  scope=scope)
    return masks


# ---- an absolute budget ----

def as_trained(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of `model` as training can leave it, for counting: every zero entry of a
    trainable parameter or of a BatchNorm running statistic set to one, then `masks` applied
    (masks of layers the model no longer has as Linear/Conv2d of that shape are ignored)."""
    probe = copy.deepcopy(model)
    frozen = {id(t) for _, _, layer in weight_layers(probe) for t in layer.frozen_tensors()}
    with torch.no_grad():
        for prm in probe.parameters():
            if prm.requires_grad and id(prm) not in frozen:
                prm.masked_fill_(prm == 0, 1.0)
        for module in probe.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for stat in (module.running_mean, module.running_var):
                    if stat is not None:
                        stat.masked_fill_(stat == 0, 1.0)
        if masks:
            modules = dict(probe.named_modules())
            apply_masks(probe, {n: m for n, m in masks.items()
                                if isinstance(modules.get(n), (nn.Linear, nn.Conv2d))
                                and modules[n].weight.shape == m.shape})
    return probe


def trained_nonzero(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """`core.budget`'s `nonzero_params` of `as_trained(model, masks)`: what the model can hold
    after any training that keeps `masks` (at least its count now)."""
    return model_cost(as_trained(model, masks), "nonzero_params")


def _kept(sizes: list[int], sparsity: float, scope: str) -> int:
    """Weights `masks_from_scores` keeps at `sparsity` (its rounding, per layer or global)."""
    if scope == "layerwise":
        return sum(keep_count(n, sparsity) for n in sizes)
    return keep_count(sum(sizes), sparsity)


def sparsity_for_budget(model: nn.Module, nonzero_params: int, scope: str = "global") -> float:
    """The smallest sparsity whose masks (`masks_from_scores` with `scope`) leave `model` with
    at most `nonzero_params` non-zero parameters as trained (`trained_nonzero`: the whole
    model, also after fine-tuning): the tensors pruning never masks (biases, norms, other
    layers) count as `as_trained` counts them, the prunable weights as the number kept.
    0.0 when the model is already within the budget; SpecError when even one kept weight is
    over it."""
    if scope not in SCOPES:
        raise SpecError(f"scope must be one of {SCOPES}, got {scope!r}")
    probe = as_trained(model)
    weights = [m.weight for _, m in prunable(probe)]
    if not weights:
        raise SpecError("the model has no Linear/Conv2d weight to prune")
    sizes = [w.numel() for w in weights]
    live = sum(int(torch.count_nonzero(w.detach())) for w in weights)
    other = model_cost(probe, "nonzero_params") - live
    keep = nonzero_params - other
    if keep < 1:
        raise SpecError(f"a nonzero_params budget of {nonzero_params} is out of reach for "
                        f"pruning: the tensors it does not mask (biases, normalisation, other "
                        f"layers) hold {other} non-zero values; the smallest reachable is "
                        f"{other + 1} (and keeping a weight in every layer needs more): raise "
                        "the budget")
    if keep >= sum(sizes):
        return 0.0
    guess = 1.0 - keep / sum(sizes)
    if _kept(sizes, guess, scope) == keep:
        return guess
    # per-layer rounding missed `keep`: bisect for the smallest sparsity that fits (kept
    # weights never grow with the sparsity; 1 - 1e-15 keeps none)
    lo, hi = 0.0, guess if _kept(sizes, guess, scope) <= keep else 1.0 - 1e-15
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            return hi
        lo, hi = (lo, mid) if _kept(sizes, mid, scope) <= keep else (mid, hi)


# ---- one entry point ----

def prune_masks(model: nn.Module, config: PruneConfig, *,
                batches: Iterable[object] | None = None,
                generator: torch.Generator | None = None,
                input_shape: Iterable[int] | None = None,
                previous: Mapping[str, torch.Tensor] | None = None,
                device: str | torch.device = "cpu",
                report: dict[str, object] | None = None) -> Masks:
    """Score and select by `config` (`PruneConfig.from_dict(step.model_dump())`): snip needs
    `batches` (labelled, `config.batches` of `config.batch_size`; scored on `device`), random a
    `generator`,
    synflow the `input_shape`. `previous` masks (an earlier pruning) stay pruned: their weights
    score below every live one and are and-ed into the result. The model is not modified
    (apply the masks with `apply_masks`; `config.init`/`repair` are `core.sigprop`'s).
    `report`: see `synflow_masks`."""
    previous = dict(previous or {})
    if config.sparsity is None:
        raise SpecError("prune_masks needs a sparsity (a nonzero_params target becomes one: "
                        "core.prune.sparsity_for_budget)")
    if config.op == "synflow":
        if input_shape is None:
            raise SpecError("synflow needs the model's input_shape")
        net = model
        if previous:
            net = copy.deepcopy(model)
            apply_masks(net, previous)
        masks = synflow_masks(net, config.sparsity, input_shape, rounds=config.rounds,
                              scope=config.scope, report=report)
    else:
        if config.op == "snip":
            if batches is None:
                raise SpecError("snip needs labelled batches")
            scores = snip_scores(model, batches, labels=config.labels, device=device)
        elif config.op == "magnitude":
            scores = magnitude_scores(model)
        elif config.op == "random":
            if generator is None:
                raise SpecError("random pruning needs a generator")
            scores = random_scores(model, generator)
        else:
            raise SpecError(f"unknown pruning op {config.op!r}; valid: snip, random, "
                            "magnitude, synflow")
        if previous:  # already pruned weights score below every live one
            scores = {n: torch.where(previous[n].to(s.device), s, torch.full_like(s, -1.0))
                      if n in previous else s for n, s in scores.items()}
        masks = masks_from_scores(scores, config.sparsity, scope=config.scope)
    return {n: m & previous[n].to(m.device) if n in previous else m for n, m in masks.items()}
