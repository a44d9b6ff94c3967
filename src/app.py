"""`python -m src.app experiment=<E> [ckpt_path=...] [detok_ckpt_path=...]`: a Gradio web demo of a trained SEED-X.

Thin, on the pipelines of `src.generate` (imported, not copied): every UI event becomes a request record
(the history so far + the new user turn) that `load_requests` checks and `ConversationRunner` answers, so
the demo gives exactly what `python -m src.generate` gives for the same turns and seed. Each turn's
request and results.jsonl stay under `paths.output_dir/sessions/<session>/turn_<k>/`.

Localhost only, no share link, no analytics, system fonts: nothing is fetched at run time.
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry calls

import json
import logging
import shutil
import uuid
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.generate import (
    check_experiment,
    exported_paths,
    image_decoder,
    inference_dtype,
    options,
    prompt_format,
    sequence_builder,
)
from src.pipelines.conversation import MODES, ConversationRunner, load_requests, worded_requests
from src.pipelines.mllm import MLLMGenerator
from src.specs.inference import build_mllm
from src.utils.run import pin_output_dir, save_resolved_config

log = logging.getLogger(__name__)


def check_app_config(cfg: DictConfig) -> None:
    """app.* mistakes fail before any model is built, naming the key."""
    modes = list(cfg.app.modes)
    bad = [m for m in modes if m not in MODES or not MODES[m].uses_llm]
    if not modes or bad:
        raise ValueError(f"app.modes: {bad or 'empty'} — pick from {[m for m in MODES if MODES[m].uses_llm]}")
    for mode in modes:
        options(cfg, mode)  # decoding/sampling option mistakes, as src.generate checks them
    if cfg.app.port is not None and not 0 < int(cfg.app.port) < 65536:
        raise ValueError(f"app.port must be a TCP port (1-65535) or null, got {cfg.app.port!r}")


class DemoModels:
    """The models `src.generate` builds, built once and shared by every turn: the MLLM and its generator,
    a sequence builder per mode, and the two de-tokenizers (built on first use: stage 1 draws t2i and chat
    images, stage 2 edits; `app.edit_detok_ckpt_path` is the stage-2 checkpoint)."""

    def __init__(self, cfg: DictConfig):
        check_experiment(cfg, "chat")
        check_app_config(cfg)
        checkpoint = None
        if cfg.get("ckpt_path"):
            from src.utils.checkpoint import read_checkpoint

            checkpoint = read_checkpoint(cfg.ckpt_path)  # its stage decides the prompt format (auto)
        self.cfg, self.fmt = cfg, prompt_format(cfg, checkpoint)
        self.modes = list(cfg.app.modes)
        if cfg.get("exported"):
            exported_paths(cfg)
        self.device, self.dtype = torch.device(cfg.device), inference_dtype(cfg)
        torch.manual_seed(int(cfg.seed))  # as src.generate: random-init tiny twins come out the same
        stage = build_mllm(OmegaConf.to_container(cfg.stage, resolve=True), cfg.get("ckpt_path"),
                           checkpoint).to(self.device, self.dtype)
        self.generator = MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer, stage.vit_chunk_size)
        edit_cfg = cfg.copy()
        with open_dict(edit_cfg):
            edit_cfg.detok_ckpt_path = cfg.app.edit_detok_ckpt_path
        self.decoders = {"stage1": image_decoder(cfg, "stage1", self.device, self.dtype)[0],
                         "stage2": image_decoder(edit_cfg, "stage2", self.device, self.dtype)[0]}
        self.builders = {m: sequence_builder(cfg, self.generator.tokenizer, m, self.fmt) for m in self.modes}

    def runner(self, mode: str, seed: int, out: Path) -> ConversationRunner:
        decoding, sampling = options(self.cfg, mode, self.fmt)
        return ConversationRunner(mode, self.generator, self.builders[mode], self.decoders[MODES[mode].detokenizer],
                                  decoding, sampling, out, seed=seed, batch_size=1, progress=False)


def kept_image(image: str, out: Path) -> Path:
    return out / f"input{Path(image).suffix or '.png'}"


def user_turn(text: str | None, image: str | None, out: Path) -> dict:
    """The new user turn as record content; the uploaded image copied beside the turn's request (Gradio's
    upload cache may be cleared while the conversation still refers to it)."""
    content = []
    if image:
        shutil.copyfile(image, kept_image(image, out))
        content.append({"image": str(kept_image(image, out))})
    if text and text.strip():
        content.append({"text": text.strip()})
    return {"role": "user", "content": content}


def answer(models: DemoModels, mode: str, history: list[dict], text: str | None, image: str | None, seed: int,
           out: Path) -> dict:
    """One turn: history + the new user turn -> a request file -> `load_requests` (the checks src.generate
    makes) -> the runner. Returns the runner's result: `replies[-1]` and the `turns` to carry on."""
    out.mkdir(parents=True, exist_ok=True)
    turn = user_turn(text, image, out)
    if not turn["content"]:
        raise ValueError("type a message (or upload an image)")
    # Only the new turn gets the mode's wording: earlier turns stay as the model saw them.
    turn = worded_requests([{"turns": [turn]}], mode, instruct=models.fmt == "instruct")[0]["turns"][0]
    path = out / "request.jsonl"
    path.write_text(json.dumps({"id": "demo", "source": "app", "turns": [*history, turn]}) + "\n")
    requests = load_requests(str(path), None, None, mode)
    return models.runner(mode, seed, out).run(requests)[0]


