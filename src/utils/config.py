"""Config checks that run before any model is built; every problem names its key and where it was set.

Types and value constraints come from the code that will consume the values: the `_target_` classes'
constructor annotations (stage, data, trainer, strategy, callbacks, loggers, nested optimizers), with
`Annotated` markers from src/utils/constraints.py (PositiveInt, Fraction, TokenizerDir ...), and the
model config dataclasses. Where constructing the consumer is cheap and builds no model (an optimizer on
a dummy parameter, config dataclasses, the stage module) it is constructed, so the check cannot drift
from the code. All problems are reported at once.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from omegaconf import DictConfig, OmegaConf

from src.utils.constraints import (
    CountOrUnlimited,
    Fraction,
    LocalPath,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Range,
)
from src.utils.weights import missing_paths

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    pass


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


# ---- types --------------------------------------------------------------------------------------------
def _strip(tp: Any) -> Any:
    return tp.__origin__ if typing.get_origin(tp) is typing.Annotated else tp


def _problem(value: Any, tp: Any, check_paths: bool = False) -> str | None:
    """Why `value` (plain yaml data) does not fit `tp`; None when it fits (or `tp` is not checkable)."""
    if typing.get_origin(tp) is typing.Annotated:
        base = _problem(value, tp.__origin__, check_paths)
        if base is not None:
            return base
        for mark in tp.__metadata__:
            if isinstance(mark, Range) or (check_paths and isinstance(mark, LocalPath)):
                msg = mark.violation(value)
                if msg:
                    return msg
        return None
    if tp in (Any, inspect.Parameter.empty) or isinstance(tp, (str, typing.TypeVar)):
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        problems = [_problem(value, a, check_paths) for a in args]
        if any(p is None for p in problems):
            return None
        # A value of the right type that breaks a constraint says which constraint, not "expected ...".
        for a, p in zip(args, problems):
            if _problem(value, _strip(a)) is None:
                return p
        return _expected(value, tp)
    if origin is typing.Literal:
        return None if value in args else _expected(value, tp)
    if tp is type(None):
        return None if value is None else _expected(value, tp)
    if tp is bool:
        return None if isinstance(value, bool) else _expected(value, tp)
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _expected(value, tp)
    if tp is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else _expected(value, tp)
    if tp is str:
        return None if isinstance(value, str) else _expected(value, tp)
    base = origin or tp
    if base in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            return _expected(value, tp)
        if base is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"expected {len(args)} items ({_type_name(tp)}), got {len(value)}: {value!r}"
            items = list(zip(value, args))
        else:
            items = [(v, args[0]) for v in value] if args else []
        for i, (v, a) in enumerate(items):
            p = _problem(v, a, check_paths)
            if p:
                return f"item {i}: {p}"
        return None
    if base is dict:
        return None if isinstance(value, dict) else _expected(value, tp)
    if inspect.isclass(base) and _is_tensor_class(base):
        return _expected(value, tp)  # yaml never holds a tensor: `float | Tensor` needs the float
    return None  # callables, classes ...: not checkable from yaml


def _is_tensor_class(cls: type) -> bool:
    import torch

    return issubclass(cls, torch.Tensor)


def _expected(value: Any, tp: Any) -> str:
    return f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}"


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        marks = [m.describe() for m in tp.__metadata__ if isinstance(m, Range)]
        return _type_name(tp.__origin__) + (f" ({', '.join(marks)})" if marks else "")
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_args(tp):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _signature_params(fn: Any) -> tuple[dict[str, Any], bool]:
    """Annotated parameters of a class's constructor, or of a function; `open_ended` when unknown keyword
    arguments are accepted. Our classes' **kwargs go to their parent (followed along the MRO); a library
    class's **kwargs may go anywhere (DDPStrategy's go to torch's DDP), so they leave it open."""
    params: dict[str, Any] = {}
    open_ended = True
    owners = [k for k in fn.__mro__ if "__init__" in k.__dict__] if inspect.isclass(fn) else [fn]
    for owner in owners:
        init = owner.__dict__["__init__"] if inspect.isclass(fn) else owner
        try:
            hints = typing.get_type_hints(init, include_extras=True)
        except (NameError, TypeError):  # an annotation that cannot be resolved: check by signature only
            hints = {}
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):  # a builtin without a signature: nothing to check
            return params, True
        for name, p in sig.parameters.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            params.setdefault(name, hints.get(name, p.annotation))
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            open_ended = False
            break
        if not getattr(owner, "__module__", "").startswith("src."):
            break
    return params, open_ended


