"""Streaming shards (data.stream_dir, src/data/stream.py): write_stream round trip and skip counting, the tiny
twins train from a stream dir, config mistakes named, mixture weights hold, and exact resume on the streaming
path (SIGKILL mid-epoch, a finished run's last.ckpt, a 2-process checkpoint resumed on 1 process)."""

import json
import math
import os
import re
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_prep.common import RecordWriter
from data_prep.write_stream import write_stream
from src.data.sources import SourceConfig
from src.data.stream import FORMAT, MANIFEST, open_stream
from tests.helpers import CONF, tiny_run_cfg
from tests.test_resume import (
    STEPS,
    STOPPED,
    env_1thread,
    global_step,
    kill_after_a_checkpoint,
    losses,
    run,
    seen,
    train_cmd,
)

pytestmark = pytest.mark.smoke

ROOT = CONF.parent
SAMPLE = ROOT / "assets" / "sample"
MLLM_SOURCES = [SourceConfig(path=str(SAMPLE / "captions.jsonl"), name="captions", weight=3.0),
                SourceConfig(path=str(SAMPLE / "edit.jsonl"), name="edit", weight=1.0)]


def clean_streaming_leftovers() -> None:
    """Remove what killed runs leave behind: the library's shared memory blocks and its /tmp file locks.

    The library skips every prefix that has a file lock in the temp dir and cleans shared memory only from prefix
    0 up to the first gap, so on a machine that ran many streams a killed run's blocks outlive
    clean_stale_shared_memory and its resume can collide with them. Tests run one stream at a time: remove all."""
    import tempfile

    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    names = "|".join(re.escape(n) for n in [*SHM_TO_CLEAN, BARRIER_FILELOCK, CACHE_FILELOCK])
    pattern = re.compile(rf"^\d{{6}}_({names})$")
    for root in (Path("/dev/shm"), Path(tempfile.gettempdir())):
        if root.is_dir():
            for f in root.iterdir():
                if pattern.match(f.name):
                    f.unlink(missing_ok=True)


@pytest.fixture(autouse=True, scope="module")
def _clean_shared_memory():
    clean_streaming_leftovers()
    yield
    clean_streaming_leftovers()


