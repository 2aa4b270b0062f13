"""Principal Component Networks: the input-based transform (seed 000 Eq. 1-2, App. C, D).

A layer with input h (m dims) is replaced by one that first projects onto the top-k principal
components, `h~ = (h - mu) U`, and then applies `W~ = W U`, `b~ = b + W mu`. `U (m, k)` and
`mu (m,)` are frozen buffers; `weight` and `bias` are trained.

Layout: score (core.pca: eigen-decomposition) -> select (`effective_dimensionality` per layer)
-> apply (`pcn_input_transform`: layer surgery in one place).
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.applies import conv_kind, register_applies
from core.edits import register_edit
from core.errors import SpecError
from core.layers import ConvDims, LinearDims, as_layer, conv_macs, linear_macs
from core.pca import LayerStats, effective_dimensionality
from core.surgery import get_layer, plain_layers, set_layer, with_edit

SELECTORS = ("threshold", "dims", "energy")


class PCNLinear(LinearDims, nn.Module):
    """`y = ((h - mu) @ U) @ weight.T + bias` with weight (n, k), U (m, k), mu (m,)."""

    def __init__(self, in_features: int, dims: int, out_features: int):
        super().__init__()
        self.in_features, self.dims, self.out_features = in_features, dims, out_features
        self.register_buffer("U", torch.zeros(in_features, dims))
        self.register_buffer("mu", torch.zeros(in_features))
        self.weight = nn.Parameter(torch.zeros(out_features, dims))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = (h - self.mu) @ self.U  # (..., k); seed 000 Eq. 1
        return F.linear(z, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, dims={self.dims}, out_features={self.out_features}"

    # ---- core.layers.Layer ----
    def weight_params(self) -> int:
        return self.weight.numel()

    def frozen_tensors(self) -> list[torch.Tensor]:
        return [self.U, self.mu]

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int:
        rows = inputs.numel() // self.in_features
        return rows * self.in_features * self.dims + linear_macs(output, self.dims)

    def dense_weight(self) -> torch.Tensor:
        """`W U^T` (n, m): the weight applied to `h - mu`."""
        return self.weight @ self.U.T


class PCNConv2d(ConvDims, nn.Module):
    """Project channels with U (a 1x1 map of `h - mu`), then a k-channel conv.

    Zero-padding correction (seed 000 App. D): the original conv pads h with zeros, whose
    projection is `-mu U`, so the projected map is padded per channel with `-mu U` and the
    conv then runs with padding 0. The padding is built as `F.pad(z) + border * (-mu U)` where
    `border` is 1 on the padded ring and 0 inside, so interior values are untouched.
    Supports stride and int/tuple padding; dilation 1, groups 1, zero padding mode only.
    """

    def __init__(self, in_channels: int, dims: int, out_channels: int,
                 kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0)):
        super().__init__()
        self.in_channels, self.dims, self.out_channels = in_channels, dims, out_channels
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding = tuple(padding)
        self.register_buffer("U", torch.zeros(in_channels, dims))
        self.register_buffer("mu", torch.zeros(in_channels))
        self.weight = nn.Parameter(torch.zeros(out_channels, dims, *self.kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("nchw,ck->nkhw", h - self.mu[:, None, None], self.U)  # (N, k, H, W)
        ph, pw = self.padding
        if ph or pw:
            pad = (pw, pw, ph, ph)
            border = F.pad(torch.zeros(1, 1, *z.shape[2:], dtype=z.dtype, device=z.device),
                           pad, value=1.0)  # (1, 1, H+2ph, W+2pw)
            pad_value = -(self.mu @ self.U)  # (k,)
            z = F.pad(z, pad) + border * pad_value[None, :, None, None]
        return F.conv2d(z, self.weight, self.bias, stride=self.stride)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, dims={self.dims}, "
                f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")

    # ---- core.layers.Layer ----
    def weight_params(self) -> int:
        return self.weight.numel()

    def frozen_tensors(self) -> list[torch.Tensor]:
        return [self.U, self.mu]

    def macs(self, inputs: torch.Tensor, output: torch.Tensor) -> int:
        # 1x1 projection at input resolution, then the k-channel conv
        spatial_in = inputs.shape[0] * inputs.shape[2] * inputs.shape[3]
        return spatial_in * self.in_channels * self.dims + conv_macs(output, self.dims,
                                                                       self.kernel_size)

    def dense_weight(self) -> torch.Tensor:
        """`sum_k W[:, k] U[:, k]` per tap (C_out, C_in, kh, kw): applied to `h - mu`, whose
        zero padding the layer corrects (App. D), it gives the original conv."""
        return torch.einsum("okij,ck->ocij", self.weight, self.U)


@register_applies("pcn")
def pcn_applies(name: str, module: nn.Module) -> str | None:
    """Why the input-based transform cannot replace `module` (None: it can). It projects the
    input channels a Linear or a dense conv mixes; `PCNConv2d` corrects zero padding only."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return (f"a {type(module).__name__}: the PCN input transform replaces nn.Linear/"
                "nn.Conv2d layers only")
    if module.groups != 1:
        return (f"{conv_kind(module)}: the PCN input transform projects the channels a dense "
                "conv mixes; a grouped conv reads each channel group alone")
    if isinstance(module.padding, str):
        return f"padding={module.padding!r}: PCNConv2d needs explicit padding"
    if tuple(module.dilation) != (1, 1):
        return f"dilated conv (dilation={tuple(module.dilation)}): PCNConv2d needs dilation 1"
    if module.padding_mode != "zeros":
        return (f"padding_mode={module.padding_mode!r}: PCNConv2d corrects zero padding "
                "only")
    return None


