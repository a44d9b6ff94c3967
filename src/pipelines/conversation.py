"""Requests in, replies out: every `src.generate` mode as one conversation loop over plain pipelines.

A request is a record of the data schema (DESIGN.md): `turns` of `user` / `assistant` content. Every user
turn that no assistant turn answers gets a generated reply, in order, and the reply (text, boxes and the
images it drew) joins the context of the next turn: multi-turn chat, stories and slide decks keep the whole
conversation. An image the model drew goes back as the model's own span (`<img>` + the 64 query tokens +
`</img>`, `"generate": true`), exactly as such an image sits in training; its PNG is only for the reader
and for a stage-2 condition. Requests run batched, turn by turn.

What differs between modes is only the table below: where the reply's image goes (`DecodingOptions.image`,
per prompt format), which de-tokenizer draws it and what its condition image is, the grid input images get,
and the prompt wording of each format.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from src.data.bbox import dequantize_box
from src.data.images import vit_view
from src.data.records import BadSample, load_image, validate_record
from src.pipelines.detok import ImageDecoder, SamplingOptions
from src.pipelines.mllm import DecodingOptions, Generated, MLLMGenerator


@dataclass(frozen=True)
class Mode:
    image: str  # DecodingOptions.image policy of an instruction-tuned model's replies
    detokenizer: str  # "stage1" or "stage2": which de-tokenizer draws the reply's images
    pretrained_format: str  # chat format of the pre-trained model's prompt (official inference)
    condition: str | None = None  # stage 2: the input image it edits, "last" or "first" of the user turn
    needs_image: bool = False
    uses_llm: bool = True
    grid: str | None = None  # grid of input images that name none (None: any-res); as the task was trained
    pretrained_image: str | None = None  # the pre-trained model's image policy (None: `image`)
    instruct_text: str = "{text}"  # how an instruction-tuned model is asked (official SEED-X-I t2i wording)
    pretrained_box_first: bool = False  # the pre-trained model's answer starts with a forced `<box_start>`


MODES: dict[str, Mode] = {
    "chat": Mode("free", "stage1", "qa"),
    # the image alone as the prompt: the pretrained model continues it with its caption (also SEED-LLaMA's mode)
    "caption": Mode("free", "stage1", "plain", needs_image=True),
    # pre-trained: official bbox_prompt `{image}{caption} [[ <box_start>`; SEED-X-I: `[INST] {image}{q} [/INST]`
    "ground": Mode("free", "stage1", "ground", needs_image=True, pretrained_box_first=True),
    # pre-trained: `{caption}<img>`; SEED-X-I: `[INST] Generate an image: {caption} [/INST]\n`, free decoding
    # (it answers "Here is ..." then the image), `<img>` forced only if the reply would end without one
    "t2i": Mode("required", "stage1", "plain", pretrained_image="first", instruct_text="Generate an image: {text}"),
    # SEED-X-Edit / Try-on: inputs at a 1x1 grid (official resolution_grids ['1x1']), free decoding (a short reply,
    # then the image), as the official edit script
    "edit": Mode("required", "stage2", "plain", condition="last", needs_image=True, grid="1x1",
                 pretrained_image="first"),
    "recon": Mode("free", "stage1", "plain", needs_image=True, uses_llm=False),
    # a reply runs to its end (slides go on after a picture); `<img>` forced where it would end without one
    "story": Mode("required", "stage1", "plain"),
    "ppt": Mode("required", "stage1", "plain"),
    "tryon": Mode("required", "stage2", "plain", condition="first", needs_image=True, grid="1x1",
                  pretrained_image="first"),
}


def mode_of(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"mode={name!r}: expected one of {sorted(MODES)}")
    return MODES[name]


# ---- requests ------------------------------------------------------------------------------------------
def load_requests(path: str | None, prompt: str | None, images, mode: str) -> list[dict]:
    """Requests from `requests=` (jsonl of records; image paths relative to the file) or `prompt=`/`image=`.

    Every problem (schema, missing image, a mode's missing input image) is reported before any model is
    built, naming the request."""
    spec = mode_of(mode)
    if path and (prompt or images):
        raise ValueError("requests= and prompt=/image= are exclusive: put the prompt into the requests file")
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"requests={path!r} does not exist (a jsonl file of request records)")
        lines = [(i, ln) for i, ln in enumerate(p.read_text().splitlines(), 1) if ln.strip()]
        raw, base = [], p.resolve().parent
        for lineno, line in lines:
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"requests={path}:{lineno}: not JSON ({e})") from None
    else:
        images = [images] if isinstance(images, str) else list(images or [])
        if not prompt and not images:
            raise ValueError(f"mode={mode}: give prompt= (and image=) or requests=FILE.jsonl")
        content = [{"image": im} for im in images] + ([{"text": prompt}] if prompt else [])
        raw, base = [{"turns": [{"role": "user", "content": content}]}], Path.cwd()
    requests = []
    for i, rec in enumerate(raw):
        if isinstance(rec, dict):
            rec = {"id": f"request_{i:04d}", "source": "generate", **rec}
        try:
            validate_record(rec)
        except BadSample as e:
            raise ValueError(f"request {i} ({path or 'prompt='}): {e.reason}: {e.detail}") from None
        rec["turns"] = [_absolute_images(t, base, rec["id"], spec.grid) for t in rec["turns"]]
        has_image = any("image" in item for t in rec["turns"] for item in t["content"])
        if spec.needs_image and not has_image:
            raise ValueError(f"mode={mode} needs an input image: request {rec['id']!r} has none (image=PATH)")
        if spec.uses_llm and not any(t.get("role") == "user" for t in rec["turns"]):
            raise ValueError(f"request {rec['id']!r} has no user turn to answer")
        requests.append(rec)
    if len({r["id"] for r in requests}) != len(requests):
        raise ValueError("requests: ids must be unique")
    return requests


def _absolute_images(turn: dict, base: Path, rid: str, grid: str | None = None) -> dict:
    """Image paths made absolute; input images that name no grid get the mode's `grid`."""
    content = []
    for item in turn["content"]:
        if "image" in item:
            path = (base / item["image"]).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"request {rid!r}: image {item['image']!r} does not exist ({path})")
            item = {**item, "image": str(path)}
            if grid is not None and "grid" not in item and not item.get("generate", False):
                item["grid"] = grid
        content.append(item)
    return {**turn, "content": content}


