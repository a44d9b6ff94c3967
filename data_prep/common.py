"""Pieces every dataset converter in ``data_prep`` shares: the record writer, image checks, input readers.

A converter reads a public dataset in its own on-disk layout and hands records (the schema of
``src/data/records.py``) to a :class:`RecordWriter`. Image items of those records hold an :class:`ImageBlob`
(the image's bytes, already checked to decode) instead of a path; the writer stores the bytes and puts the
final reference in the item:

* jsonl output (default): ``<out>/<name>.jsonl`` with images under ``<out>/images/<name>/<bucket>/`` and
  paths relative to the jsonl (``images/<name>/00000/000000007_key.jpg``; 10,000 records per bucket);
* shard output (``--shards``): ``<out>/<name>/<name>-000000.tar, ...`` in our shard layout (``<key>.json``
  record + image members, image items name their member's extension: ``"jpg"``, or ``"0.jpg"``,
  ``"1.jpg"``, ... when a record has several images); read them back with ``src.data.records.read_shards``.

Bad input never stops a conversion: a converter reports it with :meth:`RecordWriter.skip` (or raises
:class:`~src.data.records.BadSample` inside :meth:`RecordWriter.row`), the writer counts it per reason,
appends it to ``<out>/<name>.skipped.jsonl`` (one ``SkippedSample`` per line) and prints a summary at the
end. Skip reasons follow ``src/data/records.py`` where one fits (``missing_file``, ``corrupt_image``,
``bad_json``, ``bad_schema``, ``empty_text``, ``bad_shard``) plus converter-specific ones (``missing_caption``,
``failed_download``, ``bad_annotation``, ``too_short``, ...), all documented in ``data_prep/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import hashlib
import io
import json
import re
import tarfile
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from PIL import Image

from src.data.bbox import oriented_size
from src.data.records import (
    IMAGE_EXTENSIONS,
    ORIENTATION_KEY,
    BadSample,
    SkipCounter,
    SkippedSample,
    _ShardSkips,  # webdataset error handler -> SkippedSample("bad_shard"); shared with the shard reader
    load_image,
    validate_record,
)
from src.utils.progress import progress as _progress

__all__ = [
    "ImageBlob",
    "ImageIndex",
    "RecordWriter",
    "converter_parser",
    "expand_inputs",
    "field_value",
    "image_from_bytes",
    "image_from_file",
    "iter_rows",
    "iter_shard_samples",
    "progress",
    "safe_key",
]

IMAGE_MEMBER_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
                   "MPO": "jpg"}
BUCKET_SIZE = 10_000


# --------------------------------------------------------------------------------------------- images
@dataclass(frozen=True, eq=False)
class ImageBlob:
    """The bytes of one image that fully decodes, with its stored size (pixels) and file extension."""

    data: bytes
    ext: str
    width: int
    height: int


def image_from_bytes(data: bytes | None, hint_ext: str | None = None) -> ImageBlob:
    """Check that ``data`` is a complete image (full decode via ``load_image``) and wrap it.

    Raises ``BadSample("missing_file")`` for None / empty data and ``BadSample("corrupt_image")`` for
    bytes that do not decode. The extension comes from the decoded format (JPEG -> ``jpg``), falling back
    to ``hint_ext``.
    """
    if not data:
        raise BadSample("missing_file", "no image bytes")
    im = load_image({"_blobs": {"bytes": data}}, "bytes")  # BadSample(corrupt_image / image_too_large)
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
    except Exception:  # noqa: BLE001 - decoded above, so this should not happen
        fmt = None
    ext = _PIL_FORMAT_EXT.get(fmt or "") or (hint_ext or "jpg").lower().lstrip(".")
    # load_image turns the image upright; record boxes are in the stored frame, so keep the stored size.
    width, height = oriented_size(im.width, im.height, im.info[ORIENTATION_KEY])
    return ImageBlob(data=bytes(data), ext=ext, width=width, height=height)


def image_from_file(path: str | Path) -> ImageBlob:
    """:func:`image_from_bytes` of a file; ``BadSample("missing_file")`` when it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise BadSample("missing_file", f"{path} does not exist")
    return image_from_bytes(path.read_bytes(), path.suffix)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _url_filename(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]


