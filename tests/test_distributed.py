"""Sharded training on CPU: 2 gloo processes with FSDP2, then a 1-process run resumes the checkpoint."""

import csv
import json
import math
import subprocess
import sys

import pytest

from tests.helpers import CONF

pytestmark = pytest.mark.smoke


def run_train(out, *overrides, timeout=420):
    cmd = [sys.executable, "-m", "src.train", "experiment=seedx_pretrain_tiny", f"paths.output_dir={out}",
           "logger=csv", "strategy=fsdp2", "strategy.fsdp2.param_dtype=null", "~callbacks.progress_bar",
           "callbacks.mllm_probe.every_n_steps=0", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CONF.parent, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# Three interpreters and two sharded runs (~1 CPU-minute); tests/test_resume.py's two-process resume covers the same
# path in the default tier.
@pytest.mark.slow
def test_fsdp2_two_processes_then_resume_in_one(tmp_path):
    first, second = tmp_path / "two", tmp_path / "one"
    run_train(first, "trainer.devices=2", "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2")
    ckpt = first / "checkpoints" / "last.ckpt"
    # A sharded (torch.distributed.checkpoint) directory: one shard file per rank.
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    assert math.isfinite(json.loads((first / "metrics.json").read_text())["train/loss"])

    run_train(second, "trainer.devices=1", "trainer.max_steps=6", f"ckpt_path={ckpt}")
    with open(second / "csv" / "metrics.csv") as f:
        steps = sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss"))
    assert steps == [4, 5], steps  # continued where the 2-process run stopped
    metrics = json.loads((second / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss_ce"]) and math.isfinite(metrics["train/loss_mse"])
