"""Streaming shards for every stage: our records in MosaicML Streaming's MDS format (``streaming-community``).

``python -m data_prep.write_stream --experiment E --out DIR`` writes E's training sources; ``data.stream_dir=DIR``
trains from them (any stage: the datamodules hand each streamed record to their usual sample builder).
Layout of a stream dir (local, or a remote URL such as ``s3://bucket/seedx`` cached under
``data.stream_cache_dir``)::

    DIR/stream.json              manifest (FORMAT, experiment, per source: records, images, skips)
    DIR/<source>/index.json      one MDS stream per training source, named by ``source_name``
    DIR/<source>/shard.*.mds
    DIR/<source>.skipped.jsonl   records skipped at write time (reason, source, id, where, detail)

A sample has the columns ``record`` (json: the record of our schema without private keys; its image items
name members as shard records do, ``"jpg"`` or ``"0.jpg"``, ``"1.jpg"``), ``members`` (json: ``[[name,
nbytes], ...]``) and ``blobs`` (bytes: the members' bytes, concatenated). So a stream dir needs nothing
else, and a streamed record reaches the builders with ``_blobs`` / ``_where`` exactly like a shard record.

What the library does for us: the sharded storage and local cache, the per-epoch global order (shuffled
from ``seed`` and the epoch over ``num_canonical_nodes`` canonical nodes; each rank takes a strided share of
its node's part, workers take whole batches in turn, so the order does not depend on the number of ranks,
workers or nodes as long as the node count divides ``num_canonical_nodes`` or is a multiple of it; the
default 1 works for any node count), mid-epoch resume (``sample_in_epoch``: the library drops that many
samples of the epoch's global order) and the weighted mixture (``Stream(proportion=weight / sum)``: every
source gets exactly its share of ``epoch_size`` samples an epoch, up to rounding). What stays ours: the
position, i.e. what the *model* consumed, counted by :class:`~src.data.position.ResumableDataModule`
(:class:`StreamOrder` is the sampler interface it counts with) and handed to the library when the loader
is built; the record schema; skip accounting (bad samples come out of the builders as ``{"skipped": ...}``).
A sample that cannot be read from its shard (a truncated or damaged file) comes out as a ``bad_shard`` skip
naming the shard; a shard that an ``index.json`` lists but that is missing is refused by name when the
stream dir is checked (before any model is built). At the end of an epoch the library pads each rank's share with up to ``world size - 1`` repeated samples
(equal shares on every rank); the in-memory path drops them instead.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "seedx-stream/1"
MANIFEST = "stream.json"
COLUMNS = {"record": "json", "members": "json", "blobs": "bytes"}
# What reading a sample of a truncated or damaged shard raises (offsets past the end of the file, a short
# or garbled column, a shard file gone): the sample is skipped as ``bad_shard``, named by its shard.
SHARD_ERRORS = (IndexError, ValueError, KeyError, TypeError, EOFError, OSError, struct.error)

__all__ = ["COLUMNS", "FORMAT", "MANIFEST", "StreamOrder", "StreamSettings", "decode_sample", "encode_sample", "is_remote",
           "open_stream", "stream_problem"]


def is_remote(path: str) -> bool:
    return "://" in str(path)


# ---------------------------------------------------------------------------------------------- samples
def encode_sample(record: dict, blobs: dict[str, bytes]) -> dict[str, Any]:
    """One record (public keys only) and its image members -> an MDS sample of :data:`COLUMNS`."""
    names = sorted(blobs)
    return {"record": {k: v for k, v in record.items() if not k.startswith("_")},
            "members": [[n, len(blobs[n])] for n in names], "blobs": b"".join(blobs[n] for n in names)}


def decode_sample(sample: dict[str, Any], where: str) -> dict:
    """An MDS sample -> the record as the shard reader gives it (``_blobs`` {member: bytes}, ``_where``)."""
    record = dict(sample["record"])
    data, at, blobs = sample["blobs"], 0, {}
    for name, n in sample["members"]:
        blobs[name] = data[at:at + n]
        at += n
    record["_blobs"] = blobs
    record["_where"] = f"{where}:{record.get('id')}"
    return record


# ---------------------------------------------------------------------------------------------- checks
def stream_problem(path: str | None, names: list[str] | None = None) -> str | None:
    """Why ``path`` is not a stream dir (with a stream for each of ``names``); None when it is, or when it
    is remote (checked when the library opens it)."""
    if path is None or is_remote(path):
        return None
    root = Path(str(path))
    hint = "write one with `python -m data_prep.write_stream --experiment <E> --out DIR`"
    if not root.is_dir():
        return f"stream dir {str(path)!r} does not exist ({hint})"
    manifest = root / MANIFEST
    if not manifest.is_file():
        return f"{str(path)!r} is not a stream dir: no {MANIFEST} ({hint})"
    try:
        fmt = json.loads(manifest.read_text()).get("format")
    except (OSError, ValueError, AttributeError) as e:
        return f"{manifest} is unreadable ({type(e).__name__}: {e})"
    if fmt != FORMAT:
        return f"{manifest} has format {fmt!r}, expected {FORMAT!r} ({hint})"
    missing = [n for n in names or () if not (root / n / "index.json").is_file()]
    if missing:
        have = sorted(p.parent.name for p in root.glob("*/index.json"))
        return (f"stream dir {str(path)!r} has no stream for training source(s) {missing} (it has {have}); "
                f"stream names are the sources' names ({hint})")
    for name in names or ():
        problem = _missing_shards(root / name)
        if problem:
            return problem
    return None


def _missing_shards(stream: Path) -> str | None:
    """A shard that the stream's index.json lists but that is not there (the library would ask for a remote
    to download it from), named; None when every shard is present."""
    index = stream / "index.json"
    try:
        shards = json.loads(index.read_text()).get("shards") or []
    except (OSError, ValueError, AttributeError) as e:
        return f"{index} is unreadable ({type(e).__name__}: {e})"
    for shard in shards:
        files = [(shard.get(k) or {}).get("basename") for k in ("raw_data", "zip_data")]
        files = [f for f in files if f]
        if files and not any((stream / f).is_file() for f in files):
            return f"shard {stream / files[0]} is listed in {index} but missing"
    return None


@dataclass(frozen=True)
class StreamSettings:
    """``data.stream_dir`` / ``stream_cache_dir`` / ``stream_canonical_nodes`` of a datamodule."""

    dir: str
    cache_dir: str | None = None
    num_canonical_nodes: int = 1

    @classmethod
    def of(cls, stream_dir: str | None, cache_dir: str | None, num_canonical_nodes: int,
           sources: list) -> StreamSettings | None:
        """None without a stream dir; raises ``ValueError`` naming ``data.stream_dir`` when it is not one
        with a stream for every training source (checked before any model is built)."""
        if not stream_dir:
            return None
        from src.data.sources import source_name

        problem = stream_problem(str(stream_dir), [source_name(s) for s in sources])
        if problem:
            raise ValueError(f"data.stream_dir: {problem}")
        return cls(str(stream_dir), cache_dir, int(num_canonical_nodes))


# ---------------------------------------------------------------------------------------------- position
class StreamOrder:
    """The sampler interface :class:`~src.data.position.ResumableDataModule` keeps its position with, for a
    streamed training set: the library owns the order; this keeps ``(epoch, global start)`` and hands it to
    the dataset (:meth:`apply`) when the training loader is built."""

    def __init__(self, dataset, seed: int, num_canonical_nodes: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.num_samples = int(dataset.epoch_size)
        self.num_canonical_nodes = int(num_canonical_nodes)
        self.epoch, self._start = 0, 0
        self.rank, self.world_size = 0, 1

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = int(rank), int(world_size)

    def local_length(self, start: int = 0) -> int:
        """Samples each rank draws from global position ``start`` on (the last share is padded)."""
        return -(-max(self.num_samples - int(start), 0) // self.world_size)

    def position(self, start: int, local_samples: int) -> int:
        return min(int(start) + self.world_size * int(local_samples), self.num_samples)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self._start = int(epoch), 0

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._start = min(max(int(state.get("consumed", 0)), 0), self.num_samples)

    def apply(self) -> None:
        """The next iteration of the dataset is epoch ``epoch`` from global sample ``_start``; later ones
        are the following epochs from their start (the library counts them)."""
        self.dataset.load_state_dict({"epoch": self.epoch, "sample_in_epoch": self._start,
                                      "num_canonical_nodes": self.num_canonical_nodes,
                                      "shuffle_seed": self.dataset.shuffle_seed})


# ---------------------------------------------------------------------------------------------- dataset
def _record_stream_class():
    from streaming import StreamingDataset

    class RecordStream(StreamingDataset):
        """A StreamingDataset whose items are samples of ``build`` (a record -> sample builder)."""

        def __init__(self, *, build: Callable[[dict], dict], names: list[str], wheres: list[str],
                     draws: bool = False, **kwargs) -> None:
            super().__init__(**kwargs)
            self.build, self.names, self.wheres, self.draws = build, names, wheres, draws

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            shard_id = self.spanner[sample_id][0]
            stream = int(self.stream_per_shard[shard_id])
            try:
                raw = super().get_item(sample_id, retry)
                record = decode_sample(raw, self.wheres[stream])
            except SHARD_ERRORS as e:  # a truncated or damaged shard: this sample is skipped, the run goes on
                from src.data.records import SkippedSample

                shard = f"{self.wheres[stream]}/{self.shards[shard_id].raw_data.basename}"
                return {"skipped": SkippedSample("bad_shard", self.names[stream], None, f"{shard}:{sample_id}",
                                                 f"{type(e).__name__}: {e}"[:500])}
            if not self.draws:
                return self.build(record)
            # which use of the record: (epoch, sample id); the library pre-increments next_epoch while an epoch
            # runs. A sample repeated within one epoch (a source up-weighted past its size) draws alike.
            return self.build(record, draw=(int(self.next_epoch) - 1, int(sample_id)))

    return RecordStream


def _set_world_env(rank: int, world_size: int, local_rank: int, local_world_size: int) -> None:
    """The library reads the world from these variables (Lightning's launchers do not set all of them).
    Only those that differ from what the library assumes when unset: a single-process run in a live
    process (a test, a notebook) must not leave ``LOCAL_RANK`` behind, or Lightning later takes every run
    of that process and its children for one launched from outside and never spawns its ranks."""
    for key, value, unset in (("RANK", rank, 0), ("WORLD_SIZE", world_size, 1), ("LOCAL_RANK", local_rank, 0),
                              ("LOCAL_WORLD_SIZE", local_world_size, 1)):
        if int(os.environ.get(key, unset)) != int(value):
            os.environ[key] = str(value)


def open_stream(stream_dir: str, names: list[str], build: Callable[[dict], dict], *, seed: int,
                batch_size: int, weights: list[float] | None = None, epoch_size: int | None = None,
                shuffle: bool = True, cache_dir: str | None = None, num_canonical_nodes: int = 1,
                world: tuple[int, int, int, int] | None = None, draws: bool = False):
    """The training set of ``names`` (one stream each) under ``stream_dir`` and its :class:`StreamOrder`.

    ``weights``: relative source weights (proportions of ``epoch_size``, default the total); None takes
    every stream once an epoch. ``world``: (rank, world size, local rank, local world size), default the
    environment's. Remote ``stream_dir``: shards are downloaded into ``cache_dir`` (default a temp dir).
    ``draws``: ``build`` also takes ``draw=(epoch, sample id)`` (see ``src/data/sources.py`` DrawnRecords).
    """
    from streaming import Stream

    problem = stream_problem(stream_dir, names)
    if problem:
        raise FileNotFoundError(f"data.stream_dir: {problem}")
    if world is not None:
        _set_world_env(*world)
    streams = []
    for k, name in enumerate(names):
        if is_remote(stream_dir):
            local = str(Path(cache_dir) / name) if cache_dir else None
            kw: dict[str, Any] = {"remote": f"{str(stream_dir).rstrip('/')}/{name}", "local": local}
        else:
            kw = {"local": str(Path(stream_dir) / name)}
        if weights is not None:
            kw["proportion"] = float(weights[k]) / float(sum(weights))
        streams.append(Stream(**kw))
    dataset = _record_stream_class()(
        build=build, names=list(names), wheres=[f"{str(stream_dir).rstrip('/')}/{n}" for n in names], streams=streams,
        draws=draws,
        epoch_size=epoch_size, shuffle=shuffle, shuffle_seed=int(seed) % 2**31, batch_size=batch_size,
        num_canonical_nodes=num_canonical_nodes, partition_algo="orig")
    return dataset, StreamOrder(dataset, seed, num_canonical_nodes)
