"""Reliability and security (issue 27): no checkpoint runs code, no config instantiates arbitrary callables,
no run destroys another's results, files are written for teammates."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from src.utils.checkpoint import UnsafeCheckpoint, read_checkpoint

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


class _WritesAFile:
    """What an attacker pickles: unpickling it runs `exec`, which writes a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('pwned')",))


def _malicious_checkpoint(path: Path, target: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"x": _WritesAFile(target)}}, path)
    return path


# ------------------------------------------------------------------------------------------ 1: weights-only
def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    ckpt = _malicious_checkpoint(tmp_path / "evil.ckpt", target)
    with pytest.raises(UnsafeCheckpoint, match=r"stage\.init_from=.*evil\.ckpt.*refused.*exec"):
        read_checkpoint(ckpt, "stage.init_from")
    assert not target.exists()


def test_every_entry_point_refuses_a_malicious_checkpoint(tmp_path):
    """src.export and the inference builders (src.generate, src.eval, lmms-eval, SFT sampling) read through
    read_checkpoint: each refuses before building anything."""
    from src.export import export
    from src.specs.inference import build_detokenizer, build_image_tokenizer, build_mllm

    target = tmp_path / "pwned.txt"
    ckpt = str(_malicious_checkpoint(tmp_path / "evil.ckpt", target))
    with pytest.raises(UnsafeCheckpoint, match="ckpt_path"):
        export(ckpt, tmp_path / "out")
    with pytest.raises(UnsafeCheckpoint, match="detok_ckpt_path"):
        export(None, tmp_path / "out", detok_ckpt_path=ckpt)
    with pytest.raises(UnsafeCheckpoint):
        build_mllm({}, ckpt)
    with pytest.raises(UnsafeCheckpoint):
        build_detokenizer({}, "pretrain", ckpt)
    with pytest.raises(UnsafeCheckpoint):
        build_image_tokenizer(ckpt, None)
    assert not target.exists()


def test_a_sharded_checkpoint_whose_metadata_runs_code_is_refused(tmp_path):
    """torch.distributed.checkpoint unpickles `.metadata` with plain pickle: it is checked first."""
    import pickle

    target = tmp_path / "pwned.txt"
    sharded = tmp_path / "step_1.ckpt"
    sharded.mkdir()
    (sharded / ".metadata").write_bytes(pickle.dumps(_WritesAFile(target)))
    torch.save({"global_step": 1}, sharded / "meta.pt")
    with pytest.raises(UnsafeCheckpoint, match="exec"):
        read_checkpoint(sharded)
    assert not target.exists()


def test_a_real_sharded_checkpoint_passes_the_metadata_check(tmp_path):
    import torch.distributed.checkpoint as dcp

    from src.utils.checkpoint import check_sharded_metadata

    dcp.save({"state_dict": {"a": torch.zeros(3, dtype=torch.bfloat16)}, "n": 3}, checkpoint_id=str(tmp_path / "d"),
             no_dist=True)
    check_sharded_metadata(tmp_path / "d")


def test_no_source_file_loads_a_pickle_with_code():
    """Every torch.load in src/ is weights-only (read_checkpoint included): no `weights_only=False` anywhere."""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "src").rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"weights_only\s*=\s*False|pickle\.loads?\(", line)]
    assert offenders == []