def reply_messages(reply: dict) -> list[dict]:
    """The assistant's chat messages for one reply: its text, the images it drew, its boxes drawn on the image."""
    messages = [{"role": "assistant", "content": reply["text"] or "(no text)"}]
    for path in [*reply["images"], *([reply["boxes_image"]] if reply.get("boxes_image") else [])]:
        messages.append({"role": "assistant", "content": {"path": path}})
    return messages


class DemoApp:
    """The UI's event handlers over `DemoModels`; `blocks()` wires them into a Gradio page."""

    def __init__(self, models: DemoModels, work_dir: str | Path):
        self.models, self.work = models, Path(work_dir)

    def new_state(self) -> dict:
        return {"session": uuid.uuid4().hex[:12], "turns": [], "n": 0}

    def send(self, mode: str, text: str | None, image: str | None, seed, chat: list | None, state: dict | None):
        """Send button: (chat, state, shown image, cleared text, cleared image). Bad input is a `gr.Error`
        toast naming the problem; the conversation is left as it was."""
        import gradio as gr

        state = dict(state) if state else self.new_state()
        chat = list(chat or [])
        if mode not in self.models.modes:
            raise gr.Error(f"mode {mode!r} is not one of {self.models.modes}")
        try:
            seed = int(seed)
        except (TypeError, ValueError):
            raise gr.Error(f"seed must be an integer, got {seed!r}") from None
        out = self.work / "sessions" / state["session"] / f"turn_{state['n']}"
        try:
            result = answer(self.models, mode, state["turns"], text, image, seed, out)
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        reply = result["replies"][-1]
        user = [{"role": "user", "content": {"path": str(kept_image(image, out))}}] if image else []
        user += [{"role": "user", "content": text.strip()}] if text and text.strip() else []
        chat += user + reply_messages(reply)
        state = {**state, "turns": result["turns"], "n": state["n"] + 1}
        # the last drawn image (or the boxes drawn on the input) stays up through turns that draw nothing
        shown = reply.get("boxes_image") or (reply["images"][-1] if reply["images"] else gr.skip())
        log.info("session %s turn %d (%s, seed %d): %r", state["session"], state["n"], mode, seed, reply["text"])
        return chat, state, shown, "", None

    def clear(self):
        """New conversation: empty chat, a fresh session."""
        return [], self.new_state(), None, "", None

    def blocks(self):
        import gradio as gr

        cfg = self.models.cfg
        with gr.Blocks(title="SEED-X demo", analytics_enabled=False) as demo:
            weights = cfg.get("ckpt_path") or cfg.get("exported") or "the experiment's weights"
            gr.Markdown(f"### SEED-X demo · {weights} · prompt format `{self.models.fmt}`")
            state = gr.State(None)
            with gr.Row():
                with gr.Column(scale=3):
                    chat = gr.Chatbot(label="Conversation", height=420, elem_id="chat",
                                      render_markdown=False)  # replies shown as the model wrote them
                    text = gr.Textbox(label="Message", placeholder="Ask about the image, describe a picture, "
                                      "or say how to edit it", elem_id="message")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        clear = gr.Button("New conversation", elem_id="clear")
                with gr.Column(scale=2):
                    mode = gr.Radio(self.models.modes, value=self.models.modes[0], label="Task", elem_id="mode")
                    image = gr.Image(type="filepath", label="Input image (chat, ground, edit)", height=200,
                                     elem_id="input_image")
                    seed = gr.Number(value=int(cfg.seed), precision=0, label="Seed", elem_id="seed")
                    shown = gr.Image(type="filepath", label="Drawn image / boxes", interactive=False, height=200,
                                     elem_id="output_image")
            outputs = [chat, state, shown, text, image]
            inputs = [mode, text, image, seed, chat, state]
            send.click(self.send, inputs, outputs)
            text.submit(self.send, inputs, outputs)
            clear.click(self.clear, None, outputs)
        return demo


def theme():
    """The default theme on system fonts: the stock one loads Google Fonts from a CDN."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def serve(cfg: DictConfig, block: bool = True):
    """Build the models, then serve the page on app.host:app.port (localhost by default). `block=False`
    returns the running Blocks (tests close it)."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    demo = DemoApp(DemoModels(cfg), out).blocks()
    demo.queue(default_concurrency_limit=1)  # one model, one turn at a time
    demo.launch(server_name=str(cfg.app.host), server_port=None if cfg.app.port is None else int(cfg.app.port),
                share=False, inbrowser=False, ssr_mode=False, allowed_paths=[str(out.resolve())], theme=theme(),
                footer_links=[], prevent_thread_lock=not block, quiet=not block)
    return demo


@hydra.main(version_base="1.3", config_path="../conf", config_name="app.yaml")
def main(cfg: DictConfig) -> None:
    pin_output_dir(cfg)
    serve(cfg)


if __name__ == "__main__":
    main()
