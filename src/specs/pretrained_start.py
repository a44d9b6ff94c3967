"""Start a model from a pre-trained checkpoint of the same model family (`stage.init_from`), for SFT stages.

A recipe mixin (src/specs/base.py) in front of a recipe that builds `self.mllm.llm` empty (`builds_empty`) and
fills it from `weight_sources` (SEED-X's `SeedXRecipe`, SEED-LLaMA's `SeedLlamaRecipe`). The checkpoint's trained
tensors replace the initial ones; its LoRA is, by `stage.pretrain_lora`, folded into the frozen base weights
(`merge`, default: W + B·A·α/r, row by row) under a fresh task LoRA, or kept as a second frozen adapter that
stays active under the task adapter (`keep`). Towers not in the checkpoint (frozen ViT, LLM base) come from
the experiment's weight paths, or for random-init tiny twins from the checkpoint's own `init_seed`, so they
equal what it was trained on. All of this happens in `weight_sources`, so under FSDP2 each rank still reads
only its shards; a resume rebuilds the same start and then loads the run's own checkpoint over it.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from src.models.mllm import LORA_TARGETS, hf_key
from src.utils.checkpoint import checkpoint_tensors, read_checkpoint
from src.utils.materialize import HeldTensor, TensorSource, empty_init
from src.utils.weights import RequiredPath

log = logging.getLogger(__name__)

PRETRAIN_LORA_MODES = ("merge", "keep")
PRETRAIN_ADAPTER = "pretrain"  # peft adapter name of the kept pre-training LoRA (the task's is "default")


class MergedLoRA(TensorSource):
    """A base weight with a LoRA folded in, row by row: ``W[rows] + scale * B[rows] @ A`` (fp32, then W's dtype)."""

    def __init__(self, base: TensorSource, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        if tuple(lora_b.shape[:1]) + tuple(lora_a.shape[1:]) != tuple(base.shape):
            raise ValueError(f"LoRA B{tuple(lora_b.shape)} @ A{tuple(lora_a.shape)} does not fit a weight of "
                             f"shape {tuple(base.shape)}")
        self.base, self.a, self.b, self.scale = base, lora_a, lora_b, float(scale)
        self.shape = tuple(base.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        w = self.base.rows(start, stop)
        delta = self.b[start:stop].float() @ self.a.float()
        return (w.float() + self.scale * delta).to(w.dtype)


def _lora_parts(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{HF module path (`model.layers.0.self_attn.q_proj`): {"A": .., "B": ..}} of a checkpoint's LLM LoRA."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if not k.startswith("mllm.llm.") or ".lora_" not in k:
            continue
        name = k.removeprefix("mllm.llm.").removeprefix("base_model.model.")
        module, _, rest = name.partition(".lora_")
        out.setdefault(module, {})[rest[0]] = v  # rest: "A.default.weight"
    return out


def sft_if_started(hparams: dict) -> str:
    """Legacy path (no `stage_name` in the checkpoint): an SFT stage is the one trained from a start."""
    return "sft" if "init_from" in hparams else "pretrain"


class PretrainedStart:
    # What `stage.init_from` takes, for the missing-path message.
    init_from_what = "a pre-training checkpoint of this model (.ckpt or sharded dir)"

    def configure_start(self, init_from: str | None = None, pretrain_lora: Literal["merge", "keep"] = "merge") -> None:
        """After the family's own configs are parsed (stage.pretrain_lora is validated with the stage's node): where
        the weights start."""
        self.init_from = init_from
        self.pretrain_lora = pretrain_lora
        self._pretrained: tuple[dict, dict[str, torch.Tensor]] | None = None
        self.init_from_export = False  # an exported folder (SEED-X): its parts become the weight paths

    def required_paths(self) -> list[RequiredPath]:
        own = RequiredPath("stage.init_from", self.init_from_what, self.init_from, "file", required=False)
        return [*super().required_paths(), own]

    def check_checkpoint(self, checkpoint: dict) -> None:
        # A lean SFT checkpoint holds what trained, not the merged base it trained on: loading it over a model
        # built from another start would be silently wrong.
        hp = checkpoint.get("hyper_parameters") or {}
        if hp.get("init_from") and not self.init_from:
            raise RuntimeError(f"this SFT checkpoint was trained from stage.init_from={hp['init_from']!r}; set it "
                               f"(the frozen base is rebuilt from there)")
        if hp.get("init_from") and hp.get("pretrain_lora", "merge") != self.pretrain_lora:
            raise RuntimeError(f"this SFT checkpoint was trained with stage.pretrain_lora={hp.get('pretrain_lora')}, "
                               f"not {self.pretrain_lora}")
        super().check_checkpoint(checkpoint)

    # ---- the pre-trained start ----------------------------------------------------------------------------
    def pretrained(self) -> tuple[dict, dict[str, torch.Tensor]] | None:
        """(hyper-parameters, tensors) of the `stage.init_from` checkpoint, read once; None without one (no
        init_from, or an exported folder: its parts are already the weight paths)."""
        if self.init_from is None or self.init_from_export:
            return None
        if self._pretrained is None:
            checkpoint = read_checkpoint(self.init_from, "stage.init_from")
            hp = dict(checkpoint.get("hyper_parameters") or {})
            if "lora" not in hp or "model" not in hp:
                raise ValueError(f"stage.init_from={self.init_from!r} is not a checkpoint of an MLLM stage "
                                 f"(no lora/model hyper-parameters)")
            self._pretrained = hp, checkpoint_tensors(self.init_from, checkpoint, "stage.init_from")
            if int(hp.get("init_seed", self.init_seed)) != self.init_seed:
                log.info("stage.init_from: random-init towers use the checkpoint's init_seed %s (stage.init_seed=%s)",
                         hp.get("init_seed"), self.init_seed)
                self.init_seed = int(hp["init_seed"])
        return self._pretrained

    def _pretrain_lora_cfg(self) -> dict | None:
        pre = self.pretrained()
        if pre is None:
            return None
        lora = dict(pre[0].get("lora") or {})
        return lora if lora.get("enabled") else None

    def build_empty(self, load_weights: bool = True) -> None:
        super().build_empty(load_weights)
        pre_lora = self._pretrain_lora_cfg() if load_weights else None
        if pre_lora is None or self.pretrain_lora != "keep":
            return
        if not self.lora_cfg.get("enabled"):
            raise ValueError("stage.pretrain_lora=keep stacks the task LoRA on the kept one: set stage.lora.enabled=true")
        from peft import LoraConfig

        llm = self.mllm.llm
        with empty_init():
            llm.add_adapter(PRETRAIN_ADAPTER, LoraConfig(
                r=int(pre_lora["r"]), lora_alpha=int(pre_lora["alpha"]), lora_dropout=0.0,
                target_modules=list(pre_lora.get("targets") or LORA_TARGETS), task_type="CAUSAL_LM"))
        llm.base_model.set_adapter(["default", PRETRAIN_ADAPTER])  # both active; set_adapter makes both trainable
        for name, p in llm.named_parameters():
            if f".{PRETRAIN_ADAPTER}." in name:
                p.requires_grad_(False)

    def weight_sources(self, load_weights: bool = True) -> dict[str, TensorSource]:
        pre = self.pretrained() if load_weights else None
        if pre is None:
            return super().weight_sources(load_weights)
        state = pre[1]
        sources = super().weight_sources(load_weights)  # after pretrained(): the checkpoint's init_seed
        own = set(sources)
        lora = _lora_parts(state)
        pre_lora = self._pretrain_lora_cfg()
        scale = (float(pre_lora["alpha"]) / float(pre_lora["r"])) if pre_lora else 0.0
        taken, merged = 0, 0
        used: set[str] = {k for k in state if ".lora_" in k}  # LoRA: merged or kept below, or refused
        # 1) every trained tensor the checkpoint has under the same name and shape (resamplers, patch positions,
        #    embeddings, norms, lm_head; a frozen tower a sharded checkpoint kept), minus its LoRA
        for k, v in state.items():
            if ".lora_" in k or k not in own:
                continue
            if tuple(v.shape) != tuple(sources[k].shape):
                raise ValueError(f"stage.init_from: {k} has shape {tuple(v.shape)} in the checkpoint but "
                                 f"{tuple(sources[k].shape)} in this model (model.* must match the pre-training)")
            used.add(k)
            if ".base_layer." not in k:  # base weights come from the weight paths (and get the LoRA merged)
                sources[k] = HeldTensor(v)
                taken += 1
        # 2) a full fine-tune's LLM: its weights are under peft-less names; match by HF key
        by_hf = {hf_key(k.removeprefix("mllm.llm.")): (k, v) for k, v in state.items()
                 if k.startswith("mllm.llm.") and ".lora_" not in k and k not in own}
        # 3) the pre-training LoRA: merged into the base weight, or into the kept adapter
        for name in own:
            if not name.startswith("mllm.llm."):
                continue
            inner = name.removeprefix("mllm.llm.")
            if f".lora_A.{PRETRAIN_ADAPTER}." in inner or f".lora_B.{PRETRAIN_ADAPTER}." in inner:
                module = inner.removeprefix("base_model.model.").partition(".lora_")[0]
                part = "A" if ".lora_A." in inner else "B"
                if module not in lora:
                    raise ValueError(f"stage.init_from: the checkpoint has no LoRA for {module} (pretrain_lora=keep)")
                sources[name] = HeldTensor(lora[module][part])
                taken += 1
                continue
            if ".lora_" in inner:
                continue  # the fresh task LoRA
            key = hf_key(inner)
            if key in by_hf:
                used.add(by_hf[key][0])
                sources[name] = HeldTensor(by_hf[key][1])
                taken += 1
            module = key.removesuffix(".weight")
            if self.pretrain_lora == "merge" and key.endswith(".weight") and module in lora:
                parts = lora.pop(module)
                try:
                    sources[name] = MergedLoRA(sources[name], parts["A"], parts["B"], scale)
                except ValueError as e:
                    raise ValueError(f"stage.init_from: {name}: {e} (model.* must match the pre-training)") from None
                merged += 1
        if self.pretrain_lora == "merge" and lora:
            raise ValueError(f"stage.init_from: LoRA of {sorted(lora)[:4]} has no base weight in this model")
        unused = sorted(set(state) - used)
        if unused:
            raise ValueError(f"stage.init_from: {len(unused)} checkpoint tensors have no place in this model "
                             f"(model.* must match the pre-training): {unused[:6]}")
        log.info("stage.init_from=%s: %d tensors from the checkpoint, %d LoRA weights merged (pretrain_lora=%s)",
                 self.init_from, taken, merged, self.pretrain_lora)
        return sources


__all__ = ["PRETRAIN_LORA_MODES", "MergedLoRA", "PretrainedStart", "sft_if_started"]
