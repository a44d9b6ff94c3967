"""W&B runs that explain themselves: a name, group and tags from the experiment and its overrides, the resolved
config and the git commit stored on the run, curves against samples / tokens seen, and a resumed run that
continues the same W&B run.

`src.train` calls `configure_wandb` on the logger config before the loggers are built (identity, resume id)
and `describe_runs` once the trainer exists (rank 0 only: Lightning's loggers log from rank 0 alone). The run
id is kept beside the checkpoints (`<output_dir>/wandb_run.json`), so `ckpt_path=<D>/checkpoints/last.ckpt`
finds the run it continues (online: same id, `resume="allow"`; offline: a new offline directory for the same
id, which `wandb sync` appends to the same run).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

RUN_FILE = "wandb_run.json"
# Overrides that say where a run writes, not what it is: left out of the run's name.
_PLUMBING = re.compile(r"^[~+]*(paths|hydra|logger|callbacks\.progress_bar|ckpt_path|experiment)[.=]")
# Curves can be plotted against these (W&B: x-axis), besides the optimiser step (`trainer/global_step`).
PROGRESS_METRICS = ("progress/samples_seen", "progress/tokens_seen")

__all__ = ["PROGRESS_METRICS", "RUN_FILE", "configure_wandb", "describe_runs", "git_state", "run_identity"]


def git_state(root: str | Path) -> dict[str, Any]:
    """The commit of the code that runs, and whether the tree differs from it (None outside a git checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=str(root), capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "branch": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def _short(override: str) -> str:
    key, _, value = override.lstrip("+~").partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}" if value else key


def run_identity(cfg: DictConfig, overrides: list[str] = (), choices: dict | None = None,
                 multirun_dir: str | None = None) -> dict[str, Any]:
    """name (`<task>` + what the overrides change, shortened), group (the experiment, or the sweep's multirun
    directory), tags (experiment, stage, trainer, strategy, tiny, multirun) and job_type (the stage)."""
    task = str(cfg.get("task_name") or "run")
    stage = str((cfg.get("stage") or {}).get("_target_", "")).rsplit(".", 1)[-1] or "none"
    changes = [_short(o) for o in overrides if not _PLUMBING.match(o)]
    name = task + ("-" + ",".join(changes) if changes else "")
    choices = dict(choices or {})
    tags = [task, stage, f"trainer:{choices.get('trainer') or 'default'}"]
    if choices.get("strategy"):
        tags.append(f"strategy:{choices['strategy']}")
    if task.endswith("_tiny"):
        tags.append("tiny")
    group = task
    if multirun_dir:
        tags.append("multirun")
        group = f"{task}/{Path(multirun_dir).name}"
    return {"name": name[:128], "group": group[:128], "tags": tags, "job_type": stage}


def previous_run_id(cfg: DictConfig) -> str | None:
    """The W&B run id of the run a resume continues: beside its checkpoints, or in this output dir."""
    places = [Path(cfg.paths.output_dir)]
    if cfg.get("ckpt_path"):
        ckpt = Path(str(cfg.ckpt_path))
        places.insert(0, (ckpt if ckpt.is_dir() else ckpt.parent).parent)
    for place in places:
        path = place / RUN_FILE
        if path.is_file():
            try:
                return json.loads(path.read_text()).get("id")
            except (OSError, json.JSONDecodeError):
                continue
    return None


def configure_wandb(cfg: DictConfig, overrides: list[str] = (), choices: dict | None = None,
                    multirun_dir: str | None = None) -> None:
    """Fill the W&B logger config (if any) with the run's identity; a resume gets the run id it continues.
    Values the user set explicitly (`logger.wandb.name=...`, tags, group, id) win."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node:
        return
    ident = run_identity(cfg, overrides, choices, multirun_dir)
    with open_dict(node):
        if node.get("name") in (None, cfg.get("task_name")):
            node.name = ident["name"]
        if not node.get("group"):
            node.group = ident["group"]
        node.tags = list(dict.fromkeys([*ident["tags"], *list(node.get("tags") or [])]))
        if not node.get("job_type"):
            node.job_type = ident["job_type"]
        if not node.get("id") and cfg.get("ckpt_path"):
            run_id = previous_run_id(cfg)
            if run_id:
                node.id = run_id
                node.resume = "allow"


def describe_runs(loggers: list, cfg: DictConfig, overrides: list[str] = (), root: str | Path = ".") -> None:
    """On every W&B logger (rank 0): the resolved config, overrides and git state on the run, the progress
    metrics as alternative x-axes, and the run id written beside the checkpoints."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        run = logger.experiment
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run.config.update({"cfg": resolved, "overrides": list(overrides), "git": git_state(root)},
                          allow_val_change=True)
        for metric in PROGRESS_METRICS:
            run.define_metric(metric)
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RUN_FILE).write_text(json.dumps({"id": run.id, "name": run.name, "project": run.project,
                                                "group": run.group, "dir": str(run.dir)}) + "\n")
