"""The method registry (torch-free): each method's spec model registers itself next to its own
code (`service/methods/<name>.py`, with `@register_step`), and everything derived from the set of
methods comes from here — the `Step` union and the list of ops (`service.spec`), which ops need
dense weights (the one "no dense-weight op after dctps" rule, `dense_weights_refusal`), and the
curves shape and how each event folds into it (`service.curves`).

Importing `service.spec` (or `service.methods`) registers every method; the tables below are filled
then and read-only afterwards.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

# (curves, event data) -> None: folds one event of a kind into the curves dict, in place
CurveFold = Callable[[dict[str, Any], dict[str, Any]], None]


class Strict(BaseModel):
    """A spec model that refuses fields it does not know."""

    model_config = ConfigDict(extra="forbid")


class MethodSpec(Strict):
    """Base of every step's spec model (a pydantic model with an `op: Literal[...]` field;
    register it with `@register_step`). The class attributes describe the method to the
    service; none of them is a field of the spec."""

    if TYPE_CHECKING:
        op: str  # every step model declares `op: Literal[...]`

    # the ops this model serves: filled in by register_step from its `op` Literal
    ops: ClassVar[tuple[str, ...]] = ()
    # needs plain (dense) Linear/Conv2d weights: refused after a step (or on a model) whose
    # layers have none (see removes_dense_weights)
    needs_dense_weights: ClassVar[bool] = False
    # replaces dense weights by something that has none (dctps: alpha * D + S)
    removes_dense_weights: ClassVar[bool] = False
    # the structural edits (`{"op": ...}` entries of a model's arch `edits`) the method's core
    # module registers; the torch-free arch check (service.archcheck) accepts exactly these
    edit_ops: ClassVar[tuple[str, ...]] = ()
    # event kind -> curves key: every event of that kind the step emits is appended as is to
    # the list `curves[key]` (a richer fold is registered with `@curve_fold`)
    curve_records: ClassVar[dict[str, str]] = {}

    def job_rule(self, steps: Sequence[MethodSpec], index: int) -> str | None:
        """A rule about the step's place in the job (`steps[index]` is this step): the reason
        it is refused, or None. Checked by JobSpec after every step validated."""
        return None

    def referenced_models(self) -> list[str]:
        """Ids of other models of the tenant this step reads (they must exist at submission)."""
        return []


S = TypeVar("S", bound=MethodSpec)

_MODELS: list[type[MethodSpec]] = []  # in registration order: the order of the Step union
_BY_OP: dict[str, type[MethodSpec]] = {}
_CURVES: dict[str, Callable[[], Any]] = {}  # curves key -> its empty value, in order
_FOLDS: dict[str, list[CurveFold]] = {}  # event kind -> folds


def register_step(cls: type[S]) -> type[S]:
    """Class decorator: register a step's spec model (its ops come from its `op` Literal) and
    the curve records it declares (`curve_records`)."""
    field = cls.model_fields.get("op")
    ops = get_args(field.annotation) if field is not None else ()
    if field is None or get_origin(field.annotation) is not Literal or not ops \
            or not all(isinstance(op, str) for op in ops):
        raise TypeError(f"{cls.__name__}: a step model needs a field `op: Literal[...]`")
    taken = [op for op in ops if op in _BY_OP]
    if taken:
        raise TypeError(f"{cls.__name__}: op(s) {taken} already registered by "
                        f"{_BY_OP[taken[0]].__name__}")
    cls.ops = tuple(ops)
    _MODELS.append(cls)
    for op in ops:
        _BY_OP[op] = cls
    for kind, key in cls.curve_records.items():
        register_curve(key, list)
        curve_fold(kind)(_appender(key))
    return cls


def register_curve(key: str, empty: Callable[[], Any] = list) -> None:
    """Declare a top-level curves key and its empty value (`list` or `dict`)."""
    if key in _CURVES and _CURVES[key] is not empty:
        raise TypeError(f"curves key {key!r} already registered with another empty value")
    _CURVES[key] = empty


def curve_fold(kind: str) -> Callable[[CurveFold], CurveFold]:
    """Decorator: `fold(curves, data)` folds every event of `kind` into the curves (in place).
    The keys it writes must be registered with register_curve."""
    def register(fold: CurveFold) -> CurveFold:
        _FOLDS.setdefault(kind, []).append(fold)
        return fold
    return register


def _appender(key: str) -> CurveFold:
    def append(curves: dict[str, Any], data: dict[str, Any]) -> None:
        curves[key].append(data)
    return append


# ---- what is derived from the registrations -----------------------------------------------

def step_models() -> tuple[type[MethodSpec], ...]:
    return tuple(_MODELS)


def available_ops() -> tuple[str, ...]:
    return tuple(_BY_OP)


def spec_for(op: str) -> type[MethodSpec] | None:
    return _BY_OP.get(op)


def dense_weight_ops() -> tuple[str, ...]:
    return tuple(op for op, cls in _BY_OP.items() if cls.needs_dense_weights)


def edit_ops() -> tuple[str, ...]:
    """Every structural edit op a registered method writes into a model's arch, sorted."""
    return tuple(sorted({op for cls in _MODELS for op in cls.edit_ops}))


def dense_weightless_edit_ops() -> tuple[str, ...]:
    """Edit ops after which a model has no dense weights (those of removes_dense_weights)."""
    return tuple(sorted({op for cls in _MODELS if cls.removes_dense_weights
                         for op in cls.edit_ops}))


def dense_weights_refusal(op: str, where: str, source: str) -> str | None:
    """The "no dense-weight op after dctps" rule, for the spec (a step after a dctps step), the
    submission (a model with a dctps edit) and the worker (a model with DCTpS layers): why `op`
    cannot run after `source`, or None when it needs no dense weights."""
    cls = _BY_OP.get(op)
    if cls is None or not cls.needs_dense_weights:
        return None
    return (f"{where}: op '{op}' cannot run after {source}: DCTpS layers are alpha * D + S "
            "with a fixed sparse support and no dense weight to prune, factor or project; run "
            f"'{op}' before dctps (dctps then replaces those weights anyway) or in a job on a "
            "model without dctps")


def curve_keys() -> dict[str, Callable[[], Any]]:
    return dict(_CURVES)


def folds_for(kind: str) -> list[CurveFold]:
    return _FOLDS.get(kind, [])


# ---- field types shared by the method specs -----------------------------------------------

LayerName = Annotated[str, Field(min_length=1, max_length=200)]
LayerList = Annotated[list[LayerName], Field(min_length=1, max_length=256)]


def distinct(noun: str) -> Callable[[Any, ValidationInfo], Any]:
    """A field validator refusing a list that names the same entry twice (`noun`: "a layer");
    use as `_distinct_layers = field_validator("layers")(distinct("a layer"))`."""
    def check(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, list) and len(set(value)) != len(value):
            raise ValueError(f"{info.field_name} names {noun} twice")
        return value
    return check
