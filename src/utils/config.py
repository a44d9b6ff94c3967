"""Config checks that run before any model is built; every problem names its key and where it was set.

Types come from the code that will consume the values: the `_target_` classes' constructor annotations
(stage, data, trainer) and the model config dataclasses. All problems are reported at once.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    pass


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


# ---- types --------------------------------------------------------------------------------------------
def _matches(value: Any, tp: Any) -> bool:
    if tp in (Any, inspect.Parameter.empty) or isinstance(tp, (str, typing.TypeVar)):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    base = origin or tp
    if base in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, (list, tuple))
    if base is dict:
        return isinstance(value, dict)
    return True  # callables, classes, tensors ...: not checkable from yaml


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _init_params(cls: type) -> tuple[dict[str, Any], bool]:
    """Annotated constructor parameters along the MRO (subclasses forwarding **kwargs to parents)."""
    params: dict[str, Any] = {}
    open_ended = True
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except (NameError, TypeError):  # an annotation that cannot be resolved: check by signature only
            hints = {}
        sig = inspect.signature(init)
        for name, p in sig.parameters.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            params.setdefault(name, hints.get(name, p.annotation))
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            open_ended = False
            break
    return params, open_ended


def _dataclass_params(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _model_schemas() -> dict[str, type]:
    from src.models.detokenizer import DetokenizerConfig
    from src.models.mllm import AgentConfig, LLMConfig
    from src.models.qwen_vit import QwenViTConfig

    return {"vit": QwenViTConfig, "detokenizer": DetokenizerConfig, "llm": LLMConfig, "agent": AgentConfig}


def _check_node(values: dict, params: dict[str, Any], prefix: str, closed: bool, skip=()) -> list[tuple[str, str]]:
    problems = []
    for key, value in values.items():
        if key.startswith("_") or key in skip:
            continue
        if key not in params:
            if closed:
                problems.append((f"{prefix}.{key}", f"unknown key; expected one of {sorted(params)}"))
            continue
        if not _matches(value, params[key]):
            problems.append(
                (f"{prefix}.{key}", f"expected {_type_name(params[key])}, got {type(value).__name__} {value!r}")
            )
    return problems


def _target_class(node: dict) -> type | None:
    target = node.get("_target_")
    if not isinstance(target, str):
        return None
    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    return obj if inspect.isclass(obj) else None


# ---- where a key was set --------------------------------------------------------------------------------
def _defaults_chain(path: Path) -> list[Path]:
    """A config file and the same-group files its defaults list pulls in (lowest priority first)."""
    if not path.is_file():
        return []
    node = OmegaConf.load(path)
    chain = []
    for entry in node.get("defaults", []) if isinstance(node, DictConfig) else []:
        if isinstance(entry, str) and entry != "_self_":
            chain += _defaults_chain(path.parent / f"{entry}.yaml")
    return chain + [path]


def where_set(key: str, overrides: Sequence[str] = (), choices: dict | None = None) -> str:
    for o in overrides:
        if o.lstrip("+~").split("=", 1)[0] == key:
            return f"command-line override `{o}`"
    choices = choices or {}
    candidates: list[tuple[Path, str]] = []
    group_parts = key.split(".")
    for n in range(len(group_parts) - 1, 0, -1):  # deepest group first: model/vit before model
        group = "/".join(group_parts[:n])
        choice = choices.get(group)
        if choice:
            for f in _defaults_chain(CONF_DIR / group / f"{choice}.yaml"):
                candidates.append((f, ".".join(group_parts[n:])))
            break
    experiment = choices.get("experiment")
    if experiment:
        for f in _defaults_chain(CONF_DIR / "experiment" / f"{experiment}.yaml"):
            candidates.append((f, key))
    found = [f for f, sub in candidates if OmegaConf.select(OmegaConf.load(f), sub, default="__unset__") != "__unset__"]
    return str(found[-1].relative_to(CONF_DIR.parent)) if found else "conf/ defaults"


# ---- entry point --------------------------------------------------------------------------------------------
def check_config(cfg: DictConfig, overrides: Sequence[str] = (), choices: dict | None = None) -> None:
    missing_groups = [k for k in ("stage", "data", "trainer") if cfg.get(k) is None]
    if missing_groups:
        raise ConfigError(
            f"incomplete config: {', '.join(missing_groups)} not set. Pick an experiment with experiment=<name>; "
            "available: " + ", ".join(available_experiments())
        )
    problems: list[tuple[str, str]] = [(k, "required value is missing (???)") for k in sorted(_missing_keys(cfg))]
    if problems:
        raise ConfigError(_format(problems, overrides, choices))
    values = OmegaConf.to_container(cfg, resolve=True)
    if not values.get("paths", {}).get("output_dir"):
        problems.append(("paths.output_dir", "is not set"))
    for group in ("stage", "data", "trainer"):
        cls = _target_class(values[group])
        if cls is not None:
            params, open_ended = _init_params(cls)
            problems += _check_node(values[group], params, group, closed=not open_ended, skip=("model",))
    schemas = _model_schemas()
    for name, node in (values.get("model") or {}).items():
        if name in schemas and isinstance(node, dict):
            problems += _check_node(node, _dataclass_params(schemas[name]), f"model.{name}", closed=True)
    if problems:
        raise ConfigError(_format(problems, overrides, choices))


def _missing_keys(cfg: DictConfig) -> set[str]:
    return {k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra")}


def _format(problems: list[tuple[str, str]], overrides, choices) -> str:
    lines = [f"{len(problems)} config problem(s):"]
    for key, msg in problems:
        lines.append(f"  {key}: {msg} (set in {where_set(key, overrides, choices)})")
    return "\n".join(lines)
