"""Every N steps: answer a few fixed requests in the task's `src.generate` mode, images through the task's
de-tokenizer, and log the replies.

The requests are records (a jsonl of the data schema, e.g. the task's own training file): each is cut
before its first assistant turn, so the model answers the first user turn as at inference. The loop is
`src.pipelines.conversation.ConversationRunner`, the one `python -m src.generate` runs, on the module's own
MLLM, ViT and tokenizer, with prompts laid out by the datamodule's builder (the training layout). Images
are drawn by the de-tokenizer the experiment names (`detokenizer`: stage1 or stage2, default the mode's;
`model/detokenizer` the architecture; `detok_ckpt_path` a trained `seedx_detok_*` checkpoint of that stage,
else the config's weights), built on the first image and kept. If it cannot be built (no weights at full size) the replies are still logged, text only, and the
reason is logged once and written into the step's results.

Written to `<output_dir>/samples/<mode>/step_XXXXXXX/` (results.jsonl + PNGs); W&B gets a table of
(step, request, reply) and the images with their prompts. Under DDP every rank runs the same requests with
the same seeds and rank 0 writes and logs; under FSDP2 (a sharded MLLM) the callback is skipped with a
warning: answer the requests from a checkpoint with `python -m src.generate`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from src.callbacks.periodic import GeneratingCallback
from src.data.mllm_sequence import CHAT_FORMATS
from src.pipelines.conversation import ConversationRunner, load_requests, mode_of, worded_requests
from src.pipelines.detok import SamplingOptions
from src.pipelines.mllm import DecodingOptions, MLLMGenerator
from src.utils.weights import MissingWeightsError

log = logging.getLogger(__name__)


def first_turn_requests(path: str, mode: str, limit: int) -> list[dict]:
    """The first `limit` records of `path`, each cut before its first assistant turn."""
    requests = []
    for rec in load_requests(path, None, None, mode)[:limit]:
        turns = []
        for t in rec["turns"]:
            if t.get("role") == "assistant":
                break
            turns.append(t)
        requests.append({**rec, "turns": turns})
    return requests


def _request_text(request: dict) -> str:
    return " ".join(item["text"] for t in request["turns"] for item in t["content"] if "text" in item)


class SFTSamplesCallback(GeneratingCallback):
    what = "sft samples (answer the requests with python -m src.generate)"

    def __init__(self, output_dir: str, every_n_steps: int, mode: str, requests: str, num_requests: int = 4,
                 detok_ckpt_path: str | None = None, max_new_tokens: int = 64, steps: int = 25,
                 guidance_scale: float = 7.5, image_guidance_scale: float = 1.5, seed: int = 0,
                 detokenizer: str | None = None) -> None:
        super().__init__(every_n_steps)
        self.spec = mode_of(mode)  # a wrong mode fails when the callback is built, before the model
        if detokenizer not in (None, "stage1", "stage2"):
            raise ValueError(f"callbacks.sft_samples.detokenizer must be stage1, stage2 or null, got {detokenizer!r}")
        # stage 2 conditions on an input image: only modes that have one (edit, tryon) can use it
        if detokenizer == "stage2" and self.spec.condition is None:
            raise ValueError(f"callbacks.sft_samples.detokenizer=stage2 needs a mode with a condition image "
                             f"(edit, tryon), not mode={mode}")
        self.detokenizer = detokenizer or self.spec.detokenizer
        self.mode = mode
        self.dir = Path(output_dir) / "samples" / mode
        # an instruction-tuned model, asked as the task was trained (the official wording of the mode)
        self.requests = worded_requests(first_turn_requests(requests, mode, num_requests), mode, instruct=True)
        self.detok_ckpt_path = detok_ckpt_path
        self.decoding = DecodingOptions(max_new_tokens=max_new_tokens, image=self.spec.image,
                                        stop_texts=(CHAT_FORMATS["llama2"].user_prefix.strip(),))
        self.sampling = SamplingOptions(steps=steps, guidance_scale=guidance_scale,
                                        image_guidance_scale=image_guidance_scale)
        self.seed = seed
        self._decoder = None
        self._decoder_error: str | None = None

    def _image_decoder(self, pl_module):
        """The mode's de-tokenizer as a plain pipeline, built once (None, with the reason kept, if it cannot)."""
        if self._decoder is None and self._decoder_error is None:
            from src.specs.inference import build_detokenizer, image_decoder_of

            model = pl_module.hparams.get("model") or {}
            if model.get("detokenizer") is None:
                self._decoder_error = "the experiment has no model/detokenizer"
            else:
                try:
                    module = build_detokenizer({"vit": model["vit"], "detokenizer": model["detokenizer"]},
                                               self.detokenizer, self.detok_ckpt_path)
                    self._decoder = image_decoder_of(module.to(pl_module.device))
                except (MissingWeightsError, FileNotFoundError, ValueError) as e:
                    self._decoder_error = f"{type(e).__name__}: {e}"
            if self._decoder_error:
                log.warning("sft samples (%s): images are not drawn: %s", self.mode, self._decoder_error)
        return self._decoder

    @torch.no_grad()
    def run(self, trainer, pl_module, step: int) -> None:
        if not self.can_generate(trainer, pl_module):
            return
        out = self.dir / f"step_{step:07d}"
        generator = MLLMGenerator(pl_module.mllm, pl_module.vit, pl_module.tokenizer, pl_module.vit_chunk_size)
        runner = ConversationRunner(self.mode, generator, trainer.datamodule.builder,
                                    lambda: self._image_decoder(pl_module), self.decoding, self.sampling, out,
                                    seed=self.seed, batch_size=len(self.requests), progress=False)
        with self.evaluating(pl_module):
            results = runner.run(self.requests)
        if not trainer.is_global_zero:
            return
        if self._decoder_error:
            (out / "images_not_drawn.txt").write_text(self._decoder_error + "\n")
        self._log(trainer, step, results)

    def _log(self, trainer, step: int, results: list[dict]) -> None:
        rows, images, captions = [], [], []
        for req, res in zip(self.requests, results):
            reply = res["replies"][0] if res["replies"] else {"text": "", "images": []}
            rows.append([step, req["id"], _request_text(req), reply["text"]])
            for path in reply.get("images", []):
                images.append(path)
                captions.append(f"{req['id']}: {_request_text(req)[:120]}")
            if reply.get("boxes_image"):  # grounding: the boxes the reply named, drawn on its input image
                images.append(reply["boxes_image"])
                captions.append(f"{req['id']} boxes: {reply['text'][:120]}")
        with (self.dir / "samples.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "results": results}) + "\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):
                logger.log_text(key=f"samples/{self.mode}", columns=["step", "id", "request", "reply"], data=rows,
                                step=step)
            if images and hasattr(logger, "log_image"):
                logger.log_image(key=f"samples/{self.mode}_images", images=images, step=step, caption=captions)

