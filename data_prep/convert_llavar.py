"""LLaVAR (text-rich image instruction data, LLaVA conversation format) -> user/assistant chat records.

    python -m data_prep.convert_llavar --input llava_instruct_150k_llavar_16k.json \\
        --image-root llavar_images/ --out data/llavar

Input: a JSON file holding a list (``.jsonl`` with one entry a line also works) of LLaVA-format entries::

    {"id": "003166", "image": "003166.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is written on the sign?"},
                       {"from": "gpt", "value": "It says ..."}, ...]}

``image`` is a path relative to ``--image-root`` (LLaVAR's finetuning images, or COCO's for the mixed
LLaVA-Instruct file; a bare file name is also looked up anywhere under the root). ``from``: ``human`` /
``user`` -> ``user``, ``gpt`` / ``assistant`` -> ``assistant``, ``system`` -> ``system``. The image item goes
where ``<image>`` stood (text before and after it become separate text items, stripped); an entry with an
image but no ``<image>`` tag gets the image at the start of its first user turn (LLaVA's convention).
Entries without ``image`` become text-only chats. The same format covers LLaVAR's pretraining captions.

Record id: ``<source>/<entry id>`` (``-<n>`` appended to repeats). Skips: ``missing_file``,
``corrupt_image``, ``bad_json`` (unparsable file / entry not an object), ``bad_conversation`` (no turns,
unknown ``from``, a non-text ``value``, an empty turn, more than one ``<image>``, or ``<image>`` without an
image).
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

DEFAULT_NAME = "llavar"
IMAGE_TAG = "<image>"
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def conversation_turns(conversations: Any, image: ImageBlob | None) -> list[dict]:
    """LLaVA ``conversations`` -> our turns, with ``image`` where ``<image>`` stood."""
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
    n_tags = sum(value.count(IMAGE_TAG) for _, value in raw)
    if n_tags > 1:
        raise BadSample("bad_conversation", f"{n_tags} {IMAGE_TAG} tags; LLaVA entries hold one image")
    if n_tags and image is None:
        raise BadSample("bad_conversation", f"{IMAGE_TAG} tag but the entry has no 'image'")
    place_first = image is not None and n_tags == 0
    turns = []
    for j, (role, value) in enumerate(raw):
        content: list[dict] = []
        if place_first and role == "user":
            content.append({"image": image})
            place_first = False
        parts = value.split(IMAGE_TAG)
        for k, part in enumerate(parts):
            if k:
                content.append({"image": image})
            if part.strip():
                content.append({"text": part.strip()})
        if not content:
            raise BadSample("bad_conversation", f"conversations[{j}] is empty")
        turns.append({"role": role, "content": content})
    if place_first:
        raise BadSample("bad_conversation", "entry has an image but no user turn to put it in")
    return turns


def convert(inputs: str | Path | list, out: str | Path, *, image_root: str | Path | None = None,
            name: str = DEFAULT_NAME, source: str | None = None, shards: bool = False,
            shard_maxcount: int = 10_000, quiet: bool = False) -> dict:
    """Convert LLaVA-format JSON / jsonl files; returns the writer's stats dict."""
    files = expand_inputs(inputs, (".json", ".jsonl"))
    index = ImageIndex(image_root) if image_root is not None else None
    seen: dict[str, int] = {}
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount,
                      quiet=quiet) as writer:
        for path in files:
            for i, (where, row) in enumerate(progress(iter_rows(path), desc=f"{name} {path.name}",
                                                       unit="entry")):
                entry_id = row.get("id") if isinstance(row, dict) and row.get("id") not in (None, "") else None
                base = str(entry_id) if entry_id is not None else f"{path.name.split('.', 1)[0]}-{i}"
                n = seen.get(base, 0)
                seen[base] = n + 1
                rid = f"{writer.source}/{base}" + (f"-{n}" if n else "")
                with writer.row(id=rid, where=where):
                    if isinstance(row, BadSample):
                        raise row
                    image = None
                    ref = row.get("image")
                    if ref not in (None, ""):
                        if not isinstance(ref, str):
                            raise BadSample("bad_conversation", f"'image' must be a path, got {ref!r:.60}")
                        if index is None:
                            raise BadSample("missing_file", f"{ref}: no --image-root given")
                        image = index.get(name=ref)
                    turns = conversation_turns(row.get("conversations"), image)
                    writer.write({"id": rid, "source": writer.source, "turns": turns}, where=where)
        if index is not None:
            index.close()
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, DEFAULT_NAME, "LLaVA-format .json (a list) or .jsonl files, folders, globs")
    parser.add_argument("--image-root", default=None, help="folder the entries' 'image' paths are relative to")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, image_root=args.image_root, **writer_from_args(args))


if __name__ == "__main__":
    main()