def _dataclass_params(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def _model_schemas() -> dict[str, type]:
    from src.models.detokenizer import DetokenizerConfig
    from src.models.eva_vit import EvaViTConfig
    from src.models.mllm import AgentConfig, LLMConfig
    from src.models.qformer_pretrain import QFormerPretrainConfig
    from src.models.qwen_vit import QwenViTConfig
    from src.models.seed_codec import SeedCodecConfig
    from src.models.seed_decoder import SeedDecoderConfig

    return {"vit": QwenViTConfig, "detokenizer": DetokenizerConfig, "llm": LLMConfig, "agent": AgentConfig,
            "eva_vit": EvaViTConfig, "qformer": QFormerPretrainConfig, "seed_codec": SeedCodecConfig,
            "seed_decoder": SeedDecoderConfig}


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
# Strategies that need CUDA (Lightning's FSDP and DeepSpeed); FSDP2 and DDP also run on CPU (gloo).
CUDA_STRATEGIES = {
    "src.parallel.fsdp_strategy": "fsdp",
    "lightning.pytorch.strategies.FSDPStrategy": "fsdp",
    "lightning.pytorch.strategies.DeepSpeedStrategy": "deepspeed",
}
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

# What a `_target_` may name: the project's own packages and the library classes a config legitimately
# builds. Anything else (builtins.open, torch.load, subprocess.Popen ...) is refused before it is even
# imported: a config override must not be able to run arbitrary code. Entries ending in "." are packages.
ALLOWED_TARGETS: tuple[str, ...] = (
    "src.",
    "data_prep.",
    "tests.",  # test-only callbacks (tests/helpers.py ...)
    "torch.optim.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
    "diffusers.schedulers.",
)  # Hydra's own `hydra.*` nodes (launchers, sweepers) are Hydra's to build, not checked here


# Functions of the project's packages a config may call (everything else there must be a class: a
# function such as src.utils.run.atomic_write_text would write any file a config names).
ALLOWED_FACTORIES: tuple[str, ...] = ("src.parallel.fsdp_strategy", "src.callbacks.checkpoint.timed_checkpoint")
_PROJECT_PACKAGES = ("src.", "data_prep.", "tests.")


def target_refusal(target: Any) -> str | None:
    """Why a `_target_` is refused; None when the allow-list admits it (a project target is imported to
    see that it is a class or an allowed factory; nothing else is imported)."""
    listed = ", ".join(a + ("*" if a.endswith(".") else "") for a in ALLOWED_TARGETS)
    if not isinstance(target, str) or not any(
            target.startswith(a) if a.endswith(".") else target == a for a in ALLOWED_TARGETS):
        return f"{target!r} is not an allowed _target_; allowed: {listed}"
    if target.startswith(_PROJECT_PACKAGES) and target not in ALLOWED_FACTORIES:
        module, _, name = target.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            return f"cannot import {target!r}: {e}"
        if not inspect.isclass(obj):
            return (f"{target!r} is a function, not a class; the functions a config may name are "
                    f"{', '.join(ALLOWED_FACTORIES)}")
    return None


def target_problems(values: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Every `_target_` anywhere in the config (nested and in lists) that the allow-list does not admit."""
    problems: list[tuple[str, str]] = []
    items = values.items() if isinstance(values, dict) else enumerate(values) if isinstance(values, list) else ()
    for key, value in items:
        at = f"{prefix}.{key}" if prefix else str(key)
        if key == "_target_" and isinstance(values, dict):
            if (why := target_refusal(value)) is not None:
                problems.append((at, why))
        elif isinstance(value, (dict, list)):
            problems += target_problems(value, at)
    return problems


def _check_node(values: dict, params: dict[str, Any], prefix: str, closed: bool, skip=(),
                check_paths: bool = False) -> list[tuple[str, str]]:
    problems = []
    for key, value in values.items():
        if key.startswith("_") or key in skip:
            continue
        if key not in params:
            if closed:
                problems.append((f"{prefix}.{key}", f"unknown key; expected one of {sorted(params)}"))
            continue
        msg = _problem(value, params[key], check_paths)
        if msg:
            problems.append((f"{prefix}.{key}", msg))
    return problems


def _target_obj(node: dict, prefix: str) -> tuple[Any, list[tuple[str, str]]]:
    target = node.get("_target_")
    if not isinstance(target, str):
        return None, []
    module, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        return None, [(f"{prefix}._target_", f"cannot import {target!r}: {e}")]
    return (obj if callable(obj) else None), []


def _check_target(node: dict, prefix: str, check_paths: bool, skip=(), extra: dict | None = None):
    """A `_target_` node against its target's signature, then every nested `_target_` node; an optimizer
    is also constructed on a dummy parameter (torch's own checks of lr, betas, eps, weight decay)."""
    target, problems = _target_obj(node, prefix)
    if target is None:
        return problems
    params, open_ended = _signature_params(target)
    params.update(extra or {})
    problems += _check_node(node, params, prefix, closed=not open_ended, skip=skip, check_paths=check_paths)
    for key, value in node.items():
        if key in skip:
            continue
        children = value if isinstance(value, list) else [value]
        for i, child in enumerate(children):
            if isinstance(child, dict) and "_target_" in child:
                sub = f"{prefix}.{key}" + (f".{i}" if isinstance(value, list) else "")
                problems += _check_target(child, sub, check_paths)
    if not problems and _is_optimizer(target):
        problems += _dry_optimizer(target, node, prefix)
    return problems


def _is_optimizer(obj: Any) -> bool:
    import torch

    return inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer)


def _dry_optimizer(cls: type, node: dict, prefix: str) -> list[tuple[str, str]]:
    """Build the optimizer on one dummy parameter; blame each argument torch rejects on its own."""
    import torch

    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}

    def error(kw: dict) -> str | None:
        try:
            cls([torch.nn.Parameter(torch.zeros(1))], **kw)
        except (ValueError, TypeError, RuntimeError) as e:
            return f"{cls.__name__} rejects it: {e}"
        return None

    if error(kwargs) is None:
        return []
    blamed = [(f"{prefix}.{k}", msg) for k, v in kwargs.items() if (msg := error({k: v}))]
    return blamed or [(prefix, error(kwargs))]


def _dry_dataclass(cls: type, node: dict, prefix: str) -> list[tuple[str, str]]:
    """Construct a config dataclass (its __post_init__ cross-checks); the error goes under the key it names."""
    try:
        cls(**node)
    except (ValueError, TypeError, KeyError) as e:
        return [(_key_in_message(str(e), prefix, [f.name for f in dataclasses.fields(cls)]), str(e))]
    return []


def _key_in_message(msg: str, prefix: str, fields=()) -> str:
    m = re.search(r"\b(?:model|stage|data|trainer|callbacks|strategy|logger|paths)(?:\.\w+)+", msg)
    if m:
        return m.group(0)
    for word in re.findall(r"\w+", msg):
        if word in fields:
            return f"{prefix}.{word}"
    return prefix


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


def _sets(path: Path, key: str) -> bool:
    """Whether a yaml file sets `key` (an interpolation such as `${model.llm.tokenizer}` counts, unresolved)."""
    node: Any = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for part in key.split("."):
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def where_set(key: str, overrides: Sequence[str] = (), choices: dict | None = None) -> str:
    hits = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key]
    if hits:  # Hydra applies overrides in order: the last one is the value in the config
        earlier = ", ".join(f"`{o}`" for o in hits[:-1])
        return f"command-line override `{hits[-1]}`" + (f", which overrode {earlier}" if earlier else "")
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
    found = [f for f, sub in candidates if _sets(f, sub)]
    return str(found[-1].relative_to(CONF_DIR.parent)) if found else "conf/ defaults"


