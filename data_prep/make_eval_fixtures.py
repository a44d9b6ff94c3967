"""Build the tiny benchmark fixtures (assets/eval/*.tsv) in VLMEvalKit's TSV layout from the bundled photos.

    python -m data_prep.make_eval_fixtures --out assets/eval

Deterministic. Questions are written by looking at the photos in assets/sample/images:

* ``mmbench.tsv``     3 questions x 4 circular rotations (index + k * 1e6; the copies refer to the original's
                      image by its index, as VLMEvalKit's MMBench files do)
* ``mme.tsv``         3 categories (existence, count: perception; commonsense_reasoning: cognition), 2 images
                      each, a yes and a no question per image (``image_path`` names the shared image; the
                      second row refers to the first's image by index)
* ``seedbench2.tsv``  4 four-option questions in 2 categories
* ``t2i.tsv``         6 captions of the bundled photos (``question``) with the photo as reference (``image``)
* ``edit.tsv``        the 8 sample edits: source (``image``), instruction (``question``), target (``target``)
"""

from __future__ import annotations

import argparse
import base64
import csv
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[1] / "assets" / "sample" / "images"

MMBENCH = [  # (photo, question, options, answer letter, category)
    ("chelsea", "What animal is in the image?", ["a cat", "a dog", "a rabbit", "a horse"], "A", "object_recognition"),
    ("coffee", "What drink is shown?", ["orange juice", "tea with milk", "espresso", "water"], "C", "object_recognition"),
    ("rocket", "Where is the rocket?", ["in space", "on a launch pad", "in a museum hall", "under water"], "B",
     "scene_understanding"),
]
MME = [  # (category, photo, yes question, no question)
    ("existence", "chelsea", "Is there a cat in this image?", "Is there a dog in this image?"),
    ("existence", "coffee", "Is there a cup in this image?", "Is there a bicycle in this image?"),
    ("count", "astronaut", "Is there one person in this image?", "Are there three people in this image?"),
    ("count", "coins", "Are there more than ten coins in this image?", "Is there exactly one coin in this image?"),
    ("commonsense_reasoning", "rocket", "Is this vehicle made to leave the Earth's atmosphere?",
     "Is this vehicle used to travel under water?"),
    ("commonsense_reasoning", "coffee", "Is this drink usually served hot?", "Is this drink usually served frozen?"),
]
SEEDBENCH2 = [  # (photo, question, options, answer, category)
    ("astronaut", "What is the person wearing?", ["a spacesuit", "a swimsuit", "a lab coat", "a wedding dress"], "A",
     "Instance Attributes"),
    ("motorcycle", "What colour is the motorcycle?", ["blue", "green", "red", "white"], "C", "Instance Attributes"),
    ("camera", "What is the man looking through?", ["a telescope", "a window", "binoculars", "a camera"], "D",
     "Instance Identity"),
    ("page", "What is printed on the page?", ["a map", "text about segmentation", "a photo of a cat", "sheet music"],
     "B", "Instance Identity"),
]
MC_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split", "image"]


def _b64(name: str) -> str:
    return base64.b64encode((IMAGES / f"{name}.jpg").read_bytes()).decode("ascii")


def _write(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def mmbench_rows() -> list[dict]:
    rows = []
    for q, (photo, question, options, answer, category) in enumerate(MMBENCH):
        correct = options["ABCD".index(answer)]
        for k in range(4):  # rotation k: option i moves to letter (i - k) mod 4, as VLMEvalKit's circular copies
            rotated = options[k:] + options[:k]
            rows.append({"index": q + k * 1_000_000, "question": question, "hint": "",
                         **dict(zip("ABCD", rotated)), "answer": "ABCD"[rotated.index(correct)],
                         "category": category, "l2-category": "perception", "split": "dev",
                         "image": _b64(photo) if k == 0 else str(q)})
    return rows


def mme_rows() -> list[dict]:
    rows = []
    for i, (category, photo, yes_q, no_q) in enumerate(MME):
        for j, (question, answer) in enumerate(((yes_q, "Yes"), (no_q, "No"))):
            rows.append({"index": 2 * i + j, "image_path": f"{category}/{photo}.jpg", "category": category,
                         "question": f"{question} Please answer yes or no.", "answer": answer,
                         "image": _b64(photo) if j == 0 else str(2 * i)})  # the pair's second row refers to the first
    return rows


def seedbench2_rows() -> list[dict]:
    return [{"index": i, "question": question, "hint": "", **dict(zip("ABCD", options)), "answer": answer,
             "category": category, "l2-category": "L1", "split": "test", "image": _b64(photo)}
            for i, (photo, question, options, answer, category) in enumerate(SEEDBENCH2)]


def t2i_rows() -> list[dict]:
    from data_prep.make_sample_data import PHOTOS

    names = ["chelsea", "coffee", "rocket", "astronaut", "coins", "motorcycle"]
    return [{"index": i, "question": PHOTOS[n][2], "image": _b64(n)} for i, n in enumerate(names)]


def edit_rows() -> list[dict]:
    from data_prep.make_sample_data import EDITS

    return [{"index": i, "question": instruction, "image": _b64(src),
             "target": base64.b64encode((IMAGES / "edits" / f"{src}_{name}.jpg").read_bytes()).decode("ascii")}
            for i, (src, name, instruction, _) in enumerate(EDITS)]


def build(out: str | Path) -> dict[str, int]:
    out = Path(out)
    _write(out / "t2i.tsv", ["index", "question", "image"], t2i_rows())
    _write(out / "edit.tsv", ["index", "question", "image", "target"], edit_rows())
    _write(out / "mmbench.tsv", MC_COLUMNS, mmbench_rows())
    _write(out / "mme.tsv", ["index", "image_path", "category", "question", "answer", "image"], mme_rows())
    _write(out / "seedbench2.tsv", MC_COLUMNS, seedbench2_rows())
    return {"mmbench": 4 * len(MMBENCH), "mme": 2 * len(MME), "seedbench2": len(SEEDBENCH2), "t2i": 6, "edit": 8}


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="assets/eval")
    counts = build(parser.parse_args(argv).out)
    print(", ".join(f"{k}.tsv: {v} rows" for k, v in counts.items()))
    return counts


if __name__ == "__main__":
    main()