class ImageIndex:
    """Finds images in a local folder by relative name, file stem (key) or source URL.

    Understands, under ``root`` (recursively):

    * plain image files: found by relative path (``sub/a.jpg``), by file name, or by stem (``a``);
    * img2dataset ``--output_format files`` output: ``<shard>/<key>.jpg`` + ``<key>.json`` whose ``url``
      maps the URL to the image;
    * img2dataset ``--output_format webdataset`` output: uncompressed ``<shard>.tar`` with ``<key>.jpg`` +
      ``<key>.json`` members (read in place by offset, nothing is extracted);
    * files named after the URL: ``sha1(url).<ext>`` (hex digest of the UTF-8 URL), and, with
      ``url_filename=True``, the last path component of the URL (ambiguous on the web, so opt-in).

    The folder is scanned once, on the first lookup that a direct path check cannot answer. Stems or names
    that occur twice are ambiguous and never match.
    """

    def __init__(self, root: str | Path, *, url_filename: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} does not exist")
        self.url_filename = url_filename
        self._built = False
        self._by_stem: dict[str, tuple | None] = {}
        self._by_name: dict[str, tuple | None] = {}
        self._by_url: dict[str, tuple] = {}
        self._url_of: dict[tuple, str] = {}
        self._files: dict[str, Any] = {}

    # -- building
    def _add(self, table: dict, key: str, loc: tuple) -> None:
        table[key] = None if key in table and table[key] != loc else loc

    def _build(self) -> None:
        self._built = True
        sidecars: list[tuple[Path, tuple]] = []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            suffix = path.suffix.lower()
            if suffix == ".tar":
                self._scan_tar(path)
            elif suffix in IMAGE_EXTENSIONS:
                loc = ("file", str(path))
                self._add(self._by_name, path.relative_to(self.root).as_posix(), loc)
                self._add(self._by_name, path.name, loc)
                self._add(self._by_stem, path.name.split(".", 1)[0], loc)
                side = path.with_name(path.name.split(".", 1)[0] + ".json")
                if side.is_file():
                    sidecars.append((side, loc))
        for side, loc in sidecars:
            with contextlib.suppress(Exception):  # a broken sidecar only loses the URL mapping
                url = json.loads(side.read_text("utf-8")).get("url")
                if isinstance(url, str) and url:
                    self._by_url.setdefault(url, loc)
                    self._url_of[loc] = url

    def _scan_tar(self, path: Path) -> None:
        images: dict[str, tuple] = {}
        urls: dict[str, str] = {}
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    key, _, ext = base.partition(".")
                    ext = ext.lower()
                    if ext in IMAGE_MEMBER_EXTS:
                        images[key] = ("tar", str(path), m.offset_data, m.size)
                    elif ext == "json":
                        with contextlib.suppress(Exception):
                            url = json.loads(tar.extractfile(m).read()).get("url")
                            if isinstance(url, str) and url:
                                urls[key] = url
        except (tarfile.TarError, OSError):
            pass  # a truncated tar still contributes the members read before the damage
        for key, loc in images.items():
            self._add(self._by_stem, key, loc)
            if key in urls:
                self._by_url.setdefault(urls[key], loc)
                self._url_of[loc] = urls[key]

    # -- reading
    def _read(self, loc: tuple) -> bytes:
        if loc[0] == "file":
            return Path(loc[1]).read_bytes()
        _, path, offset, size = loc
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")  # noqa: SIM115 - kept open across lookups
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def locate(self, *, name: str | None = None, url: str | None = None, key: str | None = None) -> tuple:
        """Where the image is: ``("file", path)`` or ``("tar", path, offset, size)``.

        Tries, in order: ``name`` as a path under root, ``url`` (sidecar/member json, then ``sha1(url)``, then
        the URL's file name if enabled), ``name`` / ``key`` by name or stem. A match by name/key whose known
        source URL differs from ``url`` is rejected (a different image that happens to share a key).
        Raises ``BadSample("missing_file")``.
        """
        if name:
            direct = self.root / name
            if direct.is_file():
                return ("file", str(direct))
        if not self._built:
            self._build()
        if url:
            loc = self._by_url.get(url) or self._by_stem.get(_sha1(url))
            if loc is None and self.url_filename:
                fname = _url_filename(url)
                loc = self._by_name.get(fname) or self._by_stem.get(fname.split(".", 1)[0])
            if loc is not None:
                return loc
        for candidate in (name, key):
            if not candidate:
                continue
            candidate = str(candidate)
            loc = (self._by_name.get(candidate) or self._by_name.get(candidate.rsplit("/", 1)[-1])
                   or self._by_stem.get(candidate.rsplit("/", 1)[-1].split(".", 1)[0]))
            if loc is not None and not (url and self._url_of.get(loc) not in (None, url)):
                return loc
        wanted = ", ".join(f"{k}={v!r}" for k, v in (("name", name), ("url", url), ("key", key)) if v)
        raise BadSample("missing_file", f"no image for {wanted} under {self.root}")

    def get(self, *, name: str | None = None, url: str | None = None, key: str | None = None) -> ImageBlob:
        """The image as a checked :class:`ImageBlob` (``BadSample`` missing_file / corrupt_image)."""
        loc = self.locate(name=name, url=url, key=key)
        hint = Path(loc[1]).suffix if loc[0] == "file" else None
        return image_from_bytes(self._read(loc), hint)


