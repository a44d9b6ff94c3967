"""Write an experiment's training sources as streaming shards: ``data.stream_dir`` for ``python -m src.train``.

    python -m data_prep.write_stream --experiment seedx_pretrain_tiny --out D
    python -m src.train experiment=seedx_pretrain_tiny data.stream_dir=D

Every source of the experiment's ``data.train_sources`` (jsonl records with images beside them, image
folders, webdataset shards in our layout or as img2dataset writes them: ``<key>.jpg`` + ``<key>.txt`` /
``<key>.json`` captions, ``--caption-field``) becomes one MDS stream ``D/<source name>/`` holding the
records with their images' bytes embedded (layout in ``src/data/stream.py``); its ``weight`` becomes the
stream's proportion at train time. Hydra overrides after the options change the sources
(``data.train_sources=[...]``) as they would for training.

Bad records are skipped and counted as the loaders do (read-time skips of the readers; ``missing_file``,
``path_outside_root`` and ``corrupt_image`` for images that cannot be stored; ``duplicate_id``): a summary
per source is printed and every skip lands in ``D/<source>.skipped.jsonl``. Checks that depend on the
stage's settings (``min_image_size``, aspect ratio, sequence length) stay at train time, where the builders
skip and count them (``batch["skipped"]``, ``bad_samples.jsonl``). ``D/stream.json`` is written last, so an
interrupted write leaves no usable stream dir.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

from data_prep.common import RecordWriter, image_from_bytes, iter_shard_samples, progress
from src.data.records import SkippedSample, image_bytes
from src.data.sources import SourceConfig, read_source, require_exists, source_name
from src.data.stream import FORMAT, MANIFEST

__all__ = ["main", "write_stream"]


def _img2dataset(sample: dict) -> bool:
    """A shard sample as img2dataset writes it (its json is download metadata, not one of our records)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return False  # our reader reports it as bad_json
    return not (isinstance(meta, dict) and "turns" in meta)


def iter_source(src: SourceConfig, writer: RecordWriter, caption_field: str) -> Iterator[dict]:
    """Records of one source, read-time skips reported to ``writer``. Shard samples in our layout come as
    shard records (``_blobs``); img2dataset samples as records whose image items hold ``ImageBlob`` s."""
    if src.kind != "shards":
        for r in read_source(src):
            if isinstance(r, SkippedSample):
                writer.add_skipped(r)
            else:
                yield r
        return
    from data_prep.convert_img2dataset import sample_to_record
    from src.data.records import _shard_sample_to_record  # the shard reader's own sample -> record step

    for sample in iter_shard_samples(src.path, writer.add_skipped, writer.source):
        where = f"{sample.get('__url__')}:{sample.get('__key__')}"
        record = None
        with writer.row(id=f"{writer.source}/{sample.get('__key__')}", where=where):
            if _img2dataset(sample):
                record = {**sample_to_record(sample, writer.source, caption_field), "_where": where}
            else:
                record = _shard_sample_to_record(sample, src.name, False, 1, None)
        if record is not None:
            yield record


def with_image_blobs(record: dict) -> dict:
    """The record with every image item's reference replaced by its checked bytes (an ``ImageBlob``);
    ``BadSample`` (missing_file, path_outside_root, corrupt_image) for an image that cannot be stored."""
    blobs: dict[str, object] = {}
    turns = []
    for turn in record["turns"]:
        content = []
        for item in turn["content"]:
            if "image" in item and isinstance(item["image"], str):
                ref = item["image"]
                if ref not in blobs:
                    data, ext = image_bytes(record, item)
                    blobs[ref] = image_from_bytes(data, ext)
                item = {**item, "image": blobs[ref]}
            content.append(item)
        turns.append({**turn, "content": content})
    return {**record, "turns": turns}


def write_stream(sources: list[SourceConfig], out: str | Path, *, caption_field: str = "txt",
                 shard_size: int = 1 << 26, manifest_extra: dict | None = None, quiet: bool = False) -> dict:
    """Write ``sources`` as one stream each under ``out``; returns the manifest (also ``out/stream.json``)."""
    names = [source_name(s) for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data.train_sources: source names must be unique to name their streams, got {names} "
                         f"(give sources a `name`)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # not a stream dir until every stream is complete
    entries = {}
    for src, name in zip(sources, names):
        require_exists(src)
        with RecordWriter(out, name, stream=True, shard_maxsize=shard_size, quiet=quiet) as writer:
            for record in progress(iter_source(src, writer, caption_field), desc=f"write_stream {name}",
                                   unit="rec", writer=writer):
                where = record.get("_where", "?")
                with writer.row(id=record.get("id"), where=where):
                    writer.write(with_image_blobs(record), where=where)
        stats = writer.stats()
        entries[name] = {"path": src.path, "kind": src.kind, "weight": src.weight, "records": stats["records"],
                         "images": stats["images"], "skipped": stats["skipped"],
                         "skipped_total": stats["skipped_total"], "skip_log": stats["skip_log"]}
    manifest = {"format": FORMAT, **(manifest_extra or {}), "sources": entries}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", required=True, help="experiment whose data.train_sources to write")
    ap.add_argument("--out", required=True, help="stream dir (data.stream_dir)")
    ap.add_argument("--caption-field", default="txt",
                    help="img2dataset shards: 'txt' (the <key>.txt member) or a <key>.json key")
    ap.add_argument("--shard-size", type=int, default=1 << 26, help="bytes per MDS shard (default 64 MiB)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m src.train")
    args = ap.parse_args(argv)

    from omegaconf import OmegaConf

    from data_prep.precompute_features import compose

    cfg = compose(args.experiment, args.overrides)
    sources = [SourceConfig(**OmegaConf.to_container(s, resolve=True)) for s in cfg.data.train_sources]
    manifest = write_stream(sources, args.out, caption_field=args.caption_field, shard_size=args.shard_size,
                            manifest_extra={"experiment": args.experiment, "overrides": args.overrides})
    print(json.dumps({"out": str(args.out), **{n: {"records": e["records"], "skipped": e["skipped_total"]}
                                               for n, e in manifest["sources"].items()}}))
    return manifest


if __name__ == "__main__":
    main()