def where_chosen(group: str, overrides: Sequence[str] = (), choices: dict | None = None) -> str:
    """Where a config group's option was picked: `trainer=gpu` on the command line or an experiment's defaults."""
    hits = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in (group, f"/{group}")]
    if hits:
        return f"command-line override `{hits[-1]}`"
    experiment = (choices or {}).get("experiment")
    found = "conf/train.yaml defaults"
    for f in _defaults_chain(CONF_DIR / "experiment" / f"{experiment}.yaml") if experiment else []:
        for entry in OmegaConf.load(f).get("defaults", []):
            if isinstance(entry, DictConfig) and f"override /{group}" in entry:
                found = f"{f.relative_to(CONF_DIR.parent)} (`override /{group}: {entry[f'override /{group}']}`)"
    return found


# ---- entry point --------------------------------------------------------------------------------------------
def check_config(cfg: DictConfig, overrides: Sequence[str] = (), choices: dict | None = None, *,
                 for_training: bool = False) -> None:
    """Raise one ConfigError listing every problem, each with its key and where it was set.

    Always: every `_target_` against :data:`ALLOWED_TARGETS` (first, refusing the rest before anything is
    imported), types and value constraints of every `_target_` node (nested ones such as the optimizer
    included), the model config dataclasses, and dry constructions (optimizer on a dummy parameter,
    config dataclasses, the stage module, which builds no model). `for_training`: also what a run on
    this machine needs: every local path (weights, tokenizers, resume checkpoint) and CUDA when asked for.
    """
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
    refused = target_problems({k: v for k, v in values.items() if k != "hydra"})
    if refused:  # before anything is imported or built
        raise ConfigError(_format(refused, overrides, choices))
    if not values.get("paths", {}).get("output_dir"):
        problems.append(("paths.output_dir", "is not set"))
    problems += _value_problems(values, check_paths=for_training)
    stage = None
    if not any(k.split(".")[0] in ("stage", "model") for k, _ in problems):
        stage, stage_problems = _dry_stage(values["stage"])
        problems += stage_problems
    if for_training:
        if stage is not None and hasattr(stage, "required_paths"):
            problems += missing_paths(stage.required_paths())
        ckpt = values.get("ckpt_path")
        if ckpt and ckpt not in _SPECIAL_CKPT_PATHS and not Path(ckpt).exists():
            problems.append(("ckpt_path", f"'{ckpt}' does not exist (a Lightning .ckpt or a distributed checkpoint folder)"))
        if stage is not None:
            problems += _checkpoint_kind_problems(stage, ckpt)
        problems += _cuda_problems(values, overrides, choices)
    if problems:
        raise ConfigError(_format(list(dict.fromkeys(problems)), overrides, choices))


