"""What a job submission is checked against, torch-free, before anything is queued: the layer
names its steps give, and whether its dataset fits its model (sample shape and classes).

Everything comes from data the service already holds:
* a stored model (`{"model": "<id>"}`): its Model row — the prunability report the inspector or
  the worker computed (`core.prunability`: every weight layer and unit group by name) and its
  arch (`input_shape`, `num_classes`, `preprocessing.layout`); a row without a report and with a
  zoo arch gets its names from the arch;
* a fresh zoo arch (`{"model": {"arch": {...}}}`): `service.archcheck.arch_layers`, the zoo's
  layer names mirrored as arithmetic (a test holds them equal to the built model's report); a
  fresh imported graph's arch: the report of one of the tenant's models on that graph;
* the dataset: the built-ins' shapes (`service.datasets.BUILTIN_SHAPES`) or an upload's meta
  (`input_shape`, `num_classes`, from the inspector).

A name is refused only when it can be decided: a step after one that restructures layers (any
method with edit ops: pcn, lowrank, channel_prune, dctps) may name what that step made below an
existing layer (`fc1.blocks.0.0` after lowrank factors `fc1`), so such names are accepted and
left to the worker, as are names of a model whose layers are not known. The shape rule is
`worker.inputs.prepare_data`'s, mirrored (tests/service/test_submit_checks.py runs both): a
stored model's input is fixed, so a single channel is replicated and images are resized to fit
it; a fresh arch's input must match (set its `input_shape`). Each refusal is an InvalidSpec
(422) naming the field (`steps[2].layers`, `dataset`) and how to fix it.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.archcheck import ZOO_DEFAULTS, arch_layers, is_graph_arch
from service.datasets import BUILTIN_SHAPES, get_dataset
from service.errors import InvalidSpec
from service.orm import Model
from service.registry import MethodSpec, spec_for
from service.spec import JobSpec

SHOWN = 20  # valid names listed in a refusal
PLAIN_KINDS = ("linear", "conv", "depthwise_conv", "grouped_conv")  # core.prunability.layer_kind
# step fields whose value names layers: a list of names, or a dict keyed by layer name
LIST_FIELDS = ("layers",)
LIST_SUFFIX = "_layers"  # track_layers, and any later `<x>_layers`
KEY_FIELDS = ("per_layer", "ranks")
# ops whose `layers` may also name a unit group (a producer's group, a ResNet stage's stream)
GROUP_OPS = ("channel_prune",)


@dataclass(frozen=True)
class ModelFacts:
    """What the submission knows about a job's model; None where it does not know."""

    source: str  # "model <id>" or "arch 'lenet300'", for messages
    layers: tuple[str, ...] | None  # weight layers (forward order)
    groups: tuple[str, ...]  # unit groups
    transformed: bool  # some layer is already compressed (names below it may exist)
    input_shape: list[int] | None
    layout: str  # NCHW | NHWC | flat
    num_classes: int | None
    stored: bool  # a stored model: its input is fixed (the worker adapts 1 channel, resizes)


@dataclass(frozen=True)
class DataFacts:
    source: str  # "dataset 'fashion-mnist'" or "dataset <id> ('name')"
    sample_shape: list[int] | None  # one sample as stored: [D], [H, W] or [C, H, W]
    num_classes: int | None


# ---- facts ------------------------------------------------------------------------------------

def _ints(value: Any) -> list[int] | None:
    if isinstance(value, list) and value and all(type(v) is int and v >= 1 for v in value):
        return list(value)
    return None


def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 1 else None


def _layout(arch: dict[str, Any]) -> str:
    pre = arch.get("preprocessing")
    layout = pre.get("layout", "NCHW") if isinstance(pre, dict) else "NCHW"
    return layout if layout in ("NCHW", "NHWC", "flat") else "NCHW"


def _report_names(report: Any) -> tuple[tuple[str, ...], tuple[str, ...], bool] | None:
    """(layers, groups, transformed) of a prunability report, None when it is not one."""
    if not isinstance(report, dict) or not isinstance(report.get("layers"), list):
        return None
    rows = [r for r in report["layers"] if isinstance(r, dict) and isinstance(r.get("name"), str)]
    groups = [g["name"] for key in ("groups", "untouched_groups")
              for g in report.get(key) or [] if isinstance(g, dict)
              and isinstance(g.get("name"), str)]
    transformed = any(r.get("kind") not in PLAIN_KINDS for r in rows)
    return tuple(r["name"] for r in rows), tuple(dict.fromkeys(groups)), transformed


