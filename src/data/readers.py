"""Readers of the three source kinds: jsonl files, image folders and webdataset shards. Each yields validated
records (plain dicts, with the private keys listed in ``src/data/records.py``) and, for anything broken, a
:class:`~src.data.skips.SkippedSample` in the same stream; one bad line / member never stops the iteration."""

from __future__ import annotations

import functools
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from src.data.decode import load_image
from src.data.schema import _str_or_none, record_images, validate_chat, validate_record
from src.data.skips import BadSample, SkippedSample

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

__all__ = ["IMAGE_EXTENSIONS", "read_image_folder", "read_jsonl", "read_shards", "shard_source_name"]


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
