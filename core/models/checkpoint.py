"""Checkpoints: ONE safetensors file holding the state dict plus the arch as metadata.

metadata = {"slimline_arch": <json of the normalized arch>, "format": "slimline/1"}.
`load(path)` rebuilds the exact module (edits included) from the file alone.

A pruned model (`model.slimline_masks = {layer: BoolTensor}`, set by the pruning steps) is
stored sparsely: each masked `<layer>.weight` becomes its kept values, its bit-packed mask and
its shape (`core.masks.sparse_state`; metadata "slimline_sparse": "1"), never a dense copy.

An imported model (arch `{"name": "graph", "graph": <sha>, ...}`, `core.graph`) also stores its
graph: metadata "slimline_graph" = the canonical IR, registered again (and checked against the
arch's sha) by `read_arch`/`load`, so one file rebuilds it in a fresh process.
`import_graph(ir, tensors)` makes such a model from a converter's output.

This module sits above every method: it imports `core.methods`, so every method's structural
edit is registered before `build` replays an arch.
`load` rebuilds the dense weights (zeros where pruned) and sets `slimline_masks` again, so a
later job keeps the same weights pruned.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from core import methods  # noqa: F401 - registers every method's edit before build replays
from core.arch import GRAPH, build, normalize_preprocessing
from core.errors import CheckpointError, SpecError
from core.graph import canonical, graph_for, register_graph
from core.masks import SPARSE_SUFFIXES, dense_from_sparse, masked_parameters, sparse_state

FORMAT = "slimline/1"


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write `model` (built by `core.models.build`) to one safetensors file."""
    arch = getattr(model, "slimline_arch", None)
    if arch is None:
        raise CheckpointError("model has no slimline_arch; build it with core.models.build "
                              "so the checkpoint can be rebuilt from data")
    masks = getattr(model, "slimline_masks", None)
    metadata = {"slimline_arch": json.dumps(arch), "format": FORMAT}
    if isinstance(arch, dict) and arch.get("name") == GRAPH:
        try:
            metadata["slimline_graph"] = canonical(graph_for(arch.get("graph", "")))
        except SpecError as exc:
            raise CheckpointError(f"cannot save the imported model: {exc}") from None
    if masks:
        tensors = {k: v.contiguous() for k, v in sparse_state(model, masks).items()}
        metadata["slimline_sparse"] = "1"
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


