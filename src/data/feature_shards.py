"""The feature store in MDS shards (``precompute_features --layout mds``, the default): few large files.

One entry per record, as in the per-record layout (``src/data/features.py`` says what an entry holds), but
packed into MosaicML Streaming's MDS shards (the library ``src/data/stream.py`` streams records with), so a
store of millions of records is a few hundred files instead of millions (object stores and parallel file
systems handle the former well), and its bytes per sample can be read off the index::

    DIR/manifest.json                    as for the per-record layout, plus "layout": "mds"
    DIR/shards/<part>/index.json         one MDS dataset per writing process (part-<i>-of-<n>[-<k>])
    DIR/shards/<part>/shard.<n>.mds
    DIR/shards/<part>/keys.json          record keys (sha1 of "<source>\\0<id>") in sample order

Columns: ``key`` (str), ``record`` (json: ``id``, ``source``, ``images``, ``skipped``) and ``tensors``
(bytes: the entry's tensors serialised by safetensors, which keeps bf16/fp16 exactly as written).

Reading is by id: the keys files are loaded once (a dict key -> (shard, sample)), and an entry is read with
the library's shard reader (``reader_from_json(...).get_item``: one seek and one read in a plain file, no
shared memory or cache, so it works the same in DataLoader workers and in the main process). A part whose
index or keys cannot be read is named in ``problems`` (its records then read as ``missing_features``); a
missing or damaged shard file is a ``bad_features`` skip naming the shard; neither stops a run.
Parts are written to a hidden temp dir and renamed when finished, so a crashed writer leaves no part.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from src.data.records import BadSample

LAYOUT = "mds"
SHARDS = "shards"
KEYS = "keys.json"
COLUMNS = {"key": "str", "record": "json", "tensors": "bytes"}

log = logging.getLogger(__name__)

__all__ = ["COLUMNS", "KEYS", "LAYOUT", "SHARDS", "ShardEntries", "ShardWriter", "part_name"]


def part_name(root: str | Path, shard_i: int, shard_n: int, fresh: bool) -> str:
    """``part-<i>-of-<n>``; ``fresh`` (adding to a store, ``--skip-existing``): the first unused
    ``part-<i>-of-<n>-<k>`` so the parts already there are kept."""
    base = f"part-{shard_i}-of-{shard_n}"
    if not fresh:
        return base
    k = 1
    while (Path(root) / SHARDS / f"{base}-{k}").exists():
        k += 1
    return f"{base}-{k}"


class ShardWriter:
    """Writes one part: ``write`` per record, ``close`` to publish it (atomic rename)."""

    def __init__(self, root: str | Path, part: str, size_limit: int = 1 << 27) -> None:
        from streaming import MDSWriter

        self.final = Path(root) / SHARDS / part
        self.tmp = self.final.with_name(f".{part}.tmp{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.writer = MDSWriter(out=str(self.tmp), columns=COLUMNS, size_limit=size_limit, progress_bar=False)
        self.keys: list[str] = []

    def write(self, source: str, rid: str, tensors: dict[str, torch.Tensor], images: list[dict | None],
              skipped: dict | None = None) -> None:
        from safetensors.torch import save

        from src.data.features import record_key

        key = record_key(source, rid)
        meta: dict[str, Any] = {"id": rid, "source": source, "images": images}
        if skipped is not None:
            meta["skipped"] = skipped
        blob = save({k: v.contiguous() for k, v in tensors.items()})
        self.writer.write({"key": key, "record": meta, "tensors": blob})
        self.keys.append(key)

    def close(self) -> Path:
        self.writer.finish()
        (self.tmp / KEYS).write_text(json.dumps(self.keys))
        if self.final.exists():  # a re-run of the same part replaces it
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final


class ShardEntries:
    """Read side: every finished part under ``root/shards``, indexed by record key."""

    def __init__(self, root: str | Path) -> None:
        from streaming.base.format import reader_from_json

        self.root = Path(root)
        self.index: dict[str, tuple[Any, int]] = {}
        self.problems: list[str] = []
        self.samples, self.bytes = 0, 0
        parts = sorted(p for p in (self.root / SHARDS).glob("*") if p.is_dir() and not p.name.startswith("."))
        for part in parts:  # later parts win for a key written twice (a re-run with another --shard n)
            try:
                shards = json.loads((part / "index.json").read_text())["shards"]
                keys = json.loads((part / KEYS).read_text())
                readers = [reader_from_json(str(part), None, s) for s in shards]
                if sum(r.samples for r in readers) != len(keys):
                    raise ValueError(f"{len(keys)} keys for {sum(r.samples for r in readers)} samples")
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.problems.append(f"{part}: {type(e).__name__}: {e}")
                log.warning("feature store part %s is unreadable, its records will be missing: %s", part, e)
                continue
            at = 0
            for reader in readers:
                for j in range(reader.samples):
                    self.index[keys[at]] = (reader, j)
                    at += 1
                self.samples += reader.samples
                self.bytes += int(reader.raw_data.bytes)

    def __len__(self) -> int:
        return len(self.index)

    def read(self, source: str, rid: str) -> tuple[dict[str, torch.Tensor], dict, str]:
        """(tensors, record metadata, where) of the entry, or ``BadSample`` naming the id or the shard."""
        from safetensors.torch import load

        from src.data.features import record_key

        hit = self.index.get(record_key(source, rid))
        if hit is None:
            note = f" ({len(self.problems)} unreadable part(s): {self.problems[0]})" if self.problems else ""
            raise BadSample("missing_features", f"no entry for {source}/{rid} in {self.root / SHARDS}{note}")
        reader, j = hit
        where = f"{Path(reader.dirname) / reader.raw_data.basename}:{j}"
        try:
            sample = reader.get_item(j)
            meta = sample["record"]
            tensors = load(sample["tensors"])
        except Exception as e:  # noqa: BLE001 - a missing, truncated or garbled shard: one bad entry, not a crash
            raise BadSample("bad_features", f"{where}: {type(e).__name__}: {e}"[:500]) from None
        if not isinstance(meta, dict):
            raise BadSample("bad_features", f"{where}: record column is {type(meta).__name__}, not an object")
        return tensors, meta, where
