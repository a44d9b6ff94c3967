"""Typed config nodes: which pydantic model a config node is validated by, and its errors as (dotted key, message).

A `_target_` node is validated by its class's own `config_model` (every stage and datamodule has one) or, for a
library class or factory (Lightning's trainer, callbacks, loggers, strategies; torch's optimizers), by a model made
from its signature; a `model/*` node by its config class (from the model specs). Messages say the rule
that was broken (`must be in [0, 1], got 2`, `expected int, got str 'abc'`, `unknown key; expected one of ...`),
and a cross-check that raises ConfigValueError is reported under the key it names.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import types
import typing
from typing import Annotated, Any, Union

import pydantic
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model

from src.utils.constraints import (
    ConfigModel,
    ConfigValueError,
    CountOrUnlimited,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Range,
)


def _model_schemas() -> dict[str, type]:
    """The config class of each `model/*` node: what the family model specs declare (src/specs/registry.py)."""
    from src.specs.registry import model_config_classes

    return model_config_classes()


def model_problems(model: dict, check_paths: bool = False) -> list[tuple[str, str]]:
    """Every `model.<name>` node against its config class: types, constraints and unknown keys by pydantic, then
    the class itself is constructed for its own cross-checks (`__post_init__`), which builds no model."""
    schemas = _model_schemas()
    problems: list[tuple[str, str]] = []
    for name, node in (model or {}).items():
        if name in schemas and isinstance(node, dict):
            prefix = f"model.{name}"
            found = validation_problems(_dataclass_model(schemas[name]), node, prefix, check_paths)
            problems += found or _construct(schemas[name], node, prefix)
    return problems


@functools.cache
def _dataclass_model(cls: type) -> type[ConfigModel]:
    """A model config dataclass's fields as a pydantic model (its annotations and `Annotated` rules)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {}
    for f in dataclasses.fields(cls):
        if f.init:
            default = (f.default if f.default is not dataclasses.MISSING else
                       pydantic.Field(default_factory=f.default_factory) if f.default_factory is not dataclasses.MISSING
                       else ...)
            fields[f.name] = (hints.get(f.name, Any), default)
    return create_model(f"{cls.__name__}Node", __base__=ConfigModel, **fields)


def _construct(cls: type, node: dict, prefix: str) -> list[tuple[str, str]]:
    try:
        cls(**node)
    except ConfigValueError as e:
        return [(e.key if e.key.startswith(KEY_GROUPS) else f"{prefix}.{e.key}", str(e))]
    except (ValueError, TypeError, KeyError) as e:
        return [(prefix, str(e))]
    return []


@functools.cache
def signature_model(target: Any, partial: bool = False) -> type[ConfigModel]:
    """The typed node of a library class or factory (Lightning's callbacks, loggers, strategies, torch's optimizers):
    its own constructor signature as a pydantic model; open to unknown keys when it takes **kwargs. `partial`
    (a `_partial_: true` node): the arguments the code passes later (an optimizer's params) may be absent."""
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return create_model(f"{getattr(target, '__name__', 'target')}Node", __base__=_OpenModel)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target, include_extras=True)
    except (NameError, TypeError):  # an annotation that cannot be resolved: names only
        hints = {}
    fields: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name.startswith("_"):
            continue
        tp = hints.get(name, Any if p.annotation is p.empty else p.annotation)
        tp = tp if _buildable(tp) else Any
        fields[name] = (tp, p.default if p.default is not p.empty else None if partial else ...)
    open_ended = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return create_model(f"{getattr(target, '__name__', 'target')}Node",
                        __base__=_OpenModel if open_ended else ConfigModel, **fields)


class _OpenModel(ConfigModel):
    model_config = ConfigDict(extra="allow")


_STRICT = ConfigDict(strict=True, arbitrary_types_allowed=True)


def _buildable(tp: Any) -> bool:
    if isinstance(tp, (str, typing.TypeVar)):
        return False
    try:
        return TypeAdapter(tp, config=_STRICT).pydantic_complete  # False: a forward reference it cannot resolve
    except (pydantic.PydanticSchemaGenerationError, pydantic.PydanticUserError, TypeError, NameError):  # a type pydantic cannot validate (callables of classes ...): unchecked
        return False


def validation_problems(schema: type[BaseModel], node: dict, prefix: str,
                        check_paths: bool = False) -> list[tuple[str, str]]:
    """`node` (plain yaml data; `_target_`-style keys left out) validated by `schema`; each pydantic error as
    (dotted key, a message that says the rule), one per key."""
    try:
        schema.model_validate({k: v for k, v in node.items() if not k.startswith("_")},
                              context={"check_paths": check_paths})
        return []
    except ValidationError as e:
        errors = e.errors(include_url=False)
    grouped: dict[str, tuple[_Where, list[dict]]] = {}
    for err in errors:
        where = _locate(schema, err["loc"], prefix)
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigValueError):  # a cross-check of the node names the key it is about
            where = _Where(cause.key if cause.key.startswith(KEY_GROUPS) else f"{where.key}.{cause.key}")
        grouped.setdefault(where.key, (where, []))[1].append(err)
    return [(key, _message(where, errs)) for key, (where, errs) in grouped.items()]


