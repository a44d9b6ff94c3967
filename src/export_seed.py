"""`python -m src.export ckpt_path=<a SEED checkpoint> out=DIR`: the SEED stages in the formats the released code
and Hugging Face read (src/export.py dispatches here by the checkpoint's hyper-parameters).

    DIR/seed_tokenizer/model.safetensors   a seed_tokenizer_v1/v2 checkpoint: every tokenizer tensor (EVA ViT as
                      `visual_encoder.*`, `ln_vision`, `query_tokens`, `Qformer.bert.*`, `quantize`, task layers,
                      decoder branches and head) under the released names (`Blip2QformerQuantizer`'s state dict,
                      data_prep/convert_seed_tokenizer.py's map read backwards); the file's metadata holds the
                      stage hyper-parameters (`seed_tokenizer_hparams`, JSON). The frozen CLIP-H target encoder
                      (training only) is not exported. `python -m data_prep.convert_seed_tokenizer --quantizer
                      DIR/seed_tokenizer/model.safetensors` reads it back.
    DIR/llm/, DIR/lora/   a seed_llama_* checkpoint: the merged HF Llama with its tokenizer (the SEED-LLaMA tokens,
                      a chat template of `chat_format`: vicuna for the 8B `USER: ...\\nASSISTANT:`, llama2 for
                      the 14B `[INST]`), and the PEFT adapter (LoRA + embeddings, norms, lm_head as
                      modules_to_save) on its base, as src.export writes SEED-X's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

SEED_TOKENIZER_FILE = "seed_tokenizer/model.safetensors"
HPARAMS_KEY = "seed_tokenizer_hparams"


def seed_stage_of(hparams: dict) -> str | None:
    """`seed_tokenizer` / `seed_llama` for those stages' hyper-parameters, None for any other (SEED-X)."""
    model = hparams.get("model") or {}
    if "seed_codec" in model:
        return "seed_tokenizer"
    if set(model) == {"llm"}:
        return "seed_llama"
    return None


def seed_tokenizer_state(module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tokenizer's tensors under the released names (no training-only target encoder)."""
    from data_prep.convert_seed_tokenizer import ours_to_official

    state = {}
    for key, value in module.state_dict().items():
        if key.startswith("target."):
            continue
        name = ours_to_official(key)
        if name in state:
            raise ValueError(f"two tensors map to the released name {name!r}")
        value = value.detach().cpu()
        state[name] = (value.to(dtype) if value.is_floating_point() else value).contiguous()
    return state


def export_seed_tokenizer(module, hparams: dict, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    path = out / SEED_TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    hp = {k: v for k, v in hparams.items() if k != "optimizer"}
    save_file(seed_tokenizer_state(module, dtype), str(path), metadata={HPARAMS_KEY: json.dumps(hp)})
    log.info("%s: the SEED tokenizer under the released key names", path)
    return path


def export_seed_llama(stage, out: Path, dtype: torch.dtype = torch.bfloat16, base: str | None = None,
                      chat_format: str = "llama2") -> None:
    """HF folder llm/ (LoRA merged) + PEFT adapter lora/, with the SEED-X export's helpers."""
    from peft import PeftModel

    from src.data.mllm_sequence import CHAT_FORMATS
    from src.export import _with_pad_token, adapter_base, export_adapter, merged_llm, save_tokenizer

    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format={chat_format!r}: expected one of {sorted(CHAT_FORMATS)}")
    fmt = CHAT_FORMATS[chat_format]
    llm = stage.mllm.llm
    merged = _with_pad_token(merged_llm(llm), stage.tokenizer)  # merged in fp32, then cast
    merged.to(dtype).save_pretrained(str(out / "llm"), safe_serialization=True)
    save_tokenizer(stage.tokenizer, out / "llm", fmt)
    if isinstance(llm, PeftModel) and len(llm.peft_config) > 1:
        log.warning("two stacked LoRA adapters (%s): no lora/ export; llm/ has both merged", sorted(llm.peft_config))
    elif isinstance(llm, PeftModel):
        base_path = adapter_base(stage, out, base, dtype)
        export_adapter(llm, out / "lora", base_path, dtype)
        save_tokenizer(stage.tokenizer, out / "lora", fmt)
        log.info("lora/: adapter on %s", base_path)


def export_seed_stage(kind: str, hparams: dict, ckpt_path: str, checkpoint: dict, out: Path, dtype: torch.dtype,
                      base: str | None = None, chat_format: str = "llama2") -> None:
    """Rebuild the SEED stage from the checkpoint's own hyper-parameters and export it."""
    from src.specs.inference import build_seed_llama
    from src.specs.seed_tokenizer import SEED_TOKENIZER

    if kind == "seed_tokenizer":
        module = SEED_TOKENIZER.build("stage2", hparams, ckpt_path, checkpoint)
        export_seed_tokenizer(module, hparams, out, dtype)
        return
    export_seed_llama(build_seed_llama(hparams, ckpt_path, checkpoint), out, dtype, base, chat_format)
