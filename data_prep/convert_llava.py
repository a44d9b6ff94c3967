"""LLaVA-format instruction data (LLaVA-Instruct, LLaVAR, ShareGPT4V, ...) -> user/assistant chat records, or
caption -> image generation pairs (``--generation``, SEED-X-I's image-generation data from ShareGPT4V captions).

    python -m data_prep.convert_llava --input llava_v1_5_mix665k.json --image-root data/ --out data/sft --name llava
    python -m data_prep.convert_llava --input sharegpt4v_instruct_gpt4-vision_cap100k.json --image-root data/ \\
        --out data/sft --name sharegpt4v_t2i --generation

Input: a JSON file holding a list (``.jsonl`` with one entry a line also works) of LLaVA-format entries::

    {"id": "003166", "image": "coco/train2017/003166.jpg",          # or a list of paths (multi-image)
     "conversations": [{"from": "human", "value": "<image>\\nWhat is written on the sign?"},
                       {"from": "gpt", "value": "It says ..."}, ...]}

``image`` paths are relative to ``--image-root`` (a bare file name is also looked up anywhere under it).
``from``: ``human`` / ``user`` -> ``user``, ``gpt`` / ``assistant`` -> ``assistant``, ``system`` -> ``system``.
Each ``<image>`` placeholder is replaced by the next image, in order (the text around it becomes separate
text items, stripped); an entry with images but no placeholder gets them at the start of its first user turn
(LLaVA's convention). Entries without ``image`` become text-only chats.

``--generation``: an entry with one image and one human/gpt exchange becomes ``user: [gpt's answer, the
caption]`` -> ``assistant: [the image, generate]``: the caption asks for the image, and the image is the
regression target (its ViT features), as the pre-training caption -> image direction but in chat form.

Record id: ``<source>/<entry id>`` (``-<n>`` appended to repeats). Skips: ``missing_file``, ``corrupt_image``,
``bad_json`` (unparsable file / entry not an object), ``bad_conversation`` (no turns, unknown ``from``, a
non-text ``value``, an empty turn, a placeholder count that disagrees with the images, placeholders without
images; with ``--generation``: not one image and one exchange).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.common import (
    ImageBlob,
    ImageIndex,
    RecordWriter,
    converter_parser,
    expand_inputs,
    iter_rows,
    progress,
    writer_from_args,
)
from src.data.records import BadSample

DEFAULT_NAME = "llava"
IMAGE_TAG = "<image>"
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(conversations: Any) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise BadSample("bad_conversation", "'conversations' must be a non-empty list")
    raw: list[tuple[str, str]] = []
    for j, msg in enumerate(conversations):
        if not isinstance(msg, dict):
            raise BadSample("bad_conversation", f"conversations[{j}] is not an object")
        role = ROLE_MAP.get(str(msg.get("from", "")).lower())
        if role is None:
            raise BadSample("bad_conversation", f"conversations[{j}].from={msg.get('from')!r} is not human/gpt")
        value = msg.get("value")
        if not isinstance(value, str):
            raise BadSample("bad_conversation", f"conversations[{j}].value is not text")
        raw.append((role, value))
    return raw


def conversation_turns(conversations: Any, images: ImageBlob | list[ImageBlob] | None) -> list[dict]:
    """LLaVA ``conversations`` -> our turns, the k-th image where the k-th ``<image>`` stood."""
    images = [] if images is None else [images] if isinstance(images, ImageBlob) else list(images)
    raw = _messages(conversations)
    n_tags = sum(value.count(IMAGE_TAG) for _, value in raw)
    if n_tags and n_tags != len(images):
        raise BadSample("bad_conversation", f"{n_tags} {IMAGE_TAG} placeholder(s) but {len(images)} image(s)")
    place_first = bool(images) and n_tags == 0
    queue = iter(images)
    turns = []
    for j, (role, value) in enumerate(raw):
        content: list[dict] = []
        if place_first and role == "user":
            content += [{"image": im} for im in images]
            place_first = False
        for k, part in enumerate(value.split(IMAGE_TAG)):
            if k:
                content.append({"image": next(queue)})
            if part.strip():
                content.append({"text": part.strip()})
        if not content:
            raise BadSample("bad_conversation", f"conversations[{j}] is empty")
        turns.append({"role": role, "content": content})
    if place_first:
        raise BadSample("bad_conversation", "entry has images but no user turn to put them in")
    return turns


def generation_turns(conversations: Any, images: list[ImageBlob]) -> list[dict]:
    """One image + one exchange (a caption entry) -> the caption asks, the image answers (generated)."""
    raw = _messages(conversations)
    if len(images) != 1 or [r for r, _ in raw] != ["user", "assistant"]:
        raise BadSample("bad_conversation", f"--generation needs one image and one human/gpt exchange, got "
                                            f"{len(images)} image(s) and roles {[r for r, _ in raw]}")
    caption = raw[1][1].replace(IMAGE_TAG, "").strip()
    if not caption:
        raise BadSample("bad_conversation", "the caption (gpt value) is empty")
    return [{"role": "user", "content": [{"text": caption}]},
            {"role": "assistant", "content": [{"image": images[0], "generate": True}]}]


def entry_images(row: dict, index: ImageIndex | None) -> list[ImageBlob]:
    ref = row.get("image")
    if ref in (None, "", []):
        return []
    refs = ref if isinstance(ref, list) else [ref]
    if not all(isinstance(r, str) and r for r in refs):
        raise BadSample("bad_conversation", f"'image' must be a path or a list of paths, got {ref!r:.60}")
    if index is None:
        raise BadSample("missing_file", f"{refs[0]}: no --image-root given")
    return [index.get(name=r) for r in refs]


def convert(inputs: str | Path | list, out: str | Path, *, image_root: str | Path | None = None,
            name: str = DEFAULT_NAME, source: str | None = None, shards: bool = False,
            shard_maxcount: int = 10_000, quiet: bool = False, generation: bool = False) -> dict:
    """Convert LLaVA-format JSON / jsonl files; returns the writer's stats dict."""
    files = expand_inputs(inputs, (".json", ".jsonl"))
    index = ImageIndex(image_root) if image_root is not None else None
    seen: dict[str, int] = {}
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount,
                      quiet=quiet) as writer:
        for path in files:
            for i, (where, row) in enumerate(progress(iter_rows(path), desc=f"{name} {path.name}",
                                                       unit="entry", writer=writer)):
                entry_id = row.get("id") if isinstance(row, dict) and row.get("id") not in (None, "") else None
                base = str(entry_id) if entry_id is not None else f"{path.name.split('.', 1)[0]}-{i}"
                n = seen.get(base, 0)
                seen[base] = n + 1
                rid = f"{writer.source}/{base}" + (f"-{n}" if n else "")
                with writer.row(id=rid, where=where):
                    if isinstance(row, BadSample):
                        raise row
                    images = entry_images(row, index)
                    make = generation_turns if generation else conversation_turns
                    turns = make(row.get("conversations"), images)
                    writer.write({"id": rid, "source": writer.source, "turns": turns}, where=where)
        if index is not None:
            index.close()
    return writer.stats()


def main(argv: list[str] | None = None, default_name: str = DEFAULT_NAME, doc: str = __doc__) -> dict:
    parser = converter_parser(doc, default_name, "LLaVA-format .json (a list) or .jsonl files, folders, globs")
    parser.add_argument("--image-root", default=None, help="folder the entries' 'image' paths are relative to")
    parser.add_argument("--generation", action="store_true",
                        help="caption entries -> caption asks, image answers (generated): SEED-X-I's t2i data")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, image_root=args.image_root, generation=args.generation,
                   **writer_from_args(args))


if __name__ == "__main__":
    main()
