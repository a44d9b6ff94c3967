"""`python -m src.export ... official=true`: also the official SEED-X file layout (AILab-CVC/SEED-X, its
`pretrained/` folder), so a model trained here runs in the official inference scripts unchanged:

    DIR/official/seed_x/agent/pytorch_model.bin   input/output resamplers + patch_pos_embed (agent_seed_x*.yaml:
                                                  `pretrained_model_path`)
    DIR/official/seed_x/llm -> ../../llm          the merged LLM (llm_seed_x*.yaml: `pretrained_model_name_or_path`)
    DIR/official/QwenViT/qwen_vit_G.pt            the ViT (qwen_vitg_448.yaml)
    DIR/official/cvlm_llama2_tokenizer_100img_and_224loc_addpatch -> ../llm   our tokenizer (clm_llama_tokenizer_
                                                  224loc_anyres.yaml): its SEED-X token ids are ours, not the
                                                  official tokenizer's
    DIR/official/seed_detokenizer/first_stage/pytorch_model.bin    SDXLAdapter: `resampler.*` + the trained
                                                  `unet.*to_k/to_v` (stage 1)
    DIR/official/seed_detokenizer/second_stage/pytorch_model.bin   SDXLAdapterWithLatentImage (full_ft): `resampler.*`
                                                  + the whole UNet as `unet.*`, conv_in with its 8 input channels

The official scripts `torch.load` these (plain tensors, so `weights_only=True` reads them too). Stage 2: the official
constructor widens the UNet it is given from 4 to 8 input channels and then loads the checkpoint, so its
`diffusion_model_path` stays the plain SDXL base (a 4-channel UNet) and every stage-2 weight comes from
second_stage/pytorch_model.bin; our diffusers export (detokenizer/, already 8 channels) would be widened twice.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

OFFICIAL = "official"


def _save(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                for k, v in state.items()}, path)


def write_mllm(out: Path, agent: dict[str, torch.Tensor], vit: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    root = out / OFFICIAL
    _save(agent, root / "seed_x" / "agent" / "pytorch_model.bin", dtype)
    _save(vit, root / "QwenViT" / "qwen_vit_G.pt", dtype)
    for link in (root / "seed_x" / "llm", root / "cvlm_llama2_tokenizer_100img_and_224loc_addpatch"):
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(out / "llm", link.parent), link)  # relative: the folder can move; no 2nd copy


def write_detokenizer(out: Path, module, dtype: torch.dtype) -> Path:
    """The official checkpoint of a de-tokenizer stage module (stage 2 when its UNet takes a condition latent)."""
    conditional = module.unet.config.in_channels > module.vae.config.latent_channels
    state = {f"resampler.{k}": v for k, v in module.resampler.state_dict().items()}
    for k, v in module.unet.state_dict().items():
        # stage 2 trains the whole UNet (full_ft); stage 1 its attention to_k / to_v (what SDXLAdapter trains)
        if conditional or k.rsplit(".", 2)[-2] in ("to_k", "to_v"):
            state[f"unet.{k}"] = v
    path = out / OFFICIAL / "seed_detokenizer" / ("second_stage" if conditional else "first_stage") / "pytorch_model.bin"
    _save(state, path, dtype)
    return path