def worded_requests(requests: list[dict], mode: str, instruct: bool) -> list[dict]:
    """The requests' user text as the prompt format asks it: an instruction-tuned model gets the mode's
    official wording (`Generate an image: {caption}` for t2i); the pre-trained format takes the text as is."""
    template = mode_of(mode).instruct_text
    if not instruct or template == "{text}":
        return requests
    out = []
    for rec in requests:
        turns = [{**t, "content": [{**it, "text": template.format(text=it["text"])} if "text" in it else it
                                   for it in t["content"]]} if t.get("role") == "user" else t
                 for t in rec["turns"]]
        out.append({**rec, "turns": turns})
    return out


# ---- replies -------------------------------------------------------------------------------------------
def reply_pieces(token_ids: list[int], tokenizer, ids) -> list[tuple[str, object]]:
    """Generated ids -> [("text", str) | ("box", (xc, yc, w, h)) | ("image", k)]: k-th generated image.

    Image spans (`<img>...</img>`) and well-formed boxes become items; the end of sequence and stray
    special tokens (a lone `<loc-N>`) are dropped."""
    loc = {t: v for v, t in enumerate(ids.loc)}
    specials = {ids.img_start, ids.img_end, ids.box_start, ids.box_end, *ids.img, *loc}
    eos = tokenizer.eos_token_id
    pieces: list[tuple[str, object]] = []
    text: list[int] = []
    n_images, i = 0, 0

    def flush() -> None:
        s = tokenizer.decode(text, skip_special_tokens=True) if text else ""
        if s.strip():
            pieces.append(("text", s))
        text.clear()

    while i < len(token_ids):
        tok = token_ids[i]
        if tok == ids.img_start:
            flush()
            end = token_ids.index(ids.img_end, i) if ids.img_end in token_ids[i:] else len(token_ids)
            pieces.append(("image", n_images))
            n_images += 1
            i = end + 1
            continue
        window = token_ids[i:i + 6]
        if tok == ids.box_start and len(window) == 6 and window[5] == ids.box_end and all(t in loc for t in window[1:5]):
            flush()
            pieces.append(("box", tuple(loc[t] for t in window[1:5])))
            i += 6
            continue
        if tok != eos and tok not in specials:
            text.append(tok)
        i += 1
    flush()
    return pieces


