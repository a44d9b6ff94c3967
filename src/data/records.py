"""One record format for every stage, with readers that skip (and count) bad data instead of crashing.

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

from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

log = logging.getLogger(__name__)

ROLES = (None, "user", "assistant", "system")
ITEM_KINDS = ("text", "image", "box")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_GRID = re.compile(r"^(any|[1-9][0-9]*x[1-9][0-9]*)$")
ORIENTATION_KEY = "exif_orientation"  # info key of load_image's result: the EXIF orientation (1-8) it undid

__all__ = [
    "CHAT_CONTROL_TEXT",
    "ORIENTATION_KEY",
    "BadSample",
    "SkipCounter",
    "SkippedSample",
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


# --------------------------------------------------------------------------------------------- errors
class BadSample(Exception):
    """A sample that cannot be used. ``reason`` is a short snake_case tag, ``detail`` says what exactly.

    ``source`` / ``id`` / ``where`` are filled in by readers when they know them.
    """

    def __init__(self, reason: str, detail: str = "", *, source: str | None = None,
                 id: str | None = None, where: str | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.source = source
        self.id = id
        self.where = where

    def __reduce__(self):  # keep reason/detail when pickled across DataLoader workers
        return (functools.partial(BadSample, self.reason, self.detail),
                (), {"source": self.source, "id": self.id, "where": self.where})

    def to_skipped(self, source: str | None = None, id: str | None = None,
                   where: str | None = None) -> SkippedSample:
        return SkippedSample(reason=self.reason, source=self.source or source or "unknown",
                             id=self.id or id, where=self.where or where or "?", detail=self.detail)


@dataclass
class SkippedSample:
    """What a reader yields in place of a record it had to drop."""

    reason: str
    source: str
    id: str | None
    where: str
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"skipped {self.reason} [source={self.source} id={self.id} at {self.where}]: {self.detail}"


# --------------------------------------------------------------------------------------------- schema
def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_item(item: Any, at: str) -> None:
    if not isinstance(item, dict):
        raise BadSample("bad_schema", f"{at} must be an object, got {type(item).__name__}")
    kinds = [k for k in ITEM_KINDS if k in item]
    if len(kinds) != 1:
        raise BadSample("bad_schema", f"{at} must have exactly one of 'text', 'image', 'box'; "
                                      f"has {kinds or 'none'} (keys {sorted(item)})")
    kind = kinds[0]
    value = item[kind]
    if kind == "text":
        if not isinstance(value, str):
            raise BadSample("bad_schema", f"{at}.text must be a string, got {type(value).__name__}")
        if not value.strip():
            raise BadSample("empty_text", f"{at}.text is empty")
    elif kind == "image":
        if not isinstance(value, str) or not value.strip():
            raise BadSample("bad_schema", f"{at}.image must be a non-empty string, got {value!r}")
        if "generate" in item and not isinstance(item["generate"], bool):
            raise BadSample("bad_schema", f"{at}.generate must be true/false, got {item['generate']!r}")
        if "grid" in item and not (isinstance(item["grid"], str) and _GRID.match(item["grid"])):
            raise BadSample("bad_schema", f"{at}.grid must be 'any' or 'RxC' (e.g. '1x1'), got {item['grid']!r}")
    else:  # box
        if not (isinstance(value, (list, tuple)) and len(value) == 4 and all(_is_number(v) for v in value)):
            raise BadSample("bad_schema", f"{at}.box must be 4 finite numbers [x0, y0, x1, y1], got {value!r}")
        x0, y0, x1, y1 = value
        if min(value) < 0 or x1 < x0 or y1 < y0:
            raise BadSample("bad_schema", f"{at}.box must satisfy 0 <= x0 <= x1 and 0 <= y0 <= y1, got {value!r}")
        if "label" in item and not isinstance(item["label"], str):
            raise BadSample("bad_schema", f"{at}.label must be a string, got {type(item['label']).__name__}")
        canvas = item.get("canvas")
        if canvas is not None and not (isinstance(canvas, (list, tuple)) and len(canvas) == 2
                                       and all(_is_number(v) and v > 0 for v in canvas)):
            raise BadSample("bad_schema", f"{at}.canvas must be [width, height] > 0, got {canvas!r}")


def validate_record(obj: Any) -> dict:
    """Check ``obj`` against the record schema and return it unchanged.

    Raises ``BadSample("bad_schema", ...)`` naming the offending field (``turns[1].content[0].image ...``),
    or ``BadSample("empty_text", ...)`` for a text item that is blank after stripping. Keys starting with
    ``_`` and unknown extra keys are allowed (readers' private data, dataset metadata).
    """
    if not isinstance(obj, dict):
        raise BadSample("bad_schema", f"record must be a JSON object, got {type(obj).__name__}")
    for key in ("id", "source"):
        if key not in obj:
            raise BadSample("bad_schema", f"missing '{key}'")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise BadSample("bad_schema", f"'{key}' must be a non-empty string, got {obj[key]!r}")
    if "turns" not in obj:
        raise BadSample("bad_schema", "missing 'turns'")
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_schema", f"'turns' must be a non-empty list, got {turns!r:.80}")
    for i, turn in enumerate(turns):
        at = f"turns[{i}]"
        if not isinstance(turn, dict):
            raise BadSample("bad_schema", f"{at} must be an object, got {type(turn).__name__}")
        role = turn.get("role")
        if role not in ROLES:
            raise BadSample("bad_schema", f"{at}.role must be null, 'user', 'assistant' or 'system'; got {role!r}")
        content = turn.get("content")
        if not isinstance(content, list) or not content:
            raise BadSample("bad_schema", f"{at}.content must be a non-empty list, got {content!r:.80}")
        for j, item in enumerate(content):
            _validate_item(item, f"{at}.content[{j}]")
    return obj


# Text that the chat templates use to mark turns (SEED-X's Llama-2 `[INST] ... [/INST]`, `<<SYS>>`, the
# sequence marks `<s>` / `</s>`, SEED-LLaMA's `USER:` / `ASSISTANT:`): inside a turn's content it would
# forge turn boundaries the model then learns word for word.
CHAT_CONTROL_TEXT: tuple[str, ...] = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>", "USER:", "ASSISTANT:")


def validate_chat(obj: dict, control_text: Iterable[str] = CHAT_CONTROL_TEXT) -> dict:
    """Check the turns of a chat (a record with user / assistant turns; documents pass) and return it.

    ``bad_turn_order``: a system turn after the first turn, an assistant turn before any user turn, two user
    turns in a row, or no assistant turn at all (nothing to learn); ``control_text_in_chat``: a text item
    holding the templates' own turn markers (:data:`CHAT_CONTROL_TEXT`). The same rules as torchtune's
    message validation and the Llama reference chat code. Training readers apply it (generation prompts
    are user-only chats by nature and are validated with :func:`validate_record` alone)."""
    roles = [turn.get("role") for turn in obj["turns"]]
    if not any(r in ("user", "assistant") for r in roles):
        return obj
    previous = None
    for i, role in enumerate(roles):
        if role == "system" and i > 0:
            raise BadSample("bad_turn_order", f"turns[{i}] is a system turn; only the first turn may be one")
        if role == "assistant" and "user" not in roles[:i]:
            raise BadSample("bad_turn_order", f"turns[{i}] is an assistant turn before any user turn")
        if role == "user" and previous == "user":
            raise BadSample("bad_turn_order", f"turns[{i - 1}] and turns[{i}] are two user turns in a row")
        previous = role
    if "assistant" not in roles:
        raise BadSample("bad_turn_order", "a chat with no assistant turn (nothing to learn)")
    marks = tuple(control_text)
    for i, turn in enumerate(obj["turns"]):
        for j, item in enumerate(turn["content"]):
            found = next((m for m in marks if m in item.get("text", "")), None)
            if found:
                raise BadSample("control_text_in_chat", f"turns[{i}].content[{j}].text contains the chat "
                                                        f"template's control text {found!r}")
    return obj


def record_images(record: dict) -> list[dict]:
    """All image items of a record, in order."""
    return [item for turn in record["turns"] for item in turn["content"] if "image" in item]


def record_text(record: dict, sep: str = "\n") -> str:
    """All text items of a record joined with ``sep``."""
    return sep.join(item["text"] for turn in record["turns"] for item in turn["content"] if "text" in item)


def _str_or_none(obj: Any, key: str) -> str | None:
    value = obj.get(key) if isinstance(obj, dict) else None
    return value if isinstance(value, str) and value else None


# --------------------------------------------------------------------------------------------- readers
def _resolved_roots(allowed_roots: Iterable[str | Path]) -> list[str]:
    return [str(Path(r).expanduser().resolve()) for r in allowed_roots]


def read_jsonl(path: str | Path, source: str | None = None,
               allowed_roots: Iterable[str | Path] = ()) -> Iterator[dict | SkippedSample]:
    """Yield the records of a jsonl file, and a :class:`SkippedSample` for every line that is not one.

    ``source`` fills in records that have no ``source`` and names the dataset in skip reports of lines that
    could not be parsed (default: the file's stem). Blank lines are ignored. A missing file raises
    ``FileNotFoundError`` (that is a configuration error, not bad data). Image paths may point into the
    jsonl's folder and ``allowed_roots`` only (checked by :func:`load_image`).
    """
    path = Path(path)
    base_dir = str(path.resolve().parent)
    roots = _resolved_roots(allowed_roots)
    fallback = source or path.stem
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            obj: Any = None
            try:
                try:
                    obj = json.loads(raw.decode("utf-8-sig"))
                except UnicodeDecodeError as e:
                    raise BadSample("bad_json", f"not UTF-8: {e}") from None
                except json.JSONDecodeError as e:
                    raise BadSample("bad_json", str(e)) from None
                if source is not None and isinstance(obj, dict):
                    obj.setdefault("source", source)
                validate_chat(validate_record(obj))
            except BadSample as e:
                yield e.to_skipped(_str_or_none(obj, "source") or fallback, _str_or_none(obj, "id"), where)
                continue
            obj["_base_dir"] = base_dir
            if roots:
                obj["_allowed_roots"] = roots
            obj["_where"] = where
            yield obj


def read_image_folder(path: str | Path, source: str,
                      allowed_roots: Iterable[str | Path] = ()) -> Iterator[dict]:
    """Every image file under ``path`` (recursive, sorted by relative path) as an image-only document.

    Record id is ``"<source>/<relative path>"``. Hidden files (``.name``) are ignored. Images are not
    decoded here; :func:`load_image` reports broken ones, and symlinks that lead outside the folder and
    ``allowed_roots`` (``path_outside_root``).
    """
    root = Path(path)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} does not exist")
    base_dir = str(root.resolve())
    extra = {"_allowed_roots": roots} if (roots := _resolved_roots(allowed_roots)) else {}
    files = [p for p in root.rglob("*")
             if p.suffix.lower() in IMAGE_EXTENSIONS and not any(part.startswith(".")
                                                                 for part in p.relative_to(root).parts)
             and p.is_file()]
    for p in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        rel = p.relative_to(root).as_posix()
        yield {"id": f"{source}/{rel}", "source": source,
               "turns": [{"role": None, "content": [{"image": rel}]}],
               "_base_dir": base_dir, **extra, "_where": str(p)}


# --------------------------------------------------------------------------------------------- shards
def shard_source_name(url: str | Path) -> str:
    """Default source name of a shard or shard pattern: its file name without the shard number or brace
    range (``dir/laion-000003.tar``, ``dir/laion-{000000..000009}.tar`` -> ``laion``), else (a bare number
    such as ``dir/000003.tar``) the folder's name; ``unknown`` only when neither names anything."""
    p = Path(str(url))
    name = p.name.split("{", 1)[0]  # a brace pattern: the part before the range
    if "{" not in p.name:
        name = re.sub(r"\.(tar|tgz)(\.\w+)?$", "", name)
    name = re.sub(r"[-_.]*\d*[-_.]*$", "", name)
    return name or p.parent.name or "unknown"


class _ShardSkips:
    """A webdataset exception handler that turns every exception into a queued :class:`SkippedSample`.

    webdataset calls ``handler(exn)`` wherever a shard cannot be opened, a tar is truncated, a member is
    duplicated, ...; returning True tells it to carry on. :func:`_shard_records` drains the queue into the
    output stream, so skips appear among the records in (roughly) the order they happened.
    """

    def __init__(self, source: str | None):
        self.source = source
        self.pending: deque[SkippedSample] = deque()
        self._last_shard_error: tuple[str, str] | None = None

    def __call__(self, exn: BaseException) -> bool:
        if isinstance(exn, BadSample):
            self.pending.append(exn.to_skipped(self.source))
            return True
        # webdataset appends the url (and the stream) to exn.args, or " @ <stream repr>" to args[0]
        args = getattr(exn, "args", ())
        first = str(args[0]) if args else ""
        message, _, stream = first.partition(" @ ")
        urls = [a for a in args[1:] if isinstance(a, str)]
        named = re.search(r"name='([^']*)'", stream or " ".join(map(str, args[1:])))
        where = urls[-1] if urls else (named.group(1) if named else "?")
        if isinstance(exn, OSError) and exn.strerror:
            message = f"{exn.strerror}: {exn.filename or where}"
        if self._last_shard_error == (where, message):
            return True  # the same failure reported again by an outer webdataset stage
        self._last_shard_error = (where, message)
        source = self.source or shard_source_name(where)
        self.pending.append(SkippedSample("bad_shard", source, None, where,
                                          f"{type(exn).__name__}: {message}"[:500]))
        return True

    def drain(self) -> Iterator[SkippedSample]:
        while self.pending:
            yield self.pending.popleft()


def _shard_sample_to_record(sample: dict, source: str | None, check_images: bool, min_size: int,
                            max_aspect_ratio: float | None) -> dict:
    key = sample.get("__key__")
    where = f"{sample.get('__url__')}:{key}"
    obj: Any = None
    try:
        members = sorted(k for k in sample if not k.startswith("__"))
        if "json" not in sample:
            raise BadSample("missing_json", f"sample has no {key}.json member (members: {members})")
        try:
            obj = json.loads(sample["json"])
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise BadSample("bad_json", f"{key}.json: {e}") from None
        if source is not None and isinstance(obj, dict):
            obj.setdefault("source", source)
        validate_chat(validate_record(obj))
        obj["_blobs"] = {k: v for k, v in sample.items() if not k.startswith("__") and k != "json"}
        obj["_where"] = where
        for item in record_images(obj):
            if item["image"].lower() not in obj["_blobs"]:
                raise BadSample("missing_file", f"image {item['image']!r} is not a member of sample {key} "
                                                f"(members: {members})")
            if check_images:
                load_image(obj, item, min_size=min_size, max_aspect_ratio=max_aspect_ratio)
        return obj
    except BadSample as e:
        e.where = e.where or where
        e.id = e.id or _str_or_none(obj, "id")
        e.source = (e.source or _str_or_none(obj, "source") or source
                    or shard_source_name(sample.get("__url__") or "unknown"))
        raise


def _shard_records(src: Iterable[dict], *, skips: _ShardSkips, source: str | None, check_images: bool,
                   min_size: int, max_aspect_ratio: float | None) -> Iterator[dict | SkippedSample]:
    for sample in src:
        yield from skips.drain()
        try:
            record = _shard_sample_to_record(sample, source, check_images, min_size, max_aspect_ratio)
        except Exception as exn:  # noqa: BLE001 - the handler turns it into a SkippedSample
            if skips(exn):
                continue
            break
        yield record
    yield from skips.drain()


def read_shards(urls: str | list[str], source: str | None = None, shuffle: bool | int = False, *,
                check_images: bool = True, min_size: int = 1, max_aspect_ratio: float | None = None,
                seed: int = 0, split_by_node: bool = True):
    """A webdataset ``DataPipeline`` (an ``IterableDataset``) of records and :class:`SkippedSample` s.

    ``urls``: a path / brace pattern (``"shards/captions-{000000..000009}.tar"``) or a list of them.
    Records carry ``_blobs`` ({extension: bytes}) and ``_where`` (``"<url>:<key>"``); see the module
    docstring for the layout. Every failure -- unreadable or truncated shard, missing / broken json, schema
    error, image item without its member, and (with ``check_images``, the default) an image that does not
    fully decode or fails ``min_size`` / ``max_aspect_ratio`` -- comes out as a ``SkippedSample`` through
    webdataset's ``handler`` mechanism instead of raising. ``check_images`` decodes each image once here;
    turn it off when the consumer calls :func:`load_image` anyway and handles its ``BadSample``.

    ``shuffle``: False keeps shard and sample order; True (buffer 1000) or an int buffer size shuffles
    shards and samples deterministically from ``seed`` and the epoch (each pass over the pipeline).
    Shards are split across DataLoader workers, and across ranks when ``split_by_node`` (give at least as
    many shards as ranks x workers, or some get nothing).
    """
    import webdataset as wds

    skips = _ShardSkips(source)
    bufsize = 0 if shuffle is False else (1000 if shuffle is True else int(shuffle))
    stages: list[Any] = [wds.SimpleShardList(urls)]
    if bufsize:
        stages.append(wds.detshuffle(bufsize=bufsize, initial=bufsize, seed=seed))
    if split_by_node:
        stages.append(wds.split_by_node)
    stages += [wds.split_by_worker, wds.tarfile_to_samples(handler=skips)]
    if bufsize:
        stages.append(wds.detshuffle(bufsize=bufsize, initial=min(100, bufsize), seed=seed + 1))
    stages.append(functools.partial(_shard_records, skips=skips, source=source, check_images=check_images,
                                    min_size=min_size, max_aspect_ratio=max_aspect_ratio))
    return wds.DataPipeline(*stages)


# --------------------------------------------------------------------------------------------- images
def _bits_per_sample(im: Image.Image) -> int:
    """Bits of full scale of a 32-bit-int (mode ``I``) image: the TIFF's BitsPerSample where it says (one
    less for signed samples, whose positive range it is), else 16 (PNG / PGM hand 16-bit samples over
    in mode ``I``)."""
    tags = getattr(im, "tag_v2", {})

    def first(tag: int):  # TIFF tags hold an int or one value per band
        value = tags.get(tag)
        return value[0] if isinstance(value, tuple) and value else value

    bits, signed = first(258), first(339) == 2  # BitsPerSample, SampleFormat (2 = signed integer)
    return max(8, int(bits) - signed) if isinstance(bits, int) and 8 <= bits <= 32 else 16


def _high_bit_to_l(im: Image.Image) -> Image.Image:
    """A single-band image deeper than 8 bits (``I;16*``, ``I``, ``F``) as 8-bit ``L``, scaled, not clipped:
    ``v >> (bits - 8)`` for integers (the top 8 bits; what PIL itself keeps of 16-bit RGB / RGBA / LA
    PNGs), ``round(255 * v)`` for floats, which are taken as [0, 1] (NaN -> 0). PIL's own ``convert``
    clips every value above 255 instead, which turns a 16-bit photo white."""
    arr = np.asarray(im)
    if im.mode == "F":
        out = np.rint(np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0)
    else:
        bits = 16 if im.mode.startswith("I;16") else _bits_per_sample(im)
        out = np.clip(arr.astype(np.int64), 0, (1 << bits) - 1) >> (bits - 8)
    transparent = im.info.get("transparency")  # a 16-bit grey PNG's tRNS value: those pixels onto white
    if isinstance(transparent, int):
        out = np.where(arr == transparent, 255, out)
    return Image.fromarray(out.astype(np.uint8), "L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return _high_bit_to_l(im).convert("RGB")
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")  # transparent pixels onto white, not onto whatever colour they hold
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def check_image_size(w: int, h: int, name: str, min_size: int = 1, max_aspect_ratio: float | None = None,
                     **ctx) -> None:
    """``image_too_small`` / ``bad_aspect_ratio`` checks of :func:`load_image` on a known size (also used on
    the stored sizes of precomputed features, which decode no image)."""
    if min(w, h) < max(min_size, 1):
        raise BadSample("image_too_small", f"{name} is {w}x{h}, shorter side < min_size={min_size}", **ctx)
    if max_aspect_ratio is not None and max(w, h) / min(w, h) > max_aspect_ratio:
        raise BadSample("bad_aspect_ratio", f"{name} is {w}x{h}, aspect ratio "
                                            f"{max(w, h) / min(w, h):.2f} > {max_aspect_ratio}", **ctx)


def _resolve_image_path(record: dict, ref: str, ctx: dict) -> Path:
    """The real path of a (non-shard) image reference, refused when outside the record's source roots."""
    base = record.get("_base_dir")
    path = Path(ref)
    if base is None:  # not from a source reader: the caller chose the path
        return path.resolve()
    path = (Path(base) / path).resolve()  # an absolute ref replaces base; symlinks and .. are followed
    roots = [base, *(record.get("_allowed_roots") or ())]
    if not any(path.is_relative_to(Path(r).resolve()) for r in roots):
        raise BadSample("path_outside_root", f"image {ref!r} resolves to {path}, outside the source root "
                                             f"{base} and allowed_roots {roots[1:]}", **ctx)
    return path


def _image_ctx(record: dict) -> dict:
    return {"source": _str_or_none(record, "source"), "id": _str_or_none(record, "id"),
            "where": _str_or_none(record, "_where")}


def _image_source(record: dict, item: dict | str, ctx: dict) -> tuple[str, Any]:
    """(name for messages, file path or BytesIO) of an image item: a shard member or a checked path."""
    ref = item["image"] if isinstance(item, dict) else item
    blobs = record.get("_blobs")
    if blobs is not None:
        data = blobs.get(ref, blobs.get(ref.lower()))
        if data is None:
            raise BadSample("missing_file", f"no member {ref!r} in shard sample (has {sorted(blobs)})", **ctx)
        return f"member {ref!r}", io.BytesIO(data)
    path = _resolve_image_path(record, ref, ctx)
    if not path.is_file():
        raise BadSample("missing_file", f"{path} does not exist", **ctx)
    return str(path), path


def image_bytes(record: dict, item: dict | str) -> tuple[bytes, str]:
    """The stored bytes of an image item and its extension, found as :func:`load_image` finds them (shard
    member, or a path checked against the source's roots: ``missing_file`` / ``path_outside_root``);
    not decoded."""
    _, fp = _image_source(record, item, _image_ctx(record))
    if isinstance(fp, io.BytesIO):
        ref = item["image"] if isinstance(item, dict) else item
        return fp.getvalue(), ref.rsplit(".", 1)[-1]
    return fp.read_bytes(), fp.suffix.lstrip(".")


def load_image(record: dict, item: dict | str, min_size: int = 1,
               max_aspect_ratio: float | None = None) -> Image.Image:
    """Decode one image item of ``record`` to an upright RGB ``PIL.Image`` (fully decoded, file closed).

    Shard records resolve the item against ``record["_blobs"]`` (member names, not paths). Others resolve
    it against ``record["_base_dir"]`` (absolute paths as they are), then follow symlinks and ``..``; with
    a ``_base_dir`` (every record a source reader made) the result must lie inside it or one of
    ``record["_allowed_roots"]``, else ``path_outside_root``.

    The EXIF orientation is applied, and ``info[ORIENTATION_KEY]`` of the result holds the one undone
    (1 = none): boxes of the record are in the stored pixel frame, ``src.data.bbox.orient_box`` turns them
    upright with it. High-bit-depth images are scaled to 8 bits (:func:`_high_bit_to_l`); transparent
    pixels go onto white. Raises :class:`BadSample` with reason ``missing_file``, ``path_outside_root``,
    ``corrupt_image`` (undecodable or truncated), ``image_too_small`` (shorter side < ``min_size``),
    ``bad_aspect_ratio`` (long/short side > ``max_aspect_ratio``) or ``image_too_large`` (PIL
    decompression-bomb limit).
    """
    ctx = _image_ctx(record)
    name, fp = _image_source(record, item, ctx)
    try:
        with Image.open(fp) as im:
            check_image_size(*im.size, name, min_size, max_aspect_ratio, **ctx)  # orientation-invariant
            im.load()  # full decode: truncated files fail here, not later in a collate
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            orientation = int(orientation) if orientation in range(1, 9) else 1  # invalid tags: as stored
            if orientation != 1:
                ImageOps.exif_transpose(im, in_place=True)
            rgb = _to_rgb(im)
        rgb.info[ORIENTATION_KEY] = orientation
        return rgb
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("image_too_large", f"{name}: {e}", **ctx) from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadSample("corrupt_image", f"{name}: {type(e).__name__}: {e}", **ctx) from None


# --------------------------------------------------------------------------------------------- counting
class SkipCounter:
    """Counts skipped samples by (source, reason); mergeable across workers / ranks; picklable.

    ``add`` logs the first ``log_first`` skips of each reason at WARNING with their source and location
    (later ones at DEBUG) and keeps up to ``max_examples`` of them in ``examples``.
    """

    def __init__(self, log_first: int = 5, max_examples: int = 20):
        self.log_first = log_first
        self.max_examples = max_examples
        self._counts: Counter[tuple[str, str]] = Counter()
        self._logged: Counter[str] = Counter()
        self.examples: list[SkippedSample] = []

    def add(self, skipped: SkippedSample) -> SkippedSample:
        self._counts[(skipped.source, skipped.reason)] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(skipped)
        if self._logged[skipped.reason] < self.log_first:
            self._logged[skipped.reason] += 1
            log.warning("%s", skipped)
        else:
            log.debug("%s", skipped)
        return skipped

    def merge(self, other: SkipCounter) -> SkipCounter:
        self._counts.update(other._counts)
        self.examples.extend(other.examples[: max(0, self.max_examples - len(self.examples))])
        return self

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def counts_by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self._counts.items():
            out[reason] += n
        return dict(sorted(out.items()))

    def counts_by_source(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (source, _), n in self._counts.items():
            out[source] += n
        return dict(sorted(out.items()))

    def counts(self) -> dict[str, dict[str, int]]:
        """{source: {reason: n}}."""
        out: dict[str, dict[str, int]] = {}
        for (source, reason), n in sorted(self._counts.items()):
            out.setdefault(source, {})[reason] = n
        return out

    def to_metrics(self, prefix: str = "data/skipped") -> dict[str, int]:
        metrics = {f"{prefix}/{reason}": n for reason, n in self.counts_by_reason().items()}
        metrics[f"{prefix}/total"] = self.total
        return metrics

    def __repr__(self) -> str:
        return f"SkipCounter(total={self.total}, by_reason={self.counts_by_reason()})"