def _conv_geometry(name: str, conv: nn.Conv2d) -> dict[str, Any]:
    reason = pcn_applies(name, conv)
    if reason is not None:
        raise SpecError(f"layer {name!r}: {reason}")
    return {"kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
            "padding": tuple(conv.padding)}  # type: ignore[arg-type]


def placeholder_pcn_layer(name: str, layer: nn.Module, dims: int) -> nn.Module:
    """A zero-valued PCN layer with the shapes that replacing `layer` by `dims` components gives.

    Used to replay `pcn_input` edits; values are filled by a checkpoint or by the transform.
    Always has a bias: `b~ = b + W mu` is non-zero even when the original layer had none.
    """
    if isinstance(layer, nn.Linear):
        m = layer.in_features
    elif isinstance(layer, nn.Conv2d):
        m = layer.in_channels
    else:
        raise SpecError(f"layer {name!r} is a {type(layer).__name__}; the PCN input transform "
                        "applies to Linear/Conv2d layers only")
    if isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= m:
        raise SpecError(f"layer {name!r}: dims must be an integer in [1, {m}], got {dims!r}")
    if isinstance(layer, nn.Linear):
        new: nn.Module = PCNLinear(m, dims, layer.out_features)
    else:
        new = PCNConv2d(m, dims, layer.out_channels, **_conv_geometry(name, layer))
    return new.to(dtype=layer.weight.dtype, device=layer.weight.device)


def pcn_from_layer(name: str, layer: nn.Module, stats: LayerStats, dims: int) -> nn.Module:
    """The PCN replacement of `layer` keeping the top `dims` principal components of its input."""
    new = placeholder_pcn_layer(name, layer, dims)
    if stats.dim != new.U.shape[0]:
        raise SpecError(f"layer {name!r}: stats have {stats.dim} input dims, the layer has "
                        f"{new.U.shape[0]}")
    U = stats.eigvecs[:, :dims].to(torch.float64)  # (m, k)
    mu = stats.mu.to(torch.float64)  # (m,)
    W = layer.weight.detach().to(torch.float64)
    b = (layer.bias.detach().to(torch.float64) if layer.bias is not None
         else torch.zeros(W.shape[0], dtype=torch.float64))
    if isinstance(layer, nn.Linear):
        W_new = W @ U  # (n, k); seed 000 Eq. 2
        b_new = b + W @ mu
    else:
        W_new = torch.einsum("ocij,ck->okij", W, U)  # each tap: W[:, :, i, j] U
        b_new = b + torch.einsum("ocij,c->o", W, mu)  # b + sum_ij W[:, :, i, j] mu
    with torch.no_grad():
        for target, value in ((new.U, U), (new.mu, mu), (new.weight, W_new), (new.bias, b_new)):
            target.copy_(value.to(dtype=target.dtype, device=target.device))
    return new


def select_dims(stats: LayerStats, selector: dict[str, Any]) -> int:
    """`effective_dimensionality` of a layer's spectrum, capped at the computed eigenvectors
    (stats from `collect_input_stats(top_k=...)` or the Gram route hold fewer than m)."""
    dims = effective_dimensionality(stats.eigvals, total_variance=stats.total_variance,
                                    **selector)
    return min(dims, int(stats.eigvecs.shape[1]))


