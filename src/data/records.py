"""One record format for every stage, with readers that skip (and count) bad data instead of crashing.

This module documents the format and re-exports its parts, split by concern: ``schema.py`` (validation,
accessors), ``readers.py`` (jsonl, image folders, webdataset shards), ``decode.py`` (image items -> pixels,
untrusted paths) and ``skips.py`` (``BadSample``, ``SkippedSample``, ``SkipCounter``).

Record schema (see DESIGN.md, "One record schema for every stage")::

    {"id": "laion_coco/000123", "source": "laion_coco",
     "turns": [{"role": null | "user" | "assistant" | "system",
                "content": [{"text": "..."},
                            {"image": "images/a.jpg", "generate": false, "grid": "any"},
                            {"box": [x0, y0, x1, y1], "label": "...", "canvas": [w, h]}]}]}

A document (caption pair, interleaved web page) is one turn with ``role: null``. Every content item has
exactly one of ``text`` / ``image`` / ``box``. Image paths in a jsonl are relative to the jsonl's folder.
A box is in pixels of the image before it *as stored* (the raw pixel grid, before any EXIF orientation), or,
with ``"canvas": [width, height]``, in pixels of that canvas (a slide layout: boxes on a page the record
has no image of).

Image paths are untrusted data: :func:`load_image` resolves every path (relative ones against
``_base_dir``; symlinks and ``..`` resolved) and refuses one that ends up outside the source's root (the
jsonl's folder or the image folder) and the source's ``allowed_roots`` (``path_outside_root``). Records
without ``_base_dir`` (built by code, not read from a source) are used as they are. Shard records name
members by extension; those are not paths.

Decoding: the EXIF orientation is applied (the image comes out upright; its ``info[ORIENTATION_KEY]``
says which of the 8 orientations was undone, so boxes can follow with ``src.data.bbox.orient_box``), and
images deeper than 8 bits are scaled to 8 bits, never clipped (see :func:`_to_rgb`).

Readers
-------
``read_jsonl``, ``read_image_folder`` and ``read_shards`` yield validated records (plain dicts) plus, for
anything broken, a :class:`SkippedSample` (reason, source, id, where, detail) in the same stream, so the
consumer decides what to do and counts it with :class:`SkipCounter`. One bad line / member never stops the
iteration. Records carry private keys the loaders use and the tokenizer ignores:

* ``_where``    -- ``"path/to/file.jsonl:LINE"`` or ``"path/to/shard.tar:KEY"`` (for logs and skip reports)
* ``_base_dir`` -- absolute folder that relative image paths resolve against, and the source's root
  (jsonl / folder readers)
* ``_allowed_roots`` -- resolved extra folders the record's images may live in (the source's
  ``allowed_roots``; absent when there are none)
* ``_blobs``    -- ``{extension: bytes}`` of the sample's image members (shard reader)

Images are decoded lazily with :func:`load_image`, which raises :class:`BadSample` (``missing_file``,
``path_outside_root``, ``corrupt_image``, ``image_too_small``, ``bad_aspect_ratio``, ``image_too_large``).

Shard layout (webdataset)
-------------------------
A shard is a plain (optionally compressed) tar written with ``webdataset.TarWriter`` / ``ShardWriter``.
Members are grouped into samples by key, webdataset-style: everything up to the first ``.`` of the member's
basename is the key, the rest is the extension (lower-cased). One sample is::

    <key>.json        the record (schema above), UTF-8 JSON
    <key>.jpg         an image member; any extension works: <key>.png, <key>.src.jpg, <key>.tgt.jpg, ...

A record's image item names its member by that extension, e.g. ``{"image": "jpg"}`` or
``{"image": "src.jpg"}`` (keys must not contain dots). Example for an edit triplet::

    000042.json     {"id": "edit/000042", "source": "edit", "turns": [
                       {"role": "user", "content": [{"image": "src.jpg"}, {"text": "Flip it."}]},
                       {"role": "assistant", "content": [{"image": "tgt.jpg", "generate": true}]}]}
    000042.src.jpg
    000042.tgt.jpg

Skip reasons (``BadSample.reason``): ``bad_json``, ``bad_schema``, ``empty_text``, ``missing_json`` (shard
sample without ``.json``), ``missing_file`` (absent file or shard member), ``path_outside_root`` (an
image path that resolves outside the source's root and ``allowed_roots``), ``corrupt_image``,
``image_too_small``, ``bad_aspect_ratio``, ``image_too_large``, ``bad_shard`` (unreadable / truncated tar),
``bad_turn_order`` and ``control_text_in_chat`` (chats that are not chats: :func:`validate_chat`).

Skips of a shard sample whose record names no source are reported under the shard's name
(:func:`shard_source_name`: ``laion-000003.tar`` and ``laion-{000000..000009}.tar`` -> ``laion``), as a
jsonl's are under its file stem.
"""

from src.data.decode import ORIENTATION_KEY, check_image_size, image_bytes, load_image
from src.data.readers import (
    IMAGE_EXTENSIONS,
    _shard_sample_to_record,
    _ShardSkips,
    read_image_folder,
    read_jsonl,
    read_shards,
    shard_source_name,
)
from src.data.schema import CHAT_CONTROL_TEXT, record_images, record_text, validate_chat, validate_record
from src.data.skips import BadSample, SkipCounter, SkippedSample

__all__ = [
    "CHAT_CONTROL_TEXT",
    "IMAGE_EXTENSIONS",
    "ORIENTATION_KEY",
    "BadSample",
    "SkipCounter",
    "SkippedSample",
    "_ShardSkips",
    "_shard_sample_to_record",
    "check_image_size",
    "image_bytes",
    "load_image",
    "read_image_folder",
    "read_jsonl",
    "read_shards",
    "record_images",
    "record_text",
    "shard_source_name",
    "validate_chat",
    "validate_record",
]
