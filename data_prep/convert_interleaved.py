"""Interleaved image-text web documents (OBELICS, MMC4) -> one null-role document per row.

    python -m data_prep.convert_interleaved --format obelics --input obelics/data/*.parquet \\
        --image-root obelics_images/ --out data/obelics
    python -m data_prep.convert_interleaved --format mmc4 --input docs_shard_*_v2.jsonl.zip \\
        --image-root mmc4_images/ --out data/mmc4

OBELICS (HuggingFaceM4/OBELICS parquet files; jsonl with the same columns also works): each row has the
parallel lists ``images`` (image URL or null) and ``texts`` (text or null); position ``i`` holds an image
or a text, in reading order (``metadata`` / ``general_metadata`` are not used). OBELICS ships URLs only; the
images must be downloaded first. ``--image-root`` is searched (:class:`~data_prep.common.ImageIndex`) by URL:

* an img2dataset download of the URLs (``--output_format files``: ``<shard>/<key>.jpg`` + ``<key>.json``
  with ``url``; or ``--output_format webdataset``: ``<shard>.tar`` with ``<key>.jpg`` + ``<key>.json``);
* files named ``sha1(url).<ext>`` (hex SHA-1 of the UTF-8 URL), anywhere under the root;
* with ``--match-url-filename``: files named like the URL's last path component (opt-in: ambiguous).

MMC4 (``docs_shard_*.jsonl``, ``.jsonl.zip`` as downloaded, or ``.gz``): each line has ``text_list`` (the
document's sentences), ``image_info`` (list of ``{image_name, raw_url, matched_text_index, matched_sim}``)
and ``url``. Images are found under ``--image-root`` by ``image_name`` (path, file name or stem), then by
``raw_url`` as above. Every image goes right before the sentence ``matched_text_index`` (several images
matched to one sentence keep their ``image_info`` order).

Output: ``{"id": "<source>/<file stem>-<row>", "source": ..., "url": ..., "turns": [{"role": null,
"content": [text / image items in reading order]}]}``. An image that is missing or does not decode is
dropped from its document and counted in ``dropped_images`` (``--on-bad-image drop``, default), or the
whole document is skipped with the image's reason (``--on-bad-image skip``). Skips: ``bad_json``,
``bad_file``, ``bad_annotation`` (lists of the wrong type / length, bad ``matched_text_index``),
``too_few_images`` (fewer than ``--min-images`` usable images, default 1), ``missing_text`` (no text at all),
``missing_file`` / ``corrupt_image`` (with ``--on-bad-image skip``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_prep.common import (
    ImageBlob,
    ImageIndex,
    RecordWriter,
    converter_parser,
    count_rows,
    expand_inputs,
    file_stem,
    iter_rows,
    progress,
    writer_from_args,
)
from src.data.records import BadSample

FORMATS = ("obelics", "mmc4")


def detect_format(row: dict) -> str:
    if "text_list" in row or "image_info" in row:
        return "mmc4"
    if "texts" in row or "images" in row:
        return "obelics"
    raise BadSample("bad_annotation", f"neither OBELICS (images/texts) nor MMC4 (text_list/image_info) "
                                      f"columns; keys {sorted(row)[:10]}")


def _peek_format(files: list[Path]) -> str:
    """The format of the first readable row (for the default output name); "interleaved" if none."""
    for path in files:
        for _, row in iter_rows(path):
            if isinstance(row, dict):
                try:
                    return detect_format(row)
                except BadSample:
                    return "interleaved"
    return "interleaved"


def _metadata_url(meta: Any) -> str | None:
    """OBELICS' ``general_metadata`` is a JSON string with the page ``url``."""
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    return meta.get("url") if isinstance(meta, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


class _Images:
    """Resolves a document's images, applying the --on-bad-image policy."""

    def __init__(self, index: ImageIndex | None, on_bad: str, note: Callable[..., None]):
        self.index, self.on_bad, self.note = index, on_bad, note

    def get(self, **where: str | None) -> ImageBlob | None:
        try:
            if self.index is None:
                raise BadSample("missing_file", "no --image-root given")
            return self.index.get(**where)
        except BadSample as e:
            if self.on_bad == "skip":
                raise
            self.note("dropped_images", e.reason)
            return None


def obelics_content(row: dict, images: _Images) -> list[dict]:
    urls, texts = row.get("images"), row.get("texts")
    if not isinstance(urls, list) or not isinstance(texts, list):
        raise BadSample("bad_annotation", f"'images' and 'texts' must be lists, got "
                                          f"{type(urls).__name__} / {type(texts).__name__}")
    if len(urls) != len(texts):
        raise BadSample("bad_annotation", f"'images' ({len(urls)}) and 'texts' ({len(texts)}) differ in length")
    content: list[dict] = []
    for url, text in zip(urls, texts):
        if isinstance(url, str) and url:
            blob = images.get(url=url)
            if blob is not None:
                content.append({"image": blob})
        if _text(text):
            content.append({"text": text})
    return content


def mmc4_content(row: dict, images: _Images) -> list[dict]:
    sentences, infos = row.get("text_list"), row.get("image_info") or []
    if not isinstance(sentences, list) or not isinstance(infos, list):
        raise BadSample("bad_annotation", "'text_list' and 'image_info' must be lists")
    before: dict[int, list[dict]] = {}
    for j, info in enumerate(infos):
        if not isinstance(info, dict):
            raise BadSample("bad_annotation", f"image_info[{j}] is not an object")
        idx = info.get("matched_text_index")
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < len(sentences):
            raise BadSample("bad_annotation", f"image_info[{j}].matched_text_index={idx!r} is not an index "
                                              f"into text_list ({len(sentences)} sentences)")
        name = info.get("image_name")
        url = info.get("raw_url")
        blob = images.get(name=name if isinstance(name, str) else None, url=url if isinstance(url, str) else None)
        if blob is not None:
            before.setdefault(idx, []).append({"image": blob})
    content: list[dict] = []
    for i, sentence in enumerate(sentences):
        content += before.get(i, [])
        if _text(sentence):
            if content and "text" in content[-1]:  # sentences join with a space (OpenFlamingo's MMC4 loader)
                content[-1] = {"text": f"{content[-1]['text']} {sentence}"}
            else:
                content.append({"text": sentence})
    return content


def convert(inputs: str | Path | list, out: str | Path, *, image_root: str | Path | None = None,
            format: str = "auto", name: str | None = None, source: str | None = None,
            on_bad_image: str = "drop", min_images: int = 1, url_filename: bool = False,
            shards: bool = False, shard_maxcount: int = 10_000, quiet: bool = False) -> dict:
    """Convert OBELICS / MMC4 files; ``format`` auto-detects per row. Returns the writer's stats dict."""
    if format not in ("auto", *FORMATS):
        raise ValueError(f"format must be auto, obelics or mmc4, got {format!r}")
    if on_bad_image not in ("drop", "skip"):
        raise ValueError(f"on_bad_image must be drop or skip, got {on_bad_image!r}")
    files = expand_inputs(inputs, (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zip"))
    name = name or (format if format != "auto" else _peek_format(files))
    index = ImageIndex(image_root, url_filename=url_filename) if image_root is not None else None
    with RecordWriter(out, name, source=source, shards=shards, shard_maxcount=shard_maxcount,
                      quiet=quiet) as writer:
        images = _Images(index, on_bad_image, writer.note)
        for path in files:
            stem = file_stem(path)
            rows = progress(iter_rows(path), desc=f"{name} {path.name}", total=count_rows(path), unit="doc",
                            writer=writer)
            for i, (where, row) in enumerate(rows):
                rid = f"{writer.source}/{stem}-{i:07d}"
                with writer.row(id=rid, where=where):
                    if isinstance(row, BadSample):
                        raise row
                    fmt = format if format != "auto" else detect_format(row)
                    content = obelics_content(row, images) if fmt == "obelics" else mmc4_content(row, images)
                    n_images = sum(1 for item in content if "image" in item)
                    if not any("text" in item for item in content):
                        raise BadSample("missing_text", "document has no text")
                    if n_images < min_images:
                        raise BadSample("too_few_images", f"{n_images} usable image(s) < --min-images={min_images}")
                    record: dict[str, Any] = {"id": rid, "source": writer.source}
                    url = row.get("url") or _metadata_url(row.get("general_metadata"))
                    if isinstance(url, str) and url:
                        record["url"] = url
                    record["turns"] = [{"role": None, "content": content}]
                    writer.write(record, where=where)
        if index is not None:
            index.close()
    return writer.stats()


def main(argv: list[str] | None = None) -> dict:
    parser = converter_parser(__doc__, None, "OBELICS .parquet/.jsonl or MMC4 .jsonl(.zip/.gz): files, folders, globs")
    parser.add_argument("--format", default="auto", choices=["auto", *FORMATS],
                        help="input dataset (default: detect from the columns; also the default --name)")
    parser.add_argument("--image-root", default=None, help="folder with the downloaded images")
    parser.add_argument("--on-bad-image", default="drop", choices=["drop", "skip"],
                        help="drop a missing/corrupt image from its document (default) or skip the document")
    parser.add_argument("--min-images", type=int, default=1, help="skip documents with fewer usable images")
    parser.add_argument("--match-url-filename", action="store_true",
                        help="also find images by the file name at the end of the URL")
    args = parser.parse_args(argv)
    kw = writer_from_args(args)
    return convert(args.input, args.out, image_root=args.image_root, format=args.format,
                   on_bad_image=args.on_bad_image, min_images=args.min_images,
                   url_filename=args.match_url_filename, **kw)


if __name__ == "__main__":
    main()
