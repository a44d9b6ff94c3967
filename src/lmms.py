"""SEED-X as an lmms-eval model:
`lmms-eval --model seedx --model_args experiment=seedx_sft_i,ckpt_path=... --device cuda --batch_size 8 --tasks mme`.

Registered through lmms-eval's plugin entry points (`[project.entry-points."lmms_eval.models"]` in pyproject:
`seedx = "src.lmms:manifest"`), installed with the optional extra: `pip install -c constraints/eval.txt -e '.[eval]'`
(the constraint keeps antlr4 at 4.9.3 for Hydra; `make setup` does this). lmms-eval is imported only here.

Model args (`--model_args k=v,...`): `experiment` (a conf/experiment name; its model.* paths, data layout and
prompt format), `ckpt_path` (our .ckpt or sharded dir), `exported` (a `src.export` folder), `overrides`
(Hydra overrides separated by `;`), `dtype` (float32 | bfloat16), `max_new_tokens`, `prompt_format` (auto |
pretrained | instruct). `device` and `batch_size` are lmms-eval's own `--device` (default: cuda when there is
one) and `--batch_size`: lmms-eval hands them to every model, so they are refused in `--model_args` (where
they would collide). Images are laid out at dynamic resolution exactly as in training (the experiment's
any-res grids), in the order lmms-eval hands them, before the question text.

* `generate_until`: greedy (or the task's `do_sample`/`temperature`/`top_p`) batched KV-cached decoding
  (src/pipelines/mllm.py), cut at the task's `until` strings and `max_new_tokens`. The answer is the reply's
  text: an image the model starts to draw (`<img>` + image tokens + `</img>`) is left out, box spans stay.
* `loglikelihood`: log P(continuation | context) from one forward pass of the prompt + continuation, and
  whether greedy decoding would have produced the continuation.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

CONF = Path(__file__).resolve().parents[1] / "conf"


# lmms-eval passes these to every model from its own command line (`--batch_size`, `--device`)
LMMS_EVAL_ARGS = ("batch_size", "device")


def manifest() -> ModelManifest:
    return ModelManifest(model_id="seedx", simple_class_path="src.lmms.SeedX")


def answer_text(token_ids: list[int], tokenizer, ids) -> str:
    """A reply's text for a text benchmark: image spans (`<img>` ... `</img>`, or to the end when cut), stray
    image tokens and the end of sequence dropped, the rest decoded at once (words around an image keep their
    spaces); box spans stay as the model wrote them (grounding tasks read them)."""
    kept: list[int] = []
    dropped = {tokenizer.eos_token_id, ids.img_end, *ids.img}  # and stray image tokens outside a span
    in_image = False
    for tok in token_ids:
        if tok == ids.img_start:
            in_image = True
        elif in_image:
            in_image = tok != ids.img_end
        elif tok not in dropped:
            kept.append(tok)
    return tokenizer.decode(kept, skip_special_tokens=True)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


class SeedX(lmms):
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> SeedX:
        from lmms_eval import utils

        clash = sorted(set(utils.simple_parse_args_string(arg_string)) & set(LMMS_EVAL_ARGS))
        if clash:
            raise ValueError(f"seedx: {clash} are lmms-eval's own arguments: pass "
                             f"{' '.join(f'--{k} ...' for k in clash)} instead of putting them in --model_args")
        return super().create_from_arg_string(arg_string, additional_config)

    def __init__(self, experiment: str = "seedx_sft_i", ckpt_path: str | None = None, exported: str | None = None,
                 overrides: str = "", device: str | None = None, dtype: str = "float32", batch_size: int | str = 1,
                 max_new_tokens: int | str = 128, prompt_format: str = "auto", max_batch_size=None,
                 **unknown) -> None:
        super().__init__()
        if unknown:  # a misspelt model arg would otherwise be ignored silently
            raise ValueError(f"seedx: unknown --model_args {sorted(unknown)}; known: experiment, ckpt_path, exported, "
                             f"overrides, dtype, max_new_tokens, prompt_format")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"seedx: --batch_size must be a number of requests, got {batch_size!r} "
                             f"(no automatic batch size)") from None
        if batch_size < 1:
            raise ValueError(f"seedx: --batch_size must be >= 1, got {batch_size}")
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf, open_dict

        from src.generate import exported_paths, inference_dtype, sequence_builder
        from src.generate import prompt_format as format_of  # not to shadow the `prompt_format` argument
        from src.pipelines.mllm import MLLMGenerator
        from src.specs.inference import build_mllm

        os.environ.setdefault("PROJECT_ROOT", str(CONF.parent))
        extra = [o for o in str(overrides or "").split(";") if o.strip()]
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="generate", overrides=[f"experiment={experiment}", f"device={device}",
                                                             f"dtype={dtype}",
                                                             f"generate.prompt_format={prompt_format}", *extra])
        with open_dict(cfg):
            cfg.paths.output_dir = str(Path(cfg.paths.log_dir) / "lmms_eval")
            if exported:
                cfg.exported = exported
        if cfg.get("exported"):
            exported_paths(cfg)
        OmegaConf.resolve(cfg)
        from src.utils.checkpoint import read_checkpoint

        checkpoint = read_checkpoint(ckpt_path) if ckpt_path else None
        stage = build_mllm(OmegaConf.to_container(cfg.stage, resolve=True), ckpt_path, checkpoint)
        self.stage = stage.to(torch.device(device), inference_dtype(cfg))
        self.generator = MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer, stage.vit_chunk_size)
        self.builder = sequence_builder(cfg, stage.tokenizer, "chat", format_of(cfg, checkpoint))
        self.tokenizer = stage.tokenizer
        self.batch_size_per_gpu = batch_size
        self.max_new_tokens = int(max_new_tokens)
        self.device = torch.device(device)

    # ---- requests -> our records --------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return [v for v in (visuals or []) if hasattr(v, "convert")]  # images (videos/audio are not modelled)

    def _record(self, context: str, images: list, rid: str) -> dict:
        from src.pipelines.benchmark import image_question

        text = context.replace("<image>", "").strip() or " "
        return image_question(rid, "lmms_eval", [_png(im) for im in images], text)

    # ---- lmms interface -----------------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        from src.pipelines.mllm import DecodingOptions

        # lmms-eval hands over the requests of every task at once: batch only those with the same kwargs
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(f"{r.args[4]}|{sorted((r.args[1] or {}).items())!r}", []).append(i)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            gen_kwargs = dict(requests[members[0]].args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            options = DecodingOptions(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                do_sample=bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0)) > 0,
                temperature=float(gen_kwargs.get("temperature", 1.0) or 1.0),
                top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0), image="free")
            for start in range(0, len(members), self.batch_size_per_gpu):
                chunk = members[start:start + self.batch_size_per_gpu]
                samples = []
                for i in chunk:
                    ctx, _, dtv, doc_id, task, split = requests[i].args
                    record = self._record(ctx, self._visuals(dtv, doc_id, task, split), f"{task}/{doc_id}")
                    samples.append(self.builder.prompt(record))
                for i, g in zip(chunk, self.generator.generate(samples, options)):
                    text = answer_text(g.token_ids, self.tokenizer, self.generator.ids)
                    for stop in until:
                        if stop and stop in text:
                            text = text.split(stop, 1)[0]
                    out[i] = text.strip()
        return out

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        from src.data.mllm_collate import MLLMCollator

        collate = MLLMCollator(self.tokenizer.pad_token_id, max_length=1 << 20)
        out: list[tuple[float, bool]] = []
        for context, target, dtv, doc_id, task, split in [r.args for r in requests]:
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            sample = self.builder.prompt(self._record(context, self._visuals(dtv, doc_id, task, split),
                                                      f"{task}/{doc_id}"))
            cont = self._continuation_ids(context, continuation)
            n = len(cont)
            if n == 0:
                out.append((0.0, True))
                continue
            pad = torch.zeros(n, dtype=torch.bool)
            sample = {**sample, "input_ids": torch.cat([sample["input_ids"], torch.tensor(cont)]),
                      "labels": torch.cat([sample["labels"], torch.tensor(cont)]),
                      "ids_cmp_mask": torch.cat([sample["ids_cmp_mask"], pad]),
                      "ids_gen_mask": torch.cat([sample["ids_gen_mask"], pad])}
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in collate([sample]).items()}
            logits = self.stage.mllm(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                ids_cmp_mask=batch["ids_cmp_mask"], ids_gen_mask=batch["ids_gen_mask"],
                image_embeds=self.generator.encode_views(batch["vit_pixels"]), embeds_cmp_mask=batch["embeds_cmp_mask"],
                embeds_gen_mask=batch["embeds_gen_mask"], patch_positions=batch["patch_positions"])["logits"][0]
            # the logits at position t predict token t + 1: the continuation's tokens are the last n
            pred = torch.log_softmax(logits[-n - 1:-1].float(), dim=-1)
            ids = torch.tensor(cont, device=pred.device)
            out.append((float(pred.gather(1, ids[:, None]).sum()), bool((pred.argmax(-1) == ids).all())))
        return out

    def _continuation_ids(self, context: str, continuation: str) -> list[int]:
        """The continuation's tokens as they follow the prompt: tokenised after the end of the prompt text (the chat
        format's user suffix, e.g. `\nAnswer:`), so a word-start marker merges as it would in generation (the
        lm-eval convention: encode(context + continuation) minus encode(context))."""
        anchor = self.builder.chat.user_suffix or context[-32:] or "\n"
        head = self.tokenizer.encode(anchor, add_special_tokens=False)
        whole = self.tokenizer.encode(anchor + continuation, add_special_tokens=False)
        return whole[len(head):] if whole[:len(head)] == head else self.tokenizer.encode(continuation,
                                                                                          add_special_tokens=False)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("seedx: multi-round generation tasks are not supported; use single-round tasks "
                                  "(mme, mmbench_en_dev, seedbench_2)")
