"""Run plumbing for src.train: build callbacks/loggers from config, write metrics and configs atomically."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from src.utils.checkpoint import atomic_write


def instantiate_named(cfg: DictConfig | None) -> list[Any]:
    """Callbacks/loggers are named entries; `callbacks.x=null` drops one, and so does a factory returning None."""
    if not cfg:
        return []
    built = [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]
    return [b for b in built if b is not None]


def atomic_write_text(path: str | Path, text: str) -> None:
    """A reader never sees a half-written file (temp + rename)."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


def write_metrics_json(path: str | Path, metrics: dict[str, Any]) -> dict[str, float]:
    values = scalar_metrics(metrics)
    # json has no NaN/inf: store them as strings so a diverged run is still readable (and visible).
    safe = {k: (v if math.isfinite(v) else str(v)) for k, v in sorted(values.items())}
    atomic_write_text(path, json.dumps(safe, indent=2) + "\n")
    return values


def save_resolved_config(cfg: DictConfig, output_dir: str | Path) -> None:
    atomic_write_text(Path(output_dir) / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def pin_output_dir(cfg: DictConfig) -> None:
    """Inside a Hydra app: `paths.output_dir` = the directory Hydra created for this job (resolving `${now:}`
    again could differ by a second; multirun jobs get <sweep dir>/<job number>)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