def arch_facts(arch: dict[str, Any], *, source: str, stored: bool,
               report: Any = None) -> ModelFacts:
    """Facts of a model of `arch` (a zoo arch or an imported graph's), with its report if any."""
    name = arch.get("name")
    defaults = ZOO_DEFAULTS.get(name, {}) if isinstance(name, str) else {}
    full = {**defaults, **arch}
    names = _report_names(report)
    if names is None and name in ZOO_DEFAULTS:
        try:
            zoo = arch_layers(arch)
        except InvalidSpec:  # not buildable as it is: the worker says why
            zoo = None
        if zoo is not None:
            names = (zoo.layers, zoo.groups, bool(arch.get("edits")))
    layers, groups, transformed = names if names is not None else (None, (), True)
    return ModelFacts(source=source, layers=layers, groups=groups,
                      transformed=transformed or bool(arch.get("edits")),
                      input_shape=_ints(full.get("input_shape")), layout=_layout(full),
                      num_classes=_count(full.get("num_classes")), stored=stored)


def stored_model_facts(row: Model) -> ModelFacts:
    arch = row.arch if isinstance(row.arch, dict) else {}
    label = f"model {row.id}" + (f" ({row.name!r})" if row.name else "")
    return arch_facts(arch, source=label, stored=True, report=row.report)


def fresh_arch_facts(session: Session, tenant_id: str, arch: dict[str, Any]) -> ModelFacts:
    """A fresh `{"arch"}`; an imported graph's names come from the report of one of the
    tenant's models on that graph (edits never rename a layer)."""
    report = None
    if is_graph_arch(arch):
        report = session.scalars(select(Model.report).where(
            Model.tenant_id == tenant_id, Model.arch["name"].as_string() == "graph",
            Model.arch["graph"].as_string() == str(arch.get("graph")),
            Model.report.is_not(None)).limit(1)).first()
    return arch_facts(arch, source=f"arch {arch.get('name')!r}", stored=False, report=report)


def data_facts(session: Session, tenant_id: str, name: str) -> DataFacts:
    """The dataset's sample shape and classes (the dataset exists: `check_dataset_ref`)."""
    if name in BUILTIN_SHAPES:
        shape, classes = BUILTIN_SHAPES[name]
        return DataFacts(f"dataset {name!r}", list(shape), classes)
    row = get_dataset(session, tenant_id, name)
    meta = row.meta if isinstance(row.meta, dict) else {}
    return DataFacts(f"dataset {row.id} ({row.name!r})", _ints(meta.get("input_shape")),
                     _count(meta.get("num_classes")))


# ---- layer names ------------------------------------------------------------------------------

def named_layers(step: BaseModel, where: str) -> Iterator[tuple[str, list[str]]]:
    """(field path, names) of every field of `step` (and of its nested models) that names
    layers: `layers` / `*_layers` lists, `per_layer` / `ranks` dicts."""
    for field in type(step).model_fields:
        value = getattr(step, field)
        path = f"{where}.{field}"
        if isinstance(value, BaseModel):
            yield from named_layers(value, path)
        elif (field in LIST_FIELDS or field.endswith(LIST_SUFFIX)) and isinstance(value, list) \
                and all(isinstance(v, str) for v in value):
            yield path, list(value)
        elif field in KEY_FIELDS and isinstance(value, dict):
            yield path, [str(k) for k in value]


def _takes_groups(step: MethodSpec, path: str) -> bool:
    if not path.endswith(".layers"):
        return False
    if step.op in GROUP_OPS:
        return True
    if step.op == "analyze":  # unit groups are what its unit_pruning analysis removes
        return "unit_pruning" in (getattr(step, "kinds", None) or [])
    return spec_for(step.op) is None


def _listing(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" (and {len(names) - SHOWN} more)" if len(names) > SHOWN else "")


def check_layer_names(spec: JobSpec, facts: ModelFacts) -> None:
    """Every layer a step names exists in the model (or may exist by then); InvalidSpec naming
    the field and listing the valid names otherwise."""
    if facts.layers is None:
        return
    layers = set(facts.layers)
    restructured = facts.transformed  # names below a layer may exist from here on
    for i, step in enumerate(spec.steps):
        for path, names in named_layers(step, f"steps[{i}]"):
            groups = _takes_groups(step, path)
            valid = layers | set(facts.groups) if groups else layers
            unknown = [n for n in names if n not in valid and not (
                restructured and any(n.startswith(f"{layer}.") for layer in layers))]
            if unknown:
                raise InvalidSpec(_unknown_message(path, unknown, facts, groups))
        if type(step).edit_ops:
            restructured = True


def _unknown_message(path: str, unknown: list[str], facts: ModelFacts, groups: bool) -> str:
    layers = facts.layers or ()
    what = ", ".join(repr(n) for n in unknown[:SHOWN])
    many = len(unknown) > 1
    noun = ("layers" if many else "a layer") + ((" or unit groups" if many else " or unit group")
                                                if groups else "")
    text = (f"{path}: {what} {'are not' if many else 'is not'} {noun} of {facts.source}; its "
            f"layers: {_listing(layers)}")
    extra = [g for g in facts.groups if g not in set(layers)]
    if groups and extra:
        text += f"; its unit groups (besides the layers producing them): {_listing(tuple(extra))}"
    elif not groups:
        stray = [n for n in unknown if n in facts.groups]
        if stray:
            text += (f" ({', '.join(repr(n) for n in stray)} "
                     f"{'are unit groups' if len(stray) > 1 else 'is a unit group'}: only "
                     "channel_prune and analyze with unit_pruning take those)")
    where = ("GET /v1/models/{id} lists them with the methods that apply" if facts.stored
             else "they follow from the arch's kwargs")
    return f"{text}. Name layers the model has ({where})"