# --------------------------------------------------------------------------------------------- inputs
def expand_inputs(inputs: str | Path | Iterable[str | Path], suffixes: Iterable[str]) -> list[Path]:
    """Input files: each entry is a file, a folder (searched recursively for ``suffixes``), a glob, or a
    brace pattern (``shards/{00000..00009}.tar``). Raises ``FileNotFoundError`` when nothing matches."""
    import braceexpand

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    suffixes = tuple(s.lower() for s in suffixes)
    out: list[Path] = []
    for entry in inputs:
        for pattern in braceexpand.braceexpand(str(entry)):
            path = Path(pattern)
            if path.is_dir():
                out += sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
            elif path.is_file():
                out.append(path)
            elif any(ch in pattern for ch in "*?["):
                out += sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            else:
                raise FileNotFoundError(f"input {pattern} does not exist")
    if not out:
        raise FileNotFoundError(f"no input files ({', '.join(suffixes)}) in {list(map(str, inputs))}")
    return out


def file_stem(path: str | Path) -> str:
    """``docs_shard_3_v2.jsonl.zip`` -> ``docs_shard_3_v2``."""
    return Path(path).name.split(".", 1)[0]


def open_text_streams(path: Path) -> Iterator[tuple[str, io.TextIOBase]]:
    """(label, text stream) for a plain, ``.gz`` or ``.zip`` (every member) text file."""
    name = path.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            for member in sorted(n for n in zf.namelist() if not n.endswith("/")):
                with zf.open(member) as raw:
                    yield f"{path}!{member}", io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    elif name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            yield str(path), f
    else:
        with open(path, encoding="utf-8") as f:
            yield str(path), f


def _format_of(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".gz", ".zip"):
        name = name.removesuffix(suffix)
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    if name.endswith(".txt"):
        return "txt"
    return "unknown"


