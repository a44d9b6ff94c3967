"""Instruction-editing data (MagicBrush, InstructPix2Pix, SEED-Data-Edit) -> edit conversations for SEED-X-Edit.

    python -m data_prep.convert_edit --format magicbrush --input MagicBrush/data/ --out data/sft --name magicbrush
    python -m data_prep.convert_edit --format ip2p --input instructpix2pix-clip-filtered/data/ --out data/sft
    python -m data_prep.convert_edit --format seed_edit --input SEED-Data-Edit/part3/split_0.jsonl \\
        --image-root SEED-Data-Edit/part3/images --out data/sft --name seed_edit_multiturn [--multi-turn]

A record is one edit, as the official SEED-X-Edit recipe trains (single-turn pairs)::

    user:      [{"image": source, "grid": "1x1"}, {"text": instruction}]
    assistant: [{"image": target, "generate": true}]

The source is encoded at a 1x1 grid (one tile + the global view), as the official edit data; the target
is a generation target (the model regresses its ViT features; `<img>` and `</s>` carry CE). A multi-step
edit (MagicBrush sessions, SEED-Data-Edit Part 3) becomes one record per step, each from the previous
step's result. ``--multi-turn`` writes the whole chain as one conversation instead (an extension of ours:
the official release has no multi-turn editing), each further step a user turn ``[{"text": instruction k}]``
answered by ``[{"image": target k, "generate": true}]``.

When a SEED-Data-Edit row carries the GPT-4V rewrite (``instruction_new`` and ``response``) those are used,
as the official loader does: the instruction becomes ``instruction_new`` and the answer is
``[{"text": response}, {"image": target, "generate": true}]``. Otherwise the answer is the image alone and
training adds the official short reply (``data.edit_responses``, conf/data/sft_edit.yaml).

Layouts (``--input``: files, folders or globs):

* ``magicbrush``: the Hugging Face release's parquet files (columns ``img_id``, ``turn_index``,
  ``source_img``, ``mask_img``, ``instruction``, ``target_img``; images as ``{"bytes", "path"}``). The turns of
  one ``img_id`` become one chain in ``turn_index`` order; a turn whose source is not the previous turn's
  target is a broken chain (``bad_chain``) and the chain stops before it.
* ``ip2p``: InstructPix2Pix's parquet files (``original_image``, ``edit_prompt``, ``edited_image``, plus the
  captions ``original_prompt`` / ``edited_prompt``, kept as metadata); single edits.
* ``seed_edit``: SEED-Data-Edit annotation ``.jsonl`` / ``.json``: ``{"source_image", "target_image",
  "instruction"}`` (+ optional ``instruction_new`` / ``response``) for pairs (Parts 1 and 2), or Part 3's flat
  multi-turn rows ``{"source_image", "edit_image_1", "instruction_1", "edit_image_2", "instruction_2", ...}``
  (``inverse_instruction_k`` ignored); paths relative to ``--image-root``.

Skips: ``missing_file``, ``corrupt_image``, ``bad_json``, ``bad_file``, ``missing_instruction``,
``bad_chain`` (multi-turn lists whose lengths disagree, or a MagicBrush turn out of order).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from data_prep.common import (
    ImageBlob,
    ImageIndex,
    RecordWriter,
    converter_parser,
    expand_inputs,
    image_from_bytes,
    iter_rows,
    progress,
    safe_key,
    writer_from_args,
)
from src.data.records import BadSample

FORMATS = ("magicbrush", "ip2p", "seed_edit")
SUFFIXES = {"magicbrush": (".parquet",), "ip2p": (".parquet",), "seed_edit": (".jsonl", ".json")}


def edit_turns(source: ImageBlob, edits: list[tuple]) -> list[dict]:
    """(source, [(instruction, target[, response]), ...]) -> the chain's turns (see the module docstring)."""
    turns: list[dict] = []
    for k, (instruction, target, *response) in enumerate(edits):
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadSample("missing_instruction", f"edit {k} has no instruction")
        user = [{"image": source, "grid": "1x1"}] if k == 0 else []
        turns.append({"role": "user", "content": [*user, {"text": instruction.strip()}]})
        reply = [{"text": response[0].strip()}] if response and isinstance(response[0], str) and response[0].strip() else []
        turns.append({"role": "assistant", "content": [*reply, {"image": target, "generate": True}]})
    return turns