# ------------------------------------------------------------------------------------------ 2: _target_ allow-list
@pytest.mark.parametrize(("overrides", "key", "target"), [
    (["+callbacks.evil._target_=builtins.open", "+callbacks.evil.file={out}", "+callbacks.evil.mode=w"],
     "callbacks.evil._target_", "builtins.open"),
    (["stage.optimizer._target_=torch.load"], "stage.optimizer._target_", "torch.load"),
    (["trainer.plugins.0._target_=subprocess.Popen", "+trainer.plugins.0.args=[touch,{out}]"],
     "trainer.plugins.0._target_", "subprocess.Popen"),
    # a project *function* would write any file the config names
    (["+callbacks.evil._target_=src.utils.run.atomic_write_text", "+callbacks.evil.path={out}",
      "+callbacks.evil.text=pwned"], "callbacks.evil._target_", "src.utils.run.atomic_write_text"),
])
def test_a_target_outside_the_allow_list_is_refused_before_any_build(tmp_path, overrides, key, target, monkeypatch):
    from src.stages.base import StageModule
    from src.train import train
    from src.utils.config import ALLOWED_TARGETS, ConfigError
    from tests.test_config_checks import compose_like_train

    def built(self):
        raise AssertionError("a model was built")

    monkeypatch.setattr(StageModule, "configure_model", built)
    out = tmp_path / "pwned.txt"
    cfg, task, choices = compose_like_train("seedx_pretrain_tiny", tmp_path / "run",
                                            [o.format(out=out) for o in overrides])
    with pytest.raises(ConfigError) as err:
        train(cfg, task, choices)
    text = str(err.value)
    assert f"{key}: '{target}'" in text and "(set in command-line override" in text
    if not target.startswith("src."):
        assert "allowed: " + ", ".join(a + ("*" if a.endswith(".") else "") for a in ALLOWED_TARGETS) in text
    assert not out.exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_every_shipped_config_names_only_allowed_targets():
    from omegaconf import OmegaConf

    from src.utils.config import target_problems

    problems = [(p.name, k, m) for p in (ROOT / "conf").rglob("*.yaml")
                for k, m in target_problems({k: v for k, v in (OmegaConf.to_container(OmegaConf.load(p)) or {}).items()
                                             if k != "hydra"})]
    assert problems == []


# ------------------------------------------------------------------------------------------ 3: output-folder lock
FAST = ["trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1", "trainer.limit_val_batches=0"]


def test_a_held_output_folder_is_refused_naming_pid_and_host(tmp_path):
    import socket

    from src.train import train
    from src.utils.output_guard import OutputFolderInUse, OutputLock
    from tests.helpers import tiny_run_cfg

    out = tmp_path / "run"
    with OutputLock(out):  # another run holds it (flock is per open file: this process counts as another)
        with pytest.raises(OutputFolderInUse, match=rf"in use by another run \(pid {os.getpid()} on host "
                                                    rf"{re.escape(socket.gethostname())}"):
            train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, FAST))
        assert not (out / "checkpoints").exists() and not (out / "config.yaml").exists()
    OutputLock(out).acquire().release()  # the refused run left the lock as it found it


@pytest.mark.smoke
def test_a_finished_run_folder_is_refused_unless_resumed_or_overwritten(tmp_path):
    from src.train import train
    from src.utils.output_guard import OutputFolderInUse
    from tests.helpers import tiny_run_cfg

    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, FAST))
    first = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
    assert {"step_0000001.ckpt", "step_0000002.ckpt", "last.ckpt"} <= set(first)
    with pytest.raises(OutputFolderInUse, match=r"holds a finished or stopped run .*ckpt_path=.*paths\.overwrite=true"):
        train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, FAST))
    assert {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()} == first  # untouched
    # resuming from it continues the run in place
    train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, [*FAST, "trainer.max_steps=3", f"ckpt_path={ckpts / 'last.ckpt'}"]))
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 3
    # overwrite: the old run's checkpoints are gone, none stale beside the new run's
    train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, [*FAST, "trainer.max_steps=1", "paths.overwrite=true"]))
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["last.ckpt", "step_0000001.ckpt"]
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 1
    # what teammates read gets the process umask, as any other file (item 9)
    mask = os.umask(0)
    os.umask(mask)
    for f in (ckpts / "last.ckpt", out / "config.yaml", out / "metrics.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


# ------------------------------------------------------------------------------------------ 9: file modes
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_writes_get_the_mode_of_the_process_umask(tmp_path, umask):
    from src.utils.checkpoint import atomic_torch_save
    from src.utils.run import atomic_write_text, write_metrics_json

    old = os.umask(umask)
    try:
        atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "last.ckpt")
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
        write_metrics_json(tmp_path / "metrics.json", {"x": 1.0})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["last.ckpt", "config.yaml", "metrics.json", "plain.txt"], 0o666 & ~umask)


