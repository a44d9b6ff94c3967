"""Slide decks (rendered slide, title/body text, layout boxes) -> slide-generation records for SEED-X-PPT.

    python -m data_prep.convert_slides --input decks/ --out data/sft --name slides

The paper's slide data is in-house; there is no public release. This converter reads the layout that
slide-parsing tools produce (python-pptx exports, PDF layout parsers), one JSON file per deck, paths
relative to the JSON file::

    {"id": "deck-001", "topic": "Our Q3 roadmap",                       # topic optional
     "slides": [{"image": "slides/01.png",                              # the rendered slide
                 "title": "Roadmap", "body": "Three launches ...",       # body optional
                 "elements": [{"type": "picture", "box": [x0, y0, x1, y1], "image": "media/img1.png"},
                              {"type": "text", "box": [...], "text": "..."}]}]}

``box`` is in pixels of the rendered slide. A picture without its own ``image`` is cropped from the
rendered slide. A deck becomes one conversation, a turn per slide::

    user:      ["Make a slide titled \\"Roadmap\\" for a deck about Our Q3 roadmap."]
    assistant: ["Roadmap\\nThree launches ...", "picture", {box, canvas}, {picture, generate}, "text", {box, canvas}]

so the model writes the text, the layout (each box as `<box_start><loc-…>×4<box_end>` on the slide canvas)
and generates every picture (a regression target decoded by the stage-1 de-tokenizer).

Skips: ``bad_json``, ``missing_file`` / ``corrupt_image``, ``bad_annotation`` (no slides, a slide without a
title, a box outside the slide or of the wrong form, an element of unknown type).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from data_prep.common import (
    RecordWriter,
    converter_parser,
    expand_inputs,
    image_from_bytes,
    image_from_file,
    progress,
    writer_from_args,
)
from src.data.records import BadSample, load_image

DEFAULT_NAME = "slides"
ELEMENT_TYPES = ("picture", "text", "title", "chart", "table")


def slide_prompt(title: str, topic: str | None) -> str:
    return f'Make a slide titled "{title}"' + (f" for a deck about {topic}." if topic else ".")


def _crop(slide_path: Path, box: list[float]):
    im = load_image({}, {"image": str(slide_path)})
    buf = io.BytesIO()
    im.crop(tuple(round(v) for v in box)).convert("RGB").save(buf, format="PNG")
    return image_from_bytes(buf.getvalue(), ".png")


def slide_turns(deck: dict, root: Path) -> list[dict]:
    slides = deck.get("slides")
    if not isinstance(slides, list) or not slides:
        raise BadSample("bad_annotation", "deck has no 'slides' list")
    topic = deck.get("topic") if isinstance(deck.get("topic"), str) and deck["topic"].strip() else None
    turns = []
    for s, slide in enumerate(slides):
        title = slide.get("title") if isinstance(slide, dict) else None
        if not isinstance(title, str) or not title.strip():
            raise BadSample("bad_annotation", f"slides[{s}] has no title")
        slide_path = root / str(slide.get("image", ""))
        if not slide.get("image") or not slide_path.is_file():
            raise BadSample("missing_file", f"slides[{s}].image {slide.get('image')!r} does not exist")
        with Image.open(slide_path) as im:
            width, height = im.size
        text = title.strip() + (f"\n{slide['body'].strip()}" if isinstance(slide.get("body"), str) and slide["body"].strip() else "")
        content: list[dict] = [{"text": text}]
        for e, el in enumerate(slide.get("elements") or []):
            at = f"slides[{s}].elements[{e}]"
            kind, box = el.get("type"), el.get("box")
            if kind not in ELEMENT_TYPES:
                raise BadSample("bad_annotation", f"{at}.type={kind!r} is not one of {ELEMENT_TYPES}")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                    and 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
                raise BadSample("bad_annotation", f"{at}.box={box!r} is not inside the {width}x{height} slide")
            # each element label on its own line after the slide text ("...orbit.\npicture<box_start>...")
            content += [{"text": f"\n{kind}"}, {"box": [float(v) for v in box], "canvas": [width, height]}]
            if kind == "picture":
                picture = image_from_file(root / el["image"]) if el.get("image") else _crop(slide_path, box)
                content.append({"image": picture, "generate": True})
        turns.append({"role": "user", "content": [{"text": slide_prompt(title.strip(), topic)}]})
        turns.append({"role": "assistant", "content": content})
    return turns


def convert(inputs: str | Path | list, out: str | Path, *, name: str = DEFAULT_NAME, source: str | None = None,
            shards: bool = False, shard_maxcount: int = 10_000, quiet: bool = False) -> dict:
    files = expand_inputs(inputs, (".json",))
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount, quiet=quiet) as writer:
        for path in progress(files, desc=name, unit="deck", writer=writer):
            rid = f"{writer.source}/{path.stem}"
            with writer.row(id=rid, where=str(path)) as ctx:
                try:
                    deck = json.loads(path.read_text("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise BadSample("bad_json", f"{type(e).__name__}: {e}") from None
                if not isinstance(deck, dict):
                    raise BadSample("bad_json", "a deck file holds one JSON object")
                if deck.get("id"):
                    ctx.id = rid = f"{writer.source}/{deck['id']}"
                writer.write({"id": rid, "source": writer.source, "turns": slide_turns(deck, path.parent)},
                             where=str(path))
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, DEFAULT_NAME, "deck .json files or folders of them")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, **writer_from_args(args))


if __name__ == "__main__":
    main()
