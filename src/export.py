"""`python -m src.export ckpt_path=<.ckpt|sharded dir> out=DIR [detok_ckpt_path=<.ckpt>] [base=PATH]
[dtype=bf16|fp16|fp32]`: trained weights in the formats people load, no code of ours needed to read them.
A Hydra app (conf/export.yaml, typed by ExportConfig below; `--help` lists the outputs):

    DIR/llm/          merged Hugging Face Llama (safetensors, config with pad_token_id, a clean tokenizer with
                      the SEED-X tokens and chat template): `AutoModelForCausalLM.from_pretrained(DIR/llm)`,
                      `AutoTokenizer.from_pretrained(DIR/llm).apply_chat_template(messages)`
    DIR/lora/         PEFT adapter (LoRA + the trained embeddings, norms and lm_head as modules_to_save):
                      `AutoPeftModelForCausalLM.from_pretrained(DIR/lora)`. Its recorded base
                      (`base_model_name_or_path`, absolute) is `base=` when given, else the Llama folder it was
                      trained on (`model.llm.weights`; an SFT from an exported folder: that folder's llm/), else
                      (random init, or an SFT whose base is the pre-trained SEED-X with its LoRA merged) DIR/base/,
                      written here. Never DIR/llm/: the LoRA is already folded into it. With
                      stage.pretrain_lora=keep there is no lora/ (two stacked adapters).
    DIR/agent/model.safetensors   input/output resamplers + patch_pos_embed, official key names
    DIR/vit/model.safetensors     the ViT, official (Qwen-VL visual) key names
    DIR/detokenizer/  a diffusers pipeline folder (model_index.json, unet/, vae/, scheduler/; no text encoders):
                      `DiffusionPipeline.from_pretrained(DIR/detokenizer)` gives a StableDiffusionXLPipeline
                      (stage 1) or a StableDiffusionXLInstructPix2PixPipeline (stage 2: conv_in takes 8
                      channels); beside it adapter/ (model.safetensors `resampler.*`, config.json, and
                      negative.safetensors: the unconditional branch's features and its embeddings)

`official=true` also writes the official SEED-X layout under DIR/official/ (src/export_official.py).
A SEED tokenizer or SEED-LLaMA checkpoint is exported by src/export_seed.py (DIR/seed_tokenizer/model.safetensors
with the released key names; DIR/llm/ + DIR/lora/ with `chat_format=vicuna|llama2`'s chat template).
`dtype` (default bf16, the released SEED-X checkpoints' precision) is the stored precision of every weight but
the VAE, which stays fp32 (SDXL's VAE overflows in fp16); merges happen in fp32 before the cast.

The stage is rebuilt from the checkpoint's own hyper-parameters (what it was trained with).
`python -m src.generate ... exported=DIR` loads the folder as it loads official weights.
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from safetensors.torch import save_file

from src import export_official, export_seed
from src.data.mllm_sequence import CHAT_FORMATS, ChatFormat
from src.models.mllm import AGENT_KEY_PREFIXES
from src.specs.inference import build_detokenizer, build_mllm, checkpoint_hparams, detok_stage_of
from src.utils.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

# What SEED-X pre-training trains besides LoRA (MLLMPretrainModule / apply_lora): peft matches these as
# suffixes of module names, so "norm" covers every RMSNorm.
TRAINED_BASE_MODULES = ["embed_tokens", "lm_head", "norm"]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# what a tokenizer loaded from a local folder carries in its init kwargs; a saved one must not pin a reader to it
LOADING_KWARGS = ("local_files_only", "is_local", "cache_dir", "_commit_hash", "token", "revision")


def _contiguous(state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}


def chat_template(fmt: ChatFormat = CHAT_FORMATS["llama2"]) -> str:
    """A Jinja chat template that renders a conversation as SeedXSequenceBuilder lays it out (text only), so that
    tokenising the rendered text gives the builder's ids: BOS; per turn: user `{prefix}{content}{suffix}` (after
    the turn separator when a turn came before), assistant its content, system its content + suffix; EOS at the
    end unless `add_generation_prompt` (the builder's `prompt()`: the model continues after the last turn).

    The builder encodes each run of turns with the same supervision on its own (as the official SEED-X does), and
    a Llama (SentencePiece) tokenizer starts every separately encoded text with a word boundary: so a space opens
    the first turn and every switch between assistant and non-assistant turns. Image content has no text form
    (use src.generate)."""
    lit = json.dumps  # a JSON string literal is a valid Jinja one (same escapes)
    return (
        "{{ bos_token }}{% set ns = namespace(seen=false, last=none) %}"
        "{% for message in messages %}"
        "{% if message['content'] is string %}{% set content = message['content'] %}"
        "{% else %}{% set content = namespace(text='') %}"
        "{% for part in message['content'] %}"
        "{% if part['type'] != 'text' %}{{ raise_exception('SEED-X chat template: only text content (images need "
        "src.generate)') }}{% endif %}{% set content.text = content.text + part['text'] %}"
        "{% endfor %}{% set content = content.text %}{% endif %}"
        "{% set supervised = message['role'] == 'assistant' %}"
        "{% if ns.last is none or ns.last != supervised %}{{ ' ' }}{% endif %}{% set ns.last = supervised %}"
        "{% if message['role'] == 'user' %}"
        f"{{% if ns.seen %}}{{{{ {lit(fmt.turn_sep)} }}}}{{% endif %}}"
        f"{{{{ {lit(fmt.user_prefix)} + content + {lit(fmt.user_suffix)} }}}}{{% set ns.seen = true %}}"
        "{% elif message['role'] == 'assistant' %}{{ content }}{% set ns.seen = true %}"
        f"{{% elif message['role'] == 'system' %}}{{{{ content + {lit(fmt.system_suffix)} }}}}"
        "{% else %}{{ raise_exception('SEED-X chat template: roles are user, assistant, system') }}{% endif %}"
        "{% endfor %}{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    )


def save_tokenizer(tokenizer, folder: Path, fmt: ChatFormat = CHAT_FORMATS["llama2"]) -> None:
    """The tokenizer as anyone loads it: no local-loading flags, the chat template of `fmt`, a pad token."""
    tok = copy.deepcopy(tokenizer)
    for key in LOADING_KWARGS:
        tok.init_kwargs.pop(key, None)
    tok.chat_template = chat_template(fmt)
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    tok.save_pretrained(str(folder))


def merged_llm(llm: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with LoRA folded into the weights (a copy: `llm` is untouched)."""
    from peft import PeftModel

    llm = copy.deepcopy(llm)
    return llm.merge_and_unload() if isinstance(llm, PeftModel) else llm


def export_adapter(llm, out: Path, base_path: str, dtype: torch.dtype) -> None:
    """The trained LoRA as a standard PEFT adapter on `base_path`; the fully trained base modules go in as
    modules_to_save."""
    from peft import LoraConfig, get_peft_model

    trained = llm.peft_config["default"]
    base = copy.deepcopy(llm).unload()  # LoRA removed, not merged: the base with the trained norms/embeddings
    config = LoraConfig(r=trained.r, lora_alpha=trained.lora_alpha, lora_dropout=trained.lora_dropout,
                        target_modules=sorted(trained.target_modules), modules_to_save=TRAINED_BASE_MODULES,
                        task_type="CAUSAL_LM")
    adapter = get_peft_model(base, config)
    adapter.peft_config["default"].base_model_name_or_path = base_path  # get_peft_model sets the model's own name
    own = dict(llm.named_parameters())
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if ".lora_" in name:
                p.copy_(own[name])
    adapter.to(dtype).save_pretrained(str(out))


def adapter_base(stage, out: Path, base: str | None, dtype: torch.dtype) -> str:
    """Where the adapter's base lives (see the module docstring); writes `out/base/` when it is nowhere on disk."""
    if base:
        return base
    cfg = stage.llm_cfg
    on_plain_weights = not getattr(stage, "init_from", None) or getattr(stage, "init_from_export", False)
    if on_plain_weights and cfg.weights and not cfg.adapter and Path(cfg.weights).is_dir():
        return str(Path(cfg.weights).resolve())
    # Random init, or the pre-trained SEED-X with its LoRA merged (SFT): the LLM with the LoRA taken out is it
    # (its frozen weights; embeddings, norms and lm_head are replaced by the adapter's modules_to_save anyway).
    folder = out / "base"
    plain = copy.deepcopy(stage.mllm.llm).unload()
    _with_pad_token(plain, stage.tokenizer).to(dtype).save_pretrained(str(folder), safe_serialization=True)
    save_tokenizer(stage.tokenizer, folder)
    return str(folder.resolve())


def _with_pad_token(model, tokenizer):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    model.config.pad_token_id = pad
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad
    return model


def export_mllm(stage, out: Path, dtype: torch.dtype = torch.bfloat16, base: str | None = None,
                official: bool = False) -> None:
    from peft import PeftModel

    llm = stage.mllm.llm
    merged = _with_pad_token(merged_llm(llm), stage.tokenizer)  # merged in fp32, then cast
    merged.to(dtype).save_pretrained(str(out / "llm"), safe_serialization=True)
    save_tokenizer(stage.tokenizer, out / "llm")
    if isinstance(llm, PeftModel) and len(llm.peft_config) > 1:
        # SFT with stage.pretrain_lora=keep: two stacked adapters fold into llm/, but no single PEFT adapter
        # on the plain base holds both.
        log.warning("two stacked LoRA adapters (%s): no lora/ export; llm/ has both merged", sorted(llm.peft_config))
    elif isinstance(llm, PeftModel):
        base_path = adapter_base(stage, out, base, dtype)
        export_adapter(llm, out / "lora", base_path, dtype)
        save_tokenizer(stage.tokenizer, out / "lora")
        log.info("lora/: adapter on %s", base_path)
    agent = {k: v for k, v in stage.mllm.state_dict().items() if k.startswith(AGENT_KEY_PREFIXES)}
    (out / "agent").mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(agent, dtype), str(out / "agent" / "model.safetensors"))
    (out / "vit").mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(stage.vit.state_dict(), dtype), str(out / "vit" / "model.safetensors"))
    if official:
        export_official.write_mllm(out, agent, stage.vit.state_dict(), dtype)


