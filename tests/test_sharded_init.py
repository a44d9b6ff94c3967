"""Meta build -> FSDP2 shard -> fill each rank's shards from local files (src/utils/materialize.py).

Two gloo processes build the tiny MLLM stage on meta, shard it as `strategy=fsdp2` does, and fill only
their own shards from a saved HF folder (safetensors), a ViT `.pt` and the seeded random init of the
agent and LoRA. Gathered, every tensor must equal the single-process build; the LLM and ViT weights must
equal a plain load (`from_pretrained` + the SEED-X vocabulary init, `load_state_dict` of the `.pt`).
The de-tokenizer stages the same way: from a diffusers folder (UNet, VAE) and a ViT `.pt`, stage 2 also from a
stage-1 checkpoint whose 4-channel conv_in is widened on the fly; UNet and VAE equal diffusers' `from_pretrained`.

The worker runs as `python -m tests.test_sharded_init RANK WORLD PORT WEIGHTS OUT JOBS` (JOBS: JSON list of
[model, [overrides]]).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


EXPERIMENTS = {"mllm": "seedx_pretrain_tiny", "detok": "seedx_detok_pretrain_tiny", "detok_cond": "seedx_detok_cond_tiny"}


def weight_overrides(weights: Path, model: str = "mllm") -> list[str]:
    from src.bench_init import weight_overrides as saved

    return saved("detok" if model.startswith("detok") else model, weights)


def build_stage(weights: Path, model: str = "mllm", extra: list[str] = ()):
    import hydra

    cfg = compose_cfg(EXPERIMENTS[model], overrides=[*weight_overrides(weights, model), *extra])
    return hydra.utils.instantiate(cfg.stage, _convert_="all")


def run_ranks(weights: Path, out: Path, jobs: list[tuple[str, list[str]]]) -> list[dict]:
    """Two gloo ranks build each job's model (name, extra overrides) sharded from `weights`, one after the other
    in the same two processes; per job, rank 0's gathered parameters and its local count."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_sharded_init", str(r), "2", str(port),
                               str(weights), str(out), json.dumps(jobs)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(f"{out}.{i}", weights_only=True) for i in range(len(jobs))]


def assert_equals_single_process(gathered: dict, single) -> dict:
    sharded, own = gathered["state"], dict(single.named_parameters())
    assert sharded.keys() == own.keys()
    for name, value in own.items():
        assert torch.equal(sharded[name], value.detach()), name
        assert sharded[name].dtype == value.dtype, name
    # Each rank held about half of the model, never all of it.
    assert gathered["local_numel"] <= 0.55 * sum(v.numel() for v in own.values())
    return own