# ------------------------------------------------------------------------------------------ 10: wrong checkpoint kind
def _detok_checkpoint(path: Path, recorded: bool) -> Path:
    """A de-tokenizer checkpoint as src.train writes it: with its stage family, or (older ones) known only by
    the hyper-parameters a de-tokenizer stage takes."""
    hp = {"model": {"vit": {}, "detokenizer": {}}, "guidance_scale": 7.5, "negative": "zeros", "init_seed": 0}
    torch.save({"state_dict": {}, "hyper_parameters": hp, **({"stage_family": "detokenizer"} if recorded else {})},
               path)
    return path


@pytest.mark.parametrize("recorded", [True, False])
def test_a_detokenizer_checkpoint_as_init_from_of_an_mllm_stage_fails_before_any_build(tmp_path, recorded,
                                                                                      monkeypatch):
    from src.stages.base import StageModule
    from src.train import train
    from src.utils.config import ConfigError
    from tests.test_config_checks import compose_like_train

    def built(self):
        raise AssertionError("a model was built")

    monkeypatch.setattr(StageModule, "configure_model", built)
    ckpt = _detok_checkpoint(tmp_path / "detok.ckpt", recorded)
    cfg, task, choices = compose_like_train("seedx_sft_i_tiny", tmp_path / "run", [f"stage.init_from={ckpt}"])
    with pytest.raises(ConfigError, match=r"stage\.init_from='.*detok\.ckpt' is a de-tokenizer checkpoint .*; "
                                          r"stage\.init_from expects a SEED-X MLLM checkpoint"):
        train(cfg, task, choices)
    # and the resume checkpoint of a run
    cfg, task, choices = compose_like_train("seedx_pretrain_tiny", tmp_path / "run2", [f"ckpt_path={ckpt}"])
    with pytest.raises(ConfigError, match=r"ckpt_path='.*' is a de-tokenizer checkpoint"):
        train(cfg, task, choices)


def test_export_of_a_detokenizer_checkpoint_as_ckpt_path_names_the_kind(tmp_path):
    from src.export import export
    from src.utils.checkpoint_kind import WrongCheckpointKind

    ckpt = _detok_checkpoint(tmp_path / "detok.ckpt", recorded=False)
    with pytest.raises(WrongCheckpointKind, match=r"ckpt_path=.* is a de-tokenizer checkpoint .*; ckpt_path expects "
                                                  r"a SEED-X MLLM checkpoint"):
        export(str(ckpt), tmp_path / "out")


def test_generate_refuses_a_non_image_and_a_wrong_checkpoint_before_any_build(tmp_path, monkeypatch):
    import src.generate as gen
    from src.utils.checkpoint_kind import WrongCheckpointKind
    from tests.test_generate import gen_cfg

    def built(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(gen, "build_mllm", built)
    monkeypatch.setattr(gen, "build_detokenizer", built)
    text = tmp_path / "notes.jpg"
    text.write_text("this is text, not a JPEG")
    with pytest.raises(ValueError, match=r"request 'request_0000': image '.*notes\.jpg' is not a readable image "
                                         r"\(corrupt_image"):
        gen.generate(gen_cfg(tmp_path / "a", ["mode=chat", "prompt=hi", f"image={text}"]))
    ckpt = _detok_checkpoint(tmp_path / "detok.ckpt", recorded=True)
    with pytest.raises(WrongCheckpointKind, match="ckpt_path=.* is a de-tokenizer checkpoint"):
        gen.generate(gen_cfg(tmp_path / "b", ["mode=t2i", "prompt=hi", f"ckpt_path={ckpt}"]))


def test_training_checkpoints_record_their_stage_family(tmp_path):
    from src.train import train
    from src.utils.checkpoint_kind import checkpoint_family
    from tests.helpers import tiny_run_cfg

    train(tiny_run_cfg("seedx_detok_pretrain_tiny", tmp_path, ["trainer.max_steps=1", "trainer.limit_val_batches=0"]))
    assert checkpoint_family(read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")) == "detokenizer"


# ------------------------------------------------------------------------------------------ 7: storage faults
def test_a_checkpoint_folder_that_takes_no_file_is_refused_before_training(tmp_path, monkeypatch):
    """`/sys/kernel` takes no file even for root (a read-only folder as chmod cannot make one for root)."""
    import tempfile

    from src.stages.base import StageModule
    from src.train import train
    from src.utils.output_guard import OutputNotWritable
    from tests.helpers import tiny_run_cfg

    try:
        tempfile.TemporaryFile(dir="/sys/kernel").close()
        pytest.skip("/sys/kernel takes files here")
    except OSError:
        pass

    def built(self):
        raise AssertionError("a model was built")

    monkeypatch.setattr(StageModule, "configure_model", built)
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").symlink_to("/sys/kernel")
    with pytest.raises(OutputNotWritable, match=r"callbacks\.model_checkpoint\.dirpath=.*checkpoints' is not "
                                                r"writable .*crash at its first save"):
        train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, FAST))