@torch.no_grad()
def export_detokenizer(module, out: Path, dtype: torch.dtype = torch.bfloat16, official_root: Path | None = None) -> None:
    """A diffusers pipeline folder + our adapter beside it (module docstring). Casts `module` in place (it is
    not used after the export): a copy of a full-size UNet would double the memory."""
    from dataclasses import asdict

    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLInstructPix2PixPipeline,
        StableDiffusionXLPipeline,
    )

    conditional = module.unet.config.in_channels > module.vae.config.latent_channels  # stage 2: 4 + 4 channels
    negative = module.negative_features().float()
    neg_prompt, neg_pooled = module.resampler(negative.to(next(module.resampler.parameters()).dtype))
    cls = StableDiffusionXLInstructPix2PixPipeline if conditional else StableDiffusionXLPipeline
    # Euler: what src.generate samples with by default (sampling.sampler) and SDXL's own pipeline scheduler; the
    # betas are the training noise scheduler's.
    pipe = cls(vae=module.vae.float(), text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
               unet=module.unet if dtype == torch.float32 else module.unet.to(dtype), scheduler=EulerDiscreteScheduler.from_config(module.noise_scheduler.config),
               add_watermarker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    if official_root is not None:
        export_official.write_detokenizer(official_root, module, dtype)
    (out / "adapter").mkdir(parents=True, exist_ok=True)
    adapter = {f"resampler.{k}": v for k, v in module.resampler.state_dict().items()}
    save_file(_contiguous(adapter, dtype), str(out / "adapter" / "model.safetensors"))
    cfg = {k: v for k, v in asdict(module.detok_cfg.adapter_cfg).items() if k != "weights"}
    (out / "adapter" / "config.json").write_text(json.dumps(
        {"class": "src.models.detok_adapter.ResamplerXLV2", **cfg, "resolution": module.detok_cfg.resolution,
         "negative": module.negative}, indent=1) + "\n")
    save_file(_contiguous({"features": negative, "prompt_embeds": neg_prompt, "pooled_prompt_embeds": neg_pooled}),
              str(out / "adapter" / "negative.safetensors"))


def export(ckpt_path: str | None, out: str | Path, detok_ckpt_path: str | None = None, *, base: str | None = None,
           dtype: str = "bf16", official: bool = False, chat_format: str = "llama2") -> Path:
    if not ckpt_path and not detok_ckpt_path:
        raise ValueError("give ckpt_path= (an MLLM checkpoint) and/or detok_ckpt_path= (a de-tokenizer one)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format={chat_format!r}: expected one of {', '.join(sorted(CHAT_FORMATS))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if ckpt_path:
        checkpoint = read_checkpoint(ckpt_path)
        hparams = checkpoint_hparams(checkpoint, ckpt_path)
        seed_kind = export_seed.seed_stage_of(hparams)  # SEED tokenizer / SEED-LLaMA: src/export_seed.py
        if seed_kind:
            export_seed.export_seed_stage(seed_kind, hparams, ckpt_path, checkpoint, out, DTYPES[dtype], base,
                                          chat_format)
        else:
            export_mllm(build_mllm(hparams, ckpt_path, checkpoint), out, DTYPES[dtype], base, official)
    if detok_ckpt_path:
        checkpoint = read_checkpoint(detok_ckpt_path, "detok_ckpt_path")
        hp = checkpoint_hparams(checkpoint, detok_ckpt_path, "detok_ckpt_path")
        module = build_detokenizer(hp["model"], detok_stage_of(checkpoint), detok_ckpt_path, checkpoint=checkpoint)
        export_detokenizer(module, out / "detokenizer", DTYPES[dtype], out if official else None)
    log.info("exported to %s", out)
    return out


@dataclass
class ExportConfig:
    """The typed fields of conf/export.yaml (its values and comments live there): a value of the wrong type
    (`official=maybe`) fails in Hydra's composition, naming the key, before any checkpoint is read."""

    out: str = MISSING
    ckpt_path: Optional[str] = None  # noqa: UP045  (OmegaConf reads typing.Optional, not `str | None`)
    detok_ckpt_path: Optional[str] = None  # noqa: UP045
    base: Optional[str] = None  # noqa: UP045
    dtype: str = "bf16"
    official: bool = False
    chat_format: str = "llama2"


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export.yaml")
def main(cfg: DictConfig) -> None:
    export(cfg.ckpt_path, cfg.out, cfg.detok_ckpt_path, base=cfg.base, dtype=cfg.dtype, official=cfg.official,
           chat_format=cfg.chat_format)


if __name__ == "__main__":
    main()
