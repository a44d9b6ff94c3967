"""SEED-LLaMA: a transformers Llama whose vocabulary holds the SEED tokenizer's 8192 image codes (plain torch).

Images are tokens (`<img>` + 32 codes + `</img>`, src/models/vocab.py), so the model is the causal LM itself
and the objective is next-token cross-entropy over whatever the labels supervise (text and image codes). The
loss is split for logging into the text and the image-code tokens (`loss_ce_text`, `loss_ce_image`: the
mean CE over those label positions; `</img>` and `<img>` count as text).

The LLM sits at `.llm` (parameter names `llm.*` under the stage's `mllm.`), as in `SeedXMLLM`, so the
SEED-X SFT machinery (init_from, LoRA merge/keep, export) serves SEED-LLaMA unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class SeedLlama(nn.Module):
    def __init__(self, llm: nn.Module, code_ids) -> None:
        """`code_ids`: the token ids of the image codes, as the tokenizer names them (`<img_00000>`...): a
        released tokenizer need not hold them in code order or as one run of ids."""
        super().__init__()
        self.llm = llm
        self.code_ids = tuple(int(i) for i in code_ids)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        logits = out.logits
        if labels is None:
            return {"logits": logits}
        target = labels[:, 1:]
        token_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="none").view_as(target)
        real = target != IGNORE_INDEX
        is_code = torch.isin(target, torch.tensor(self.code_ids, device=target.device))
        # A batch with no supervised token would give 0/0: keep the graph, weight 0.
        ce = token_ce.sum() / real.sum().clamp(min=1)

        def part(mask: torch.Tensor) -> torch.Tensor:
            return (token_ce * mask).sum().detach() / mask.sum().clamp(min=1)

        return {"loss": ce, "loss_ce": ce.detach(), "loss_ce_text": part(real & ~is_code),
                "loss_ce_image": part(real & is_code), "logits": logits}
