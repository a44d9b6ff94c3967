"""A checkpoint written by the code before issue 28 (main a784451, which kept the data position by editing
Lightning's loop state) resumes with today's code, which keeps it in the datamodule only
(src/data/position.py): no converter is needed.

tests/fixtures/checkpoints/seedx_pretrain_tiny_step3.ckpt: `seedx_pretrain_tiny`, 3 steps (its data position:
epoch 0, 12 of 12 samples consumed, i.e. the epoch ended at step 3); the .json beside it holds the command
and what resuming it to max_steps=6 gave on the old code."""

import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import CONF

ROOT = CONF.parent
FIXTURE = ROOT / "tests" / "fixtures" / "checkpoints" / "seedx_pretrain_tiny_step3.ckpt"
OLD = json.loads(FIXTURE.with_suffix(".json").read_text())


def test_the_old_checkpoint_holds_the_position_the_new_code_reads():
    ckpt = torch.load(FIXTURE, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == 3
    assert ckpt["MLLMDataModule"]["epoch"] == 0 and ckpt["MLLMDataModule"]["consumed"] == 12

    from src.data.position import ResumableDataModule

    dm = ResumableDataModule()  # the position part every record datamodule shares
    dm.load_state_dict(dict(ckpt["MLLMDataModule"]))
    assert (dm._epoch, dm._start) == (0, 12)


@pytest.mark.slow  # one tiny training run (~40 s on 2 cores)
def test_a_checkpoint_of_the_old_code_resumes_where_it_stopped(tmp_path):
    out = tmp_path / "resumed"
    ckpt = tmp_path / "old.ckpt"
    shutil.copyfile(FIXTURE, ckpt)  # the resume may write beside it; never into tests/fixtures
    cmd = [sys.executable, "-m", "src.train", "experiment=seedx_pretrain_tiny", "trainer.max_steps=6",
           "callbacks.model_checkpoint.every_n_train_steps=3", "logger=csv", f"paths.output_dir={out}",
           f"ckpt_path={ckpt}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]

    with open(out / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    old = {int(k): v for k, v in OLD["resumed_train_loss_by_logged_step"].items()}
    # It went on from step 3, on the old code's data position (the next data epoch), to the same losses:
    # the model, optimizer, schedule, RNG and data order all came back from the old file.
    assert sorted(train) == sorted(old) == [3, 4, 5]
    # Bit-equal where the fixture was made (2 CPU threads); rel 1e-6 leaves room for another thread count's
    # fp32 reduction order, far below what a wrong data position or a lost optimizer state changes (> 1e-2).
    assert train == pytest.approx(old, rel=1e-6, abs=0), (train, old)
    assert val and val[-1] == pytest.approx(OLD["resumed_val_loss"], rel=1e-6)
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["global_step"] == 6
    assert last["progress"]["samples_seen"] == OLD["samples_seen_at_end"]