KEY_GROUPS = ("model.", "stage.", "data.", "trainer.", "callbacks.", "logger.", "strategy.")


@dataclasses.dataclass
class _Where:
    key: str
    tp: Any = None  # the annotation at the key (or at the list/tuple item)
    item: str = ""  # "item i: " inside a list/tuple
    container: Any = None  # the list/tuple annotation around that item
    fields: tuple[str, ...] = ()  # the keys the node that holds the key takes


def _locate(schema: Any, loc: tuple, prefix: str) -> _Where:
    """Where an error is: its loc walked through the fields and items; a union member's tag (`float`,
    `is-instance[Tensor]`) ends the walk at the union."""
    where, owner = _Where(prefix), schema
    for el in loc:
        fields = _fields(owner)
        if isinstance(el, str) and owner is not None:
            where = _Where(f"{where.key}.{el}", fields.get(el), fields=tuple(sorted(fields)))
            owner = _nested(where.tp) if el in fields else None
            if el not in fields:
                break  # an unknown key
        elif isinstance(el, int) and where.tp is not None and _item_type(where.tp, el) is not None:
            where = dataclasses.replace(where, tp=_item_type(where.tp, el), item=f"item {el}: ", container=where.tp)
            owner = _nested(where.tp)
        else:
            break
    return where


def _fields(schema: Any) -> dict[str, Any]:
    """{field name: annotation (with its Annotated rules)} of a pydantic model; {} for anything else."""
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return {n: Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
                for n, f in schema.model_fields.items()}
    return {}


def _nested(tp: Any) -> Any:
    """The model a field holds (through Optional), so the walk can go into it."""
    tp = _strip(tp)
    for a in (tp, *typing.get_args(tp)):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _item_type(tp: Any, index: int) -> Any:
    tp = _strip(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
        return _item_type(args[0], index)
    origin = typing.get_origin(tp)
    if origin is tuple:
        return args[0] if len(args) == 2 and args[1] is Ellipsis else (args[index] if index < len(args) else None)
    if origin in (list, collections.abc.Sequence):
        return args[0] if args else Any
    return None


def _strip(tp: Any) -> Any:
    return tp.__origin__ if typing.get_origin(tp) is typing.Annotated else tp


def _message(where: _Where, errors: list[dict]) -> str:
    types_ = {e["type"]: e for e in errors}
    if "extra_forbidden" in types_:
        return f"unknown key; expected one of {list(where.fields)}"
    for e in errors:  # a value of the right type that breaks a rule says the rule, not "expected ..."
        if e["type"] in ("value_error", "assertion_error"):
            cause = (e.get("ctx") or {}).get("error")
            return where.item + (str(cause) if cause is not None else e["msg"])
    if "too_long" in types_ or ("missing" in types_ and where.item):  # a tuple of the wrong length
        tp = where.container if where.item else where.tp
        value = types_["too_long"]["input"] if "too_long" in types_ else None
        n = len(typing.get_args(_strip(tp)))
        return f"expected {n} items ({_type_name(tp)})" + (f", got {len(value)}: {value!r}" if value else "")
    if "missing" in types_:
        return "required value is missing"
    value = errors[0].get("input")
    return f"{where.item}expected {_type_name(_strip(where.tp))}, got {type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if tp is None:
        return "a known type"
    if typing.get_origin(tp) is typing.Annotated:
        marks = [m.describe() for m in tp.__metadata__ if isinstance(m, Range)]
        return _type_name(tp.__origin__) + (f" ({', '.join(marks)})" if marks else "")
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if typing.get_args(tp):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# Lightning's Trainer signature is not ours to annotate: the value constraints its arguments need.
TRAINER_CONSTRAINTS: dict[str, Any] = {
    "max_steps": CountOrUnlimited,
    "max_epochs": CountOrUnlimited | None,
    "devices": CountOrUnlimited | str | list[NonNegativeInt],
    "num_nodes": PositiveInt,
    "accumulate_grad_batches": PositiveInt,
    "log_every_n_steps": PositiveInt,
    "check_val_every_n_epoch": PositiveInt | None,
    "val_check_interval": PositiveInt | Annotated[float, Range(gt=0, le=1)] | None,
    "limit_val_batches": NonNegativeInt | Fraction | None,
    "limit_train_batches": PositiveInt | Annotated[float, Range(gt=0, le=1)] | None,
    "num_sanity_val_steps": Annotated[int, Range(ge=0, also=(-1,))] | None,
    "gradient_clip_val": NonNegativeFloat | None,
}
def node_schema(target: Any, partial: bool = False) -> type[BaseModel]:
    """The typed node a `_target_` takes: a stage's or datamodule's own `config_model`, else its signature's."""
    own = getattr(target, "config_model", None)
    if isinstance(own, type) and issubclass(own, BaseModel):
        return own
    if target is _trainer_class():
        return _trainer_schema()
    return signature_model(target, partial)


def _trainer_class() -> type:
    from lightning.pytorch import Trainer

    return Trainer


@functools.cache
def _trainer_schema() -> type[BaseModel]:
    """Lightning's Trainer signature is not ours to annotate: its node with the value rules its arguments need."""
    return create_model("TrainerNode", __base__=signature_model(_trainer_class()),
                        **{k: (tp, None) for k, tp in TRAINER_CONSTRAINTS.items()})