def iter_rows(path: str | Path, batch_size: int = 256,
              fmt: str | None = None) -> Iterator[tuple[str, dict | BadSample]]:
    """Rows of a table file as ``(where, row dict)``, or ``(where, BadSample)`` for a row that is not one.

    Formats by suffix: ``.parquet`` (pyarrow, batch by batch), ``.jsonl`` / ``.ndjson`` (one object a line;
    ``.gz`` / ``.zip`` accepted), ``.json`` (one list of objects, or an object). A file that cannot be read
    at all (or breaks midway) yields one ``BadSample("bad_file")``; the rows before the damage are kept.
    ``where`` is ``file:LINE`` (jsonl), ``file:row N`` (parquet) or ``file[i]`` (json list). ``fmt`` overrides
    the suffix (e.g. ``"jsonl"`` for C4's ``.json.gz`` files, which hold one object a line).
    """
    path = Path(path)
    fmt = fmt or _format_of(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        row = 0
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=batch_size):
                for obj in batch.to_pylist():
                    yield f"{path}:row {row}", obj
                    row += 1
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            yield f"{path}:row {row}", BadSample("bad_file", f"{type(e).__name__}: {e}")
    elif fmt == "jsonl":
        label = str(path)
        lineno = 0
        try:
            for label, stream in open_text_streams(path):
                lineno = 0
                for lineno, line in enumerate(stream, 1):
                    if not line.strip():
                        continue
                    where = f"{label}:{lineno}"
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield where, BadSample("bad_json", str(e))
                        continue
                    if not isinstance(obj, dict):
                        yield where, BadSample("bad_json", f"line is a JSON {type(obj).__name__}, not an object")
                        continue
                    yield where, obj
        except (OSError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as e:
            yield f"{label}:{lineno + 1}", BadSample("bad_file", f"{type(e).__name__}: {e}")
    elif fmt == "json":
        try:
            with open(path, "rb") as f:
                raw = f.read()
            if path.name.lower().endswith(".gz"):
                raw = gzip.decompress(raw)
            data = json.loads(raw.decode("utf-8-sig"))
        except (OSError, UnicodeDecodeError, EOFError, json.JSONDecodeError) as e:
            yield str(path), BadSample("bad_json", f"whole file unreadable: {type(e).__name__}: {e}")
            return
        rows = data if isinstance(data, list) else [data]
        for i, obj in enumerate(rows):
            where = f"{path}[{i}]"
            if isinstance(obj, dict):
                yield where, obj
            else:
                yield where, BadSample("bad_json", f"entry is a JSON {type(obj).__name__}, not an object")
    else:
        yield str(path), BadSample("bad_file", f"unsupported file type {path.name} (want .parquet, .jsonl, .json)")


def field_value(row: dict, field: str) -> Any:
    """``row[a][b]`` for ``field="a.b"`` (an exact key containing dots wins); None when absent."""
    if field in row:
        return row[field]
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def count_rows(path: str | Path) -> int | None:
    """Row count when it is cheap to know (parquet metadata), else None (for progress bars)."""
    path = Path(path)
    if _format_of(path) == "parquet":
        with contextlib.suppress(Exception):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    return None


def iter_shard_samples(urls: str | list[str], on_skip: Callable[[SkippedSample], Any],
                       source: str | None = None) -> Iterator[dict]:
    """Raw samples (``__key__``, ``__url__``, ``{ext: bytes}``) of webdataset tar shards, in order.

    Read with webdataset (``tarfile_to_samples``); an unreadable or truncated shard is reported through
    ``on_skip`` as a ``SkippedSample("bad_shard")`` and reading goes on with the next shard.
    """
    import webdataset as wds

    skips = _ShardSkips(source)
    pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=skips))
    for sample in pipeline:
        for s in skips.drain():
            on_skip(s)
        yield sample
    for s in skips.drain():
        on_skip(s)


def image_member(sample: dict) -> tuple[str, bytes] | None:
    """(extension, bytes) of the first image member of a webdataset sample, or None."""
    for ext in IMAGE_MEMBER_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "row",
             writer: RecordWriter | None = None) -> Iterator:
    """A progress bar over the input (off when stderr is not a terminal) showing `writer`'s written / skipped
    counts."""
    return _progress(iterable, desc, total, unit, counts=writer.counts if writer is not None else None)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_key(text: str, max_len: int = 80) -> str:
    """A file-name / shard-key safe version of ``text`` (no dots, slashes or spaces)."""
    return _UNSAFE.sub("_", str(text)).strip("_")[-max_len:] or "x"


# --------------------------------------------------------------------------------------------- writer
@dataclass
class RowContext:
    """What :meth:`RecordWriter.row` reports a skip under."""

    id: str | None
    where: str


