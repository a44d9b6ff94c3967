"""`python -m src.export ckpt_path=<.ckpt|sharded dir> out=DIR [detok_ckpt_path=<.ckpt>]`: trained weights
in the formats people load, no code of ours needed to read them:

    DIR/llm/          merged Hugging Face Llama (safetensors, config, tokenizer with the SEED-X tokens):
                      `transformers.AutoModelForCausalLM.from_pretrained(DIR/llm)`
    DIR/lora/         PEFT adapter (LoRA + the trained embeddings, norms and lm_head as modules_to_save) for
                      the base Llama resized to the tokenizer: `peft.PeftModel.from_pretrained(base, DIR/lora)`;
                      for an SFT checkpoint the base is the pre-trained SEED-X's merged LLM (lora/BASE.md),
                      and with stage.pretrain_lora=keep there is no lora/ (two stacked adapters)
    DIR/agent/model.safetensors   input/output resamplers + patch_pos_embed, official key names
    DIR/vit/model.safetensors     the ViT, official (Qwen-VL visual) key names
    DIR/detokenizer/  diffusers folder (unet/, vae/, scheduler/) + adapter/model.safetensors (`resampler.*`)

The stage is rebuilt from the checkpoint's own hyper-parameters (what it was trained with).
`python -m src.generate ... exported=DIR` loads the folder as it loads official weights.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from safetensors.torch import save_file

from src.models.mllm import AGENT_KEY_PREFIXES
from src.stages.inference import (
    build_detokenizer,
    build_mllm,
    checkpoint_hparams,
    detok_stage_of,
    read_checkpoint,
)

log = logging.getLogger(__name__)

# What SEED-X pre-training trains besides LoRA (MLLMPretrainModule / apply_lora): peft matches these as
# suffixes of module names, so "norm" covers every RMSNorm.
TRAINED_BASE_MODULES = ["embed_tokens", "lm_head", "norm"]


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def merged_llm(llm: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with LoRA folded into the weights (a copy: `llm` is untouched)."""
    from peft import PeftModel

    llm = copy.deepcopy(llm)
    return llm.merge_and_unload() if isinstance(llm, PeftModel) else llm


def export_adapter(llm, out: Path) -> None:
    """The trained LoRA as a standard PEFT adapter; the fully trained base modules go in as modules_to_save."""
    from peft import LoraConfig, get_peft_model

    trained = llm.peft_config["default"]
    base = copy.deepcopy(llm).unload()  # LoRA removed, not merged: the base with the trained norms/embeddings
    config = LoraConfig(r=trained.r, lora_alpha=trained.lora_alpha, lora_dropout=trained.lora_dropout,
                        target_modules=sorted(trained.target_modules), modules_to_save=TRAINED_BASE_MODULES,
                        task_type="CAUSAL_LM")
    adapter = get_peft_model(base, config)
    own = dict(llm.named_parameters())
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".lora_" in name:
                p.copy_(own[name])
    adapter.save_pretrained(str(out))


def export_mllm(stage, out: Path) -> None:
    from peft import PeftModel

    llm = stage.mllm.llm
    merged = merged_llm(llm)
    merged.save_pretrained(str(out / "llm"), safe_serialization=True)
    stage.tokenizer.save_pretrained(str(out / "llm"))
    if isinstance(llm, PeftModel) and len(llm.peft_config) > 1:
        # SFT with stage.pretrain_lora=keep: two stacked adapters fold into llm/, but no single PEFT adapter
        # on the plain base holds both.
        log.warning("two stacked LoRA adapters (%s): no lora/ export; llm/ has both merged", sorted(llm.peft_config))
    elif isinstance(llm, PeftModel):
        export_adapter(llm, out / "lora")
        stage.tokenizer.save_pretrained(str(out / "lora"))
        init_from = getattr(stage, "init_from", None)
        if init_from:  # SFT: the adapter sits on the pre-trained SEED-X (its LoRA merged), not on plain Llama
            (out / "lora" / "BASE.md").write_text(
                f"This adapter was trained on the pre-trained SEED-X of `{init_from}` with its pre-training LoRA "
                f"merged into the base weights: apply it to that model's merged LLM (`python -m src.export "
                f"ckpt_path={init_from} out=BASE`, then BASE/llm), not to plain Llama-2.\n")
    agent = {k: v for k, v in stage.mllm.state_dict().items() if k.startswith(AGENT_KEY_PREFIXES)}
    (out / "agent").mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(agent), str(out / "agent" / "model.safetensors"))
    (out / "vit").mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(stage.vit.state_dict()), str(out / "vit" / "model.safetensors"))


def export_detokenizer(module, out: Path) -> None:
    """diffusers-style folder; stage 2's UNet is saved widened (conv_in 8 channels, its config says so)."""
    module.unet.save_pretrained(str(out / "unet"))
    module.vae.save_pretrained(str(out / "vae"))
    module.noise_scheduler.save_pretrained(str(out / "scheduler"))
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    adapter = {f"resampler.{k}": v for k, v in module.resampler.state_dict().items()}
    save_file(_contiguous(adapter), str(out / "adapter" / "model.safetensors"))


def export(ckpt_path: str | None, out: str | Path, detok_ckpt_path: str | None = None) -> Path:
    if not ckpt_path and not detok_ckpt_path:
        raise ValueError("give ckpt_path= (an MLLM checkpoint) and/or detok_ckpt_path= (a de-tokenizer one)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        export_mllm(build_mllm(checkpoint_hparams(checkpoint, ckpt_path), ckpt_path, checkpoint), out)
    if detok_ckpt_path:
        checkpoint = read_checkpoint(detok_ckpt_path, "detok_ckpt_path")
        hp = checkpoint_hparams(checkpoint, detok_ckpt_path, "detok_ckpt_path")
        module = build_detokenizer(hp["model"], detok_stage_of(hp), detok_ckpt_path, checkpoint=checkpoint)
        export_detokenizer(module, out / "detokenizer")
    log.info("exported to %s", out)
    return out


def main(argv: list[str]) -> None:
    args = {}
    for a in argv:
        key, eq, value = a.partition("=")
        if not eq or key not in ("ckpt_path", "out", "detok_ckpt_path"):
            raise SystemExit(f"usage: python -m src.export ckpt_path=<.ckpt|dir> out=DIR [detok_ckpt_path=<.ckpt>]"
                             f" (got {a!r})")
        args[key] = value
    if "out" not in args:
        raise SystemExit("out=DIR is required")
    logging.basicConfig(level=logging.INFO)
    export(args.get("ckpt_path"), args["out"], args.get("detok_ckpt_path"))


if __name__ == "__main__":
    main(sys.argv[1:])