# ---- the dataset against the model --------------------------------------------------------

def image_shape(sample: list[int]) -> list[int]:
    """One sample as the worker loads it (`core.data.from_arrays`): (D) -> 1x1xD, (H, W) ->
    1xHxW, (C, H, W) as is."""
    if len(sample) == 1:
        return [1, 1, sample[0]]
    if len(sample) == 2:
        return [1, *sample]
    return list(sample)


def _shape_text(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def fit_refusal(have: list[int], shape: list[int], layout: str, stored: bool) -> str | None:
    """Why the worker cannot feed samples of `have` ([C, H, W], as loaded) to a model reading
    `shape` in `layout`, or None when it can (exactly, or adapted: a stored model's single
    channel replicated and images resized). Mirrors `worker.inputs._shape_for_model`."""
    if layout == "NHWC":
        if len(shape) != 3:
            return (f"the model's layout is NHWC but its input_shape {shape} is not [H, W, C]; "
                    "fix the model's preprocessing")
        target: list[int] | None = [shape[2], shape[0], shape[1]]
    elif layout == "flat" and len(shape) != 3:
        target = None
    elif len(shape) != 3:
        return (f"the model's input_shape {shape} is not an image [C, H, W]; for a model "
                "reading flat vectors set its preprocessing layout to 'flat'")
    else:
        target = list(shape)
    if target is None:
        values = math.prod(have)
        if values != shape[0]:
            return (f"one sample holds {values} values ({_shape_text(have)}) but the model "
                    f"reads flat vectors of {shape[0]}; use data with {shape[0]} values per "
                    "sample, or a model made for it")
        return None
    if have == target:
        return None
    reshape = ""
    if math.prod(have) == math.prod(target):
        reshape = (f" (the same {math.prod(have)} values: reshape x_train and x_test to "
                   f"(N, {', '.join(str(d) for d in target)}) before uploading)")
    if not stored:
        return (f"the samples are {_shape_text(have)} but the model reads "
                f"{_shape_text(target)} (input_shape {shape}, layout {layout}){reshape}; set "
                f"\"input_shape\": {have} in the arch, or use a dataset of that shape")
    channel_ok = have[0] == target[0] or have[0] == 1
    size_ok = have[1:] == target[1:] or min(*have[1:], *target[1:]) >= 2
    if channel_ok and size_ok:
        return None  # the worker adapts them, with a warning event
    return (f"the samples are {_shape_text(have)} but the model reads {_shape_text(target)} "
            f"(input_shape {shape}, layout {layout}){reshape}; the worker only replicates a single "
            "channel and resizes images of at least 2x2, nothing else: use data of that shape, "
            "or a model made for it")


def check_data_fits(facts: ModelFacts, data: DataFacts) -> None:
    """The dataset's samples fit the model's input and its labels its outputs (fewer classes
    than outputs is fine); InvalidSpec naming `dataset` otherwise."""
    if data.sample_shape is not None and facts.input_shape is not None:
        why = fit_refusal(image_shape(data.sample_shape), facts.input_shape, facts.layout,
                          facts.stored)
        if why is not None:
            raise InvalidSpec(f"dataset: {data.source} does not fit {facts.source}: {why}")
    if data.num_classes is not None and facts.num_classes is not None \
            and data.num_classes > facts.num_classes:
        fix = ("set \"num_classes\": " f"{data.num_classes} in the arch" if not facts.stored
               else f"use a model with at least {data.num_classes} outputs, or a dataset with "
                    f"labels 0..{facts.num_classes - 1}")
        raise InvalidSpec(f"dataset: {data.source} has labels up to {data.num_classes - 1} "
                          f"({data.num_classes} classes) but {facts.source} has "
                          f"{facts.num_classes} outputs (num_classes); {fix}")


def check_job_inputs(session: Session, tenant_id: str, spec: JobSpec,
                     model: Model | None = None) -> None:
    """The submission's checks against the model and the dataset (`model`: the job's stored
    model row, for a `{"model": "<id>"}` spec). The model, the dataset and a fresh arch were
    checked to exist and be well-formed before."""
    if model is not None:
        facts = stored_model_facts(model)
    else:
        facts = fresh_arch_facts(session, tenant_id, spec.model.arch)  # type: ignore[union-attr]
    check_layer_names(spec, facts)
    check_data_fits(facts, data_facts(session, tenant_id, spec.dataset))