class RecordWriter:
    """Writes validated records as ``<out>/<name>.jsonl`` + images, as webdataset shards, or (``stream``) as
    the MDS stream ``<out>/<name>/`` of ``src/data/stream.py`` (``shard_maxsize`` bytes a shard); counts skips.

    Use as a context manager; :meth:`close` prints the summary and returns :meth:`stats`. The jsonl is
    written to ``<name>.jsonl.tmp`` and renamed when the writer closes. In shard mode earlier shards of
    the same name in ``<out>/<name>/`` are removed first (they would mix with the new ones).
    """

    def __init__(self, out: str | Path, name: str, *, source: str | None = None, shards: bool = False,
                 shard_maxcount: int = 10_000, shard_maxsize: float = 1e9, quiet: bool = False,
                 stream: bool = False):
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"name {name!r} must be letters, digits, '_' or '-'")
        self.out = Path(out)
        self.name = name
        self.source = source or name
        self.shards = shards
        self.stream = stream  # MDS shards of src/data/stream.py in <out>/<name>/ (data.stream_dir)
        self.quiet = quiet
        self.out.mkdir(parents=True, exist_ok=True)
        self.skip_path = self.out / f"{name}.skipped.jsonl"
        self._skip_file = open(self.skip_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.skips = SkipCounter(log_first=0)
        self._first_skip: dict[str, SkippedSample] = {}
        self.notes: dict[str, Counter] = {}
        self.count = 0
        self.n_images = 0
        self._ids: set[str] = set()
        self._closed = False
        if stream:
            from streaming import MDSWriter

            from src.data.stream import COLUMNS

            self.shard_dir = self.out / name
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            for old in [self.shard_dir / "index.json", *self.shard_dir.glob("shard.*.mds")]:
                old.unlink(missing_ok=True)
            self._sink = MDSWriter(out=str(self.shard_dir), columns=COLUMNS, size_limit=int(shard_maxsize),
                                   progress_bar=False)
            self.output = self.shard_dir
        elif shards:
            import webdataset as wds

            self.shard_dir = self.out / name
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            for old in self.shard_dir.glob(f"{name}-*.tar"):
                if re.fullmatch(rf"{re.escape(name)}-\d{{6}}\.tar", old.name):
                    old.unlink()
            self._sink = wds.ShardWriter(str(self.shard_dir / f"{name}-%06d.tar"), maxcount=shard_maxcount,
                                         maxsize=shard_maxsize, verbose=0, encoder=False)
            self.output = self.shard_dir
        else:
            self.jsonl_path = self.out / f"{name}.jsonl"
            self._tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
            self._sink = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self.output = self.jsonl_path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(success=exc_type is None)

    # -- skips and notes
    def skip(self, reason: str, *, id: str | None = None, where: str = "?", detail: str = "",
             source: str | None = None) -> None:
        self.add_skipped(SkippedSample(reason=reason, source=source or self.source, id=id, where=where,
                                       detail=detail[:1000]))

    def add_skipped(self, skipped: SkippedSample) -> None:
        self.skips.add(skipped)
        self._first_skip.setdefault(skipped.reason, skipped)
        self._skip_file.write(json.dumps(skipped.to_dict(), ensure_ascii=False) + "\n")

    def note(self, group: str, reason: str, n: int = 1) -> None:
        """Count something that did not cost a whole row (e.g. ``note("dropped_images", "missing_file")``)."""
        self.notes.setdefault(group, Counter())[reason] += n

    @contextlib.contextmanager
    def row(self, *, id: str | None = None, where: str = "?"):
        """Guard one input row: a ``BadSample`` raised inside is counted as a skip with its reason, any
        other exception as ``unexpected_error`` (with the traceback's last lines); the conversion goes on.

        Yields a :class:`RowContext`; set its ``id`` once the row's real id is known (skips report it).
        """
        ctx = RowContext(id, where)
        try:
            yield ctx
        except BadSample as e:
            self.skip(e.reason, id=e.id or ctx.id, where=e.where or ctx.where, detail=e.detail, source=e.source)
        except Exception as e:  # noqa: BLE001 - never crash mid-file; the skip log keeps the details
            last = traceback.format_exc().strip().splitlines()[-3:]
            self.skip("unexpected_error", id=ctx.id, where=ctx.where,
                      detail=f"{type(e).__name__}: {e} | {' | '.join(last)}")

    # -- records
    def write(self, record: dict, *, where: str = "?") -> bool:
        """Store one record whose image items hold :class:`ImageBlob` s; False (and a skip) if invalid."""
        rid = record.get("id") if isinstance(record, dict) else None
        blobs: list[ImageBlob] = []
        index: dict[int, int] = {}
        turns = []
        for turn in record.get("turns") or []:
            content = []
            for item in turn.get("content") or []:
                if isinstance(item, dict) and isinstance(item.get("image"), ImageBlob):
                    blob = item["image"]
                    if id(blob) not in index:
                        index[id(blob)] = len(blobs)
                        blobs.append(blob)
                    item = {**item, "image": index[id(blob)]}
                content.append(item)
            turns.append({**turn, "content": content})
        refs = self._refs(blobs, rid)
        for turn in turns:
            for item in turn["content"]:
                if isinstance(item, dict) and isinstance(item.get("image"), int):
                    item["image"] = refs[item["image"]]
        final = {k: v for k, v in record.items() if not k.startswith("_")}
        final["turns"] = turns
        try:
            validate_record(final)
        except BadSample as e:
            self.skip(e.reason, id=rid if isinstance(rid, str) else None, where=where, detail=e.detail)
            return False
        if rid in self._ids:
            self.skip("duplicate_id", id=rid, where=where, detail=f"id {rid!r} was already written")
            return False
        self._ids.add(rid)
        line = json.dumps(final, ensure_ascii=False)
        if self.stream:
            from src.data.stream import encode_sample

            self._sink.write(encode_sample(final, {ref: blob.data for blob, ref in zip(blobs, refs)}))
        elif self.shards:
            sample: dict[str, Any] = {"__key__": f"{self.count:09d}", "json": line.encode("utf-8")}
            for blob, ref in zip(blobs, refs):
                sample[ref] = blob.data
            self._sink.write(sample)
        else:
            for blob, ref in zip(blobs, refs):
                path = self.out / ref
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(blob.data)
            self._sink.write(line + "\n")
        self.count += 1
        self.n_images += len(blobs)
        return True

    def _refs(self, blobs: list[ImageBlob], rid: Any) -> list[str]:
        if self.shards or self.stream:
            if len(blobs) == 1:
                return [blobs[0].ext]
            return [f"{i}.{b.ext}" for i, b in enumerate(blobs)]
        stem = f"{self.count:09d}_{safe_key(str(rid).split('/', 1)[-1], 60)}"
        folder = f"images/{self.name}/{self.count // BUCKET_SIZE:05d}"
        if len(blobs) == 1:
            return [f"{folder}/{stem}.{blobs[0].ext}"]
        return [f"{folder}/{stem}_{i}.{b.ext}" for i, b in enumerate(blobs)]

    # -- end
    def counts(self) -> dict[str, int]:
        """What the progress bar shows."""
        return {"written": self.count, "skipped": self.skips.total}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "source": self.source,
            "format": "stream" if self.stream else "shards" if self.shards else "jsonl",
            "output": str(self.output), "records": self.count, "images": self.n_images,
            "skipped": self.skips.counts_by_reason(), "skipped_total": self.skips.total,
            "skip_log": str(self.skip_path),
        }
        if self.shards:
            shards = sorted(str(p) for p in self.shard_dir.glob(f"{self.name}-*.tar"))
            out["shards"] = shards
        for group, counter in sorted(self.notes.items()):
            out[group] = dict(sorted(counter.items()))
        return out

    def close(self, success: bool = True) -> dict[str, Any]:
        if self._closed:
            return self.stats()
        self._closed = True
        if self.stream:
            self._sink.finish()  # writes index.json
        else:
            self._sink.close()
        self._skip_file.close()
        if not (self.shards or self.stream) and success:
            self._tmp.replace(self.jsonl_path)
        stats = self.stats()
        if not self.quiet:
            print(summary_text(stats, self._first_skip))
        return stats


