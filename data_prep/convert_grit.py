"""GRIT (Kosmos-2 grounded image-text pairs) -> grounded caption records with pixel boxes.

    # img2dataset download whose <key>.json carries the GRIT columns (--save_additional_columns)
    python -m data_prep.convert_grit --input grit_shards/ --out data/grit [--shards]
    # GRIT metadata (parquet / jsonl) + a local image folder
    python -m data_prep.convert_grit --input grit-20m/*.parquet --images grit_images/ --out data/grit

Input rows have ``caption``, ``noun_chunks`` (list of ``[start, end, x0, y0, x1, y1, score]``: a character
span of the caption and its box in coordinates NORMALISED to [0, 1]; ``score`` optional), optional
``ref_exps`` (same format, used with ``--spans ref_exps``), ``width`` / ``height``, ``url``, ``key``, ``id``.
They come either

* from img2dataset webdataset shards (``*.tar``, read with webdataset): image member ``<key>.jpg``, the row
  is ``<key>.json`` (GRIT's recommended download: ``img2dataset ... --save_additional_columns
  '["id","noun_chunks","ref_exps",...]'``; the ``<shard>.parquet`` img2dataset writes beside each tar is
  ignored), or
* from GRIT's parquet / jsonl metadata files, with the image found in ``--images`` (a
  :class:`~data_prep.common.ImageIndex` folder) by the row's ``url`` (img2dataset sidecar json, or a file
  named ``sha1(url)``), else by ``key`` / ``id`` as a file stem (``<images>/<key>.jpg``).

Boxes are scaled by the size of the stored image (img2dataset may have resized it; normalised coordinates
do not care), clamped to it and rounded to 0.01 px. Content: ``[image, text, box, text, box, ..., text]``:
each text piece runs up to the end of a grounded span plus `` [[ ``, is followed by that span's box(es) (label =
the span's text) and `` ]]`` (the official ``phrase [[ <box_start>...<box_end> ]]`` form); joining the text
pieces with those markers removed gives the caption back. Spans that overlap an earlier span, or score
below ``--min-score``, are dropped (counted in ``dropped_boxes``).

Record id: ``<source>/<id>`` (GRIT's ``id``, else ``key``). Skips: ``missing_file``, ``corrupt_image``,
``bad_json``, ``missing_caption``, ``bad_annotation`` (malformed spans / boxes), ``no_boxes`` (nothing left
to ground), ``failed_download``, ``bad_shard``, ``bad_file``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from data_prep.common import (
    ImageBlob,
    ImageIndex,
    RecordWriter,
    converter_parser,
    count_rows,
    expand_inputs,
    image_from_bytes,
    image_member,
    iter_rows,
    iter_shard_samples,
    progress,
    writer_from_args,
)
from src.data.records import BadSample

DEFAULT_NAME = "grit"
BOX_OPEN, BOX_CLOSE = " [[ ", " ]]"  # around each grounded phrase's box(es), as the official SEED-X prompts


def _spans(raw: Any, field: str) -> list[tuple[int, int, tuple[float, float, float, float], float | None]]:
    if isinstance(raw, str):  # CSV/TSV dumps keep the list as a JSON string
        try:
            raw = json.loads(raw)
        except ValueError as e:
            raise BadSample("bad_annotation", f"{field} is not JSON: {e}") from None
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        raise BadSample("bad_annotation", f"{field} must be a list, got {type(raw).__name__}")
    out = []
    for i, chunk in enumerate(raw):
        if not isinstance(chunk, (list, tuple)) or len(chunk) not in (6, 7):
            raise BadSample("bad_annotation", f"{field}[{i}] must be [start, end, x0, y0, x1, y1, score], "
                                              f"got {chunk!r:.100}")
        try:
            start, end = int(chunk[0]), int(chunk[1])
            box = tuple(float(v) for v in chunk[2:6])
            score = float(chunk[6]) if len(chunk) == 7 and chunk[6] is not None else None
        except (TypeError, ValueError):
            raise BadSample("bad_annotation", f"{field}[{i}] has non-numeric values: {chunk!r:.100}") from None
        if start != chunk[0] or end != chunk[1]:
            raise BadSample("bad_annotation", f"{field}[{i}] span must be integers, got {chunk[:2]!r}")
        if not all(math.isfinite(v) for v in box):
            raise BadSample("bad_annotation", f"{field}[{i}] box is not finite: {box!r}")
        out.append((start, end, box, score))
    return out


def grounded_content(caption: str, spans: list, image: ImageBlob, *, field: str = "noun_chunks",
                     min_score: float = 0.0, note=None) -> list[dict]:
    """``[image, text, box(es), text, box(es), ..., text]`` in pixel coordinates of ``image``.

    Raises ``BadSample("bad_annotation")`` for spans outside the caption or boxes outside [0, 1] /
    inverted, and ``BadSample("no_boxes")`` when no span is left.
    """
    W, H = image.width, image.height
    tol = 1e-3  # detector outputs are sometimes a hair outside [0, 1]
    groups: list[tuple[int, int, list[tuple[float, float, float, float]]]] = []
    for i, (start, end, (x0, y0, x1, y1), score) in enumerate(sorted(spans, key=lambda s: (s[0], s[1]))):
        if not (0 <= start < end <= len(caption)):
            raise BadSample("bad_annotation", f"{field} span [{start}, {end}) is outside the caption "
                                              f"(length {len(caption)})")
        if not (-tol <= x0 <= x1 <= 1 + tol and -tol <= y0 <= y1 <= 1 + tol):
            raise BadSample("bad_annotation", f"{field} box {[x0, y0, x1, y1]} is not normalised "
                                              f"0 <= x0 <= x1 <= 1, 0 <= y0 <= y1 <= 1")
        if score is not None and score < min_score:
            if note:
                note("dropped_boxes", "low_score")
            continue
        pixel = (_clamp(x0 * W, W), _clamp(y0 * H, H), _clamp(x1 * W, W), _clamp(y1 * H, H))
        if groups and (start, end) == groups[-1][:2]:
            groups[-1][2].append(pixel)  # same span, another box
        elif groups and start < groups[-1][1]:
            if note:
                note("dropped_boxes", "overlapping_span")
        else:
            groups.append((start, end, [pixel]))
    if not groups:
        raise BadSample("no_boxes", f"no usable {field} (of {len(spans)})")
    content: list[dict] = [{"image": image}]
    pos, close = 0, ""
    for start, end, boxes in groups:
        # the official grounding form `phrase [[ <box_start>...<box_end> ]]` (the pre-trained model's
        # bbox_prompt is `{image}{caption} [[ <box_start>`; the closing ` ]]` is inferred)
        content.append({"text": close + caption[pos:end] + BOX_OPEN})
        label = caption[start:end].strip()
        for box in boxes:
            content.append({"box": list(box), "label": label})
        pos, close = end, BOX_CLOSE
    content.append({"text": BOX_CLOSE + caption[pos:]})
    return content


def _clamp(v: float, hi: int) -> float:
    return round(min(max(v, 0.0), float(hi)), 2)


def row_to_record(row: dict, image: ImageBlob, source: str, *, field: str = "noun_chunks",
                  min_score: float = 0.0, note=None, fallback_key: str | None = None) -> dict:
    caption = row.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("missing_caption", f"caption is {caption!r:.60}")
    rid = row.get("id") if row.get("id") not in (None, "") else row.get("key", fallback_key)
    spans = _spans(row.get(field), field)
    content = grounded_content(caption, spans, image, field=field, min_score=min_score, note=note)
    record: dict[str, Any] = {"id": f"{source}/{rid}", "source": source}
    if isinstance(row.get("url"), str):
        record["url"] = row["url"]
    record["turns"] = [{"role": None, "content": content}]
    return record


def _row_id(row: Any, source: str, fallback: str | None) -> str | None:
    if isinstance(row, dict):
        rid = row.get("id") if row.get("id") not in (None, "") else row.get("key", fallback)
        if rid not in (None, ""):
            return f"{source}/{rid}"
    return f"{source}/{fallback}" if fallback else None


def convert(inputs: str | Path | list, out: str | Path, *, images: str | Path | None = None,
            name: str = DEFAULT_NAME, source: str | None = None, spans: str = "noun_chunks",
            min_score: float = 0.0, url_filename: bool = False, shards: bool = False,
            shard_maxcount: int = 10_000, quiet: bool = False) -> dict:
    """Convert GRIT shards and/or metadata files (with ``images``); returns the writer's stats dict."""
    files = expand_inputs(inputs, (".tar", ".parquet", ".jsonl", ".jsonl.gz"))
    tars = [str(p) for p in files if p.name.endswith(".tar")]
    # img2dataset writes <shard>.parquet (its own per-sample status table) beside each <shard>.tar: not metadata
    tables = [p for p in files if not p.name.endswith(".tar")
              and not (p.suffix == ".parquet" and p.with_suffix(".tar").is_file())]
    if tables and images is None:
        raise ValueError("GRIT metadata files need --images (the folder holding the downloaded images)")
    index = ImageIndex(images, url_filename=url_filename) if tables else None
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount,
                      quiet=quiet) as writer:
        src = writer.source
        opts = {"field": spans, "min_score": min_score, "note": writer.note}
        if tars:
            for sample in progress(iter_shard_samples(tars, writer.add_skipped, src), desc=f"{name} shards",
                                   unit="sample", writer=writer):
                key = sample.get("__key__")
                where = f"{sample.get('__url__')}:{key}"
                with writer.row(id=f"{src}/{key}", where=where) as ctx:
                    try:
                        row = json.loads(sample["json"]) if "json" in sample else None
                    except ValueError as e:
                        raise BadSample("bad_json", f"{key}.json: {e}") from None
                    if not isinstance(row, dict):
                        raise BadSample("bad_json", f"sample {key} has no GRIT row (<key>.json object)")
                    ctx.id = _row_id(row, src, key)
                    status = row.get("status")
                    if status is not None and status != "success":
                        raise BadSample("failed_download", f"status={status!r}")
                    if not isinstance(row.get("caption"), str) or not row["caption"].strip():
                        raise BadSample("missing_caption", f"caption is {row.get('caption')!r:.60}")
                    member = image_member(sample)
                    if member is None:
                        raise BadSample("missing_file", f"sample {key} has no image member")
                    image = image_from_bytes(member[1], member[0])
                    writer.write(row_to_record(row, image, src, fallback_key=key, **opts), where=where)
        for path in tables:
            for i, (where, row) in enumerate(progress(iter_rows(path), desc=f"{name} {path.name}",
                                                       total=count_rows(path))):
                fallback = f"{Path(path).name.split('.', 1)[0]}-{i}"
                with writer.row(id=_row_id(row, src, fallback), where=where):
                    if isinstance(row, BadSample):
                        raise row
                    if not isinstance(row.get("caption"), str) or not row["caption"].strip():
                        raise BadSample("missing_caption", f"caption is {row.get('caption')!r:.60}")
                    key = row.get("key") if row.get("key") not in (None, "") else row.get("id")
                    image = index.get(url=row.get("url"), key=None if key is None else str(key))
                    writer.write(row_to_record(row, image, src, fallback_key=fallback, **opts), where=where)
        if index is not None:
            index.close()
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, DEFAULT_NAME, "img2dataset GRIT shards (.tar) and/or GRIT metadata "
                                          "(.parquet / .jsonl): files, folders, globs, brace patterns")
    parser.add_argument("--images", default=None,
                        help="image folder for metadata rows (img2dataset output, or <key>.<ext> files)")
    parser.add_argument("--spans", default="noun_chunks", choices=["noun_chunks", "ref_exps"],
                        help="which grounded spans to use (default noun_chunks)")
    parser.add_argument("--min-score", type=float, default=0.0, help="drop spans scoring below this")
    parser.add_argument("--match-url-filename", action="store_true",
                        help="also find images by the file name at the end of the URL")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, images=args.images, spans=args.spans, min_score=args.min_score,
                   url_filename=args.match_url_filename, **writer_from_args(args))


if __name__ == "__main__":
    main()
