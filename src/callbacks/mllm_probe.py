"""MLLM probes every N steps: a greedy caption for a fixed image, the regression error for a fixed caption.

Both go through the datamodule's own sequence builder and collator, so the probe sees exactly the
training layout (the caption -> image probe is a caption pair put through the builder's t2i flip, the
same path as the ``t2i_ratio`` samples). The caption is logged as W&B text and appended to
`<output_dir>/samples/probe.jsonl`; the error as `val/probe_mse`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from src.callbacks.periodic import PeriodicCallback


def probe_record(kind: str, content: list[dict]) -> dict:
    # `_base_dir` "/" lets absolute image paths through load_image unchanged.
    return {"id": f"probe/{kind}", "source": "probe", "turns": [{"role": None, "content": content}],
            "_base_dir": "/", "_where": "probe"}


class MLLMProbeCallback(PeriodicCallback):
    def __init__(self, output_dir: str, every_n_steps: int, image: str, caption: str, max_new_tokens: int = 32):
        super().__init__(every_n_steps)
        self.path = Path(output_dir) / "samples" / "probe.jsonl"
        self.image = str(Path(image).resolve())
        self.caption = caption
        self.max_new_tokens = max_new_tokens

    def _batch(self, dm, record: dict, drop_eos: bool, t2i: bool = False) -> dict | None:
        if drop_eos:
            try:
                sample = dm.builder.prompt(record, t2i=t2i)
            except ValueError:  # a probe record that skips (e.g. its image cannot be read): no probe this time
                return None
        else:
            sample = dm.builder(record, t2i=t2i)
            if "skipped" in sample:
                return None
        return dm.collator([sample])

    @torch.no_grad()
    def run(self, trainer, pl_module, step: int) -> None:
        dm = trainer.datamodule
        if dm is None or getattr(dm, "builder", None) is None:
            return
        was_training = pl_module.training
        pl_module.eval()
        result = {"step": step}
        prompt = self._batch(dm, probe_record("caption", [{"image": self.image}]), drop_eos=True)
        if prompt is not None:
            ids = pl_module.generate_text(pl_module.transfer_batch_to_device(prompt, pl_module.device, 0),
                                          self.max_new_tokens)
            result["caption"] = dm.tokenizer.decode(ids, skip_special_tokens=True)
        target = self._batch(dm, probe_record("t2i", [{"image": self.image}, {"text": self.caption}]),
                             drop_eos=False, t2i=True)
        if target is not None:
            losses = pl_module.compute_losses(pl_module.transfer_batch_to_device(target, pl_module.device, 0), "val")
            result["probe_mse"] = float(losses["loss_mse"])
        pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        if "probe_mse" in result:
            trainer.callback_metrics["val/probe_mse"] = torch.tensor(result["probe_mse"])
            for logger in trainer.loggers:
                logger.log_metrics({"val/probe_mse": result["probe_mse"]}, step=step)
        if "caption" in result:
            for logger in trainer.loggers:
                if hasattr(logger, "log_text"):
                    logger.log_text(key="val/probe_caption", columns=["step", "caption"],
                                    data=[[step, result["caption"]]], step=step)