def layer_selector(select: dict[str, Any], name: str, kind: str) -> dict[str, Any]:
    """per_layer[name] > select[kind] ('linear'|'conv') > the top-level selector."""
    per_layer = select.get("per_layer", {}) or {}
    for candidate in (per_layer.get(name), select.get(kind),
                      {k: select[k] for k in SELECTORS if k in select}):
        if candidate:
            return candidate
    raise SpecError(f"no selector for layer {name!r}: give one of {SELECTORS} at the top level, "
                    f"under {kind!r}, or under per_layer[{name!r}]")


def _validate_select(select: Any, chosen: list[str]) -> None:
    if not isinstance(select, dict):
        raise SpecError(f"select must be a dict such as {{'threshold': 0.1}}, got {select!r}")
    unknown = set(select) - {*SELECTORS, "per_layer", "linear", "conv"}
    if unknown:
        raise SpecError(f"unknown select keys {sorted(unknown)}; use one of {SELECTORS}, "
                        "'linear', 'conv' or 'per_layer'")
    per_layer = select.get("per_layer", {}) or {}
    if not isinstance(per_layer, dict):
        raise SpecError("select['per_layer'] must map layer names to selectors")
    for key in ("linear", "conv"):
        if key in select and not isinstance(select[key], dict):
            raise SpecError(f"select[{key!r}] must be a selector dict such as {{'dims': 8}}")
    if not all(isinstance(v, dict) for v in per_layer.values()):
        raise SpecError("every per_layer entry must be a selector dict such as {'dims': 8}")
    extra = sorted(set(per_layer) - set(chosen))
    if extra:
        raise SpecError(f"per_layer names layers that are not transformed: {extra}; "
                        f"transformed layers: {', '.join(chosen)}")


def pcn_untouched(model: nn.Module) -> dict[str, str]:
    """{layer: reason} of the model's Linear/Conv2d layers the input transform cannot replace
    (`pcn_applies`: depthwise/grouped or dilated convs); "auto" leaves them out."""
    return {n: reason for n, m in plain_layers(model)
            if (reason := pcn_applies(n, m)) is not None}


def resolve_layers(model: nn.Module, layers: list[str] | str,
                   auto: Callable[[list[str]], list[str]]) -> list[str]:
    """The layer names to transform: `auto(valid)` for "auto" (less the layers the transform
    cannot replace, `pcn_untouched`), else the given names, checked to be Linear/Conv2d layers
    of `model` it can replace (SpecError naming the valid ones, or the reason, otherwise).
    Valid layers are `core.surgery.plain_layers` (never a factor of a low-rank layer)."""
    untouched = pcn_untouched(model)
    valid = [n for n, _ in plain_layers(model) if n not in untouched]
    if layers == "auto":
        chosen = [n for n in auto(valid) if n not in untouched]
    elif isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers):
        chosen = list(dict.fromkeys(layers))
    else:
        raise SpecError(f"layers must be 'auto' or a list of layer names, got {layers!r}")
    refused = {n: untouched[n] for n in chosen if n in untouched}
    if refused:
        raise SpecError("cannot transform " + "; ".join(f"{n!r}: {r}" for n, r in refused.items())
                        + f"; leave them out (layers the transform can replace: "
                        f"{', '.join(valid)})")
    bad = [n for n in chosen if n not in valid]
    if bad:
        raise SpecError(f"cannot transform {bad}: not Linear/Conv2d layers of the model; "
                        f"valid layers: {', '.join(valid)}")
    if not chosen:
        raise SpecError("no layers to transform")
    return chosen


