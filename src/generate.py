"""`python -m src.generate experiment=<E> mode=<mode> ...`: answer requests with a trained SEED-X.

Thin: check the request and options, build the experiment's models (src/specs/inference.py), hand the
plain modules to src/pipelines and write `results.jsonl` + PNGs under `paths.output_dir`.
`python -m src.generate --help` lists the modes with an example each.
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import functools
import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.data.mllm_sequence import CHAT_FORMATS, SeedXSequenceBuilder
from src.models.detokenizer import hold_decoder_in
from src.pipelines.conversation import (
    Conversation,
    ConversationRunner,
    load_requests,
    mode_of,
    rendered_prompt,
    worded_requests,
)
from src.pipelines.detok import SamplingOptions
from src.pipelines.mllm import DecodingOptions, MLLMGenerator
from src.specs.inference import build_detokenizer, build_mllm, image_decoder_of
from src.specs.seedx import SEEDX
from src.utils.checkpoint_kind import model_family
from src.utils.run import pin_output_dir, save_resolved_config

log = logging.getLogger(__name__)

PROMPT_FORMATS = ("auto", "pretrained", "instruct")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def exported_paths(cfg: DictConfig) -> None:
    """`exported=DIR` (a `python -m src.export` folder): point the model weight paths at its parts."""
    root = Path(cfg.exported)
    if not root.is_dir():
        raise FileNotFoundError(f"exported={cfg.exported!r} is not a directory (python -m src.export out=DIR)")
    with open_dict(cfg):
        cfg.model.llm.weights = str(root / "llm")
        cfg.model.llm.tokenizer = str(root / "llm")
        cfg.model.llm.allow_random_init = False
        cfg.model.agent.weights = str(root / "agent" / "model.safetensors")
        cfg.model.vit.weights = str(root / "vit" / "model.safetensors")
        if (root / "detokenizer").is_dir():
            cfg.model.detokenizer.pretrained_dir = str(root / "detokenizer")
            cfg.model.detokenizer.adapter_weights = str(root / "detokenizer" / "adapter" / "model.safetensors")


def options(cfg: DictConfig, mode: str, fmt: str = "instruct") -> tuple[DecodingOptions, SamplingOptions]:
    """Decoding as the mode asks in prompt format `fmt` (pretrained | instruct), and the sampling options."""
    g, s, spec = cfg.generate, cfg.sampling, mode_of(mode)
    pretrained = fmt == "pretrained"
    user_prefix = CHAT_FORMATS[chat_format_of(mode, fmt)].user_prefix.strip()
    decoding = DecodingOptions(max_new_tokens=int(g.max_new_tokens), do_sample=bool(g.do_sample),
                               temperature=float(g.temperature), top_p=float(g.top_p),
                               image=(spec.pretrained_image or spec.image) if pretrained else spec.image,
                               box_first=pretrained and spec.pretrained_box_first,
                               stop_texts=(user_prefix,) if user_prefix else ())
    sampling = SamplingOptions(sampler=s.sampler, steps=int(s.steps), guidance_scale=float(s.guidance_scale),
                               image_guidance_scale=float(s.image_guidance_scale),
                               resolution=None if s.resolution is None else int(s.resolution))
    return decoding, sampling


def prompt_format(cfg: DictConfig, checkpoint: dict | None = None) -> str:
    """`pretrained` or `instruct`. `auto` follows what the weights were trained as: the checkpoint's own stage
    when `ckpt_path` is given (an SFT checkpoint holds `init_from` in its hyper-parameters), else the
    experiment's stage (seedx_sft_* are instruction-tuned)."""
    fmt = cfg.generate.prompt_format
    if fmt not in PROMPT_FORMATS:
        raise ValueError(f"generate.prompt_format must be one of {PROMPT_FORMATS}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    if checkpoint is not None:
        return "instruct" if SEEDX.stage_of(checkpoint) == "sft" else "pretrained"
    return "instruct" if family_of(cfg) == SEEDX.name and "init_from" in cfg.stage else "pretrained"


def chat_format_of(mode: str, fmt: str) -> str:
    return mode_of(mode).pretrained_format if fmt == "pretrained" else "llama2"


def sequence_builder(cfg: DictConfig, tokenizer, mode: str, fmt: str | None = None) -> SeedXSequenceBuilder:
    """Prompts laid out as the MLLM was trained (data.* settings), in the mode's prompt format `fmt`
    (default: `prompt_format(cfg)`, the experiment's)."""
    fmt = fmt or prompt_format(cfg)
    d = cfg.data
    return SeedXSequenceBuilder(tokenizer, vit_image_size=d.vit_image_size, grids=list(d.grids),
                                num_image_tokens=d.num_image_tokens, max_length=d.max_length, truncation="cut",
                                min_image_size=d.min_image_size, max_aspect_ratio=d.max_aspect_ratio,
                                chat_format=chat_format_of(mode, fmt))


def dry_run(cfg: DictConfig, mode: str, fmt: str, requests: list[dict], out: Path) -> list[dict]:
    """The first turn of every request rendered as the model would be prompted, without building any model:
    one line per request in results.jsonl with its `prompt` (tokens, views with role, dropped turns)."""
    from src.data.mllm import load_tokenizer

    builder = sequence_builder(cfg, load_tokenizer(cfg.data.tokenizer_path), mode, fmt)
    results = []
    for request in requests:
        conv = Conversation.of(request)
        conv.next_prompt()
        sample = builder.prompt(conv.record(), t2i=False)
        results.append({"id": request["id"], "mode": mode, "prompt_format": fmt, "dry_run": True,
                        "prompt": rendered_prompt(sample, builder.tokenizer)})
    with (out / "results.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    return results


def inference_dtype(cfg: DictConfig) -> torch.dtype:
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
    return DTYPES[cfg.dtype]


def image_decoder(cfg: DictConfig, stage: str, device: torch.device, dtype: torch.dtype):
    """The mode's de-tokenizer and its ViT (the unconditional branch; `recon` encodes with it), built on first use."""
    @functools.cache
    def stage_module():
        if cfg.model.get("detokenizer") is None:
            raise ValueError("model.detokenizer: this experiment has no de-tokenizer config; pick one with "
                             "model/detokenizer=sdxl|tiny")
        model = OmegaConf.to_container(cfg.model, resolve=True)
        m = build_detokenizer({"vit": model["vit"], "detokenizer": model["detokenizer"]}, stage,
                              cfg.get("detok_ckpt_path")).to(device)
        for tower in (m.vit, m.resampler, m.unet):
            tower.to(dtype)
        hold_decoder_in(m.vae, dtype)  # latents of condition images are encoded in fp32
        return m

    return lambda: image_decoder_of(stage_module()), lambda: stage_module().vit


def check_experiment(cfg: DictConfig, mode: str) -> None:
    """The modes that talk need an MLLM experiment; `recon` only a de-tokenizer config."""
    if mode_of(mode).uses_llm and family_of(cfg) != SEEDX.name:
        raise ValueError(f"mode={mode} needs an MLLM experiment (e.g. experiment=seedx_pretrain_tiny); "
                         f"stage._target_ is {(cfg.get('stage') or {}).get('_target_')!r}")


def family_of(cfg: DictConfig) -> str | None:
    """The model family (src/specs) the experiment's `model` node configures, without importing its stage."""
    return model_family(cfg.get("model") or {})


def seed_llama_generate(cfg: DictConfig, mode: str, requests: list[dict], out: Path, device: torch.device,
                        dtype: torch.dtype) -> list[dict]:
    """SEED-LLaMA's modes: the LLM from `ckpt_path` / model.llm.*, the SEED tokenizer from `image_tokenizer.*`.
    Requests are answered `batch_size` at a time, turn by turn (a reply's images stay in the context as codes);
    images are drawn with `seed_decode.*` (the released unCLIP settings unless the experiment or the user set
    others; `sampling.*` is SEED-X's de-tokenizer and is not read here)."""
    from src.data.seed_llama import SeedLlamaSequenceBuilder
    from src.pipelines.conversation import Conversation, batches, safe_name
    from src.pipelines.seed_decode import build_decode_pipeline
    from src.pipelines.seed_llama import SEED_LLAMA_MODES, SeedDecodeOptions, SeedImages, SeedLlamaGenerator
    from src.specs.inference import build_image_tokenizer, build_seed_llama

    if mode not in SEED_LLAMA_MODES:
        raise ValueError(f"mode={mode}: a SEED-LLaMA experiment answers mode={'|'.join(SEED_LLAMA_MODES)}")
    decode = SeedDecodeOptions.of(cfg.get("seed_decode"))  # option mistakes fail before any model is built
    # an SFT checkpoint rebuilds the pre-trained start it trained on
    stage = build_seed_llama(OmegaConf.to_container(cfg.stage, resolve=True), cfg.get("ckpt_path")).to(device, dtype)
    it = cfg.image_tokenizer
    image_tokenizer = build_image_tokenizer(it.ckpt_path, it.experiment).to(device)
    fmt = cfg.generate.prompt_format
    instruct = fmt == "instruct" or (fmt == "auto" and stage.stage_name == "sft")
    # the instruction template the experiment trains with: `USER: ...\nASSISTANT:` (8B) or `[INST]` (14B)
    template = cfg.data.get("chat_format") if cfg.data.get("chat_format") in ("llama2", "vicuna") else "llama2"
    builder = SeedLlamaSequenceBuilder(stage.tokenizer, max_length=int(cfg.data.max_length), truncation="cut",
                                       chat_format=template if instruct else "plain")
    pipe = functools.cache(lambda: build_decode_pipeline(image_tokenizer.decoder_cfg, device, dtype))
    images = SeedImages(image_tokenizer, pipe, decode)
    generator = SeedLlamaGenerator(stage.mllm.llm, stage.tokenizer, builder, images)
    decoding, _ = options(cfg, "chat")
    index = {r["id"]: k for k, r in enumerate(requests)}
    rngs = {r["id"]: torch.Generator().manual_seed(int(cfg.seed) + k) for k, r in enumerate(requests)}
    results = []
    for chunk in batches([Conversation.of(r) for r in requests], int(cfg.batch_size)):
        rejected = {c.request["id"]: 0 for c in chunk}
        rnd = 0
        while active := [c for c in chunk if c.next_prompt()]:
            prompts = [generator.prompt_ids(c.record()) for c in active]
            replies = generator.generate(prompts, mode, decoding, [rngs[c.request["id"]] for c in active])
            for c, reply in zip(active, replies):
                rid = c.request["id"]
                content, drawn = [], []
                for kind, value in reply.pieces:
                    if kind == "text":
                        content.append({"text": value})
                        continue
                    path = out / f"{safe_name(rid)}_{rnd}_{len(drawn)}.png"
                    images.draw(value, int(cfg.seed) + index[rid]).save(path)
                    content.append({"image": str(path), "codes": value, "generate": True})
                    drawn.append(str(path))
                rejected[rid] += reply.rejected_images
                c.replies.append({"text": reply.text, "codes": reply.images, "images": drawn,
                                  "rejected_images": reply.rejected_images})
                if content:  # an empty reply lays out as no turn: `...ASSISTANT:` then the next user turn
                    c.turns.append({"role": "assistant", "content": content})
            rnd += 1
        for c in chunk:
            last = c.replies[-1] if c.replies else {"text": "", "codes": [], "images": []}
            results.append({"id": c.request["id"], "mode": mode, "text": last["text"],
                            "codes": last["codes"][0] if last["codes"] else None,
                            "image": last["images"][0] if last["images"] else None, "replies": c.replies,
                            "rejected_images": rejected[c.request["id"]]})
    with (out / "results.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in results)
    return results


def seed_tokenizer_recon(cfg: DictConfig, mode: str, requests: list[dict], out: Path, device: torch.device,
                         dtype: torch.dtype) -> list[dict]:
    """A SEED tokenizer's own check (SEED's demo_recon): every input image -> 32 codes -> its decoder's image,
    drawn with `seed_decode.*` (the released settings by default)."""
    from src.pipelines.conversation import safe_name
    from src.pipelines.seed_decode import build_decode_pipeline
    from src.pipelines.seed_llama import SeedDecodeOptions, SeedImages
    from src.specs.inference import build_image_tokenizer
    from src.specs.seed_tokenizer import SEED_TOKENIZER

    if mode != "recon":
        raise ValueError(f"mode={mode}: a SEED tokenizer experiment answers mode=recon (image -> codes -> image)")
    decode = SeedDecodeOptions.of(cfg.get("seed_decode"))
    if cfg.get("ckpt_path"):
        tokenizer = build_image_tokenizer(cfg.ckpt_path, None, keys=("ckpt_path", "experiment"))
    else:
        tokenizer = SEED_TOKENIZER.build("stage2", OmegaConf.to_container(cfg.stage, resolve=True))
    tokenizer = tokenizer.to(device)
    images = SeedImages(tokenizer, functools.cache(lambda: build_decode_pipeline(tokenizer.decoder_cfg, device, dtype)),
                        decode)
    results = []
    with (out / "results.jsonl").open("w") as f:
        for k, request in enumerate(requests):
            record = images.attach_codes(request)
            result = {"id": request["id"], "mode": mode, "inputs": [], "codes": [], "images": []}
            for j, item in enumerate(it for t in record["turns"] for it in t["content"] if "image" in it):
                path = out / f"{safe_name(request['id'])}_{j}.png"
                images.draw(item["codes"], int(cfg.seed) + k).save(path)
                result["inputs"].append(item["image"])
                result["codes"].append(item["codes"])
                result["images"].append(str(path))
            f.write(json.dumps(result) + "\n")
            results.append(result)
    return results


def check_request_images(requests: list[dict]) -> None:
    """Every input image of the requests decodes (a text file given as image= fails here, naming it and its
    request, not after the model is built)."""
    from src.data.records import BadSample, load_image

    for rec in requests:
        for item in (it for t in rec["turns"] for it in t["content"] if "image" in it and not it.get("generate")):
            try:
                load_image(rec, item)
            except BadSample as e:
                raise ValueError(f"request {rec['id']!r}: image {item['image']!r} is not a readable image "
                                 f"({e.reason}: {e.detail})") from None


def check_checkpoint_kinds(cfg: DictConfig, family: str) -> None:
    """`ckpt_path` of the experiment's kind and `detok_ckpt_path` a de-tokenizer's, before any model is built
    (each is read again, memory-mapped, where its model is built)."""
    from src.utils.checkpoint import read_checkpoint
    from src.utils.checkpoint_kind import check_checkpoint_kind

    for key, expected in (("ckpt_path", family), ("detok_ckpt_path", "detokenizer")):
        if cfg.get(key):
            check_checkpoint_kind(read_checkpoint(cfg[key], key), cfg[key], key, expected)


def generate(cfg: DictConfig) -> list[dict]:
    mode = cfg.mode
    spec = mode_of(mode)
    seed_llama = family_of(cfg) == "seed_llama"
    seed_tokenizer = family_of(cfg) == "seed_tokenizer"
    if not (seed_llama or seed_tokenizer):
        check_experiment(cfg, mode)
    requests = load_requests(cfg.get("requests"), cfg.get("prompt"), cfg.get("image"), mode)
    check_request_images(requests)
    check_checkpoint_kinds(cfg, "seed_llama" if seed_llama else "seed_tokenizer" if seed_tokenizer else "seedx_mllm")
    checkpoint = None
    if spec.uses_llm and not (seed_llama or seed_tokenizer) and cfg.get("ckpt_path"):
        from src.utils.checkpoint import read_checkpoint

        checkpoint = read_checkpoint(cfg.ckpt_path)  # its stage decides the prompt format (auto)
    fmt = prompt_format(cfg, checkpoint)
    decoding, sampling = options(cfg, mode, fmt)  # option mistakes fail before any model is built
    dtype = inference_dtype(cfg)
    if cfg.get("exported"):
        exported_paths(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, out)
    if spec.uses_llm and not (seed_llama or seed_tokenizer):
        requests = worded_requests(requests, mode, instruct=fmt == "instruct")
        if cfg.get("dry_run"):
            results = dry_run(cfg, mode, fmt, requests, out)
            log.info("dry run: %d prompts in %s", len(results), out / "results.jsonl")
            return results
    device = torch.device(cfg.device)
    torch.manual_seed(int(cfg.seed))
    if seed_llama or seed_tokenizer:
        run = seed_llama_generate if seed_llama else seed_tokenizer_recon
        results = run(cfg, mode, requests, out, device, dtype)
        log.info("%d results in %s", len(results), out / "results.jsonl")
        return results

    generator = builder = None
    if spec.uses_llm:
        stage = build_mllm(OmegaConf.to_container(cfg.stage, resolve=True), cfg.get("ckpt_path"),
                           checkpoint).to(device, dtype)
        generator = MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer, stage.vit_chunk_size)
        builder = sequence_builder(cfg, stage.tokenizer, mode, fmt)
    decoder, recon_vit = image_decoder(cfg, spec.detokenizer, device, dtype)
    runner = ConversationRunner(mode, generator, builder, decoder, decoding, sampling, out, seed=int(cfg.seed),
                                batch_size=int(cfg.batch_size), progress=bool(cfg.progress), recon_encoder=recon_vit,
                                save_prompts=bool(cfg.get("save_prompts", False)))
    results = runner.run(requests)
    log.info("%d results in %s", len(results), out / "results.jsonl")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate.yaml")
def main(cfg: DictConfig) -> None:
    pin_output_dir(cfg)
    generate(cfg)


if __name__ == "__main__":
    main()
