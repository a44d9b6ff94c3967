"""img2dataset webdataset output -> caption records (image + text document).

    python -m data_prep.convert_img2dataset --input laion_coco/ --out data/laion_coco \\
        --name laion_coco --caption-field top_caption [--shards]

Input: what ``img2dataset --output_format webdataset`` writes: shards ``00000.tar, 00001.tar, ...`` (a folder,
files, globs or a brace pattern ``{00000..00099}.tar``), each sample ``<key>.jpg`` (or png/webp),
``<key>.txt`` (the caption column) and ``<key>.json`` (``url``, ``key``, ``caption``, ``status``, ``width``,
``height``, ``error_message`` and every ``--save_additional_columns`` column, e.g. LAION-COCO's
``top_caption`` / ``all_captions`` or a re-caption column). The ``.parquet`` / ``_stats.json`` files beside
the tars are ignored. Shards are read with webdataset.

``--caption-field txt`` (default) takes ``<key>.txt``; any other value is a key of ``<key>.json`` (dotted for
nested objects, ``a.b``; a list value uses its first non-empty string).

Record: ``{"id": "<source>/<key>", "source": ..., "url": ..., "turns": [{"role": null, "content":
[{"image": ...}, {"text": caption}]}]}``. Skips: ``failed_download`` (json ``status`` other than
``success``), ``missing_file`` (no image member), ``corrupt_image``, ``bad_json`` (unparsable ``<key>.json``),
``missing_caption`` (no / blank caption), ``bad_shard`` (unreadable or truncated tar).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_prep.common import (
    RecordWriter,
    converter_parser,
    expand_inputs,
    field_value,
    image_from_bytes,
    image_member,
    iter_shard_samples,
    progress,
    writer_from_args,
)
from src.data.records import BadSample

DEFAULT_NAME = "img2dataset"


def caption_text(value: Any) -> str | None:
    """A caption from a field value: a string, or the first non-empty string of a list."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        for v in value:
            text = caption_text(v)
            if text:
                return text
    return None


def sample_to_record(sample: dict, source: str, caption_field: str = "txt") -> dict:
    """One img2dataset sample -> record with an ``ImageBlob`` image item; raises ``BadSample``."""
    key = sample["__key__"]
    meta: dict = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError as e:
            raise BadSample("bad_json", f"{key}.json: {e}") from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"{key}.json is a JSON {type(meta).__name__}, not an object")
    status = meta.get("status")
    if status is not None and status != "success":
        raise BadSample("failed_download", f"status={status!r} {meta.get('error_message') or ''}".strip())
    member = image_member(sample)
    if member is None:
        members = sorted(k for k in sample if not k.startswith("__"))
        raise BadSample("missing_file", f"sample {key} has no image member (members: {members})")
    ext, data = member
    if caption_field == "txt":
        caption = caption_text(sample.get("txt"))
    else:
        caption = caption_text(field_value(meta, caption_field))
    if not caption:
        raise BadSample("missing_caption", f"no caption in {key}.{caption_field if caption_field == 'txt' else 'json'}"
                                           + ("" if caption_field == "txt" else f" field {caption_field!r}"))
    blob = image_from_bytes(data, ext)
    record: dict[str, Any] = {"id": f"{source}/{key}", "source": source}
    if isinstance(meta.get("url"), str):
        record["url"] = meta["url"]
    record["turns"] = [{"role": None, "content": [{"image": blob}, {"text": caption}]}]
    return record


def convert(inputs: str | Path | list, out: str | Path, *, name: str = DEFAULT_NAME, source: str | None = None,
            caption_field: str = "txt", shards: bool = False, shard_maxcount: int = 10_000,
            quiet: bool = False) -> dict:
    """Convert img2dataset webdataset shards; returns the writer's stats dict."""
    urls = [str(p) for p in expand_inputs(inputs, (".tar",))]
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount,
                      quiet=quiet) as writer:
        samples = iter_shard_samples(urls, writer.add_skipped, writer.source)
        for sample in progress(samples, desc=f"{name}", unit="sample", writer=writer):
            key = sample.get("__key__")
            where = f"{sample.get('__url__')}:{key}"
            rid = f"{writer.source}/{key}"
            with writer.row(id=rid, where=where):
                writer.write(sample_to_record(sample, writer.source, caption_field), where=where)
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, DEFAULT_NAME, "img2dataset shards: folder(s), .tar files, globs or brace patterns")
    parser.add_argument("--caption-field", default="txt",
                        help="'txt' (the <key>.txt member, default) or a <key>.json key, e.g. top_caption")
    args = parser.parse_args(argv)
    return convert(args.input, args.out, caption_field=args.caption_field, **writer_from_args(args))


if __name__ == "__main__":
    main()