def _value_problems(values: dict, check_paths: bool) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for group in ("stage", "data", "trainer", "strategy"):
        node = values.get(group)
        if isinstance(node, dict):
            problems += _check_target(node, group, check_paths, skip=("model",) if group == "stage" else (),
                                      extra=TRAINER_CONSTRAINTS if group == "trainer" else None)
    for group in ("callbacks", "logger"):
        for name, node in (values.get(group) or {}).items():
            if isinstance(node, dict):
                problems += _check_target(node, f"{group}.{name}", check_paths)
    stage_cls, _ = _target_obj(values["stage"], "stage")
    # Plain-dict stage arguments with a schema (stage.scheduler -> SchedulerConfig).
    for key, schema in getattr(stage_cls, "config_schemas", {}).items():
        node = values["stage"].get(key)
        if isinstance(node, dict):
            found = _check_node(node, _dataclass_params(schema), f"stage.{key}", closed=True)
            problems += found or _dry_dataclass(schema, node, f"stage.{key}")
    schemas = _model_schemas()
    for name, node in (values.get("model") or {}).items():
        if name in schemas and isinstance(node, dict):
            found = _check_node(node, _dataclass_params(schemas[name]), f"model.{name}", closed=True)
            problems += found or _dry_dataclass(schemas[name], node, f"model.{name}")
    return problems


