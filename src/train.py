"""`python -m src.train experiment=<name>`: compose, instantiate, fit. Nothing stage-specific here."""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.types import RunMode
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.utils.checkpoint import check_sharded_metadata
from src.utils.config import check_config
from src.utils.output_guard import OutputLock, check_previous_run, check_writable
from src.utils.run import instantiate_named, pin_output_dir, save_resolved_config, write_metrics_json
from src.utils.tracking import configure_wandb, describe_runs

log = logging.getLogger(__name__)


def train(cfg: DictConfig, overrides=(), choices=None,
          multirun_dir: str | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    check_config(cfg, overrides, choices, for_training=True)  # every problem at once, before any build
    out = Path(cfg.paths.output_dir)
    ckpt = cfg.get("ckpt_path")
    if ckpt and Path(ckpt).is_dir():
        check_sharded_metadata(ckpt)  # DCP unpickles `.metadata` as it is: refuse one that names code first
    lock = None
    if rank_zero_only.rank == 0:  # one process per run guards its folder (other ranks share it)
        check_writable({"paths.output_dir": out, **{f"callbacks.{name}.dirpath": node.dirpath
                                                    for name, node in (cfg.get("callbacks") or {}).items()
                                                    if node is not None and node.get("dirpath")}})
        lock = OutputLock(out).acquire()  # refuses while another run holds the folder
    try:
        if lock is not None:
            check_previous_run(out, ckpt, bool(cfg.paths.get("overwrite", False)))
        return _fit(cfg, out, overrides, choices, multirun_dir)
    finally:
        if lock is not None:
            lock.release()


def instantiate_strategy(node: DictConfig | None, module):
    """The trainer's strategy; a strategy node with `blocks: null` (strategy=fsdp) wraps the block classes the
    stage's model spec names (src/specs), so no second list of them lives in conf/. `module`: the stage or its
    class (`spec` is a class attribute)."""
    if not node:
        return "auto"
    if "blocks" in node and node.blocks is None:
        return hydra.utils.instantiate(node, blocks=list(module.spec.fsdp_blocks))
    return hydra.utils.instantiate(node)


def _fit(cfg: DictConfig, out: Path, overrides, choices, multirun_dir: str | None):
    L.seed_everything(cfg.seed, workers=True)

    datamodule = hydra.utils.instantiate(cfg.data)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    callbacks = instantiate_named(cfg.get("callbacks"))
    configure_wandb(cfg, list(overrides), choices, multirun_dir)  # name, group, tags; a resume's run id
    loggers = instantiate_named(cfg.get("logger"))
    strategy = instantiate_strategy(cfg.get("strategy"), module)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, strategy=strategy)

    if trainer.is_global_zero:
        save_resolved_config(cfg, out)
        describe_runs(loggers, cfg, list(overrides), cfg.paths.root_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except SIGTERMException:
        # SLURM preemption / time limit: Lightning stopped at a step boundary and callbacks.exact_resume
        # saved last.ckpt there; a clean exit (code 0), resume with ckpt_path=<dir>/checkpoints/last.ckpt.
        log.warning("SIGTERM: stopped at step %d; resume from last.ckpt", trainer.global_step)
    finally:
        _close_wandb()
    metrics = dict(trainer.callback_metrics)
    if trainer.is_global_zero:
        metrics = write_metrics_json(out / "metrics.json", metrics)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def _close_wandb() -> None:
    import sys

    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    pin_output_dir(cfg)
    OmegaConf.resolve(cfg)
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    metrics, _ = train(cfg, overrides=list(hc.overrides.task), choices=dict(hc.runtime.choices),
                       multirun_dir=hc.sweep.dir if multirun else None)
    return optimized_value(cfg, metrics)


def optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a search sweeper (hparams_search/) minimises or maximises: `optimized_metric` of the run's
    final metrics (what metrics.json holds)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if name not in metrics:
        raise KeyError(f"optimized_metric={name!r} is not among the run's metrics: {sorted(metrics)}")
    return float(metrics[name])


if __name__ == "__main__":
    main()
