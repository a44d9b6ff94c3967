"""Ranks whose batches differ in modality must not hang or desync FSDP2 (2 gloo processes on CPU).

The tiny MLLM stage is sharded with `src.parallel.parallelize` (FSDP2 `fully_shard` per Llama / ViT block,
then each top-level model), as `strategy=fsdp2` does. Per step the two ranks get different data:

    step 0: rank 0 comprehension + generated image (MSE) | rank 1 comprehension only (no generation)
    step 1: rank 0 generation only (no comprehension)    | rank 1 comprehension only
    step 2: rank 0 two samples, several ViT chunks        | rank 1 text only (no image: no ViT view at all)
    step 3: as step 0, from precomputed features (data_prep/precompute_features.py; no ViT call anywhere)

Every step must finish (a hang fails the test through its timeout), losses must be finite, and the
sharded parameters after each SGD step must equal an unsharded reference trained on the mean of both
ranks' losses (a desynced collective would mix up or drop gradients). The forward hooks show that the
guards are what runs: each resampler runs on every rank every step (a zero-weight dummy where the batch
has nothing for it, whose gradient is exactly zero), and the ViT runs equally often on both ranks. The
same steps with the ViT's call-count guard switched off (each rank encodes only its own chunks, as the
stage did before) fail with a collective mismatch (or hang until the shortened gloo timeout).

The worker runs as `python -m tests.test_rank_divergence RANK WORLD PORT MODE OUT`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "assets" / "sample")


def _rec(rid: str, turns: list[dict]) -> dict:
    return {"id": f"divergence/{rid}", "source": "divergence", "turns": turns, "_base_dir": BASE}


EDIT = _rec("edit", [
    {"role": "user", "content": [{"image": "images/chelsea.jpg"}, {"text": "Flip the photo horizontally."}]},
    {"role": "assistant", "content": [{"image": "images/edits/chelsea_flip.jpg", "generate": True}]}])
CAPTION = _rec("caption", [{"role": None, "content": [{"image": "images/coffee.jpg"}, {"text": "A cup of coffee."}]}])
T2I = _rec("t2i", [{"role": None, "content": [{"text": "A rocket on its launch pad."},
                                              {"image": "images/rocket.jpg", "generate": True}]}])
TEXT = _rec("text", [{"role": None, "content": [{"text": "Only words here, and no picture at all."}]}])
# (rank 0's records, rank 1's records, from precomputed features)
STEPS = [([EDIT], [CAPTION], False), ([T2I], [CAPTION], False), ([EDIT, CAPTION], [TEXT], False),
         ([EDIT], [CAPTION], True)]
LR = 0.1


# ------------------------------------------------------------------------------------------------ worker
def worker(rank: int, world: int, port: int, mode: str, out: str) -> None:
    from datetime import timedelta

    import hydra
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.parallel import FSDP2Options, block_classes, parallelize
    from tests.helpers import tiny_run_cfg

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    timeout = timedelta(seconds=60 if mode == "guarded" else 15)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("data_parallel",))

    if mode == "no_vit_guard":  # as before: each rank calls the sharded ViT once per chunk of its own views
        import src.stages.mllm_pretrain as stage_mod

        stage_mod.same_call_count = lambda module, n, device="cpu": n

    # LoRA dropout off: the reference must draw no random numbers the ranks do not.
    cfg = tiny_run_cfg("seedx_pretrain_tiny", Path(out) / f"cfg{rank}",
                       ["stage.lora.dropout=0.0", "stage.vit_chunk_size=2", "data.t2i_ratio=0.0"])
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    store = Path(out) / "features"
    if rank == 0 and mode == "guarded":  # the unguarded run never gets to the feature step
        from data_prep.precompute_features import main as precompute

        records = Path(out) / "divergence.jsonl"
        records.write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n"
                                   for r in (EDIT, CAPTION, T2I, TEXT)))
        # The records' relative image paths; a copy, since a symlink out of the jsonl's folder is refused.
        shutil.copytree(Path(BASE) / "images", Path(out) / "images")
        precompute(["--experiment", "seedx_pretrain_tiny", "--out", str(store), "--source", str(records)])
    dist.barrier()
    dm_features = hydra.utils.instantiate(cfg.data, features_dir=str(store) if mode == "guarded" else None)
    dm_features.setup("fit")

    def batch(records, features=False):
        d = dm_features if features else dm
        return d.collator([d.dataset_builder(dict(r)) for r in records])

    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    module.build_models(load_weights=True)
    ref = hydra.utils.instantiate(cfg.stage, _convert_="all")
    ref.build_models(load_weights=True)  # same init_seed: identical start, never sharded
    blocks = block_classes(list(module.fsdp_blocks))
    for child in module.children():
        parallelize(child, blocks, mesh, FSDP2Options())
    module.train()
    ref.train()

    calls: dict[str, int] = {}
    out_grad: list[float] = []

    def count(name):
        def hook(mod, args, output):
            calls[name] = calls.get(name, 0) + 1
            if name == "output_resampler" and output.requires_grad:
                output.register_hook(lambda g: out_grad.append(float(g.abs().max())))
        return hook

    module.vit.register_forward_hook(count("vit"))
    module.mllm.input_resampler.register_forward_hook(count("input_resampler"))
    module.mllm.output_resampler.register_forward_hook(count("output_resampler"))

    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    ref_params = dict(ref.named_parameters())
    opt = torch.optim.SGD([p for _, p in params], lr=LR)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR)

    from src.utils.materialize import clean_name

    for step, (*per_rank, features) in enumerate(STEPS):
        calls.clear()
        out_grad.clear()
        mine = batch(per_rank[rank], features)
        losses = module.compute_losses(mine, "train")
        losses["loss"].backward()
        opt.step()
        opt.zero_grad()

        ref_loss = sum(ref.compute_losses(batch(r, features), "train")["loss"] for r in per_rank) / world
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()

        worst, checksum = 0.0, 0.0
        for name, p in params:  # same order on every rank: full_tensor() is a collective
            full = p.full_tensor().detach()
            checksum += float(full.double().sum())
            worst = max(worst, float((full - ref_params[clean_name(name)].detach()).abs().max()))
        sums = [None] * world
        dist.all_gather_object(sums, checksum)
        report = {
            "rank": rank, "step": step, "loss": float(losses["loss"]), "loss_mse": float(losses["loss_mse"]),
            "has_gen": bool(mine["embeds_gen_mask"].any()), "has_cmp": bool(mine["embeds_cmp_mask"].any()),
            "views": int(mine["vit_features" if features else "vit_pixels"].shape[0]), "features": features,
            "calls": dict(calls), "out_grad": out_grad[:],
            "max_diff_vs_reference": worst, "checksums": sums,
        }
        print("REPORT " + json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launcher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(mode: str, out: Path, timeout: float) -> tuple[list[int | None], list[dict], str]:
    """Both ranks as subprocesses; past `timeout` both are killed (a hang fails instead of blocking CI)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_rank_divergence", str(r), "2", str(port), mode,
                               str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in range(2)]
    deadline = time.monotonic() + timeout
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            outputs.append(p.communicate()[0] + "\n[killed: timeout]")
    for p in procs:  # the first rank may have finished, the other been killed
        if p.poll() is None:
            p.kill()
            p.wait()
    reports = [json.loads(line[len("REPORT "):]) for text in outputs for line in text.splitlines()
               if line.startswith("REPORT ")]
    return [p.returncode for p in procs], reports, "\n".join(outputs)


