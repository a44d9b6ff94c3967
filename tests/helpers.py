"""Compose the real Hydra config the way `python -m src.train` does, for tests."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_cfg(experiment: str, output_dir: Path | str | None = None, overrides: list[str] = (),
                config_name: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[f"experiment={experiment}", *overrides])
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def tiny_run_cfg(experiment: str, output_dir: Path, overrides: list[str] = ()) -> DictConfig:
    """A tiny experiment shrunk for tests: CSV logger only, no progress bar, resolved like src.train."""
    cfg = compose_cfg(
        experiment,
        output_dir,
        ["logger=csv", "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", *overrides],
    )
    OmegaConf.resolve(cfg)
    return cfg


# The tiny MLLM's training shrunk further (2 samples a batch, 1x1 grids, short rows: about a second a step) for
# tests whose assertions hold at any batch size.
SMALL_MLLM = ["data.batch_size=2", "data.grids=[1x1]", "data.max_length=512"]

# Generation shrunk for tests: 2 denoising steps, 6 new tokens, no progress bars.
FAST_GENERATE = ["sampling.steps=2", "generate.max_new_tokens=6", "progress=false"]


def tiny_generate_cfg(out: Path | str, overrides=(), config_name: str = "generate") -> DictConfig:
    """The tiny MLLM's `src.generate` (or `src.app`, config_name="app") config, shrunk and resolved."""
    cfg = compose_cfg("seedx_pretrain_tiny", out, [*FAST_GENERATE, *overrides], config_name=config_name)
    OmegaConf.resolve(cfg)
    return cfg


class InjectNaN(L.Callback):
    """Test callback: fills one training batch's pixels with NaN, so that step's loss is NaN."""

    def __init__(self, at_step: int, key: str = "vit_pixels") -> None:
        self.at_step, self.key, self.fired = at_step, key, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.fired and trainer.global_step == self.at_step and batch.get("batch_size"):
            batch[self.key].fill_(float("nan"))
            self.fired = True


class SaveStateAtStart(L.Callback):
    """Test callback: saves the module's state entries whose name contains `contains` when training starts
    (what the first step starts from)."""

    def __init__(self, path: str, contains: str) -> None:
        self.path, self.contains = path, contains

    def on_train_start(self, trainer, pl_module) -> None:
        import torch

        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items() if self.contains in k}, self.path)


def perturb_trainable(module, seed: int) -> None:
    """Make what trains differ from its init (LoRA B is zero at init: merging would prove nothing)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def trained_tiny_detok_checkpoint(experiment: str, tmp) -> str:
    """A perturbed (so: unlike a fresh init) tiny de-tokenizer stage saved as src.train would: its path."""
    import hydra

    cfg = tiny_run_cfg(experiment, tmp)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.build_models(load_weights=True)
    perturb_trainable(module, 2)
    lean_checkpoint(module, tmp / "detok.ckpt")
    return str(tmp / "detok.ckpt")


def lean_checkpoint(module, path) -> None:
    """What src.train writes (trainable tensors + hyper-parameters), without a Trainer."""
    import copy

    import torch

    frozen = module.frozen_state_keys()
    torch.save({"state_dict": {k: v for k, v in module.state_dict().items() if k not in frozen},
                "hyper_parameters": copy.deepcopy(dict(module.hparams))}, path)


def wandb_records(run_dir) -> dict[str, list]:
    """The records of an offline run's .wandb file, by kind (run, config, history, ...).

    W&B's service process writes the file: `run.finish()` can return before it has written every record
    (a table's artifact record came late under CPU load), so the service is torn down first; teardown
    waits until it has flushed everything and exited (the next wandb.init starts a new one)."""
    import wandb

    wandb.teardown()
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    (path,) = run_dir.glob("run-*.wandb")
    ds = datastore.DataStore()
    ds.open_for_scan(str(path))
    out: dict[str, list] = {}
    while (data := ds.scan_data()) is not None:
        rec = pb.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        out.setdefault(kind, []).append(getattr(rec, kind))
    return out


def built_stage(experiment: str, tmp, *overrides: str):
    """The stage of a tiny experiment, its models built (weights loaded: random init for tiny twins), eval mode."""
    import hydra

    stage = hydra.utils.instantiate(tiny_run_cfg(experiment, tmp, list(overrides)).stage, _convert_="all")
    stage.build_models(load_weights=True)
    return stage.eval()


def trained_tiny_stage(experiment: str, tmp):
    """A 'trained' tiny stage (its trainable weights moved off their init) and its lean checkpoint
    `tmp/last.ckpt`, as src.train writes it."""
    stage = built_stage(experiment, tmp)
    perturb_trainable(stage, 0)
    ckpt = tmp / "last.ckpt"
    lean_checkpoint(stage, ckpt)
    return stage, ckpt


def trained_tiny_mllm(tmp):
    return trained_tiny_stage("seedx_pretrain_tiny", tmp)



class AllBadBatch(L.Callback):
    """Test callback: every sample of the training batches numbered `batch_indices` (0-based, in loading order)
    arrives skipped, through the datamodule's own collate, as a real all-bad batch would (every callback and
    the stage see it); only on global rank `rank` when given. Needs `data.num_workers=0` (the count is kept in
    this process)."""

    def __init__(self, batch_indices: list[int], rank: int | None = None) -> None:
        self.batch_indices, self.rank = set(batch_indices), rank

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        datamodule = trainer.datamodule
        make_loader = datamodule.train_dataloader
        indices = self.batch_indices

        def train_dataloader():
            loader = make_loader()
            collate, calls = loader.collate_fn, [0]

            def collate_all_bad(samples):
                n, calls[0] = calls[0], calls[0] + 1
                if n not in indices:
                    return collate(samples)
                from src.data.records import SkippedSample

                return collate([{"skipped": SkippedSample("missing_file", "all_bad", f"all_bad/{n}.{i}", "AllBadBatch")}
                                for i in range(len(samples))])

            loader.collate_fn = collate_all_bad
            return loader

        datamodule.train_dataloader = train_dataloader


def run_module_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m <module> *argv` run in this process, for tests of what a command prints, not of the process
    (a new interpreter costs ~10 s of imports here): `main` is the module's entry point, a `@hydra.main`
    function (given the absolute config dir, which `python -m` finds from the file) or one taking argv.
    Returns (exit code, stdout, stderr). Hydra's logging setup is undone after (the root logger's handlers
    and level, the loggers it disabled), so later tests log as before."""
    import logging
    import sys

    hydra_main = hasattr(main, "__wrapped__")
    root = logging.getLogger()
    handlers, level, argv_before = root.handlers[:], root.level, sys.argv
    # Hydra's job logging (dictConfig) disables every logger that exists already: re-enable them after
    disabled = {name for name, lg in logging.root.manager.loggerDict.items()
                if isinstance(lg, logging.Logger) and lg.disabled}
    capsys.readouterr()
    code = 0
    try:
        if hydra_main:
            sys.argv = [main.__module__, "--config-path", str(CONF), *argv]
            main()
        else:
            main(argv)
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = argv_before
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lg in list(logging.root.manager.loggerDict.items()):
            if isinstance(lg, logging.Logger) and name not in disabled:
                lg.disabled = False
    out, err = capsys.readouterr()
    return code, out, err
