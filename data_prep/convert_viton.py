"""VITON-HD (virtual try-on) -> try-on records for SEED-X-Try-on.

    python -m data_prep.convert_viton --input VITON-HD/train_pairs.txt --out data/sft --name viton_hd

Input: VITON-HD's pair list (``train_pairs.txt`` / ``test_pairs.txt``: ``<person>.jpg <cloth>.jpg`` a line)
beside its split folders (``train/`` or ``test/``, the one named like the list): ``image/`` (the person),
``cloth/`` (the garment) and ``agnostic-v3.2/`` (the person with the clothing region masked out). A record::

    user:      [{person input, grid 1x1}, {garment, grid 1x1}, "<prompt>"]
    assistant: [{the person wearing the garment (image/), generate}]

The person input is ``agnostic-v3.2/`` (default; ``--person image`` uses the dressed photo, e.g. for unpaired
lists whose target does not exist). It is the condition image of the stage-2 de-tokenizer that decodes the
result (`src.generate mode=tryon` conditions on the first input image). ``--unpaired`` writes no target
(evaluation requests: the user turn only).

Skips: ``missing_file`` / ``corrupt_image``, ``bad_line`` (not two file names).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.common import (
    RecordWriter,
    converter_parser,
    expand_inputs,
    image_from_file,
    progress,
    writer_from_args,
)
from src.data.records import BadSample

DEFAULT_NAME = "viton_hd"
DEFAULT_PROMPT = "Dress the person in this garment."
PERSON_DIRS = {"agnostic": "agnostic-v3.2", "image": "image"}


def tryon_turns(person, garment, target, prompt: str) -> list[dict]:
    turns = [{"role": "user", "content": [{"image": person, "grid": "1x1"}, {"image": garment, "grid": "1x1"},
                                          {"text": prompt}]}]
    if target is not None:
        turns.append({"role": "assistant", "content": [{"image": target, "generate": True}]})
    return turns


def convert(inputs: str | Path | list, out: str | Path, *, person: str = "agnostic", prompt: str = DEFAULT_PROMPT,
            unpaired: bool = False, name: str = DEFAULT_NAME, source: str | None = None, shards: bool = False,
            shard_maxcount: int = 10_000, quiet: bool = False) -> dict:
    if person not in PERSON_DIRS:
        raise ValueError(f"--person must be one of {sorted(PERSON_DIRS)}, got {person!r}")
    files = expand_inputs(inputs, ("_pairs.txt",))
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount, quiet=quiet) as writer:
        for path in files:
            split = path.parent / path.name.split("_", 1)[0]  # train_pairs.txt -> train/
            lines = path.read_text("utf-8").splitlines()
            for lineno, line in progress(list(enumerate(lines, 1)), desc=f"{name} {path.name}", unit="pair",
                                         writer=writer):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                parts = line.split()
                rid = f"{writer.source}/{split.name}/{Path(parts[0]).stem if parts else lineno}"
                if unpaired and len(parts) == 2:
                    rid += f"-{Path(parts[1]).stem}"
                with writer.row(id=rid, where=where):
                    if len(parts) != 2:
                        raise BadSample("bad_line", f"expected '<person> <cloth>', got {line!r:.80}")
                    person_file, cloth_file = parts
                    inp = image_from_file(split / PERSON_DIRS[person] / person_file)
                    garment = image_from_file(split / "cloth" / cloth_file)
                    target = None if unpaired else image_from_file(split / "image" / person_file)
                    writer.write({"id": rid, "source": writer.source,
                                  "turns": tryon_turns(inp, garment, target, prompt)}, where=where)
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, DEFAULT_NAME, "VITON-HD pair lists (train_pairs.txt / test_pairs.txt)")
    parser.add_argument("--person", choices=sorted(PERSON_DIRS), default="agnostic",
                        help="person input: agnostic-v3.2/ (default) or the photo itself")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--unpaired", action="store_true", help="requests without a target (unpaired evaluation)")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, person=args.person, prompt=args.prompt, unpaired=args.unpaired,
                   **writer_from_args(args))


if __name__ == "__main__":
    main()
