"""VIST (Visual Storytelling, story-in-sequence) -> multi-turn story records for SEED-X-Story.

    python -m data_prep.convert_vist --input vist/sis/train.story-in-sequence.json \\
        --image-root vist/images/train --out data/sft --name vist --context 2

Input: VIST's SIS annotation JSON ``{"images": [...], "albums": [...], "annotations": [[{"story_id",
"photo_flickr_id", "worker_arranged_photo_order", "text", "original_text", ...}], ...]}`` (one step per
inner list) and its image folder (``<photo_flickr_id>.jpg`` / ``.png``, found anywhere under the root).

A story of n steps becomes, with ``--context k``::

    user:      [image 1, sentence 1, ..., image k, sentence k, "<prompt>"]
    assistant: [sentence k+1, {image k+1, generate}]
    user:      ["<prompt>"]
    assistant: [sentence k+2, {image k+2, generate}] ...

The context images are comprehension inputs; every later image is a generation target after its sentence
(text first, then the image: the order `src.generate mode=story` decodes). ``text`` is VIST's anonymised
sentence (``original_text`` with ``--original-text``).

Skips: ``bad_json``, ``missing_file`` / ``corrupt_image`` (a story with a lost photo is dropped whole: its
steps depend on each other), ``too_short`` (fewer than k + 1 steps), ``bad_annotation`` (a step without
text or photo id, or a repeated photo order).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from data_prep.common import (
    ImageIndex,
    RecordWriter,
    converter_parser,
    expand_inputs,
    progress,
    writer_from_args,
)
from src.data.records import BadSample

DEFAULT_NAME = "vist"
DEFAULT_PROMPT = "Continue the story."


def story_turns(steps: list[tuple[object, str]], context: int, prompt: str) -> list[dict]:
    """[(image, sentence), ...] in story order -> turns (see the module docstring)."""
    if len(steps) < context + 1:
        raise BadSample("too_short", f"{len(steps)} steps; --context {context} needs at least {context + 1}")
    first = [item for image, text in steps[:context] for item in ({"image": image}, {"text": text})]
    if first:  # the prompt follows the last context sentence after a space ("... food . Continue the story.")
        first[-1] = {"text": f"{first[-1]['text']} {prompt}"}
    else:
        first = [{"text": prompt}]
    turns = [{"role": "user", "content": first}]
    for k, (image, text) in enumerate(steps[context:]):
        if k:
            turns.append({"role": "user", "content": [{"text": prompt}]})
        turns.append({"role": "assistant", "content": [{"text": text}, {"image": image, "generate": True}]})
    return turns


def convert(inputs: str | Path | list, out: str | Path, *, image_root: str | Path, context: int = 2,
            prompt: str = DEFAULT_PROMPT, original_text: bool = False, name: str = DEFAULT_NAME,
            source: str | None = None, shards: bool = False, shard_maxcount: int = 10_000, quiet: bool = False) -> dict:
    if context < 0:
        raise ValueError(f"--context must be >= 0, got {context}")
    files = expand_inputs(inputs, (".json",))
    index = ImageIndex(image_root)
    field = "original_text" if original_text else "text"
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount, quiet=quiet) as writer:
        for path in files:
            try:
                data = json.loads(path.read_text("utf-8"))
                annotations = data["annotations"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                writer.skip("bad_json", where=str(path), detail=f"not a VIST SIS file: {type(e).__name__}: {e}")
                continue
            stories: dict[str, list[tuple[int, str, dict]]] = defaultdict(list)
            for i, group in enumerate(annotations):
                for step in group if isinstance(group, list) else [group]:
                    if isinstance(step, dict) and step.get("story_id") is not None:
                        stories[str(step["story_id"])].append((i, f"{path}:annotations[{i}]", step))
                    else:
                        writer.skip("bad_json", where=f"{path}:annotations[{i}]", detail="step is not an object with story_id")
            for story_id, steps in progress(stories.items(), desc=f"{name} {path.name}", unit="story",
                                              writer=writer):
                rid = f"{writer.source}/{story_id}"
                with writer.row(id=rid, where=steps[0][1]):
                    orders = [s.get("worker_arranged_photo_order") for _, _, s in steps]
                    if len(set(orders)) != len(orders) or not all(isinstance(o, int) for o in orders):
                        raise BadSample("bad_annotation", f"photo orders {orders} are not distinct integers")
                    pairs = []
                    for _, _, s in sorted(steps, key=lambda t: t[2]["worker_arranged_photo_order"]):
                        text, photo = s.get(field), s.get("photo_flickr_id")
                        if not isinstance(text, str) or not text.strip() or not photo:
                            raise BadSample("bad_annotation", f"step {s.get('storylet_id')} has no {field} or photo id")
                        pairs.append((index.get(key=str(photo)), text.strip()))
                    turns = story_turns(pairs, context, prompt)
                    writer.write({"id": rid, "source": writer.source, "turns": turns}, where=steps[0][1])
    index.close()
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, DEFAULT_NAME, "VIST SIS json files (e.g. sis/train.story-in-sequence.json)")
    parser.add_argument("--image-root", required=True, help="VIST image folder (<photo_flickr_id>.jpg)")
    parser.add_argument("--context", type=int, default=2, help="story steps given in the first user turn (default 2)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the user's request each turn (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--original-text", action="store_true", help="use original_text instead of the anonymised text")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, image_root=args.image_root, context=args.context, prompt=args.prompt,
                   original_text=args.original_text, **writer_from_args(args))


if __name__ == "__main__":
    main()
