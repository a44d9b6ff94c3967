"""Where records come from: one ``SourceConfig`` per dataset, shared by every datamodule.

A source is a jsonl file of records or a folder of images (read eagerly into a list: map-style), or
webdataset shards (streamed by the datamodule that supports them; :func:`read_source` refuses them).
``weight`` is the relative sampling weight of the source in a training mixture (see ``mixture.py``).
``allowed_roots``: folders besides the source's root (the jsonl's folder, the image folder) that its
records' image paths may resolve into; anything else is skipped as ``path_outside_root`` (see
``records.py``). ``name`` defaults to :func:`source_name`, for skip reports too.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset

from src.data.records import SkippedSample, read_image_folder, read_jsonl, shard_source_name

SOURCE_KINDS = ("jsonl", "folder", "shards")

__all__ = ["SOURCE_KINDS", "RecordDataset", "SourceConfig", "parse_sources", "read_source", "require_exists",
           "source_name"]


@dataclass
class SourceConfig:
    path: str
    kind: str = "jsonl"
    name: str | None = None
    weight: float = 1.0
    allowed_roots: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"data source kind must be one of {SOURCE_KINDS}, got {self.kind!r} ({self.path})")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) \
                or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"data source weight must be a finite number >= 0, got {self.weight!r} "
                             f"({self.name or self.path})")
        self.weight = float(self.weight)
        roots = self.allowed_roots
        if isinstance(roots, (str, bytes)) or not all(isinstance(r, str) and r for r in roots or ()):
            raise ValueError(f"data source allowed_roots must be a list of folder paths, got {roots!r} "
                             f"({self.name or self.path})")
        self.allowed_roots = list(roots or ())


def parse_sources(train: list[dict], val: list[dict] | None) -> tuple[list[SourceConfig], list[SourceConfig]]:
    """`data.train_sources` / `data.val_sources` entries -> SourceConfig; at least one training source."""
    train_sources = [SourceConfig(**s) for s in train]
    if not train_sources:
        raise ValueError("data.train_sources is empty: give at least one {path, kind, weight} source")
    return train_sources, [SourceConfig(**s) for s in (val or [])]


def require_exists(src: SourceConfig) -> None:
    if not Path(src.path).exists():
        raise FileNotFoundError(f"data source path does not exist: {src.path} (kind={src.kind})")


def source_name(src: SourceConfig) -> str:
    """The name a source's records and skip reports carry: ``name``, else the jsonl's stem, the folder's
    name, or the shards' name without shard number / brace range (:func:`shard_source_name`)."""
    if src.name:
        return src.name
    if src.kind == "shards":
        return shard_source_name(src.path)
    return Path(src.path).name if src.kind == "folder" else Path(src.path).stem


def read_source(src: SourceConfig) -> list[dict | SkippedSample]:
    """All records of a jsonl or folder source, with read-time :class:`SkippedSample` s left in place
    (so they are counted when a loader reaches them)."""
    if src.kind == "jsonl":  # read_jsonl falls back to the same stem for lines without a source
        return list(read_jsonl(src.path, source=src.name, allowed_roots=src.allowed_roots))
    if src.kind == "folder":
        return list(read_image_folder(src.path, source=source_name(src), allowed_roots=src.allowed_roots))
    raise ValueError(f"source kind {src.kind!r} is not map-style (shards are streamed): {src.path}")


class RecordDataset(Dataset):
    """Records of a map-style source (read-time skips included), turned into samples on access by `build`."""

    def __init__(self, records: list, build: Callable[[Any], dict[str, Any]]) -> None:
        self.records = records
        self.build = build

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.build(self.records[i])


class DrawnRecords(ConcatDataset):
    """Several :class:`RecordDataset` parts indexed by a :class:`~src.data.mixture.MixtureSampler` with
    ``with_draws``: the key ``(index, epoch, position)`` reaches the builder as ``draw=(epoch, position)``,
    so what a builder draws per use of a record (the caption-pair direction, official prompt picks) differs
    between repeats and epochs yet is the same on a resume. A plain int index builds with ``draw=None``."""

    def __getitem__(self, key) -> dict[str, Any]:
        index, draw = (key[0], tuple(key[1:])) if isinstance(key, tuple) else (key, None)
        part = bisect.bisect_right(self.cumulative_sizes, index)
        offset = self.cumulative_sizes[part - 1] if part else 0
        dataset = self.datasets[part]
        return dataset.build(dataset.records[index - offset], draw=draw)
