"""Exact resume: SIGKILL mid-epoch + resume gives the uninterrupted loss sequence, and so does a run that
stopped (max_steps raised afterwards, should_stop as max_time does, SIGTERM); a 2-process checkpoint
resumes in 1 process with every sample of the epoch seen exactly once; sampler positions map across world
sizes; checkpoint writes are atomic."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from src.data.mixture import MixtureSampler
from src.data.sources import SourceConfig, read_source
from src.utils.checkpoint import AtomicCheckpointIO, replace_dir
from tests.helpers import CONF

pytestmark = pytest.mark.smoke

ROOT = CONF.parent
CAPTIONS = ROOT / "assets" / "sample" / "captions.jsonl"
# The tiny MLLM shrunk further (2 samples a batch, 1x1 grids, short rows) so a step takes about a second.
TINY = ["experiment=seedx_pretrain_tiny", "logger=csv", "+logger.csv.flush_logs_every_n_steps=1",
        "~callbacks.progress_bar", "+trainer.enable_progress_bar=false", "callbacks.mllm_probe=null",
        "data.batch_size=2", "data.grids=[1x1]", "data.max_length=512"]


def train_cmd(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "src.train", *TINY, f"paths.output_dir={out}", *overrides]


def env_1thread() -> dict:
    # One thread per process: two runs share the 2 cores, and every run does the same fp32 reductions.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run(cmd: list[str], timeout: int = 300, env: dict | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


def losses(out: Path) -> dict[int, str]:
    """step -> train/loss exactly as logged (the string: bit-equal means equal text)."""
    path = out / "csv" / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:  # may be mid-write while polling: skip a partial last row
        return {int(r["step"]): r["train/loss"] for r in csv.DictReader(f)
                if r.get("train/loss") and (r.get("step") or "").isdigit()}


def global_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, weights_only=True, map_location="cpu")["global_step"])


def kill_after_a_checkpoint(cmd: list[str], out: Path) -> int:
    """Start a run, SIGKILL it once last.ckpt exists and the losses up to it are flushed (while it is still
    training), and return the step of the last.ckpt it left."""
    last = out / "checkpoints" / "last.ckpt"
    log_path = out.with_suffix(".log")
    with open(log_path, "w") as log:
        victim = subprocess.Popen(cmd, cwd=ROOT, env=env_1thread(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while True:
                assert victim.poll() is None, f"run ended before it was killed: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                if last.is_file() and (at := global_step(last)) >= 2 and set(range(at)) <= set(losses(out)):
                    break
                time.sleep(0.05)
            os.kill(victim.pid, signal.SIGKILL)
            assert victim.wait(timeout=30) == -signal.SIGKILL
        finally:
            if victim.poll() is None:
                victim.kill()
    return global_step(last)  # the run may have written one more before the signal landed


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_losses(tmp_path):
    steps, per_epoch = 8, 40  # 20 batches an epoch: every checkpoint below is mid-epoch
    common = [f"trainer.max_steps={steps}", f"data.samples_per_epoch={per_epoch}",
              "callbacks.model_checkpoint.every_n_train_steps=2"]
    whole, killed, resumed = tmp_path / "whole", tmp_path / "killed", tmp_path / "resumed"
    with open(tmp_path / "whole.log", "w") as log:
        # The uninterrupted reference runs beside the killed run (one thread each, 2 cores).
        uninterrupted = subprocess.Popen(train_cmd(whole, *common), cwd=ROOT, env=env_1thread(),
                                         stdout=log, stderr=subprocess.STDOUT)
        try:
            at = kill_after_a_checkpoint(train_cmd(killed, *common), killed)
            assert 2 <= at < steps and at * 2 < per_epoch, at
            before = {s: v for s, v in losses(killed).items() if s < at}
            assert sorted(before) == list(range(at)), f"losses before the kill not all flushed: {sorted(before)}"
            run(train_cmd(resumed, *common, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"), env=env_1thread())
            assert uninterrupted.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-3000:]
        finally:
            if uninterrupted.poll() is None:
                uninterrupted.kill()

    after = losses(resumed)
    assert sorted(after) == list(range(at, steps)), sorted(after)
    reference = losses(whole)
    assert sorted(reference) == list(range(steps))
    assert {**before, **after} == reference  # bit-equal losses (as logged) at every step


# ---- a run that stopped, resumed: max_steps raised, should_stop (max_time), SIGTERM -------------------------
STEPS, PER_EPOCH = 8, 40  # 20 batches an epoch: every stop below is mid-epoch
# A constant schedule: raising max_steps changes a cosine schedule's horizon (README, exact resume).
STOPPED = [f"data.samples_per_epoch={PER_EPOCH}", "stage.scheduler.name=constant", "stage.scheduler.warmup_steps=0",
           "callbacks.model_checkpoint.every_n_train_steps=1000"]


class StopAtStep(L.Callback):
    """Test callback: stops training after `step` steps the way Lightning's Timer (`trainer.max_time`) does,
    `trainer.should_stop = True` in on_train_batch_end, without the timing that makes a max_time test flaky."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class Straight:
    """The uninterrupted STEPS-step reference, shared by the module's tests; it runs in the background
    beside the first test's own runs (one thread each, 2 cores)."""

    def __init__(self, out: Path) -> None:
        self.out, self.log = out, out.with_suffix(".log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(train_cmd(out, *STOPPED, f"trainer.max_steps={STEPS}"), cwd=ROOT,
                                         env=env_1thread(), stdout=log, stderr=subprocess.STDOUT)

    def losses(self) -> dict[int, str]:
        assert self.proc.wait(timeout=300) == 0, self.log.read_text()[-3000:]
        reference = losses(self.out)
        assert sorted(reference) == list(range(STEPS))
        return reference


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    ref = Straight(tmp_path_factory.mktemp("straight") / "whole")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()