_FULL_DISK = """
import sys, torch
from src.utils.checkpoint import atomic_torch_save
atomic_torch_save({"w": torch.zeros(10)}, sys.argv[1] + "/last.ckpt")
try:
    atomic_torch_save({"w": torch.zeros(1_000_000)}, sys.argv[1] + "/last.ckpt")
except OSError as e:
    print("ERROR", e)
"""


def test_a_full_disk_says_no_space_left_and_keeps_the_previous_last_ckpt(tmp_path):
    """A 512 KiB tmpfs in a private mount namespace (root, `unshare -m`), so nothing outside this process sees it."""
    import shutil
    import subprocess
    import sys

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a small file system")
    script = (f'mount -t tmpfs -o size=512k tmpfs "{disk}" && "{sys.executable}" -c \'{_FULL_DISK}\' "{disk}" && '
              f'ls -a "{disk}" && "{sys.executable}" -c \'import torch,sys; print("KEPT", torch.load(sys.argv[1], '
              f'weights_only=True)["w"].shape[0])\' "{disk}/last.ckpt"')
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if "mount" in proc.stderr and proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")
    assert f"ERROR [Errno 28] no space left on {disk} while writing last.ckpt" in proc.stdout, proc.stdout + proc.stderr
    assert "the previous last.ckpt is kept" in proc.stdout and "KEPT 10" in proc.stdout
    assert ".tmp" not in proc.stdout  # no partial temp file left behind


@pytest.mark.smoke
def test_a_truncated_last_ckpt_names_the_newest_intact_step_checkpoint(tmp_path, monkeypatch):
    from src.train import train
    from src.utils.config import ConfigError
    from tests.helpers import tiny_run_cfg

    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, FAST))
    for name in ("last.ckpt", "step_0000002.ckpt"):  # a crash while copying the folder, say
        data = (ckpts / name).read_bytes()
        (ckpts / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=rf"ckpt_path='.*last\.ckpt' cannot be read \(truncated or corrupted: .*\); "
                                          rf"the newest intact checkpoint beside it is {re.escape(str(ckpts))}/"
                                          rf"step_0000001\.ckpt: use ckpt_path=.*step_0000001\.ckpt"):
        train(tiny_run_cfg("seedx_detok_pretrain_tiny", out, [*FAST, "trainer.max_steps=3",
                                                              f"ckpt_path={ckpts / 'last.ckpt'}"]))


@pytest.mark.parametrize(("parts", "family"), [
    (["agent", "detokenizer", "llm", "vit"], "seedx_mllm"), (["detokenizer", "vit"], "detokenizer"),
    (["llm"], "seed_llama"), (["eva_vit", "qformer"], "seed_qformer"),
    (["eva_vit", "qformer", "seed_codec", "seed_decoder"], "seed_tokenizer"), ([], None)])
def test_checkpoints_without_a_recorded_family_are_known_by_their_model_parts(parts, family):
    from src.utils.checkpoint_kind import checkpoint_family

    assert checkpoint_family({"hyper_parameters": {"model": {part: {} for part in parts}}}) == family
