"""Benchmark files in VLMEvalKit's TSV layout, and prediction files VLMEvalKit's own scorer reads back.

A benchmark TSV has one row per question: ``index``, ``image`` (base64-encoded image bytes; in MMBench's
circular copies a short value is the ``index`` of the row whose image it shares), ``question``, then per
benchmark ``hint``, ``A``..``H`` (options), ``answer``, ``category``, ``l2-category``, ``split``. MME's
``answer`` is ``Yes`` / ``No`` and its ``image_path`` names the image that two questions share.

A prediction file is the benchmark's rows without ``image`` plus a ``prediction`` column, tab-separated, as
VLMEvalKit writes ``{model}_{dataset}.tsv`` (``PRED_FORMAT=tsv``), so its evaluators can re-score it.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import sys
from pathlib import Path

from PIL import Image

OPTION_LETTERS = "ABCDEFGH"
_REF_MAX = 64  # VLMEvalKit: an `image` this short is a reference to another row's index

__all__ = ["OPTION_LETTERS", "decode_image", "options_of", "read_tsv", "write_predictions"]


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a VLMEvalKit TSV, image references resolved (every row's ``image`` is base64 bytes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such benchmark file (a VLMEvalKit-layout .tsv)")
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        raise ValueError(f"{path}: no rows")
    for need in ("index", "question"):
        if need not in rows[0]:
            raise ValueError(f"{path}: column {need!r} missing (columns: {sorted(rows[0])})")
    by_index = {r["index"]: r for r in rows}
    for r in rows:
        image = r.get("image") or ""
        if image and len(image) <= _REF_MAX:
            if image not in by_index:
                raise ValueError(f"{path}: row {r['index']} refers to the image of row {image!r}, which is absent")
            r["image"] = by_index[image]["image"]
    return rows


def decode_image(row: dict[str, str]) -> Image.Image:
    """The row's image, decoded (RGB)."""
    try:
        data = base64.b64decode(row["image"], validate=False)
        im = Image.open(io.BytesIO(data))
        im.load()
    except (KeyError, binascii.Error, OSError, ValueError) as e:
        raise ValueError(f"row {row.get('index')}: image does not decode ({type(e).__name__}: {e})") from None
    return im.convert("RGB")


def options_of(row: dict[str, str]) -> dict[str, str]:
    """{letter: option text} of a multiple-choice row (empty / NaN options left out)."""
    out = {}
    for letter in OPTION_LETTERS:
        value = (row.get(letter) or "").strip()
        if value and value.lower() != "nan":
            out[letter] = value
    return out


def write_predictions(rows: list[dict[str, str]], predictions: dict[str, str], path: str | Path) -> Path:
    """The rows (without images) + a ``prediction`` column, tab-separated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [c for c in rows[0] if c != "image"] + ["prediction"]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t", extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "prediction": predictions.get(r["index"], "")})
    return path
