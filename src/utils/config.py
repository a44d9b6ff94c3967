"""Config checks that run before any model is built; every problem names its key and where it was set.

pydantic validates each node: a stage's or datamodule's own typed node (`config_model`, src/utils/constraints.py
ConfigModel with `Annotated` rules such as PositiveInt, Fraction, TokenizerDir), a library class's node from its
signature (Lightning's trainer, callbacks, loggers, strategies; torch's optimizers) and the `model/*` nodes from
their config classes. Each pydantic error becomes (dotted key, the rule it broke), and `where_set` names the yaml
file or override that set the key. Where constructing the consumer is cheap and builds no model (an optimizer on
a dummy parameter, the model config classes, the stage module) it is constructed for its cross-checks, which
name their key (ConfigValueError). All problems are reported at once.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from src.utils.config_nodes import KEY_GROUPS, model_problems, node_schema, validation_problems
from src.utils.constraints import ConfigValueError
from src.utils.weights import missing_paths

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


class ConfigError(ValueError):
    pass


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


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


def _check_target(node: dict, prefix: str, check_paths: bool) -> list[tuple[str, str]]:
    """A `_target_` node against its typed node, then every nested `_target_` node; an optimizer is also
    constructed on a dummy parameter (torch's own checks of lr, betas, eps, weight decay)."""
    target, problems = _target_obj(node, prefix)
    if target is None:
        return problems
    nested = {k for k, v in node.items() if _has_target(v)}
    own = {k: v for k, v in node.items() if k not in nested}
    problems += validation_problems(node_schema(target, bool(node.get("_partial_"))), own, prefix, check_paths)
    for key in nested:
        value = node[key]
        for i, child in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(child, dict) and "_target_" in child:
                sub = f"{prefix}.{key}" + (f".{i}" if isinstance(value, list) else "")
                problems += _check_target(child, sub, check_paths)
    if not problems and _is_optimizer(target):
        problems += _dry_optimizer(target, node, prefix)
    return problems


def _has_target(value: Any) -> bool:
    return (isinstance(value, dict) and "_target_" in value) or (
        isinstance(value, list) and any(isinstance(v, dict) and "_target_" in v for v in value))


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


# ---- where a key was set --------------------------------------------------------------------------------
def _defaults_chain(path: Path) -> list[Path]:
    """A config file and the files its defaults list pulls in (same-group names, `/group/file` paths), lowest
    priority first."""
    if not path.is_file():
        return []
    node = OmegaConf.load(path)
    chain = []
    for entry in node.get("defaults", []) if isinstance(node, DictConfig) else []:
        if isinstance(entry, str) and entry != "_self_":  # `/debug/tiny`: a file by its path under conf/
            base = CONF_DIR if entry.startswith("/") else path.parent
            chain += _defaults_chain(base / f"{entry.lstrip('/')}.yaml")
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
            problems += _check_target(node, group, check_paths)
    for group in ("callbacks", "logger"):
        for name, node in (values.get(group) or {}).items():
            if isinstance(node, dict):
                problems += _check_target(node, f"{group}.{name}", check_paths)
    return problems + model_problems(values.get("model") or {}, check_paths)


def _dry_stage(node: dict):
    """Construct the stage module: it parses and cross-checks its model configs but builds no model."""
    import hydra

    try:
        return hydra.utils.instantiate(node, _convert_="all"), []
    except Exception as e:  # noqa: BLE001 - reported under the key the check names, never swallowed
        err = e.__cause__ or e
        key = err.key if isinstance(err, ConfigValueError) else "stage"
        return None, [(key if key.startswith(KEY_GROUPS) or key == "stage" else f"stage.{key}", str(err)
                       if isinstance(err, ConfigValueError) else f"{type(err).__name__}: {err}")]


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
