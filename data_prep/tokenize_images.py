"""Tokenise the images of record sources into SEED codes, for SEED-LLaMA (which trains on codes, not pixels).

    python -m data_prep.tokenize_images --ckpt runs/seed_tokenizer_v2/checkpoints/last.ckpt \\
        --source /data/cc3m.jsonl --out /data/seed_codes [--shards] [--batch-size 256] [--device cuda]
    python -m src.train experiment=seed_llama_pretrain data.train_sources='[{path: /data/seed_codes/cc3m.jsonl}]'

Every image item of every record gains ``"codes"``: the 32 code ids (0..8191) the SEED tokenizer gives the
image (``SeedTokenizerModule.codes_of``: EVA ViT -> causal Q-Former -> task layer -> nearest code). The
record is written again, images included (``RecordWriter``: ``<out>/<name>.jsonl`` + images, or webdataset
shards with ``--shards``, or an MDS stream with ``--stream``), so the output is a record source like any other.
A record with an unusable image is skipped and logged with its reason (``<out>/<name>.skipped.jsonl``);
text-only records pass through as they are.

``--ckpt``: a ``seed_tokenizer_v2`` (or ``_v1``) checkpoint; the stage is rebuilt from its own
hyper-parameters (its frozen Q-Former from their ``init_from``). Without ``--ckpt`` the experiment's config is
built as it is (only random-init tiny twins allow that: the bundled sample codes come from
``--experiment seed_tokenizer_v2_tiny``). Trailing arguments are Hydra overrides of the experiment.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from data_prep.common import RecordWriter, image_from_bytes, progress
from data_prep.precompute_features import iter_records, parse_source
from src.data.images import vit_view
from src.data.records import SkippedSample, image_bytes, load_image, record_images
from src.specs.inference import build_image_tokenizer


def tokenize_source(stage, source, writer: RecordWriter, batch_size: int, device: str) -> None:
    size = stage.vit_cfg.image_size
    pending: list[tuple[dict, list[torch.Tensor]]] = []

    def flush() -> None:
        views = [v for _, vs in pending for v in vs]
        codes = stage.codes_of(torch.stack(views).to(device)).cpu().tolist() if views else []
        at = 0
        for record, vs in pending:
            for item in record_images(record):
                item["codes"] = codes[at]
                at += 1
            writer.write(record, where=record.get("_where", "?"))
        pending.clear()

    for record in progress(iter_records(source), f"tokenise {source.path}", unit="record", writer=writer):
        if isinstance(record, SkippedSample):
            writer.add_skipped(record)
            continue
        with writer.row(id=record.get("id"), where=record.get("_where", "?")):
            items = record_images(record)
            views = []
            for item in items:
                views.append(vit_view(load_image(record, item), size))
                data, ext = image_bytes(record, item)
                item["image"] = image_from_bytes(data, ext)  # the writer stores it beside the new record
            pending.append((record, views))  # text-only records pass through unchanged
        if sum(len(vs) for _, vs in pending) >= batch_size:
            flush()
    flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="seed_tokenizer_v2")
    parser.add_argument("--ckpt", default=None, help="a seed_tokenizer_v1/v2 checkpoint")
    parser.add_argument("--source", action="append", required=True, help="jsonl, image folder or shards (repeat)")
    parser.add_argument("--source-name", action="append", default=None)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--shards", action="store_true", help="webdataset shards instead of jsonl + images")
    parser.add_argument("--stream", action="store_true", help="an MDS stream dir (data.stream_dir)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args, overrides = parser.parse_known_args(argv)
    names = args.source_name or [None] * len(args.source)
    if len(names) != len(args.source):
        parser.error("give --source-name once per --source, or never")
    stage = build_image_tokenizer(args.ckpt, args.experiment, overrides, keys=("--ckpt", "--experiment")).to(args.device)
    summary = []
    with torch.no_grad():
        for path, name in zip(args.source, names):
            source = parse_source(path, name)
            out_name = name or Path(path.rstrip("/")).stem.split(".")[0]
            with RecordWriter(args.out, out_name, shards=args.shards, stream=args.stream) as writer:
                tokenize_source(stage, source, writer, args.batch_size, args.device)
            summary.append(writer.stats())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
