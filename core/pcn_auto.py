"""Which layers and unit groups the PCN transform picks by default (seed 000 App. E).

* `auto_layers`: the "widest layers" heuristic made precise: among every Linear/Conv2d layer
  (the first only when it reads >= `min_in_dim` dims), take layers by decreasing weight count
  (`m * n * kh * kw`) until they hold >= `coverage` (default 90%) of those layers' weights, plus
  the partners of a picked layer that read the same tensor (a ResNet block's shortcut_conv with
  its conv1: they share U); returned in forward order.
* `auto_output`: the output-based transform only where it pays (App. C, E): on every unit group
  whose readers are all input-transformed with `in_dim / dims >= min_ratio` (10x), keeping the
  top units that hold `score_mass` (default 0.9) of the summed L1 scores.

`core.pcn_select` re-exports both (with the target search built on them).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from core.applies import why_not
from core.errors import SpecError
from core.pca import LayerStats
from core.pcn_graph import UnitGroup, shared_input_sets, unit_groups
from core.surgery import get_layer, prunable_layers

AUTO_OUTPUT_RULE = {"score_mass": 0.9}


def auto_layers(model: nn.Module, *, coverage: float = 0.9, min_in_dim: int = 16) -> list[str]:
    """The widest layers (seed 000 App. E: "the input-based transformation on the widest
    layers"): fewest Linear/Conv2d layers, by decreasing weight count, holding >= coverage of
    the weights of every candidate, plus their shared-input partners; forward order.

    The first layer is a candidate only when its input has >= `min_in_dim` dims: a first conv
    reading 1-3 image channels has nothing to compress, while an MLP's first layer reading 784
    pixels is its widest (LeNet-300-100: fc1 holds 88% of the weights, like Conv4's fc1).
    """
    if not 0 < coverage <= 1:
        raise SpecError(f"coverage must be in (0, 1], got {coverage!r}")
    layers = [(n, m) for n, m in prunable_layers(model) if isinstance(m, (nn.Linear, nn.Conv2d))
              and why_not("pcn", n, m) is None]  # not a depthwise/grouped conv
    first = layers[0][1] if layers else None
    wide_first = first is not None and (
        first.in_features if isinstance(first, nn.Linear) else first.in_channels) >= min_in_dim
    candidates = layers if wide_first else layers[1:]
    if not candidates:
        raise SpecError("the model has no Linear/Conv2d layer to transform (its first layer "
                        f"reads fewer than {min_in_dim} input dims)")
    sizes = {n: m.weight.numel() for n, m in candidates}
    total = sum(sizes.values())
    picked: set[str] = set()
    held = 0
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: forward order on ties
        if held >= coverage * total - 1e-9:
            break
        picked.add(name)
        held += sizes[name]
    for tensor in shared_input_sets(model):  # partners reading the same tensor share U
        if picked & set(tensor):
            picked |= {n for n in tensor if n in sizes}
    return [n for n, _ in candidates if n in picked]


def auto_output(model: nn.Module, stats: dict[str, LayerStats], dims: dict[str, int], *,
                min_ratio: float = 10.0,
                rule: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """{group: rule} for the unit groups whose every reader is compressed >= min_ratio."""
    rule = dict(rule or AUTO_OUTPUT_RULE)
    out = {}
    for name, group in unit_groups(model).items():
        readers = group.reader_layers
        if all(r in dims and r in stats and stats[r].dim >= min_ratio * dims[r]
               for r in readers) and _plain_readers(model, group):
            out[name] = rule
    return out


def _plain_readers(model: nn.Module, group: UnitGroup) -> bool:
    """Every reader reads the group alone (no concatenation) and is one the input transform
    replaces (`core.pcn_output.output_unsupported` says why not, for an explicit request)."""
    return not group.segments and all(
        why_not("pcn", r, get_layer(model, r)) is None for r in group.reader_layers)