def _metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def read_arch(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The arch stored in a checkpoint's metadata (no tensors are read)."""
    metadata = _metadata(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {metadata.get('format')!r}, expected {FORMAT!r}; "
                              "write checkpoints with core.models.save")
    try:
        arch = json.loads(metadata["slimline_arch"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} has no valid 'slimline_arch' metadata ({exc})") from None
    if not isinstance(arch, dict):
        raise CheckpointError(f"{path}: 'slimline_arch' metadata must be a JSON object")
    if arch.get("name") == GRAPH:
        _register_stored_graph(path, arch, metadata)
    return arch


def _register_stored_graph(path: str | os.PathLike[str], arch: dict[str, Any],
                           metadata: dict[str, str]) -> None:
    """Register the IR an imported model's checkpoint carries; its sha must be the arch's."""
    text = metadata.get("slimline_graph")
    if text is None:
        raise CheckpointError(f"{path} holds an imported model (arch 'graph') but no "
                              "'slimline_graph' metadata; save it with core.models.save")
    try:
        sha = register_graph(json.loads(text))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: 'slimline_graph' metadata is not JSON ({exc})") from None
    except SpecError as exc:
        raise CheckpointError(f"{path}: invalid imported graph: {exc}") from None
    if sha != arch.get("graph"):
        raise CheckpointError(f"{path}: the stored graph has id {sha}, but the arch names "
                              f"{arch.get('graph')!r}; the file was modified")


def load(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the model stored at `path` (in eval mode)."""
    arch = read_arch(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read tensors from {path}: {exc}") from None
    return from_tensors(arch, tensors, source=str(path))


def from_tensors(arch: dict[str, Any], tensors: Mapping[str, torch.Tensor], *,
                 source: str = "checkpoint") -> nn.Module:
    """`from_state_dict`, plus sparse weights: when `tensors` holds `core.masks.sparse_state`
    entries (`<layer>.weight.sparse_values/_mask/_shape`), the dense weights are rebuilt
    (zeros where pruned) and `model.slimline_masks` is set. CheckpointError on inconsistent
    sparse entries or masks that do not fit the architecture."""
    if not any(k.endswith(SPARSE_SUFFIXES) for k in tensors):
        return from_state_dict(arch, tensors)
    try:
        dense, masks = dense_from_sparse(tensors)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{source}: invalid sparse weights: {exc}") from None
    model = from_state_dict(arch, dense)
    try:
        masked_parameters(model, masks)  # every mask names a prunable layer of its shape
    except Exception as exc:  # noqa: BLE001 - any mismatch is a bad checkpoint
        raise CheckpointError(f"{source}: sparse masks do not fit the architecture: {exc}") \
            from None
    model.slimline_masks = masks
    return model


def from_state_dict(arch: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build `arch` and load `tensors` into it after validating every key, shape and value.

    Floating tensors are loaded in their own dtype when they all share one (a float64 checkpoint
    gives a float64 model). The model is returned in eval mode.
    """
    try:
        model = build(arch)
    except SpecError as exc:
        raise CheckpointError(f"invalid architecture in checkpoint: {exc}") from None
    expected = model.state_dict()
    mismatch = key_mismatch(str(arch.get("name")), list(expected), list(tensors))
    if mismatch is not None:
        raise CheckpointError(mismatch)
    float_dtypes = set()
    for key, want in expected.items():
        got = tensors[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"key {key!r} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(f"shape mismatch for key {key!r}: expected {tuple(want.shape)}, "
                                  f"got {tuple(got.shape)}; check the architecture kwargs")
        if want.is_floating_point():
            if not got.is_floating_point():
                raise CheckpointError(f"key {key!r} has dtype {got.dtype}; expected a floating "
                                      "dtype (float16/bfloat16/float32/float64)")
            if not bool(torch.isfinite(got).all()):
                raise CheckpointError(f"key {key!r} contains non-finite values (NaN or Inf); "
                                      "re-export the model from a healthy training run")
            float_dtypes.add(got.dtype)
        elif got.is_floating_point() or got.dtype == torch.bool:
            raise CheckpointError(f"key {key!r} has dtype {got.dtype}; expected {want.dtype}")
    if len(float_dtypes) == 1:
        model.to(float_dtypes.pop())
    model.load_state_dict(dict(tensors), strict=True)
    return model.eval()


SHOWN_KEYS = 10  # keys listed per kind in a key mismatch


def _keys(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def _prefix_fix(expected: list[str], given: list[str]) -> tuple[str, int] | None:
    """(prefix, keys it fixes) when stripping one common prefix (`module.` of DDP /
    DataParallel, `model.` of a Lightning module, ...) from the checkpoint's keys turns the
    most of them into keys the architecture expects."""
    want = set(expected)
    counts: dict[str, int] = {}
    for key in given:
        if key in want:
            continue
        for cut in (i + 1 for i, ch in enumerate(key) if ch == "."):
            if key[cut:] in want:
                counts[key[:cut]] = counts.get(key[:cut], 0) + 1
    if not counts:
        return None
    prefix, fixed = max(counts.items(), key=lambda item: (item[1], -len(item[0])))
    return (prefix, fixed) if 2 * fixed >= len([k for k in given if k not in want]) else None


def key_mismatch(name: str, expected: list[str], given: list[str]) -> str | None:
    """Why a checkpoint's keys do not fit the architecture `name`: the missing and the
    unexpected keys (counts and the first SHOWN_KEYS of each) and, when removing a common prefix
    would make them fit, that prefix to strip; None when the keys are exactly the expected
    ones."""
    want, have = set(expected), set(given)
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in given if k not in want]
    if not missing and not unexpected:
        return None
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) that {name!r} needs: {_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) that {name!r} does not have: "
                     f"{_keys(unexpected)}")
    text = "the checkpoint's keys do not match the architecture: " + "; ".join(parts)
    fix = _prefix_fix(expected, given)
    if fix is not None:
        prefix, fixed = fix
        how = (f"{{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}")
        origin = {"module.": " (DistributedDataParallel and DataParallel add it; or save "
                             "model.module.state_dict())",
                  "model.": " (a wrapper module holding the network as .model adds it)"}
        rest = "" if fixed == len(unexpected) else (f"; that fixes {fixed} of the "
                                                     f"{len(unexpected)} unexpected keys")
        stripped = {k.removeprefix(prefix) for k in given}
        still = sum(1 for k in expected if k not in stripped)
        if still:
            rest += f"; {still} key(s) would still be missing"
        return (f"{text}. Strip the prefix {prefix!r} from the keys{origin.get(prefix, '')}: "
                f"save {how} instead{rest}")
    hint = ("check the architecture's kwargs and edits (the arch form field), or save the "
            "model with core.models.save")
    return f"{text}; {hint}"


def import_graph(ir: dict[str, Any], tensors: Mapping[str, torch.Tensor], *,
                 num_classes: int | None = None,
                 preprocessing: dict[str, Any] | None = None) -> nn.Module:
    """The model of an imported graph (a converter's `(ir, tensors)`): registers the graph,
    builds it, loads and validates `tensors` like `from_state_dict` (CheckpointError), and sets
    `slimline_arch` = `{"name": "graph", "graph": <sha>, "input_shape", "num_classes",
    "init": "torch", "edits": [], ["preprocessing"]}`. `num_classes` is read from the output
    (N, classes) when None and must match it otherwise (SpecError). Eval mode."""
    sha = register_graph(ir)
    shape = list(ir["input"]["shape"])
    if num_classes is not None and (isinstance(num_classes, bool) or
                                    not isinstance(num_classes, int) or num_classes < 1):
        raise SpecError(f"num_classes must be a positive integer, got {num_classes!r}")
    arch: dict[str, Any] = {"name": GRAPH, "graph": sha, "input_shape": shape,
                            "num_classes": num_classes or 1, "init": "torch", "edits": []}
    if preprocessing is not None:
        arch["preprocessing"] = normalize_preprocessing(preprocessing)
    model = from_state_dict(arch, tensors)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    with torch.no_grad():
        try:
            out = model(torch.zeros(1, *shape, dtype=dtype))
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise SpecError(f"the graph does not run on an input of shape {[1, *shape]}: "
                            f"{exc}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SpecError(f"the graph must return logits (N, classes); it returns {got} for one "
                        "sample")
    classes = int(out.shape[1])
    if num_classes is not None and num_classes != classes:
        raise SpecError(f"num_classes {num_classes} does not match the graph's output "
                        f"({classes} classes)")
    model.slimline_arch["num_classes"] = classes
    return model
