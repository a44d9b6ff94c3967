"""Checks that run before any model is built, each naming the config key at fault."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def available_experiments() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def check_config(cfg: DictConfig) -> None:
    problems = []
    for key in ("stage", "data", "trainer"):
        if cfg.get(key) is None:
            problems.append(f"`{key}` is not set")
    if problems:
        raise ValueError(
            "incomplete config: " + "; ".join(problems) + ". Pick an experiment with experiment=<name>; "
            "available: " + ", ".join(available_experiments())
        )
    if not cfg.get("paths") or not cfg.paths.get("output_dir"):
        raise ValueError("paths.output_dir is not set")