@dataclass(frozen=True)
class PCNPlan:
    """What a PCN transform keeps (JSON-able via `to_dict`/`from_dict`): `dims[layer]` principal
    components per input-transformed layer (in transform order), and for output-pruned unit
    groups (`core.pcn_output`) `output[group]` = the kept unit indices (ascending) and
    `scores[group]` = every unit's score (for the report)."""

    dims: dict[str, int]
    output: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"dims": dict(self.dims), "output": {g: list(k) for g, k in self.output.items()},
                "scores": {g: list(s) for g, s in self.scores.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PCNPlan:
        return cls(dims={str(n): int(k) for n, k in d["dims"].items()},
                   output={str(g): [int(u) for u in k] for g, k in d.get("output", {}).items()},
                   scores={str(g): [float(s) for s in v]
                           for g, v in d.get("scores", {}).items()})


def check_stats(stats: dict[str, LayerStats], layers: list[str]) -> None:
    missing = [n for n in layers if n not in stats]
    if missing:
        raise SpecError(f"no PCA stats for layers {missing}; collect them with "
                        "core.pca.collect_input_stats first")


def transform_inputs(new_model: nn.Module, dims: dict[str, int], stats: dict[str, LayerStats],
                     sliced: dict[str, LayerStats] | None = None
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """In place: replace every layer of `dims` by its PCN layer (from `sliced[layer]` where
    output pruning truncated its input, else `stats[layer]`); returns (report, pcn_input edits)."""
    sliced = sliced or {}
    report: dict[str, Any] = {}
    edits: list[dict[str, Any]] = []
    for name, k in dims.items():
        st = stats[name]
        layer = get_layer(new_model, name)
        in_dim = as_layer(layer).in_dim  # type: ignore[union-attr]
        set_layer(new_model, name, pcn_from_layer(name, layer, sliced.get(name, st), k))
        edits.append({"op": "pcn_input", "layer": name, "dims": k})
        e = st.eigvals.clamp(min=0)
        total = float(e.sum()) if st.total_variance is None else st.total_variance
        report[name] = {"in_dim": in_dim, "dims": k,
                        "eigvals": [float(v) for v in st.eigvals[:10]],
                        "explained_variance": float(e[:k].sum()) / total if total > 0 else 1.0}
    return report, edits


def plan_pcn_input(model: nn.Module, stats: dict[str, LayerStats], select: dict[str, Any],
                   layers: list[str] | str = "auto") -> PCNPlan:
    """The dims of every chosen layer (`pcn_input_transform`'s plan; no output pruning)."""
    chosen = resolve_layers(model, layers, auto=lambda valid: valid[1:])
    check_stats(stats, chosen)
    _validate_select(select, chosen)
    dims = {}
    for name in chosen:
        kind = as_layer(get_layer(model, name)).kind  # type: ignore[union-attr]
        dims[name] = select_dims(stats[name], layer_selector(select, name, kind))
    return PCNPlan(dims=dims)


def apply_pcn_input(model: nn.Module, plan: PCNPlan, stats: dict[str, LayerStats]
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """A deep copy of `model` with `plan.dims` input-transformed; (new model, report)."""
    if plan.output:
        raise SpecError("a plan with output pruning is applied by core.pcn_output.apply_pcn")
    check_stats(stats, list(plan.dims))
    new_model = copy.deepcopy(model)
    report, edits = transform_inputs(new_model, plan.dims, stats)
    for edit in edits:
        new_model.slimline_arch = with_edit(new_model, edit)
    return new_model, report


def pcn_input_transform(model: nn.Module, stats: dict[str, LayerStats], select: dict[str, Any],
                        layers: list[str] | str = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """Replace the chosen layers by PCN layers; return (deep-copied new model, report).

    `select`: one selector for every layer (`{"threshold": 0.1}`, `{"dims": 64}`,
    `{"energy": 0.99}`), optionally overridden per kind (`{"linear": {...}, "conv": {...}}`) and
    per layer (`{"per_layer": {"fc1": {"dims": 64}}}`); see `effective_dimensionality`.
    `layers="auto"`: every Linear/Conv2d except the first in forward order (its input is the raw
    image). `stats` must hold `core.pca.collect_input_stats` results for every chosen layer,
    computed on `model`. The new model's arch is the old one plus a `pcn_input` edit per layer.
    Report: `{layer: {"in_dim", "dims", "eigvals" (top 10), "explained_variance"}}`.
    `plan_pcn_input` + `apply_pcn_input`.
    """
    return apply_pcn_input(model, plan_pcn_input(model, stats, select, layers), stats)


@register_edit("pcn_input")
def replay_pcn_input(model: nn.Module, edit: dict[str, Any]) -> None:
    """Structural replay of `{"op": "pcn_input", "layer", "dims"}`: a placeholder PCN layer."""
    layer, dims = edit.get("layer"), edit.get("dims")
    if not isinstance(layer, str) or not isinstance(dims, int) or isinstance(dims, bool):
        raise SpecError(f"pcn_input edit needs a string 'layer' and an int 'dims', got {edit}")
    set_layer(model, layer, placeholder_pcn_layer(layer, get_layer(model, layer), dims))