def resume_to_the_end(out: Path, stopped: Path) -> dict[int, str]:
    last = stopped / "checkpoints" / "last.ckpt"
    run(train_cmd(out, *STOPPED, f"trainer.max_steps={STEPS}", f"ckpt_path={last}"), env=env_1thread())
    return losses(out)


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_finished_run_resumed_with_more_max_steps_gives_the_straight_losses(tmp_path, straight):
    """The Must-show of issue 9 item 10: 3 steps, then `trainer.max_steps` raised and `ckpt_path=last.ckpt`.
    Lightning counts the epoch as ended when max_steps stops a run, so the old code began a new epoch (other
    data, other losses). A step checkpoint at 2 also checks that last.ckpt holds the final step (3), not 2."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    run(train_cmd(first, *STOPPED, "trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2"),
        env=env_1thread())
    assert global_step(first / "checkpoints" / "last.ckpt") == 3
    before = losses(first)
    assert sorted(before) == [0, 1, 2]
    after = resume_to_the_end(resumed, first)
    assert sorted(after) == list(range(3, STEPS)), sorted(after)
    assert {**before, **after} == straight.losses()  # bit-equal losses (as logged) at every step


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_run_stopped_by_should_stop_resumes_mid_epoch(tmp_path, straight):
    """`trainer.max_time` stops through the Timer callback setting `trainer.should_stop`; StopAtStep does the
    same at a fixed step (a small max_time would make the test flaky). Same fault as max_steps on the old
    code: Lightning ends the epoch before writing last.ckpt, and the resume began a new epoch."""
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    stop_at = ["+callbacks.stop_at._target_=tests.test_resume.StopAtStep", "+callbacks.stop_at.step=3"]
    run(train_cmd(stopped, *STOPPED, f"trainer.max_steps={STEPS}", *stop_at), env=env_1thread())
    assert global_step(stopped / "checkpoints" / "last.ckpt") == 3
    before = losses(stopped)
    assert sorted(before) == [0, 1, 2]
    after = resume_to_the_end(resumed, stopped)
    assert sorted(after) == list(range(3, STEPS)), sorted(after)
    assert {**before, **after} == straight.losses()


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_sigterm_saves_last_at_a_step_boundary_exits_cleanly_and_resumes_exactly(tmp_path, straight):
    """SLURM sends SIGTERM before preemption: the run saves last.ckpt at the step boundary after the signal
    (it may land mid-step), exits 0, and the resume gives the uninterrupted losses. Old code: Lightning raised
    SIGTERMException (exit code 1) and no last.ckpt was written at that step."""
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log:
        victim = subprocess.Popen(train_cmd(stopped, *STOPPED, f"trainer.max_steps={STEPS}"), cwd=ROOT,
                                  env=env_1thread(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while len(losses(stopped)) < 3:  # steps 0..2 logged: the run is in step 3 or later
                assert victim.poll() is None, f"run ended before the signal: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "not 3 steps within 240 s"
                time.sleep(0.05)
            os.kill(victim.pid, signal.SIGTERM)
            assert victim.wait(timeout=120) == 0, log_path.read_text()[-3000:]
        finally:
            if victim.poll() is None:
                victim.kill()
    at = global_step(stopped / "checkpoints" / "last.ckpt")
    before = losses(stopped)
    assert 3 <= at < STEPS and sorted(before) == list(range(at)), (at, sorted(before))  # the last logged step
    after = resume_to_the_end(resumed, stopped)
    assert sorted(after) == list(range(at, STEPS)), sorted(after)
    assert {**before, **after} == straight.losses()


def test_the_data_position_not_lightnings_epoch_says_where_a_stopped_run_goes_on():
    """Replaces the test of `reopen_stopped_epoch` (which edited Lightning's epoch counters in the checkpoint):
    a run that stopped mid-epoch is resumed by Lightning as a new epoch, and Lightning calls the sampler's
    `set_epoch` with its own count; the loader still serves the rest of the stopped data epoch, then rolls over
    to the next data epoch at its start."""
    from src.data.detok import DetokDataModule

    dm = DetokDataModule(train_sources=[{"path": str(CAPTIONS), "kind": "jsonl"}], batch_size=4, seed=3)
    dm.setup("fit")
    dm.load_state_dict({"epoch": 0, "consumed": 4, "world_size": 1, "batch_size": 4})

    class Trainer:  # the part of a Trainer the hooks read
        training, global_rank, world_size = True, 0, 1

    dm.trainer = Trainer()
    loader = dm.train_dataloader()
    dm.train_sampler.set_epoch(1)  # what Lightning's fit loop does at the start of its next epoch
    rest = [b for b in loader]
    for b in rest:
        dm.on_before_batch_transfer(b, 0)
    order = dm.train_sampler.indices(0)
    ids = [read_source(SourceConfig(path=str(CAPTIONS)))[i] for i in order]
    ids = [r["id"] if isinstance(r, dict) else r.id for r in ids]
    got = [i for b in rest for i in b.ids + [s.id for s in b.skipped]]
    assert sorted(got) == sorted(ids[4:]) and len(rest) == 2
    assert dm.state_dict()["epoch"] == 0 and dm.state_dict()["consumed"] == 12  # epoch 0 used up
    nxt = next(iter(loader))  # the next iteration is data epoch 1 from its start
    dm.on_before_batch_transfer(nxt, 0)
    assert dm.state_dict()["epoch"] == 1 and dm.state_dict()["consumed"] == 4
    assert dm.train_sampler.epoch == 1


def test_a_position_restored_after_the_loader_drew_is_refused():
    from src.data.detok import DetokDataModule

    dm = DetokDataModule(train_sources=[{"path": str(CAPTIONS), "kind": "jsonl"}], batch_size=4, seed=3)
    dm.setup("fit")
    state = dm.state_dict()
    next(iter(dm.train_dataloader()))  # a loader built and drawn from before the checkpoint came back
    with pytest.raises(RuntimeError, match="before the checkpoint's data position was restored"):
        dm.load_state_dict(state)


def test_no_code_touches_lightnings_private_loop_state():
    """Issue 28 item 2: resume keeps no hand on Lightning's loops (`grep` of its Must-show)."""
    import re

    pattern = re.compile(r"_combined_loader|_data_fetcher|batch_progress|epoch_progress")
    src = Path(__file__).resolve().parents[1] / "src"
    hits = [f"{p}:{n}" for p in src.rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1)
            if pattern.search(line)]
    assert hits == []


