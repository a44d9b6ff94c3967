"""Tracking and sweeps: offline W&B runs that hold their config, git commit, images and tables; a resume that
continues the same run; W&B sweep files whose commands compose; Hydra grid and Optuna multiruns; src.report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from src.report import report
from src.utils.tracking import git_state, run_identity
from tests.helpers import CONF, compose_cfg, tiny_run_cfg, wandb_records

ROOT = CONF.parent
SWEEPS = sorted((ROOT / "experiments").glob("*/sweep.yaml"))


# ---- identity ----------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_run_identity_names_the_run_after_its_experiment_and_overrides(tmp_path):
    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path)
    ident = run_identity(cfg, ["experiment=seedx_pretrain_tiny", "paths.output_dir=/x", "stage.optimizer.lr=1e-3",
                               "+trainer.limit_val_batches=2"], {"trainer": "cpu", "strategy": "fsdp2"},
                         multirun_dir="/logs/multiruns/2026-12-04_10-00-00")
    assert ident["name"] == "seedx_pretrain_tiny-lr=1e-3,limit_val_batches=2"
    assert ident["group"] == "seedx_pretrain_tiny/2026-12-04_10-00-00"
    assert ident["tags"] == ["seedx_pretrain_tiny", "MLLMPretrainModule", "trainer:cpu", "strategy:fsdp2", "tiny",
                             "multirun"]
    assert ident["job_type"] == "MLLMPretrainModule"
    state = git_state(ROOT)
    assert state["commit"] is None or len(state["commit"]) == 40


# ---- W&B runs ----------------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_offline_wandb_run_holds_config_git_commit_images_and_a_table(tmp_path):
    from src.train import train

    overrides = ["logger=wandb", "trainer.max_steps=3"]
    train(tiny_run_cfg("seedx_sft_edit_tiny", tmp_path, overrides), overrides)
    info = json.loads((tmp_path / "wandb_run.json").read_text())
    (run_dir,) = (tmp_path / "wandb").glob(f"offline-run-*-{info['id']}")
    records = wandb_records(run_dir)
    config = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
              for rec in records["config"] for item in rec.update}
    assert config["cfg"]["task_name"] == "seedx_sft_edit_tiny" and config["cfg"]["stage"]["init_from"] is None
    commit = git_state(ROOT)["commit"]
    assert config["git"]["commit"] == commit and isinstance(config["git"]["dirty"], bool)
    (run,) = records["run"]
    assert run.run_group == "seedx_sft_edit_tiny" and "MLLMSFTModule" in run.tags
    assert run.display_name == "seedx_sft_edit_tiny-max_steps=3"
    pngs = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    tables = list((run_dir / "files" / "media" / "table").rglob("*.table.json"))
    assert pngs and Image.open(pngs[0]).size[0] > 0
    assert tables and json.loads(tables[0].read_text())["columns"] == ["step", "id", "request", "reply"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in records["history"]]
    seen = [h["progress/samples_seen"] for h in history if "progress/samples_seen" in h]
    assert seen == sorted(seen) and seen[-1] == 3 * 2  # 3 steps of 2 samples: an x-axis besides the step


@pytest.mark.smoke
def test_a_resumed_run_continues_the_same_wandb_run_and_its_progress(tmp_path):
    from src.train import train

    train(tiny_run_cfg("seedx_pretrain_tiny", tmp_path, ["logger=wandb", "trainer.max_steps=2",
                                                          "callbacks.mllm_probe.every_n_steps=0"]))
    first = json.loads((tmp_path / "wandb_run.json").read_text())["id"]
    out2 = tmp_path / "resumed"
    metrics, _ = train(tiny_run_cfg("seedx_pretrain_tiny", out2, [
        "logger=wandb", "trainer.max_steps=3", "callbacks.mllm_probe.every_n_steps=0",
        f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"]))
    assert json.loads((out2 / "wandb_run.json").read_text())["id"] == first
    assert list((out2 / "wandb").glob(f"offline-run-*-{first}"))  # `wandb sync` appends it to the same run
    straight, _ = train(tiny_run_cfg("seedx_pretrain_tiny", tmp_path / "straight", [
        "logger=csv", "trainer.max_steps=3", "callbacks.mllm_probe.every_n_steps=0"]))
    # counted on from the checkpoint, not from zero (good samples only: the sample data has bad ones)
    assert metrics["progress/samples_seen"] == straight["progress/samples_seen"] > 8


# ---- W&B sweep files ---------------------------------------------------------------------------------------
def sweep_command(path: Path) -> list[str]:
    """The command a W&B agent runs for the first value of every parameter."""
    spec = yaml.safe_load(path.read_text())
    args = []
    for key, p in spec["parameters"].items():
        value = p["values"][0] if "values" in p else p.get("min", p.get("value"))
        args.append(f"{key}={value}")
    expand = {"${env}": [], "${interpreter}": [sys.executable], "${args_no_hyphens}": args, "${program}": ["src/train.py"]}
    return [a for part in spec["command"] for a in expand.get(part, [part])]


@pytest.mark.config
@pytest.mark.parametrize("path", SWEEPS, ids=[p.parent.name for p in SWEEPS])
def test_every_wandb_sweep_command_is_a_valid_train_command(path, tmp_path):
    from src.utils.config import check_config

    cmd = sweep_command(path)
    assert cmd[1:3] == ["-m", "src.train"] and cmd[3] == f"experiment={path.parent.name}"
    spec = yaml.safe_load(path.read_text())
    assert spec["metric"]["name"] in ("val/loss", "val/loss_ce", "val/loss_gen") and spec["parameters"]
    overrides = cmd[4:]
    cfg = compose_cfg(path.parent.name, tmp_path, overrides)
    check_config(cfg, overrides)  # every swept key exists with a value of the right type


@pytest.mark.slow
def test_a_sweep_command_composes_with_cfg_job():
    cmd = sweep_command(ROOT / "experiments" / "seedx_pretrain" / "sweep.yaml")
    out = subprocess.run([*cmd, "--cfg", "job"], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lora:" in out.stdout and "rec_loss_scale: 1.0" in out.stdout


@pytest.mark.unit
def test_the_slurm_agent_script_is_valid_bash():
    script = ROOT / "experiments" / "wandb_agent.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert "wandb agent" in script.read_text() and "#SBATCH --array" in script.read_text()


# ---- Hydra multirun + report -------------------------------------------------------------------------------
def _fake_job(root: Path, name: str, overrides: list[str], metrics: dict | None, losses: list[float]) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": None}))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    (job / "csv").mkdir()
    rows = "".join(f"{i},{v}\n" for i, v in enumerate(losses))
    (job / "csv" / "metrics.csv").write_text("step,train/loss\n" + rows)


@pytest.mark.unit
def test_report_ranks_jobs_by_the_metric_and_plots_it_against_the_swept_values(tmp_path):
    base = ["experiment=seedx_pretrain_tiny", "trainer.max_steps=2"]
    _fake_job(tmp_path, "0", [*base, "seed=1", "stage.optimizer.lr=0.001"], {"val/loss": 2.0, "train/loss": 2.5}, [3, 2.5])
    _fake_job(tmp_path, "1", [*base, "seed=1", "stage.optimizer.lr=0.01"], {"val/loss": 1.0, "train/loss": 1.5}, [3, 1.5])
    _fake_job(tmp_path, "2", [*base, "seed=2", "stage.optimizer.lr=0.001"], {"val/loss": 3.0, "train/loss": 3.5}, [3, 3.5])
    _fake_job(tmp_path, "3", [*base, "seed=2", "stage.optimizer.lr=0.01"], None, [3])
    text = report(tmp_path).read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| job")]
    assert "| job | `seed` | `stage.optimizer.lr` | `val/loss` | `train/loss` |" in text  # only what varies
    assert [r.split(" | ")[0] for r in rows] == ["| 1", "| 0", "| 2", "| 3"]  # best first, failed last
    assert rows[0] == "| 1 | 1 | 0.01 | 1 | 1.5 |" and "failed" in rows[-1]
    for png in ("report_val_loss.png", "report_curves.png"):
        assert Image.open(tmp_path / png).size[0] > 100
    assert "train/loss" in report(tmp_path, metric="train/loss").read_text()
    with pytest.raises(FileNotFoundError, match="no job folders"):
        report(tmp_path / "3" / "csv")


@pytest.mark.slow
def test_a_2x2_grid_multirun_gives_four_jobs_and_the_report_reads_them(tmp_path):
    sweep = tmp_path / "sweep"
    run = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "experiment=seedx_detok_pretrain_tiny", "seed=1,2",
         "stage.optimizer.lr=1e-3,3e-3", "trainer.max_steps=2", "logger=csv", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"] and all((p / "metrics.json").is_file() for p in jobs)
    out = subprocess.run([sys.executable, "-m", "src.report", str(sweep)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "`seed`" in out.stdout and "`stage.optimizer.lr`" in out.stdout
    assert (sweep / "report_curves.png").is_file()


@pytest.mark.slow
def test_the_optuna_sweeper_runs_three_trials_and_returns_the_best_value(tmp_path):
    sweep = tmp_path / "optuna"
    run = subprocess.run(
        [sys.executable, "-m", "src.train", "-m", "hparams_search=detok_optuna", "experiment=seedx_detok_pretrain_tiny",
         "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_steps=2",
         "logger=csv", "optimized_metric=train/loss", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 3
    values = [json.loads((p / "metrics.json").read_text())["train/loss"] for p in jobs]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values))
    assert set(best["best_params"]) == {"stage.optimizer.lr", "stage.scheduler.warmup_steps", "stage.feature_drop_rate"}
