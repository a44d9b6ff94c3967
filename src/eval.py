"""`python -m src.eval experiment=<E> task=<mmbench|mme|seedbench2> [ckpt_path=...] [data.path=FILE.tsv]`: score a
trained SEED-X on a benchmark locally (no hub, no LLM judge).

Thin: read the VLMEvalKit-layout TSV (`data.path`; default the tiny fixture `assets/eval/<task>.tsv`), build the
experiment's MLLM as `src.generate` does (`ckpt_path`, `exported`, or the model.* weight paths), answer every
question greedily in batches, score it (src/evaluation/scorers.py) and write under `paths.output_dir`:
`eval.json` (scores, settings), `eval.md` (the same as tables), `predictions/<experiment>_<task>.tsv` (the
benchmark rows + `prediction`, which VLMEvalKit's scorer reads), and with a W&B logger the scores and a Table
of samples with their images (offline unless WANDB_MODE=online).
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import base64
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.evaluation.scorers import score_mmbench, score_mme, score_multiple_choice
from src.evaluation.vlmeval_tsv import options_of, read_tsv, write_predictions
from src.generate import check_experiment, exported_paths, inference_dtype, sequence_builder
from src.pipelines.mllm import DecodingOptions, MLLMGenerator
from src.stages.inference import build_mllm
from src.utils.run import save_resolved_config

log = logging.getLogger(__name__)

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SCORERS = {"mmbench": score_mmbench, "mme": score_mme, "seedbench2": score_multiple_choice}
HEADLINE = {"mmbench": "circular_accuracy", "mme": "perception", "seedbench2": "accuracy"}


def question_text(task: str, row: dict) -> str:
    """The benchmark's question as VLMEvalKit prompts it: hint, question, lettered options, the instruction."""
    if task == "mme":
        return row["question"].strip()
    parts = []
    hint = (row.get("hint") or "").strip()
    if hint and hint.lower() != "nan":
        parts.append(hint)
    parts.append(row["question"].strip())
    parts += [f"{k}. {v}" for k, v in options_of(row).items()]
    parts.append(MC_INSTRUCTION)
    return "\n".join(parts)


def request_of(task: str, row: dict) -> dict:
    """One benchmark row as a record of the data schema (the image carried as bytes, as shard records are)."""
    return {"id": f"{task}/{row['index']}", "source": task, "_where": f"{task}:{row['index']}",
            "_blobs": {"img": base64.b64decode(row["image"])},
            "turns": [{"role": "user", "content": [{"image": "img"}, {"text": question_text(task, row)}]}]}


def answer(generator: MLLMGenerator, builder, task: str, rows: list[dict], batch_size: int,
           max_new_tokens: int) -> dict[str, str]:
    """{row index: the model's answer text}, greedy, `batch_size` questions at a time."""
    options = DecodingOptions(max_new_tokens=max_new_tokens, image="free")
    out: dict[str, str] = {}
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        samples = [builder.prompt(request_of(task, r)) for r in chunk]
        for r, g in zip(chunk, generator.generate(samples, options)):
            out[r["index"]] = generator.tokenizer.decode(g.token_ids, skip_special_tokens=True).strip()
    return out


def markdown(task: str, scores: dict) -> str:
    lines = [f"# {task}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in scores.items() if not isinstance(v, dict)]
    per = scores.get("per_category") or {}
    if per:
        first = next(iter(per.values()))
        if isinstance(first, dict):
            cols = list(first)
            lines += ["", "| category | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
            lines += [f"| {c} | " + " | ".join(f"{v[k]:.2f}" for k in cols) + " |" for c, v in per.items()]
        else:
            lines += ["", "| category | accuracy |", "|---|---|"]
            lines += [f"| {c} | {v:.2f} |" for c, v in per.items()]
    return "\n".join(lines) + "\n"


def log_to_wandb(cfg: DictConfig, task: str, scores: dict, rows: list[dict], predictions: dict[str, str],
                 out: Path, max_rows: int = 32) -> None:
    """Scores and a Table of (index, image, question, prediction, answer) when the experiment logs to W&B."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node:
        return
    import io

    import wandb
    from PIL import Image

    run = wandb.init(project=node.get("project") or "seedx", dir=str(out), name=f"eval-{cfg.task_name}-{task}",
                     group=str(cfg.task_name), job_type="eval", tags=["eval", task],
                     config={"cfg": OmegaConf.to_container(cfg, resolve=True)})
    flat = {f"eval/{task}/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}
    table = wandb.Table(columns=["index", "image", "question", "prediction", "answer"])
    for r in rows[:max_rows]:
        image = Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")
        table.add_data(r["index"], wandb.Image(image), question_text(task, r), predictions.get(r["index"], ""),
                       r.get("answer", ""))
    run.log({**flat, f"eval/{task}/samples": table})
    run.finish()


def evaluate(cfg: DictConfig) -> dict:
    task = cfg.task
    if task not in SCORERS:
        raise ValueError(f"task={task!r}: expected one of {sorted(SCORERS)}")
    check_experiment(cfg, "chat")
    path = cfg.data.get("path") or str(Path(cfg.paths.root_dir) / "assets" / "eval" / f"{task}.tsv")
    rows = read_tsv(path)  # a bad file fails before any model is built
    if cfg.get("limit"):
        rows = rows[: int(cfg.limit)]
    dtype = inference_dtype(cfg)
    if cfg.get("exported"):
        exported_paths(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    stage = build_mllm(OmegaConf.to_container(cfg.stage, resolve=True), cfg.get("ckpt_path"))
    stage = stage.to(torch.device(cfg.device), dtype)
    generator = MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer, stage.vit_chunk_size)
    builder = sequence_builder(cfg, stage.tokenizer, "chat")
    predictions = answer(generator, builder, task, rows, int(cfg.batch_size), int(cfg.max_new_tokens))
    scores = SCORERS[task](rows, predictions)
    pred_file = write_predictions(rows, predictions, out / "predictions" / f"{cfg.task_name}_{task}.tsv")
    result = {"task": task, "experiment": cfg.task_name, "data": str(path), "ckpt_path": cfg.get("ckpt_path"),
              "headline": {HEADLINE[task]: scores[HEADLINE[task]]}, "scores": scores, "predictions": str(pred_file)}
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(task, scores))
    log_to_wandb(cfg, task, scores, rows, predictions, out)
    log.info("%s: %s", task, result["headline"])
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    evaluate(cfg)


if __name__ == "__main__":
    main()