def seen(out: Path, before_step: int | None = None) -> list[str]:
    ids = []
    for path in sorted((out / "seen_ids").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if before_step is None or row["step"] < before_step:
                ids += row["ids"] + row["skipped"]  # a skipped (bad) sample's position was consumed: seen
    return ids


def test_two_process_checkpoint_resumes_in_one_with_each_sample_seen_once(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    data = [f"data.train_sources=[{{path: '{CAPTIONS}', kind: jsonl, name: captions}}]",
            "data.samples_per_epoch=null", "callbacks.seen_samples.enabled=true"]
    epoch_ids = [r["id"] if isinstance(r, dict) else r.id for r in read_source(SourceConfig(path=str(CAPTIONS)))]
    assert len(epoch_ids) == 12 and len(set(epoch_ids)) == 12  # one source, one epoch: a permutation

    # 2 processes x 2 steps x 2 samples = 8 of the 12 samples of epoch 0; the sharded last.ckpt is at step 2.
    run(train_cmd(two, *data, "strategy=fsdp2", "strategy.fsdp2.param_dtype=null", "trainer.devices=2",
                  "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2"), timeout=400)
    ckpt = two / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    position = next(v for k, v in meta.items() if k.endswith("DataModule"))
    assert position["epoch"] == 0 and position["consumed"] == 8 and position["world_size"] == 2
    first = seen(two, before_step=2)
    assert len(first) == 8

    # 1 process finishes the epoch from there: 4 samples, 2 steps.
    run(train_cmd(one, *data, "strategy=fsdp2", "strategy.fsdp2.param_dtype=null", "trainer.devices=1",
                  "trainer.max_steps=-1", "trainer.max_epochs=1", f"ckpt_path={ckpt}"), timeout=400)
    second = seen(one)
    assert len(second) == 4
    assert Counter(first + second) == Counter(epoch_ids), (first, second)  # each exactly once
    with open(one / "csv" / "metrics.csv", newline="") as f:
        assert sorted(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")) == [2, 3]


# ---- unit: the data position and the writes --------------------------------------------------------------
def drain(sampler: MixtureSampler, world: int, local: int | None = None) -> list[int]:
    """What `world` ranks draw together, in global-position order (each rank `local` samples, or all)."""
    per_rank = []
    for rank in range(world):
        sampler.set_distributed(rank, world)
        state = sampler.state_dict()
        it = iter(sampler)
        per_rank.append([x for _, x in zip(range(local if local is not None else 10**9), it)])
        if rank < world - 1:
            sampler.load_state_dict(state)  # every rank starts from the same position
    out = [x for group in zip(*per_rank) for x in group]
    assert all(len(r) == len(per_rank[0]) for r in per_rank)  # equal shares: no rank waits at a collective
    return out


@pytest.mark.parametrize(("world_a", "world_b"), [(2, 1), (1, 2), (2, 3), (3, 2), (4, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_position_maps_across_world_sizes(world_a, world_b, shuffle):
    n, bs, steps = 37, 3, 2
    a = MixtureSampler([n], [1.0], num_samples=n, seed=5, shuffle=shuffle)
    order = a.indices(0).tolist()
    assert sorted(order) == list(range(n)) and (order != list(range(n))) == shuffle
    head = drain(a, world_a, local=steps * bs)
    consumed = a.position(0, steps * bs)  # what the datamodule checkpoints: (epoch, global samples)
    assert consumed == steps * bs * world_a and head == order[:consumed]

    b = MixtureSampler([n], [1.0], num_samples=n, seed=5, shuffle=shuffle)
    b.load_state_dict({"epoch": 0, "consumed": consumed})
    b.set_epoch(0)  # what Lightning does on resume: keeps the position
    tail = drain(b, world_b)
    assert head + tail == order[:len(head) + len(tail)]  # nothing skipped, nothing repeated
    assert n - len(head) - len(tail) < world_b  # only the last < world positions of the epoch are left out
    assert b.epoch == 1 and len(b) == n // world_b


def test_mixture_position_is_world_size_independent():
    s = MixtureSampler([13, 8], [3.0, 1.0], num_samples=50, seed=7)
    order = s.indices(0).tolist()
    assert drain(s, 2, local=5) == order[:10]
    s.load_state_dict({"epoch": 0, "consumed": 10})
    assert drain(s, 5) == order[10:50]


def test_datamodule_checkpoints_what_was_consumed_not_what_was_prefetched():
    from src.data.detok import DetokDataModule

    dm = DetokDataModule(train_sources=[{"path": str(CAPTIONS), "kind": "jsonl"}], vit_image_size=28,
                         resolution=32, batch_size=4, seed=3)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert dm.batches_per_epoch() == 3
    it = iter(loader)
    first, _ = next(it), next(it)  # two batches drawn (a prefetch), one consumed:

    class Trainer:  # the part of a Trainer the hook reads
        training, current_epoch, global_rank, world_size = True, 0, 0, 1

    dm.trainer = Trainer()
    dm.on_before_batch_transfer(first, 0)
    assert dm.state_dict()["consumed"] == 4 and dm.train_sampler.state_dict()["consumed"] == 8

    resumed = DetokDataModule(train_sources=[{"path": str(CAPTIONS), "kind": "jsonl"}], vit_image_size=28,
                              resolution=32, batch_size=4, seed=3)
    resumed.setup("fit")
    resumed.load_state_dict(dm.state_dict())
    ids = [i for batch in resumed.train_dataloader() for i in batch.ids + [s.id for s in batch.skipped]]
    order = [read_source(SourceConfig(path=str(CAPTIONS)))[i] for i in dm.train_sampler.indices(0)]
    expected = [r["id"] if isinstance(r, dict) else r.id for r in order]
    assert sorted(first.ids + [s.id for s in first.skipped]) == sorted(expected[:4])
    assert sorted(ids) == sorted(expected[4:])  # the resumed loader starts at the consumed position


@pytest.mark.parametrize(("world_a", "world_b", "left"), [(1, 2, 2), (2, 1, 4), (2, 2, 2)])
def test_resume_on_another_world_size_ends_the_epoch_where_the_data_ends(world_a, world_b, left):
    """Lightning restores its per-epoch batch counter in the old run's units; the training loader has no length,
    so Lightning ends the epoch when the loader's data ends, whatever that counter says (the old code shifted
    Lightning's private counter). 24 samples, batch 2: world_a consumed 16, 8 are left for world_b ranks."""
    from types import SimpleNamespace

    from src.data.detok import DetokDataModule

    trainer = SimpleNamespace(training=False, current_epoch=0, global_rank=0, world_size=world_b)
    dm = DetokDataModule(train_sources=[{"path": str(CAPTIONS), "kind": "jsonl"}] * 2, batch_size=2, seed=0)
    dm.trainer = trainer
    dm.setup("fit")
    dm.load_state_dict({"epoch": 0, "consumed": 16, "world_size": world_a, "batch_size": 2})
    loader = dm.train_dataloader()
    with pytest.raises(TypeError):
        len(loader)  # Lightning: an epoch of unknown length, ended by the data
    assert dm.batches_per_epoch() == 12 // world_b  # a whole epoch here (the schedule's unit)
    assert len(list(loader)) == left  # the batches left end the epoch exactly


def test_atomic_checkpoint_write_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    assert global_step(path) == 1

    def crash(*args, **kwargs):
        raise OSError("simulated crash between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert global_step(path) == 1  # the old checkpoint, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left behind
    io.save_checkpoint({"global_step": 3, "w": torch.zeros(3)}, path)
    assert global_step(path) == 3


def test_sharded_directory_is_swapped_in_whole(tmp_path):
    dst = tmp_path / "last.ckpt"
    for step in (1, 2):
        tmp = tmp_path / ".last.ckpt.tmp"
        tmp.mkdir()
        (tmp / "meta.pt").write_text(str(step))
        (tmp / "__0_0.distcp").write_text("x" * step)
        replace_dir(tmp, dst)
        assert (dst / "meta.pt").read_text() == str(step) and (dst / "__0_0.distcp").read_text() == "x" * step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_numpy_rng_round_trips_through_a_weights_only_checkpoint(tmp_path):
    from src.callbacks.rng_state import capture_rng, restore_rng

    np.random.seed(0)
    torch.manual_seed(0)
    state = capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    expected = (np.random.rand(3).tolist(), torch.rand(3).tolist())
    np.random.seed(1)
    torch.manual_seed(1)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected
