"""`python -m src.eval experiment=<E> task=<mmbench|mme|seedbench2|t2i|edit> [ckpt_path=...] [data.path=FILE.tsv]`:
score a trained SEED-X locally (no hub, no LLM judge).

Thin: read the VLMEvalKit-layout TSV (`data.path`; default the tiny fixture `assets/eval/<task>.tsv`), build the
experiment's MLLM as `src.generate` does (`ckpt_path`, `exported`, or the model.* weight paths), then
* benchmarks (mmbench, mme, seedbench2): answer every question greedily in batches and score the answers
  (src/evaluation/scorers.py); `predictions/<experiment>_<task>.tsv` holds the rows + `prediction`, which
  VLMEvalKit's own scorer reads;
* t2i (prompt -> image; CLIPScore against the prompt, FID against the reference images) and edit (source +
  instruction -> image through the stage-2 de-tokenizer; MagicBrush L1, CLIP-I, DINO against the target):
  the images are drawn by the `src.generate` loop (`images/`), the metrics are src/evaluation/image_metrics.py
  with networks from `metrics.*` paths (tiny twins: small random ones);
and write under `paths.output_dir`: `eval.json` (scores, settings), `eval.md` (tables), and with a W&B logger
the scores and a Table of samples with their images (offline unless WANDB_MODE=online).
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from src.evaluation import image_metrics
from src.evaluation.scorers import BENCHMARKS
from src.evaluation.vlmeval_tsv import decode_image, read_tsv, write_predictions
from src.generate import (
    check_experiment,
    exported_paths,
    image_decoder,
    inference_dtype,
    options,
    prompt_format,
    sequence_builder,
)
from src.pipelines.benchmark import answer_questions, question_text
from src.pipelines.conversation import ConversationRunner, mode_of, worded_requests
from src.pipelines.mllm import MLLMGenerator
from src.specs.inference import build_mllm
from src.utils.checkpoint import read_checkpoint
from src.utils.run import pin_output_dir, save_resolved_config

log = logging.getLogger(__name__)

# t2i / edit: drawn by the model, scored by image metrics (the benchmarks' table is src/evaluation/scorers.py)
IMAGE_TASKS = {"t2i": ("clip_score", ("question", "image")), "edit": ("clip_i", ("question", "image", "target"))}
TASKS = (*BENCHMARKS, *IMAGE_TASKS)


def draw(cfg: DictConfig, stage, builder, task: str, rows: list[dict], out: Path,
         fmt: str) -> dict[str, Image.Image]:
    """{row index: the image the model drew} for t2i (the prompt) or edit (source + instruction)."""
    mode = task
    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    requests = []
    for r in rows:
        content = [{"text": r["question"].strip()}]
        if task == "edit":
            src = inputs / f"{r['index']}.png"
            decode_image(r).save(src)
            content.insert(0, {"image": str(src)})
        requests.append({"id": f"{task}/{r['index']}", "source": task, "turns": [{"role": "user", "content": content}]})
    requests = worded_requests(requests, mode, instruct=fmt == "instruct")
    decoding, sampling = options(cfg, mode, fmt)
    device, dtype = torch.device(cfg.device), inference_dtype(cfg)
    decoder, _ = image_decoder(cfg, mode_of(mode).detokenizer, device, dtype)
    generator = MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer, stage.vit_chunk_size)
    runner = ConversationRunner(mode, generator, builder, decoder, decoding, sampling, out / "images", seed=int(cfg.seed),
                                batch_size=int(cfg.batch_size), progress=False)
    drawn = {}
    for r, res in zip(rows, runner.run(requests)):
        images = [p for reply in res["replies"] for p in reply["images"]]
        if images:
            drawn[r["index"]] = Image.open(images[0]).convert("RGB")
    return drawn


def image_scores(cfg: DictConfig, task: str, rows: list[dict], drawn: dict[str, Image.Image]) -> dict:
    m = cfg.metrics
    tiny = bool(m.tiny) if m.tiny is not None else str(cfg.task_name).endswith("_tiny")
    nets = image_metrics.FeatureNets(clip_path=m.clip_path, dino_path=m.dino_path, fid_weights=m.fid_weights,
                                     tiny=tiny, tokenizer_path=m.tokenizer_path, seed=int(cfg.seed))
    done = [r for r in rows if r["index"] in drawn]
    outputs = [drawn[r["index"]] for r in done]
    scores: dict = {"samples": len(rows), "drawn": len(done), "tiny_metric_networks": tiny}
    if not done:
        return scores
    if task == "t2i":
        references = [decode_image(r) for r in rows]
        scores["clip_score"] = image_metrics.clip_score(nets, outputs, [r["question"] for r in done])
        if len(outputs) >= 2:  # FID needs a covariance on each side
            scores["fid"] = image_metrics.fid(nets, outputs, references)
    else:
        targets = [decode_image({"index": r["index"], "image": r["target"]}) for r in done]
        scores["l1"] = image_metrics.l1_distance(outputs, targets)
        scores["clip_i"] = image_metrics.clip_i(nets, outputs, targets)
        scores["dino"] = image_metrics.dino_similarity(nets, outputs, targets)
    return scores


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


def log_to_wandb(cfg: DictConfig, task: str, scores: dict, samples: list[tuple[dict, str, object]], out: Path,
                 max_rows: int = 32) -> None:
    """Scores and a Table of samples (index, input image, question or prompt, answer, drawn image, reference)
    when the experiment logs to W&B."""
    node = (cfg.get("logger") or {}).get("wandb")
    if not node:
        return
    import wandb

    run = wandb.init(project=node.get("project") or "seedx", dir=str(out), name=f"eval-{cfg.task_name}-{task}",
                     group=str(cfg.task_name), job_type="eval", tags=["eval", task],
                     config={"cfg": OmegaConf.to_container(cfg, resolve=True)})
    flat = {f"eval/{task}/{k}": v for k, v in scores.items() if isinstance(v, (int, float))}
    table = wandb.Table(columns=["index", "image", "question", "prediction", "drawn", "answer"])
    for r, prediction, drawn in samples[:max_rows]:
        table.add_data(r["index"], wandb.Image(decode_image(r)), question_text(task, r), prediction,
                       wandb.Image(drawn) if drawn is not None else None, r.get("answer", ""))
    run.log({**flat, f"eval/{task}/samples": table})
    run.finish()


def evaluate(cfg: DictConfig) -> dict:
    task = cfg.task
    if task not in TASKS:
        raise ValueError(f"task={task!r}: expected one of {list(TASKS)}")
    check_experiment(cfg, "chat")
    path = cfg.data.get("path") or str(Path(cfg.paths.root_dir) / "assets" / "eval" / f"{task}.tsv")
    rows = read_tsv(path)  # a bad file fails before any model is built
    columns = BENCHMARKS[task].columns if task in BENCHMARKS else IMAGE_TASKS[task][1]
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise ValueError(f"data.path={path}: task={task} needs the columns {missing} (VLMEvalKit layout)")
    if cfg.get("limit"):
        rows = rows[: int(cfg.limit)]
    dtype = inference_dtype(cfg)
    if cfg.get("exported"):
        exported_paths(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    result = {"task": task, "experiment": cfg.task_name, "data": str(path), "ckpt_path": cfg.get("ckpt_path")}
    outputs = cfg.get("outputs")
    if outputs and task in IMAGE_TASKS:  # score images some model already drew: no model is built
        drawn = read_outputs(outputs, rows)
        result["outputs"] = str(outputs)
        scores = image_scores(cfg, task, rows, drawn)
        samples = [(r, "", drawn.get(r["index"])) for r in rows]
        return finish(cfg, task, result, scores, samples, out)
    checkpoint = read_checkpoint(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    fmt = prompt_format(cfg, checkpoint)
    stage = build_mllm(OmegaConf.to_container(cfg.stage, resolve=True), cfg.get("ckpt_path"), checkpoint)
    stage = stage.to(torch.device(cfg.device), dtype)
    builder = sequence_builder(cfg, stage.tokenizer, "chat" if task in BENCHMARKS else task, fmt)
    if task in BENCHMARKS:
        generator = MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer, stage.vit_chunk_size)
        predictions = answer_questions(generator, builder, task, rows, int(cfg.batch_size),
                                       int(cfg.generate.max_new_tokens), show_progress=True)
        scores = BENCHMARKS[task].score(rows, predictions)
        result["predictions"] = str(write_predictions(rows, predictions,
                                                      out / "predictions" / f"{cfg.task_name}_{task}.tsv"))
        samples = [(r, predictions.get(r["index"], ""), None) for r in rows]
    else:
        drawn = draw(cfg, stage, builder, task, rows, out, fmt)
        scores = image_scores(cfg, task, rows, drawn)
        samples = [(r, "", drawn.get(r["index"])) for r in rows]
    return finish(cfg, task, result, scores, samples, out)


def read_outputs(folder: str, rows: list[dict]) -> dict[str, Image.Image]:
    """`outputs=DIR`: the images to score, `DIR/<row index>.png` (or .jpg); a row without one is not drawn."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"outputs={folder!r} is not a folder of <index>.png images")
    drawn = {}
    for r in rows:
        for ext in (".png", ".jpg", ".jpeg", ".webp"):
            if (root / f"{r['index']}{ext}").is_file():
                drawn[r["index"]] = Image.open(root / f"{r['index']}{ext}").convert("RGB")
                break
    return drawn


def finish(cfg: DictConfig, task: str, result: dict, scores: dict, samples: list, out: Path) -> dict:
    headline = BENCHMARKS[task].headline if task in BENCHMARKS else IMAGE_TASKS[task][0]
    result.update(headline={headline: scores.get(headline)}, scores=scores)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "eval.md").write_text(markdown(task, scores))
    log_to_wandb(cfg, task, scores, samples, out)
    log.info("%s: %s", task, result["headline"])
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    pin_output_dir(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