def _parquet_image(value: Any, what: str) -> ImageBlob:
    """A Hugging Face ``Image`` cell (``{"bytes", "path"}``) or raw bytes."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if not data:
        raise BadSample("missing_file", f"{what} has no image bytes")
    hint = Path(value["path"]).suffix if isinstance(value, dict) and value.get("path") else None
    return image_from_bytes(data, hint)


def _magicbrush(files: list[Path], writer: RecordWriter, single: bool) -> None:
    sessions: dict[str, list[tuple[int, str, dict]]] = defaultdict(list)
    for path in files:
        for where, row in progress(iter_rows(path), desc=f"magicbrush {path.name}", writer=writer):
            if isinstance(row, BadSample):
                writer.skip(row.reason, where=where, detail=row.detail)
                continue
            sessions[str(row.get("img_id"))].append((int(row.get("turn_index") or 0), where, row))
    for img_id, turns in sessions.items():
        turns.sort(key=lambda t: t[0])
        where = turns[0][1]
        with writer.row(id=f"{writer.source}/{img_id}", where=where):
            source = _parquet_image(turns[0][2].get("source_img"), f"img_id {img_id} turn 1 source_img")
            edits, prev_target = [], None
            for index, at, row in turns:
                if prev_target is not None and row.get("source_img", {}).get("bytes") != prev_target:
                    writer.skip("bad_chain", id=f"{writer.source}/{img_id}", where=at,
                                detail=f"turn {index}'s source is not turn {index - 1}'s target; chain cut there")
                    break
                target = _parquet_image(row.get("target_img"), f"img_id {img_id} turn {index} target_img")
                edits.append((row.get("instruction"), target))
                prev_target = (row.get("target_img") or {}).get("bytes")
            _write_chain(writer, f"{writer.source}/{img_id}", source, edits, where, single)


def _ip2p(files: list[Path], writer: RecordWriter) -> None:
    for path in files:
        for i, (where, row) in enumerate(progress(iter_rows(path), desc=f"ip2p {path.name}", writer=writer)):
            rid = f"{writer.source}/{safe_key(path.stem)}-{i}"
            with writer.row(id=rid, where=where):
                if isinstance(row, BadSample):
                    raise row
                source = _parquet_image(row.get("original_image"), "original_image")
                target = _parquet_image(row.get("edited_image"), "edited_image")
                record = {"id": rid, "source": writer.source, "turns": edit_turns(source, [(row.get("edit_prompt"), target)])}
                for key in ("original_prompt", "edited_prompt"):
                    if isinstance(row.get(key), str):
                        record[key] = row[key]
                writer.write(record, where=where)


def _seed_edit(files: list[Path], writer: RecordWriter, index: ImageIndex, single: bool) -> None:
    for path in files:
        for i, (where, row) in enumerate(progress(iter_rows(path), desc=f"seed_edit {path.name}", writer=writer)):
            base = str(row.get("id")) if isinstance(row, dict) and row.get("id") not in (None, "") else f"{path.stem}-{i}"
            rid = f"{writer.source}/{safe_key(base)}"
            with writer.row(id=rid, where=where):
                if isinstance(row, BadSample):
                    raise row
                if "edit_image_1" in row:  # Part 3: flat edit_image_k / instruction_k, k = 1, 2, ...
                    paths, instructions, k = [row.get("source_image")], [], 1
                    while f"edit_image_{k}" in row:
                        paths.append(row[f"edit_image_{k}"])
                        instructions.append(row.get(f"instruction_{k}"))
                        k += 1
                    edits_meta = [(ins,) for ins in instructions]
                elif "instruction_new" in row and "response" in row:  # the GPT-4V rewrite, as officially preferred
                    paths = [row.get("source_image"), row.get("target_image")]
                    edits_meta = [(row.get("instruction_new"), row.get("response"))]
                else:
                    paths = [row.get("source_image"), row.get("target_image")]
                    edits_meta = [(row.get("instruction"),)]
                if any(not isinstance(p, str) or not p for p in paths):
                    raise BadSample("missing_file", f"image paths {paths!r} must be non-empty strings")
                blobs = [index.get(name=str(p)) for p in paths]
                edits = [(meta[0], target, *meta[1:]) for meta, target in zip(edits_meta, blobs[1:])]
                _write_chain(writer, rid, blobs[0], edits, where, single)


def _write_chain(writer: RecordWriter, rid: str, source: ImageBlob, edits: list, where: str, single: bool) -> None:
    if not single:
        writer.write({"id": rid, "source": writer.source, "turns": edit_turns(source, edits)}, where=where)
        return
    for k, edit in enumerate(edits):
        writer.write({"id": f"{rid}-{k}", "source": writer.source, "turns": edit_turns(source, [edit])},
                     where=where)
        source = edit[1]


def convert(inputs: str | Path | list, out: str | Path, *, format: str, image_root: str | Path | None = None,
            name: str | None = None, source: str | None = None, shards: bool = False, shard_maxcount: int = 10_000,
            quiet: bool = False, single_turn: bool = True) -> dict:
    if format not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {format!r}")
    if format == "seed_edit" and image_root is None:
        raise ValueError("--format seed_edit needs --image-root (the folder its image paths are relative to)")
    files = expand_inputs(inputs, SUFFIXES[format])
    with RecordWriter(out, name or format, source=source, shards=shards, shard_maxcount=shard_maxcount,
                      quiet=quiet) as writer:
        if format == "magicbrush":
            _magicbrush(files, writer, single_turn)
        elif format == "ip2p":
            _ip2p(files, writer)
        else:
            index = ImageIndex(image_root)
            _seed_edit(files, writer, index, single_turn)
            index.close()
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, None, "parquet (magicbrush, ip2p) or jsonl/json (seed_edit) files, folders, globs")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--image-root", default=None, help="seed_edit: folder its image paths are relative to")
    parser.add_argument("--multi-turn", action="store_true",
                        help="a multi-step edit as one conversation (ours; the official recipe is single-turn)")
    parser.add_argument("--single-turn", action="store_true", help="one record per edit (the default; kept for "
                                                                   "old command lines)")
    args = parser.parse_args(argv)
    if args.multi_turn and args.single_turn:
        parser.error("--multi-turn and --single-turn are exclusive")
    return convert(args.input, args.out, format=args.format, image_root=args.image_root,
                   single_turn=not args.multi_turn, **writer_from_args(args))


if __name__ == "__main__":
    main()
