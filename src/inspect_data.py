"""`python -m src.inspect_data experiment=<E> records=<jsonl> [limit=N]`: what the model is trained on.

Renders each record of a jsonl file exactly as the experiment's datamodule builds a training sample (its
tokenizer, chat format, grids, max_length, the official wrappers it turns on) without building any model,
and prints one JSON object per record on stdout:

    {"id", "tokens": [token strings], "ce": [bool: the position carries CE], "gen": [bool: an image slot whose
     features are regressed (MSE)], "views": [{"kind": tile|global, "role": input|generate, "grid": "AxB"|null}],
     "truncated": bool, "skipped": reason|null, "detail": why it was skipped|null}

The caption-pair direction and the official prompt picks are drawn per record (`draw=None`: the value a
record gets outside the training sampler), so a line shows one of the layouts training draws. MLLM experiments
only (SEED-X, SEED-LLaMA). Like a fine-tuning framework's tokenisation debug view.
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import hydra
from omegaconf import DictConfig

from src.data.mllm_sequence import IGNORE_INDEX

__all__ = ["render", "rendered_records"]


def sample_builder(cfg: DictConfig):
    """The experiment's MLLM sample builder, as its datamodule makes it (the datamodule is only constructed:
    it reads no data)."""
    from src.data.mllm import MLLMDataModule, load_tokenizer

    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    if not isinstance(dm, MLLMDataModule):
        raise TypeError(f"experiment={cfg.get('task_name')}: src.inspect_data renders MLLM samples (SEED-X, "
                         f"SEED-LLaMA experiments); data._target_ is {cfg.data.get('_target_')!r}")
    tokenizer = load_tokenizer(dm.tokenizer_path, extend=dm.extend_tokenizer)
    return dm.builder_class(tokenizer, **dm.builder_kwargs)


def render(builder, record) -> dict:
    """One record (or a read-time skip) -> the JSON object described in the module docstring."""
    sample = builder(record)
    if "skipped" in sample:
        s = sample["skipped"]
        return {"id": s.id, "tokens": [], "ce": [], "gen": [], "views": [], "truncated": False,
                "skipped": s.reason, "detail": s.detail}
    ids = sample["input_ids"].tolist()
    return {
        "id": sample["id"],
        "tokens": builder.tokenizer.convert_ids_to_tokens(ids),
        "ce": [lab != IGNORE_INDEX for lab in sample["labels"].tolist()],
        "gen": sample["ids_gen_mask"].tolist(),
        "views": sample.get("views", []),
        "truncated": bool(sample["truncated"]),
        "skipped": None,
        "detail": None,
    }


def rendered_records(cfg: DictConfig) -> Iterator[dict]:
    from src.data.records import read_jsonl

    if not cfg.get("records"):
        raise ValueError("records=<jsonl file of records> is required")
    path = Path(cfg.records)
    if not path.is_file():
        raise FileNotFoundError(f"records={cfg.records!r} does not exist")
    builder = sample_builder(cfg)
    limit = cfg.get("limit")
    for k, record in enumerate(read_jsonl(path)):
        if limit is not None and k >= int(limit):
            break
        yield render(builder, record)


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect_data.yaml")
def main(cfg: DictConfig) -> None:
    for line in rendered_records(cfg):
        sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