# ------------------------------------------------------------------------------------------------ worker
def worker(rank: int, world: int, port: int, weights: str, out: str, jobs: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.parallel import FSDP2Options
    from src.utils.materialize import materialize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    for i, (model, extra) in enumerate(json.loads(jobs)):
        module = build_stage(Path(weights), model, extra)
        module.build_empty(load_weights=True)
        module.shard(FSDP2Options(), mesh)
        assert all(p.is_meta for p in module.parameters())
        materialize(module, module.weight_sources(load_weights=True), "cpu")
        local = sum(p.to_local().numel() for p in module.parameters())
        full = {}
        for name, p in module.named_parameters():
            full[name.replace("_checkpoint_wrapped_module.", "")] = p.full_tensor().clone()
        if rank == 0:
            torch.save({"state": full, "local_numel": local}, f"{out}.{i}")
        dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """The tiny twin's Llama saved as an HF folder (safetensors) and its ViT as a `.pt` (what make bench saves
    at the 1b size)."""
    from src.bench_init import save_weights

    root = tmp_path_factory.mktemp("weights")
    save_weights("tiny", root)
    return root


def test_sharded_fill_equals_single_process_and_plain_loads(saved_weights, tmp_path):
    gathered, = run_ranks(saved_weights, tmp_path / "gathered", [("mllm", [])])
    single = build_stage(saved_weights)
    single.build_models(load_weights=True)
    assert_equals_single_process(gathered, single)

    # Plain loads: HF from_pretrained + the SEED-X rows, and the ViT state dict.
    from transformers import LlamaForCausalLM

    from src.models.vocab import init_new_embeddings

    plain = LlamaForCausalLM.from_pretrained(saved_weights / "llm", local_files_only=True, dtype=torch.float32)
    old = plain.get_input_embeddings().weight.shape[0]
    plain.resize_token_embeddings(len(single.tokenizer), mean_resizing=False)
    init_new_embeddings(plain, old)
    llm = {n.removeprefix("base_model.model.").replace(".base_layer.", "."): p
           for n, p in single.mllm.llm.named_parameters() if "lora_" not in n}
    plain_state = plain.state_dict()
    assert llm.keys() <= plain_state.keys()
    for name, p in llm.items():
        assert torch.equal(p.detach(), plain_state[name]), name
    vit = torch.load(saved_weights / "vit.pt", weights_only=True)
    for name, p in single.vit.named_parameters():
        assert torch.equal(p.detach(), vit[name]), name


def test_random_towers_do_not_depend_on_each_other(saved_weights):
    """Each random-init tower has its own seed: dropping LoRA does not change the resamplers' init."""
    import hydra

    a = build_stage(saved_weights)
    a.build_models()
    cfg = compose_cfg("seedx_pretrain_tiny", overrides=[*weight_overrides(saved_weights), "stage.lora.enabled=false",
                                                        "stage.full_finetune=true"])
    b = hydra.utils.instantiate(cfg.stage, _convert_="all")
    b.build_models()
    for name, p in a.mllm.input_resampler.named_parameters():
        assert torch.equal(p, dict(b.mllm.input_resampler.named_parameters())[name]), name
    assert torch.equal(a.mllm.patch_pos_embed, b.mllm.patch_pos_embed)


def test_sources_that_do_not_fit_are_named_all_at_once():
    from torch import nn

    from src.utils.materialize import HeldTensor, materialize

    with torch.device("meta"):
        m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sources = {"0.weight": HeldTensor(torch.zeros(3, 5)), "1.weight": HeldTensor(torch.zeros(2, 3)),
               "1.bias": HeldTensor(torch.zeros(2)), "2.weight": HeldTensor(torch.zeros(1))}
    with pytest.raises(ValueError) as err:
        materialize(m, sources, "cpu", "toy")
    msg = str(err.value)
    assert "missing (1): 0.bias" in msg and "unexpected (1): 2.weight" in msg
    assert "0.weight: source (3, 5) != model (3, 4)" in msg


def test_extended_rows_give_the_seedx_vocabulary_init():
    from torch import nn

    from src.models.vocab import init_new_embeddings
    from src.utils.materialize import ExtendedRows, HeldTensor

    torch.manual_seed(0)
    emb, head = torch.randn(10, 6, dtype=torch.float16), torch.randn(10, 6, dtype=torch.float16)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.out = nn.Embedding(13, 6), nn.Linear(6, 13, bias=False)

        def get_input_embeddings(self):
            return self.inp

        def get_output_embeddings(self):
            return self.out

    toy = Toy()
    with torch.no_grad():
        toy.inp.weight[:10], toy.out.weight[:10] = emb.float(), head.float()
    init_new_embeddings(toy, 10)
    inp = ExtendedRows(HeldTensor(emb), 13, 1.0, torch.float32)
    out = ExtendedRows(HeldTensor(head), 13, 3.0, torch.float32)
    assert torch.equal(torch.cat([inp.rows(0, 7), inp.rows(7, 13)]), toy.inp.weight.detach())
    assert torch.equal(out.rows(9, 13), toy.out.weight.detach()[9:])


@pytest.fixture(scope="module")
def saved_detok_weights(tmp_path_factory):
    """The tiny de-tokenizer's UNet and VAE as a diffusers folder and its ViT as a `.pt` (make bench saves the
    sdxl_reduced size)."""
    from src.bench_init import save_weights

    root = tmp_path_factory.mktemp("detok_weights")
    save_weights("tiny", root, "detok")
    return root


def test_detokenizer_stages_fill_their_shards_from_a_diffusers_folder(saved_detok_weights, tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = saved_detok_weights
    single = build_stage(root, "detok")
    single.build_models(load_weights=True)
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        plain = cls.from_pretrained(root / "sdxl", subfolder=name, local_files_only=True).state_dict()
        for key, p in getattr(single, name).named_parameters():
            assert torch.equal(p.detach(), plain[key]), (name, key)

    # Stage 2 from a stage-1 checkpoint (adapter + UNet to_k, 4-channel conv_in): widened where each rank fills
    # its rows; the new input channels zero, the checkpoint's tensors over the SDXL folder's.
    torch.manual_seed(0)
    trained = {k: v + torch.randn_like(v) for k, v in single.state_dict().items()
               if k.startswith(("resampler.", "unet.conv_in.")) or (k.startswith("unet.") and ".to_k." in k)}
    torch.save({"state_dict": trained}, tmp_path / "stage1.ckpt")
    extra = [f"model.detokenizer.adapter_weights={tmp_path / 'stage1.ckpt'}"]
    stage1, stage2 = run_ranks(root, tmp_path / "gathered", [("detok", []), ("detok_cond", extra)])
    assert_equals_single_process(stage1, single)
    cond = build_stage(root, "detok_cond", extra)
    cond.build_models(load_weights=True)
    own = assert_equals_single_process(stage2, cond)
    conv = own["unet.conv_in.weight"].detach()
    assert conv.shape[1] == 8 and torch.equal(conv[:, :4], trained["unet.conv_in.weight"]) and not conv[:, 4:].any()
    for key, value in trained.items():
        if key != "unet.conv_in.weight":
            assert torch.equal(own[key].detach(), value), key
    assert torch.equal(own["unet.conv_out.weight"].detach(), single.unet.conv_out.weight.detach())


def test_adapter_checkpoint_missing_adapter_keys_is_named(saved_detok_weights, tmp_path):
    torch.save({"state_dict": {"unet.conv_out.bias": torch.zeros(4)}}, tmp_path / "partial.ckpt")
    stage = build_stage(saved_detok_weights, "detok", [f"model.detokenizer.adapter_weights={tmp_path / 'partial.ckpt'}"])
    with pytest.raises(ValueError, match=r"does not match the de-tokenizer:\n  missing \(\d+\): resampler\."):
        stage.build_models(load_weights=True)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