@pytest.fixture(scope="module")
def mllm_stream(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stream") / "mllm"
    write_stream(MLLM_SOURCES, out, quiet=True)
    return out


def raw_ids(stream_dir: Path, names: list[str], **kw) -> list:
    ds, _ = open_stream(str(stream_dir), names, lambda r: r, seed=0, batch_size=1, **kw)
    return list(ds)


def test_write_stream_round_trip_and_bad_record_counting(mllm_stream):
    manifest = json.loads((mllm_stream / MANIFEST).read_text())
    assert manifest["format"] == FORMAT
    caps, edit = manifest["sources"]["captions"], manifest["sources"]["edit"]
    assert (caps["records"], caps["skipped"]) == (10, {"corrupt_image": 1, "missing_file": 1})
    assert (edit["records"], edit["skipped_total"], edit["images"]) == (8, 0, 16)
    report = [json.loads(x) for x in (mllm_stream / "captions.skipped.jsonl").read_text().splitlines()]
    assert sorted(r["reason"] for r in report) == ["corrupt_image", "missing_file"]
    assert all(r["where"].startswith(str(SAMPLE / "captions.jsonl")) for r in report)

    records = raw_ids(mllm_stream, ["captions", "edit"], shuffle=False)
    by_id = {r["id"]: r for r in records}
    assert len(records) == len(by_id) == 18
    originals = {}
    for line in (SAMPLE / "captions.jsonl").read_text().splitlines():
        r = json.loads(line)
        originals[r["id"]] = r
    r = by_id["sample_captions/astronaut"]
    assert r["turns"][0]["content"][1] == originals["sample_captions/astronaut"]["turns"][0]["content"][1]
    assert r["turns"][0]["content"][0] == {"image": "jpg"}  # named like a shard member
    assert r["_blobs"]["jpg"] == (SAMPLE / "images" / "astronaut.jpg").read_bytes()  # byte for byte
    assert r["_where"].endswith("captions:sample_captions/astronaut")


def _finite(metrics: dict, key: str) -> bool:
    return key in metrics and math.isfinite(float(metrics[key]))


@pytest.mark.parametrize("experiment", ["seedx_pretrain_tiny", "seedx_detok_pretrain_tiny", "seedx_detok_cond_tiny"])
def test_tiny_twins_train_from_a_stream_dir(experiment, tmp_path):
    from omegaconf import OmegaConf

    from data_prep.precompute_features import compose
    from src.train import train

    sources = [SourceConfig(**OmegaConf.to_container(s, resolve=True))
               for s in compose(experiment, []).data.train_sources]
    write_stream(sources, tmp_path / "stream", quiet=True)
    extra = ["data.grids=[1x1]", "data.max_length=512", "callbacks.mllm_probe=null"] \
        if experiment == "seedx_pretrain_tiny" else ["callbacks.sample_images=null"]
    cfg = tiny_run_cfg(experiment, tmp_path / "run", [f"data.stream_dir={tmp_path / 'stream'}",
                                                      "trainer.max_steps=3", "trainer.limit_val_batches=0", *extra])
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 3
    assert "LOCAL_RANK" not in os.environ  # else later runs of this process take themselves for launched ranks
    assert _finite(metrics, "train/loss")
    if experiment == "seedx_pretrain_tiny":
        assert _finite(metrics, "train/loss_ce") and _finite(metrics, "train/loss_mse")


def test_stream_dir_mistakes_name_the_key(tmp_path, mllm_stream):
    from src.data.mllm import MLLMDataModule

    kw = {"tokenizer_path": str(ROOT / "assets" / "tokenizers" / "tiny-llama"),
          "train_sources": [{"path": s.path, "name": s.name, "weight": s.weight} for s in MLLM_SOURCES]}
    with pytest.raises(ValueError, match=r"data.stream_dir: .* is not a stream dir: no stream.json"):
        MLLMDataModule(**kw, stream_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"data.stream_dir: .* no stream for training source\(s\) \['laion'\]"):
        MLLMDataModule(**{**kw, "train_sources": [{"path": s.path, "name": "laion"} for s in MLLM_SOURCES[:1]]},
                       stream_dir=str(mllm_stream))


@pytest.mark.unit
def test_mixture_fractions_hold_within_one_percent_over_an_epoch(tmp_path):
    sizes, weights = {"big": 300, "mid": 120, "small": 40}, {"big": 5.0, "mid": 3.0, "small": 2.0}
    for name, n in sizes.items():
        with RecordWriter(tmp_path, name, stream=True, quiet=True) as w:
            for i in range(n):
                w.write({"id": f"{name}/{i}", "source": name,
                         "turns": [{"role": None, "content": [{"text": f"text {i}"}]}]})
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT}))
    epoch = 2000
    got = Counter(r["source"] for r in raw_ids(tmp_path, list(sizes), weights=list(weights.values()),
                                                epoch_size=epoch))
    assert sum(got.values()) == epoch
    total = sum(weights.values())
    for name in sizes:
        assert abs(got[name] / epoch - weights[name] / total) <= 0.01, (name, got)


