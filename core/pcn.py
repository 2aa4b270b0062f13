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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import SpecError
from core.pca import LayerStats, effective_dimensionality

SELECTORS = ("threshold", "dims", "energy")


class PCNLinear(nn.Module):
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


class PCNConv2d(nn.Module):
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


def _conv_geometry(name: str, conv: nn.Conv2d) -> dict[str, Any]:
    padding = conv.padding
    if isinstance(padding, str):
        raise SpecError(f"layer {name!r}: string padding {padding!r} is not supported by PCNConv2d")
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1) or conv.padding_mode != "zeros":
        raise SpecError(f"layer {name!r}: PCNConv2d needs groups=1, dilation=1 and zero padding")
    return {"kernel_size": tuple(conv.kernel_size), "stride": tuple(conv.stride),
            "padding": tuple(padding)}


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


def resolve_layers(model: nn.Module, layers: list[str] | str,
                   auto: Callable[[list[str]], list[str]]) -> list[str]:
    """The layer names to transform: `auto(valid)` for "auto", else the given names, checked to
    be Linear/Conv2d layers of `model` (SpecError naming the valid ones otherwise)."""
    from core.models import prunable_layers

    valid = [n for n, m in prunable_layers(model) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if layers == "auto":
        chosen = auto(valid)
    elif isinstance(layers, (list, tuple)) and all(isinstance(n, str) for n in layers):
        chosen = list(dict.fromkeys(layers))
    else:
        raise SpecError(f"layers must be 'auto' or a list of layer names, got {layers!r}")
    bad = [n for n in chosen if n not in valid]
    if bad:
        raise SpecError(f"cannot transform {bad}: not Linear/Conv2d layers of the model; "
                        f"valid layers: {', '.join(valid)}")
    if not chosen:
        raise SpecError("no layers to transform")
    return chosen


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
    """
    from core.models import get_layer, set_layer, with_edit

    chosen = resolve_layers(model, layers, auto=lambda valid: valid[1:])
    missing = [n for n in chosen if n not in stats]
    if missing:
        raise SpecError(f"no PCA stats for layers {missing}; collect them with "
                        "core.pca.collect_input_stats first")
    _validate_select(select, chosen)

    new_model = copy.deepcopy(model)
    report: dict[str, Any] = {}
    for name in chosen:
        layer = get_layer(new_model, name)
        st = stats[name]
        kind = "linear" if isinstance(layer, nn.Linear) else "conv"
        dims = select_dims(st, layer_selector(select, name, kind))
        set_layer(new_model, name, pcn_from_layer(name, layer, st, dims))
        new_model.slimline_arch = with_edit(new_model, {"op": "pcn_input", "layer": name,
                                                        "dims": dims})
        e = st.eigvals.clamp(min=0)
        total = float(e.sum()) if st.total_variance is None else st.total_variance
        report[name] = {
            "in_dim": st.dim,
            "dims": dims,
            "eigvals": [float(v) for v in st.eigvals[:10]],
            "explained_variance": float(e[:dims].sum()) / total if total > 0 else 1.0,
        }
    return new_model, report
