"""Every N steps: a small local benchmark (a VLMEvalKit-layout TSV, default the tiny fixture of the task) answered
by the model being trained, scored by src/evaluation/scorers.py and logged as `eval/<task>/<metric>`.

The questions go through the datamodule's builder (the training layout, e.g. the `[INST]` template in SFT) and
the same greedy loop as `python -m src.eval` (src/pipelines/benchmark.py), so the numbers are that CLI's on the
same rows. Written to `<output_dir>/eval/<task>.jsonl` (one line per run: step, scores, answers); the headline
also lands in metrics.json. Skipped with a warning under FSDP2 (KV-cached decoding runs below the sharded root).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from src.callbacks.periodic import GeneratingCallback
from src.evaluation.scorers import BENCHMARKS
from src.evaluation.vlmeval_tsv import read_tsv
from src.pipelines.benchmark import answer_questions
from src.pipelines.mllm import MLLMGenerator


class EvalBenchmarkCallback(GeneratingCallback):
    def __init__(self, output_dir: str, every_n_steps: int, task: str, path: str, limit: int | None = None,
                 batch_size: int = 8, max_new_tokens: int = 16) -> None:
        super().__init__(every_n_steps, at_fit_end=every_n_steps > 0)  # off means off: not at the end either
        if task not in BENCHMARKS:
            raise ValueError(f"callbacks.eval_benchmark.task must be one of {sorted(BENCHMARKS)}, got {task!r}")
        self.task = task
        self.what = f"eval {task} (score a checkpoint with python -m src.eval)"
        self.rows = read_tsv(path)[:limit] if limit else read_tsv(path)  # a bad file fails before the model
        self.path = Path(output_dir) / "eval" / f"{task}.jsonl"
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    @torch.no_grad()
    def run(self, trainer, pl_module, step: int) -> None:
        if not self.can_generate(trainer, pl_module):
            return
        generator = MLLMGenerator(pl_module.mllm, pl_module.vit, pl_module.tokenizer, pl_module.vit_chunk_size)
        with self.evaluating(pl_module):
            answers = answer_questions(generator, trainer.datamodule.builder, self.task, self.rows, self.batch_size,
                                       self.max_new_tokens)
        bench = BENCHMARKS[self.task]
        scores, headline = bench.score(self.rows, answers), bench.headline
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "scores": scores, "answers": answers}) + "\n")
        flat = {f"eval/{self.task}/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))}
        trainer.callback_metrics[f"eval/{self.task}/{headline}"] = torch.tensor(scores[headline])
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=step)