def _dry_stage(node: dict):
    """Construct the stage module: it parses and cross-checks its configs but builds no model."""
    import hydra

    try:
        return hydra.utils.instantiate(node, _convert_="all"), []
    except Exception as e:  # noqa: BLE001 - reported with the key its message names, never swallowed
        err = e.__cause__ or e
        return None, [(_key_in_message(str(err), "stage"), f"{type(err).__name__}: {err}")]


def _checkpoint_kind_problems(stage, ckpt_path: str | None) -> list[tuple[str, str]]:
    """`stage.init_from` and a resume `ckpt_path` of the wrong kind (a de-tokenizer checkpoint where an MLLM
    one belongs ...), named here instead of deep inside the build (src/utils/checkpoint_kind.py)."""
    from src.utils.checkpoint import UnreadableCheckpoint, UnsafeCheckpoint, read_checkpoint
    from src.utils.checkpoint_kind import WrongCheckpointKind, check_checkpoint_kind

    problems = []
    for key, path, family in (("stage.init_from", getattr(stage, "init_from", None), getattr(stage, "init_from_family", None)),
                              ("ckpt_path", ckpt_path, getattr(stage, "checkpoint_family", None))):
        p = Path(str(path)) if path else None
        if not family or p is None or not (p.is_file() or (p / "meta.pt").is_file()):
            continue  # absent (reported above), an exported folder, or a special name such as `last`
        try:
            check_checkpoint_kind(read_checkpoint(p, key), p, key, family)
        except (WrongCheckpointKind, UnsafeCheckpoint, UnreadableCheckpoint) as e:
            problems.append((key, str(e)))
    return problems


def _cuda_problems(values: dict, overrides: Sequence[str], choices: dict | None) -> list[tuple[str, str]]:
    import torch

    if torch.cuda.is_available():
        return []
    choices = choices or {}
    experiment = choices.get("experiment") or values.get("task_name")
    hint = "pick trainer=cpu"
    if experiment and (CONF_DIR / "experiment" / f"{experiment}_tiny.yaml").is_file():
        hint += f", or run its tiny twin experiment={experiment}_tiny"
    problems = []
    accelerator = str(values["trainer"].get("accelerator", "auto")).lower()
    mps = accelerator == "gpu" and torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda") and not mps:
        chosen = f" (trainer={choices['trainer']} from {where_chosen('trainer', overrides, choices)})" if (
            choices.get("trainer")) else ""
        msg = f"{accelerator!r} needs a CUDA GPU, but torch.cuda.is_available() is False on this machine{chosen}: {hint}"
        problems.append(("trainer.accelerator", msg))
    name = CUDA_STRATEGIES.get((values.get("strategy") or {}).get("_target_"))
    if name:
        msg = (f"strategy={name} needs CUDA, which this machine lacks: use strategy=fsdp2 or strategy=ddp "
               f"(both run on CPU with gloo), or {hint}")
        problems.append(("strategy._target_", msg))
    return problems


def _missing_keys(cfg: DictConfig) -> set[str]:
    return {k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra")}


def _format(problems: list[tuple[str, str]], overrides, choices) -> str:
    lines = [f"{len(problems)} config problem(s):"]
    for key, msg in problems:
        text = msg if msg.startswith(key) else f"{key}: {msg}"
        lines.append(f"  {text} (set in {where_set(key, overrides, choices)})")
    return "\n".join(lines)
