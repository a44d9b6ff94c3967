"""Precomputed frozen-encoder features (written by ``data_prep/precompute_features.py``, read by datamodules).

A training run with ``data.features_dir=DIR`` reads these instead of running the frozen ViT (and, for
the de-tokenizer, the VAE encoder) on every step. The store is keyed by record, so the map-style MLLM
datamodule (random access through its mixture sampler) and the de-tokenizer datamodule (jsonl, folders
or shards) look a record up by its ``(source, id)`` without scanning anything.

Two layouts, named by the manifest's ``layout`` (``precompute_features --layout``); the reader is the same:

* ``mds`` (the default): entries packed into MDS shards, read by id (``src/data/feature_shards.py``).
* ``files``: one safetensors file per record (random access, atomic writes, mmap reads; a store written
  before layouts existed is this one)::

    DIR/manifest.json                       what wrote the store; checked against the run at setup
    DIR/records/<h[:2]>/<h>.safetensors     h = sha1("<source>\\0<id>") hex, one file per record

An entry holds, for its ``k``-th image item (``record_images`` order, 0-based):

* ``cmp.<k>``  (n_views, T, D)  ViT output of the item's comprehension views, in the MLLM builder's view
  order (dynamic-resolution tiles row-major, then the global view): for items that are not ``generate``.
* ``gen.<k>``  (T, D)           ViT output of the item's generation view (the whole image resized, the
  MLLM regression target and the de-tokenizer's condition features): for ``generate`` items and for the
  first image of a record without a generated one (caption->image flips, de-tokenizer targets).
* ``vae.<k>``  (2C, h, w)       VAE posterior parameters (mean and logvar, as diffusers'
  ``latent_dist.parameters``) of the item's de-tokenizer VAE view (de-tokenizer stores only: target and
  condition image). The stage samples ``mean + std * eps`` from them exactly as it does after encoding,
  so training with or without the store sees the same latents for the same RNG state.

and safetensors metadata ``{"record": json}`` with ``id``, ``source`` and ``images``: one entry per image
item, ``{"size": [w, h], "orientation": o}`` (pixels of the image as decoded, i.e. upright, and the EXIF
orientation 1-8 undone to get there; the builder picks the tile grid and turns and quantises boxes from
them, so no image is decoded at train time; a missing ``orientation`` reads as 1) plus, for VAE views,
``"original_size": [h, w]`` and
``"crop_top_left": [top, left]`` (SDXL micro-conditioning). A record whose image could not be used when
the store was written is stored as a marker with ``"skipped": {"reason", "detail"}`` and no tensors, so the
run skips it with the same reason it would have had with pixels (``corrupt_image``, ``missing_file``, ...).

T = ``model.vit.n_queries`` (256), D = ``model.vit.output_dim``; dtypes as written (``--dtype`` for the ViT
features, ``--vae-dtype`` for the VAE posteriors; the stages compute in their own dtype whatever is stored).

Skip reasons added here: ``missing_features`` (no file for the record) and ``bad_features`` (unreadable
file, missing key, wrong shape or view count).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from src.data.records import BadSample

# /2: images are stored upright (EXIF orientation applied) with that orientation kept per image; /1 stores
# held unrotated pixels for EXIF-rotated photos, so they must be recomputed.
FORMAT = "seedx-features/2"
MANIFEST = "manifest.json"

__all__ = ["FORMAT", "LAYOUTS", "FeatureStore", "RecordFeatures", "RecordFileWriter", "open_writer", "record_key",
           "record_path", "write_record"]
LAYOUTS = ("mds", "files")


def record_key(source: str, rid: str) -> str:
    return hashlib.sha1(f"{source}\x00{rid}".encode()).hexdigest()


def record_path(root: str | Path, source: str, rid: str) -> Path:
    h = record_key(source, rid)
    return Path(root) / "records" / h[:2] / f"{h}.safetensors"


def write_record(root: str | Path, source: str, rid: str, tensors: dict[str, torch.Tensor],
                 images: list[dict | None], skipped: dict | None = None) -> Path:
    """Write one record's file atomically (tmp + rename): a crash never leaves a half-written entry."""
    from safetensors.torch import save_file

    path = record_path(root, source, rid)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"id": rid, "source": source, "images": images}
    if skipped is not None:
        meta["skipped"] = skipped
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"record": json.dumps(meta)})
    os.replace(tmp, path)
    return path