def summary_text(stats: dict, examples: dict[str, SkippedSample] | None = None) -> str:
    lines = [f"[{stats['name']}] wrote {stats['records']} records, {stats['images']} images -> {stats['output']}"]
    if stats["skipped_total"]:
        lines.append(f"[{stats['name']}] skipped {stats['skipped_total']} rows (details: {stats['skip_log']}):")
        for reason, n in stats["skipped"].items():
            ex = (examples or {}).get(reason)
            eg = f"   e.g. {ex.where}: {ex.detail[:160]}" if ex else ""
            lines.append(f"    {reason:<18} {n}{eg}")
    else:
        lines.append(f"[{stats['name']}] skipped 0 rows")
    for key, value in stats.items():
        if isinstance(value, dict) and key != "skipped" and value:
            lines.append(f"[{stats['name']}] {key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI
def converter_parser(doc: str, default_name: str | None, input_help: str) -> argparse.ArgumentParser:
    """A converter's CLI with the shared options: --input, --out, --name, --source, --shards,
    --shard-maxcount (``default_name`` None: the converter picks the name). ``doc``: the module docstring."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=input_help)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default=default_name,
                        help="output name: <out>/<name>.jsonl or <out>/<name>/ shards "
                             f"(default {default_name or 'the dataset format'})")
    parser.add_argument("--source", default=None, help="record source (id prefix); default: --name")
    parser.add_argument("--shards", action="store_true",
                        help="write webdataset shards <out>/<name>/<name>-NNNNNN.tar instead of jsonl + images")
    parser.add_argument("--shard-maxcount", type=int, default=10_000, help="records per shard (default 10000)")
    return parser


def writer_from_args(args: argparse.Namespace) -> dict:
    """The writer options of :func:`converter_parser` as keyword arguments for a ``convert()``."""
    return {"name": args.name, "source": args.source, "shards": args.shards,
            "shard_maxcount": args.shard_maxcount}