# ---- exact resume on the streaming path ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def straight_stream(tmp_path_factory, mllm_stream):
    """The uninterrupted STEPS-step streamed run, in the background beside the tests' own runs."""
    out = tmp_path_factory.mktemp("straight") / "whole"
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - the background run writes it until teardown
    proc = subprocess.Popen(train_cmd(out, *STOPPED, f"data.stream_dir={mllm_stream}", f"trainer.max_steps={STEPS}"),
                            cwd=ROOT, env=env_1thread(), stdout=log, stderr=subprocess.STDOUT)

    def result() -> dict[int, str]:
        assert proc.wait(timeout=300) == 0, out.with_suffix(".log").read_text()[-3000:]
        reference = losses(out)
        assert sorted(reference) == list(range(STEPS))
        return reference

    yield result
    if proc.poll() is None:
        proc.kill()
    log.close()


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_losses(tmp_path, mllm_stream, straight_stream):
    common = [*STOPPED, f"data.stream_dir={mllm_stream}", f"trainer.max_steps={STEPS}",
              "callbacks.model_checkpoint.every_n_train_steps=2"]
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    at = kill_after_a_checkpoint(train_cmd(killed, *common), killed)
    assert 2 <= at < STEPS, at
    before = {s: v for s, v in losses(killed).items() if s < at}
    run(train_cmd(resumed, *common, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"), env=env_1thread())
    after = losses(resumed)
    assert sorted(after) == list(range(at, STEPS)), sorted(after)
    assert {**before, **after} == straight_stream()  # bit-equal losses (as logged) at every step


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_finished_run_last_ckpt_resumes_where_it_stopped(tmp_path, mllm_stream, straight_stream):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    data = [*STOPPED, f"data.stream_dir={mllm_stream}"]
    run(train_cmd(first, *data, "trainer.max_steps=3"), env=env_1thread())
    last = first / "checkpoints" / "last.ckpt"
    assert global_step(last) == 3
    before = losses(first)
    run(train_cmd(resumed, *data, f"trainer.max_steps={STEPS}", f"ckpt_path={last}"), env=env_1thread())
    after = losses(resumed)
    assert sorted(after) == list(range(3, STEPS)), sorted(after)
    assert {**before, **after} == straight_stream()


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_two_process_checkpoint_resumes_in_one_with_each_sample_seen_once(tmp_path, mllm_stream):
    two, one = tmp_path / "two", tmp_path / "one"
    data = [f"data.stream_dir={mllm_stream}", f"data.train_sources=[{{path: '{SAMPLE / 'captions.jsonl'}', kind: jsonl, name: captions}}]",
            "data.samples_per_epoch=null", "callbacks.seen_samples.enabled=true"]
    epoch_ids = [r["id"] for r in raw_ids(mllm_stream, ["captions"])]
    assert len(epoch_ids) == 10 and len(set(epoch_ids)) == 10

    # 2 processes x 2 steps x 2 samples = 8 of the 10 samples of epoch 0 (gloo DDP on CPU).
    run(train_cmd(two, *data, "strategy=ddp", "trainer.devices=2", "trainer.max_steps=2",
                  "callbacks.model_checkpoint.every_n_train_steps=2"), timeout=400)
    ckpt = two / "checkpoints" / "last.ckpt"
    position = next(v for k, v in torch.load(ckpt, weights_only=True).items() if k.endswith("DataModule"))
    assert position["epoch"] == 0 and position["consumed"] == 8 and position["world_size"] == 2
    first = seen(two, before_step=2)
    assert len(first) == 8

    # 1 process finishes the epoch from there: 2 samples, 1 step.
    run(train_cmd(one, *data, "trainer.devices=1", "trainer.max_steps=-1", "trainer.max_epochs=1",
                  f"ckpt_path={ckpt}"), timeout=400)
    second = seen(one)
    assert Counter(first + second) == Counter(epoch_ids), (first, second)  # each exactly once


def _copy_stream(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.unit
def test_a_truncated_shard_is_skipped_and_counted_by_its_shard_name(tmp_path, mllm_stream):
    """Issue 27 item 6: a shard cut short (a copy that did not finish) skips the samples past its end as
    bad_shard, named by the shard, instead of an IndexError a step into the run."""
    stream = _copy_stream(mllm_stream, tmp_path / "stream")
    (shard,) = sorted((stream / "captions").glob("shard.*.mds"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    items = raw_ids(stream, ["captions", "edit"], shuffle=False)
    skipped = [i["skipped"] for i in items if "skipped" in i]
    records = [i for i in items if "skipped" not in i]
    assert len(items) == 18 and 0 < len(skipped) < 10
    assert {s.reason for s in skipped} == {"bad_shard"} and {s.source for s in skipped} == {"captions"}
    assert all(s.where.startswith(f"{stream}/captions/{shard.name}:") for s in skipped)
    assert sum(f"{stream}/edit:" in r["_where"] for r in records) == 8  # the other source is untouched


@pytest.mark.unit
def test_an_index_listing_a_missing_shard_names_the_shard(tmp_path, mllm_stream):
    from src.data.mllm import MLLMDataModule

    stream = _copy_stream(mllm_stream, tmp_path / "stream")
    (shard,) = sorted((stream / "edit").glob("shard.*.mds"))
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard {re.escape(str(shard))} is listed in .*edit/index.json "
                                                r"but missing"):
        raw_ids(stream, ["captions", "edit"])
    kw = {"tokenizer_path": str(ROOT / "assets" / "tokenizers" / "tiny-llama"),
          "train_sources": [{"path": s.path, "name": s.name, "weight": s.weight} for s in MLLM_SOURCES]}
    with pytest.raises(ValueError, match=rf"data.stream_dir: shard {re.escape(str(shard))} is listed"):
        MLLMDataModule(**kw, stream_dir=str(stream))
