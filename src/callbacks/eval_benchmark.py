"""Every N steps: a small local benchmark (a VLMEvalKit-layout TSV, default the tiny fixture of the task) answered
by the model being trained, scored by src/evaluation/scorers.py and logged as `eval/<task>/<metric>`.

The questions go through the datamodule's builder (the training layout, e.g. the `[INST]` template in SFT) and
the same greedy loop as `python -m src.eval` (src/pipelines/benchmark.py), so the numbers are that CLI's on the
same rows. Written to `<output_dir>/eval/<task>.jsonl` (one line per run: step, scores, answers); the headline
also lands in metrics.json. Skipped with a warning under FSDP2 (KV-cached decoding runs below the sharded root).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from src.callbacks.periodic import PeriodicCallback
from src.evaluation.scorers import score_mmbench, score_mme, score_multiple_choice
from src.evaluation.vlmeval_tsv import read_tsv
from src.parallel import is_sharded
from src.pipelines.benchmark import answer_questions
from src.pipelines.mllm import MLLMGenerator

log = logging.getLogger(__name__)

SCORERS = {"mmbench": (score_mmbench, "circular_accuracy"), "mme": (score_mme, "perception"),
           "seedbench2": (score_multiple_choice, "accuracy")}


class EvalBenchmarkCallback(PeriodicCallback):
    def __init__(self, output_dir: str, every_n_steps: int, task: str, path: str, limit: int | None = None,
                 batch_size: int = 8, max_new_tokens: int = 16) -> None:
        super().__init__(every_n_steps)
        if task not in SCORERS:
            raise ValueError(f"callbacks.eval_benchmark.task must be one of {sorted(SCORERS)}, got {task!r}")
        self.task = task
        self.rows = read_tsv(path)[:limit] if limit else read_tsv(path)  # a bad file fails before the model
        self.path = Path(output_dir) / "eval" / f"{task}.jsonl"
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self._warned = False

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.every_n_steps > 0:  # off means off: no evaluation at the end either
            super().on_fit_end(trainer, pl_module)

    @torch.no_grad()
    def run(self, trainer, pl_module, step: int) -> None:
        dm = trainer.datamodule
        if dm is None or getattr(dm, "builder", None) is None or getattr(pl_module, "tokenizer", None) is None:
            return
        if is_sharded(pl_module.mllm):
            if not self._warned:
                log.warning("eval %s: skipped under FSDP2; score a checkpoint with python -m src.eval", self.task)
                self._warned = True
            return
        generator = MLLMGenerator(pl_module.mllm, pl_module.vit, pl_module.tokenizer, pl_module.vit_chunk_size)
        was_training = pl_module.training
        pl_module.eval()
        try:
            answers = answer_questions(generator, dm.builder, self.task, self.rows, self.batch_size,
                                       self.max_new_tokens)
        finally:
            pl_module.train(was_training)
        score, headline = SCORERS[self.task]
        scores = score(self.rows, answers)
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "scores": scores, "answers": answers}) + "\n")
        flat = {f"eval/{self.task}/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float))}
        trainer.callback_metrics[f"eval/{self.task}/{headline}"] = torch.tensor(scores[headline])
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=step)