def safe_name(rid: str) -> str:
    """A file-name stem for a request id; ids that had to change get a hash, so two never share files."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", rid).strip("_.") or "request"
    return safe if safe == rid else f"{safe}_{hashlib.sha1(rid.encode()).hexdigest()[:8]}"


@dataclass
class Conversation:
    """One request being answered: the turns so far and the original turns still to come."""

    request: dict
    turns: list[dict]
    todo: list[dict]
    replies: list[dict]

    @classmethod
    def of(cls, request: dict) -> Conversation:
        return cls(request, [], [dict(t) for t in request["turns"]], [])

    def next_prompt(self) -> bool:
        """Move turns into the context up to the next user turn without an answer; False when done."""
        while self.todo:
            turn = self.todo.pop(0)
            self.turns.append(turn)
            if turn.get("role") == "user" and not (self.todo and self.todo[0].get("role") == "assistant"):
                return True
        return False

    def record(self) -> dict:
        return {"id": self.request["id"], "source": self.request["source"], "turns": self.turns}

    def images_before_reply(self) -> list[str]:
        return [item["image"] for item in self.turns[-1]["content"] if "image" in item]

    def last_image(self) -> str | None:
        found = [item["image"] for t in self.turns for item in t["content"] if "image" in item]
        return found[-1] if found else None


# ---- the loop ------------------------------------------------------------------------------------------
class ConversationRunner:
    """Answers requests in one mode with plain pipelines: the MLLM generator (None for `recon`), the
    sequence builder that lays out its prompts, and the de-tokenizer (built on first use: chat draws
    only when the model opens an image; a factory that returns None draws nothing)."""

    def __init__(self, mode: str, generator: MLLMGenerator | None, builder, decoder: Callable[[], ImageDecoder],
                 decoding: DecodingOptions, sampling: SamplingOptions, out_dir: str | Path, seed: int = 0,
                 batch_size: int = 4, progress: bool = True, recon_encoder: Callable[[], torch.nn.Module] | None = None,
                 save_prompts: bool = False):
        self.mode_name, self.mode = mode, mode_of(mode)
        self.generator, self.builder = generator, builder
        self._decoder_factory, self._decoder = decoder, None
        self.decoding, self.sampling = decoding, sampling
        self.out = Path(out_dir)
        self.seed, self.batch_size, self.progress = int(seed), int(batch_size), progress
        self.recon_encoder = recon_encoder
        self.save_prompts = bool(save_prompts)

    @property
    def decoder(self) -> ImageDecoder:
        if self._decoder is None:
            self._decoder = self._decoder_factory()
        return self._decoder

    def _bar(self, total: int | None, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False)

    def _timesteps(self, desc: str):
        def wrap(timesteps):
            with self._bar(len(timesteps), desc) as bar:
                for t in timesteps:
                    yield t
                    bar.update(1)
        return wrap

    def run(self, requests: list[dict]) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        convs = [Conversation.of(r) for r in requests]
        if self.mode.uses_llm:
            rnd = 0
            while True:
                active = [c for c in convs if c.next_prompt()]
                if not active:
                    break
                for k, chunk in enumerate(batches(active, self.batch_size)):
                    self._answer(chunk, rnd, k)
                rnd += 1
        else:
            for k, chunk in enumerate(batches(convs, self.batch_size)):
                self._reconstruct(chunk, k)
        results = [self._result(c) for c in convs]
        with open(self.out / "results.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        return results

    def _generator(self, *salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(hash((self.seed, *salt)) % (2**63))

    def _answer(self, chunk: list[Conversation], rnd: int, k: int) -> None:
        samples = [self.builder.prompt(c.record(), t2i=False) for c in chunk]
        with self._bar(None, f"{self.mode_name}: tokens (turn {rnd + 1})") as bar:
            gens = self.generator.generate(samples, self.decoding, self._generator(0, rnd, k), bar.update)
        drawn = self._draw(chunk, gens, rnd, k)
        for c, g, images, sample in zip(chunk, gens, drawn, samples):
            self._add_reply(c, g, images, rnd)
            c.replies[-1]["dropped_turns"] = int(sample["dropped_turns"])
            if self.save_prompts:
                c.replies[-1]["prompt"] = rendered_prompt(sample, self.builder.tokenizer)

    def _draw(self, chunk: list[Conversation], gens: list[Generated], rnd: int, k: int) -> list[list[str]]:
        """Decode every generated image of the chunk in one de-tokenizer call; PNG paths per reply."""
        feats, owners, conditions = [], [], []
        for i, (c, g) in enumerate(zip(chunk, gens)):
            for j, f in enumerate(g.images):
                feats.append(f)
                owners.append((i, j))
                conditions.append(self._condition(c))
        out: list[list[str]] = [[] for _ in chunk]
        decoder = self.decoder if feats else None
        if decoder is None:  # nothing drawn, or no de-tokenizer (training-time samples without one)
            return out
        images = decoder.decode(torch.stack(feats), self.sampling, self._generator(1, rnd, k),
                                conditions=conditions if decoder.conditional else None,
                                progress=self._timesteps(f"{self.mode_name}: denoising"))
        for (i, j), im in zip(owners, images):
            path = self.out / f"{safe_name(chunk[i].request['id'])}_turn{rnd}_img{j}.png"
            im.save(path)
            out[i].append(str(path))
        return out

    def _condition(self, c: Conversation) -> Image.Image | None:
        if self.mode.condition is None:
            return None
        here = c.images_before_reply() or ([c.last_image()] if c.last_image() else [])
        if not here:
            raise ValueError(f"mode={self.mode_name}: request {c.request['id']!r} has no image to condition on")
        path = here[-1] if self.mode.condition == "last" else here[0]
        return load_image({}, {"image": path})

    def _add_reply(self, c: Conversation, g: Generated, images: list[str], rnd: int) -> None:
        tok = self.generator.tokenizer
        pieces = reply_pieces(g.token_ids, tok, self.generator.ids)
        basis = c.last_image()
        size = load_image({}, {"image": basis}).size if basis else None
        content, boxes, texts = [], [], []
        for kind, value in pieces:
            if kind == "text":
                content.append({"text": value})
                texts.append(value)
            elif kind == "image" and value < len(images):
                content.append({"image": images[value], "generate": True})  # the model's own span, as trained
            elif kind == "box" and size is not None:
                box = [round(v, 2) for v in dequantize_box(value, *size)]
                boxes.append(box)
                content.append({"box": box})
        # raw: every generated token, the 64 forced query tokens of each image shortened to their count
        raw = re.sub(r"(?:<img_\d{5}>)+", lambda m: f"[{m.group(0).count('<img_')} image tokens]",
                     tok.decode(g.token_ids))
        reply = {"turn": rnd, "text": "".join(texts).strip(), "raw": raw,
                 "images": images, "boxes": boxes, "finished": g.finished}
        if boxes:
            reply["boxes_image"] = self._draw_boxes(c, basis, boxes, rnd)
        c.replies.append(reply)
        # The reply joins the context: a turn must hold something, so an empty reply stays out of it.
        if content:
            c.turns.append({"role": "assistant", "content": content})

    def _draw_boxes(self, c: Conversation, image: str, boxes: list[list[float]], rnd: int) -> str:
        im = load_image({}, {"image": image}).copy()
        draw = ImageDraw.Draw(im)
        width = max(1, round(min(im.size) / 100))
        for box in boxes:
            draw.rectangle(box, outline=(255, 0, 0), width=width)
        path = self.out / f"{safe_name(c.request['id'])}_turn{rnd}_boxes.png"
        im.save(path)
        return str(path)

    @torch.no_grad()
    def _reconstruct(self, chunk: list[Conversation], k: int) -> None:
        vit = self.recon_encoder()
        paths = [[item["image"] for t in c.request["turns"] for item in t["content"] if "image" in item]
                 for c in chunk]
        flat = [p for ps in paths for p in ps]
        dtype = next(vit.parameters()).dtype
        device = next(vit.parameters()).device
        pixels = torch.stack([vit_view(load_image({}, {"image": p}), vit.cfg.image_size) for p in flat])
        feats = vit.pool_for_generation(vit(pixels.to(device, dtype)))
        images = self.decoder.decode(feats, self.sampling, self._generator(2, k),
                                     progress=self._timesteps("recon: denoising"))
        it = iter(images)
        for c, ps in zip(chunk, paths):
            files = []
            for j, _ in enumerate(ps):
                path = self.out / f"{safe_name(c.request['id'])}_recon{j}.png"
                next(it).save(path)
                files.append(str(path))
            c.replies.append({"turn": 0, "text": "", "images": files, "boxes": [], "inputs": ps})

    def _result(self, c: Conversation) -> dict:
        return {"id": c.request["id"], "mode": self.mode_name, "replies": c.replies,
                "turns": c.turns if self.mode.uses_llm else c.request["turns"]}


def rendered_prompt(sample: dict, tokenizer) -> dict:
    """What the model was fed: token strings, the image views in order (kind, role, grid) and how many of the
    oldest turns were dropped to fit `data.max_length`."""
    return {"tokens": tokenizer.convert_ids_to_tokens(sample["input_ids"].tolist()), "views": sample["views"],
            "dropped_turns": int(sample.get("dropped_turns", 0))}


def batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