pytestmark = pytest.mark.smoke


def test_rank_divergent_modalities_step_in_lockstep(tmp_path):
    rcs, reports, log = run_two_ranks("guarded", tmp_path, timeout=240)
    assert rcs == [0, 0], log[-4000:]
    by = {(r["rank"], r["step"]): r for r in reports}
    assert len(by) == 2 * len(STEPS), log[-4000:]
    # The divergence the steps are meant to create really happens.
    assert by[0, 0]["has_gen"] and not by[1, 0]["has_gen"]
    assert not by[0, 1]["has_cmp"] and by[1, 1]["has_cmp"]
    assert by[1, 2]["views"] == 0 and by[0, 2]["views"] > 2
    for step in range(len(STEPS)):
        a, b = by[0, step], by[1, step]
        for r in (a, b):
            assert r["loss"] == r["loss"] and abs(r["loss"]) < 1e4, r  # finite
            # Every sharded module ran on every rank (dummy passes where the batch has nothing for it).
            assert r["calls"].get("input_resampler", 0) >= 1 and r["calls"].get("output_resampler", 0) >= 1, r
            assert r["max_diff_vs_reference"] < 1e-5, r
        assert a["calls"].get("vit", 0) == b["calls"].get("vit", 0), (a["calls"], b["calls"])
        assert a["checksums"] == b["checksums"]
    # Rank 1 has no generated image in step 0: its output resampler ran on the dummy, gradient exactly zero.
    assert by[1, 0]["out_grad"] and max(by[1, 0]["out_grad"]) == 0.0
    assert by[0, 0]["out_grad"] and max(by[0, 0]["out_grad"]) > 0.0
    # Rank 1 has no image at all in step 2; the ViT still ran as often as on rank 0 (dummy views).
    assert by[1, 2]["calls"]["vit"] == by[0, 2]["calls"]["vit"] >= 2
    # From precomputed features the ViT runs nowhere; everything else as with pixels.
    assert by[0, 3]["features"] and by[0, 3]["views"] == by[0, 0]["views"] and "vit" not in by[0, 3]["calls"]
    assert by[1, 3]["out_grad"] == [0.0] and max(by[0, 3]["out_grad"]) > 0.0


@pytest.mark.slow  # subprocess runs (~30 s each here); CI runs the slow tier
def test_without_the_vit_guard_the_same_steps_fail(tmp_path):
    rcs, reports, log = run_two_ranks("no_vit_guard", tmp_path, timeout=150)
    ok = rcs == [0, 0] and len(reports) == 2 * len(STEPS) and all(
        r["max_diff_vs_reference"] < 1e-5 for r in reports)
    assert not ok, "unequal sharded-ViT calls across ranks went unnoticed:\n" + log[-3000:]
    assert not any(r["step"] >= 1 for r in reports), reports  # step 1: rank 0 has 1 ViT chunk, rank 1 has 2


if __name__ == "__main__":
    rank_, world_, port_, mode_, out_ = sys.argv[1:6]
    worker(int(rank_), int(world_), int(port_), mode_, out_)