class RecordFileWriter:
    """The ``files`` layout's writer, with the interface of ``feature_shards.ShardWriter``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def write(self, source: str, rid: str, tensors: dict[str, torch.Tensor], images: list[dict | None],
              skipped: dict | None = None) -> None:
        write_record(self.root, source, rid, tensors, images, skipped=skipped)

    def close(self) -> Path:
        return self.root


def open_writer(root: str | Path, layout: str, shard_i: int = 0, shard_n: int = 1, adding: bool = False,
                shard_bytes: int = 1 << 27):
    """A writer of ``layout`` for the process handling records ``hash % shard_n == shard_i``; ``adding``:
    keep what the store already holds (``--skip-existing``)."""
    if layout == "files":
        return RecordFileWriter(root)
    if layout == "mds":
        from src.data.feature_shards import ShardWriter, part_name

        return ShardWriter(root, part_name(root, shard_i, shard_n, fresh=adding), size_limit=shard_bytes)
    raise ValueError(f"feature store layout must be one of {LAYOUTS}, got {layout!r}")


class _FileEntries:
    """The ``files`` layout's read side (same ``read`` as ``feature_shards.ShardEntries``)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []

    def read(self, source: str, rid: str) -> tuple[dict[str, torch.Tensor], dict, str]:
        from safetensors import safe_open

        path = record_path(self.root, source, rid)
        if not path.is_file():
            raise BadSample("missing_features", f"no entry {path} for {source}/{rid}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["record"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as e:  # noqa: BLE001 - truncated / corrupt file, bad json: one bad entry, not a crash
            raise BadSample("bad_features", f"{path}: {type(e).__name__}: {e}") from None
        return tensors, meta, str(path)

    def size(self) -> tuple[int, int]:
        files = list((self.root / "records").glob("*/*.safetensors"))
        return len(files), sum(f.stat().st_size for f in files)


class RecordFeatures:
    """One record's entry; every accessor raises ``BadSample("bad_features")`` when the entry lacks it."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict, where: str, tokens: int, dim: int):
        self.tensors, self.meta, self.where = tensors, meta, where
        self.tokens, self.dim = tokens, dim

    def _bad(self, detail: str) -> BadSample:
        return BadSample("bad_features", f"{self.where}: {detail}")

    def image(self, k: int) -> dict:
        images = self.meta.get("images") or []
        if k >= len(images) or not isinstance(images[k], dict):
            raise self._bad(f"no entry for image item {k}")
        return images[k]

    def size(self, k: int) -> tuple[int, int]:
        size = self.image(k).get("size")
        if not (isinstance(size, list) and len(size) == 2):
            raise self._bad(f"image item {k} has no size")
        return int(size[0]), int(size[1])

    def orientation(self, k: int) -> int:
        """EXIF orientation (1-8) undone when image item k was encoded; 1 for stores written without it."""
        o = self.image(k).get("orientation", 1)
        if not (isinstance(o, int) and 1 <= o <= 8):
            raise self._bad(f"image item {k} has orientation {o!r}, expected 1-8")
        return o

    def _get(self, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            raise self._bad(f"no tensor {key!r} (has {sorted(self.tensors)}); was the store written for this "
                            f"stage and data config?")
        if shape is not None and tuple(t.shape) != shape:
            raise self._bad(f"{key} has shape {tuple(t.shape)}, expected {shape}")
        return t

    def cmp(self, k: int, n_views: int) -> torch.Tensor:
        """(n_views, T, D) comprehension views of image item k."""
        return self._get(f"cmp.{k}", (n_views, self.tokens, self.dim))

    def gen(self, k: int) -> torch.Tensor:
        """(T, D) generation view of image item k."""
        return self._get(f"gen.{k}", (self.tokens, self.dim))

    def vae(self, k: int) -> torch.Tensor:
        """(2C, h, w) VAE posterior parameters of image item k."""
        t = self._get(f"vae.{k}")
        if t.dim() != 3:
            raise self._bad(f"vae.{k} has shape {tuple(t.shape)}, expected (2C, h, w)")
        return t


class FeatureStore:
    """Read side of the store. ``expect``: manifest values this run needs (a mismatch fails at setup)."""

    def __init__(self, root: str | Path, expect: dict[str, Any] | None = None, key: str = "data.features_dir"):
        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"{key}={root}: no {MANIFEST} there; write the store with "
                                    f"`python -m data_prep.precompute_features --experiment <E> --out {root}`")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{key}={root}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        problems = [f"{k}: store has {self.manifest.get(k)!r}, this run needs {v!r}"
                    for k, v in (expect or {}).items() if _norm(self.manifest.get(k)) != _norm(v)]
        if problems:
            raise ValueError(f"{key}={root} was written for another config ({'; '.join(problems)}); re-run "
                             f"data_prep/precompute_features.py for this experiment")
        self.tokens = int(self.manifest["tokens"])
        self.dim = int(self.manifest["dim"])
        self.layout = self.manifest.get("layout", "files")  # stores written before layouts are per-record files
        if self.layout == "mds":
            from src.data.feature_shards import ShardEntries

            self.entries = ShardEntries(self.root)
        elif self.layout == "files":
            self.entries = _FileEntries(self.root)
        else:
            raise ValueError(f"{key}={root}: manifest layout {self.layout!r}, expected one of {LAYOUTS}")

    def empty_views(self) -> torch.Tensor:
        return torch.zeros(0, self.tokens, self.dim, dtype=getattr(torch, self.manifest.get("dtype", "float32")))

    def load(self, record: dict) -> RecordFeatures:
        """The record's entry, by its ``(source, id)``, or ``BadSample`` (``missing_features``,
        ``bad_features`` or the reason the record was skipped with when the store was written)."""
        tensors, meta, where = self.entries.read(record["source"], record["id"])
        if not isinstance(meta, dict) or meta.get("id") != record["id"] or meta.get("source") != record["source"]:
            got = f"{meta.get('source')}/{meta.get('id')}" if isinstance(meta, dict) else repr(meta)[:80]
            raise BadSample("bad_features", f"{where} holds {got}")
        skipped = meta.get("skipped")
        if skipped:
            raise BadSample(str(skipped.get("reason", "bad_features")), str(skipped.get("detail", "")))
        return RecordFeatures(tensors, meta, where, self.tokens, self.dim)

    def stats(self) -> dict[str, Any]:
        """What the store holds and costs: entries (skip markers included), bytes on disk (data files), bytes
        per entry, dtypes, and parts that could not be read."""
        if self.layout == "mds":
            n, size = self.entries.samples, self.entries.bytes
        else:
            n, size = self.entries.size()
        return {"layout": self.layout, "entries": n, "bytes": size,
                "bytes_per_sample": (size / n) if n else None, "dtype": self.manifest.get("dtype"),
                "vae_dtype": self.manifest.get("vae_dtype", "float32"), "problems": list(self.entries.problems)}


def _norm(value: Any) -> Any:
    """JSON-normalised (tuples -> lists) for manifest comparisons."""
    return json.loads(json.dumps(value))
