"""Precompute the frozen encoders' outputs of an experiment's data, so training runs no frozen encoder.

    python -m data_prep.precompute_features --experiment seedx_pretrain_tiny --out /data/feats/pretrain
    python -m src.train experiment=seedx_pretrain_tiny data.features_dir=/data/feats/pretrain

    python -m data_prep.precompute_features --experiment seedx_detok_pretrain --out /data/feats/detok \\
        model.vit.weights=/ckpt/qwen_vit_G.pt model.detokenizer.pretrained_dir=/ckpt/sdxl-base-1.0

The experiment is composed with Hydra exactly as ``python -m src.train`` composes it (trailing arguments are
overrides), and its model spec (src/specs) builds the frozen towers (``build_frozen_encoders``): the ViT from
``model.vit.weights`` or, for tiny twins, the random init of ``stage.init_seed``, so the features are what
training would compute. Records come from the experiment's ``data.train_sources`` + ``data.val_sources``
or from ``--source PATH`` (jsonl, image folder or webdataset shards; ``--source-name`` names it).

What is stored, per record (layout: ``src/data/features.py``):

* MLLM stages (``SeedXSequenceBuilder``): ``cmp.<k>``, the ViT output of every view the builder makes of
  a comprehension image (``SeedXSequenceBuilder.image_views``: dynamic-resolution tiles, then the global
  view), and ``gen.<k>``, of the generation view of generated images and of the first image of records
  without one (so ``data.t2i_ratio`` / ``seed`` can change without recomputing).
* De-tokenizer stages (``DetokSampleBuilder.image_views``): ``gen.<k>`` of the target image, and
  ``vae.<k>``: the VAE posterior parameters (mean ‖ logvar, diffusers' ``latent_dist.parameters``) of the
  target and of the condition image (stage 2). Posterior, not a sample: the stage draws
  ``mean + std * eps`` every step exactly as it does after encoding (a fresh latent sample per step, as
  without the store), and stage 2 takes the mean (= mode) for the condition.

Records whose image cannot be used are stored as a marker with the reason (the run skips them with the
same reason it would give with pixels); read-time skips (bad json lines) have no id and are only counted.
``--layout mds`` (default) packs the entries into MDS shards, one part per process, published when the
process finishes; ``--layout files`` writes one file per record, atomically. ``--skip-existing`` resumes
(adds a part / files holding only the records the store lacks), ``--shard i/n`` splits the records across
n processes (by record-key hash); ``--dtype bfloat16`` (or ``float16``) halves the ViT features and
``--vae-dtype`` the VAE posteriors (the default float32 keeps training bit-comparable with the encoders run
inline on CPU); ``python -m src.inspect experiment=E data.features_dir=DIR`` prints the bytes per sample. Under ``trainer.precision=bf16-mixed`` the
ViT runs under bf16 autocast as it does in training; the VAE encodes in fp32 always, as in training.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from src.data.features import FORMAT, LAYOUTS, MANIFEST, FeatureStore, open_writer, record_key, record_path
from src.data.records import (
    ORIENTATION_KEY,
    BadSample,
    SkippedSample,
    load_image,
    read_shards,
    record_images,
)
from src.data.sources import SourceConfig, read_source
from src.utils.progress import progress

CONF = Path(__file__).resolve().parents[1] / "conf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- config
def compose(experiment: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    os.environ.setdefault("PROJECT_ROOT", str(CONF.parent))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=[f"experiment={experiment}", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(os.environ.get("TMPDIR", "/tmp")) / "precompute_features")
    return cfg


def parse_source(path: str, name: str | None) -> SourceConfig:
    p = Path(path)
    if p.is_dir():
        kind = "folder"
    elif p.suffix == ".jsonl":
        kind = "jsonl"
    else:
        kind = "shards"  # a .tar or a brace pattern
    return SourceConfig(path=path, kind=kind, name=name)


def iter_records(src: SourceConfig) -> Iterator[dict | SkippedSample]:
    if src.kind == "shards":
        yield from read_shards(src.path, source=src.name, check_images=False, split_by_node=False)
    else:
        yield from read_source(src)


# ---------------------------------------------------------------------------------------------- jobs
class Job:
    """What one kind of stage needs encoded. ``prepare`` (CPU, DataLoader workers) decodes a record's
    images into views; the main process encodes and writes."""

    kind: str

    def prepare(self, record: dict) -> dict:
        raise NotImplementedError

    def expect(self) -> dict[str, Any]:
        raise NotImplementedError

    def _skip(self, record: dict, e: BadSample) -> dict:
        return {"record": record, "skipped": {"reason": e.reason, "detail": e.detail}}


class MLLMJob(Job):
    kind = "mllm"

    def __init__(self, cfg, dm) -> None:
        from src.data.mllm import load_tokenizer
        from src.data.mllm_sequence import SeedXSequenceBuilder

        self.builder = SeedXSequenceBuilder(load_tokenizer(dm.tokenizer_path), **dm.builder_kwargs)

    def expect(self) -> dict[str, Any]:
        return {"vit_image_size": self.builder.vit_image_size, "grids": list(self.builder.grids)}

    def prepare(self, record: dict) -> dict:
        b = self.builder
        images = record_images(record)
        gen = {k for k, it in enumerate(images) if it.get("generate", False)} or ({0} if images else set())
        views: dict[str, torch.Tensor] = {}
        meta: list[dict | None] = []
        for k, item in enumerate(images):
            try:
                img = load_image(record, item, min_size=b.min_image_size, max_aspect_ratio=b.max_aspect_ratio)
            except BadSample as e:  # the builder skips the whole record at its first bad image
                return self._skip(record, e)
            meta.append({"size": list(img.size), "orientation": img.info[ORIENTATION_KEY]})
            if not item.get("generate", False):
                views[f"cmp.{k}"] = b.image_views(img, item)
            if k in gen:
                views[f"gen.{k}"] = b.image_views(img, {**item, "generate": True})[0]
        return {"record": record, "vit": views, "vae": {}, "images": meta}


class DetokJob(Job):
    kind = "detok"

    def __init__(self, cfg, dm) -> None:
        self.build = dm.build

    def expect(self) -> dict[str, Any]:
        return {"vit_image_size": self.build.vit_size, "resolution": self.build.vae_size, "image_fit": self.build.fit}

    def prepare(self, record: dict) -> dict:
        from src.data.detok import split_target_condition

        images = record_images(record)
        try:
            target, cond = split_target_condition(record)
            loaded = [(target, self.build._load(record, target))]
            if cond is not None:
                loaded.append((cond, self.build._load(record, cond)))
        except BadSample as e:
            return self._skip(record, e)
        index = {id(it): k for k, it in enumerate(images)}
        meta: list[dict | None] = [None] * len(images)
        vit, vae = {}, {}
        for n, (item, img) in enumerate(loaded):
            k = index[id(item)]
            v = self.build.image_views(img)
            meta[k] = {"size": list(img.size), "orientation": img.info[ORIENTATION_KEY],
                       "original_size": list(v["original_size"]),
                       "crop_top_left": list(v["crop_top_left"])}
            if n == 0:
                vit[f"gen.{k}"] = v["vit_pixels"]
            vae[f"vae.{k}"] = v["vae_pixels"]
        return {"record": record, "vit": vit, "vae": vae, "images": meta}


# ---------------------------------------------------------------------------------------------- encode
class Encoder:
    def __init__(self, towers: dict, device: torch.device, precision: str, dtype: torch.dtype,
                 vit_chunk: int, vae_chunk: int, vae_dtype: torch.dtype = torch.float32):
        self.vit = towers["vit"].to(device)
        self.vae = towers["vae"].to(device) if "vae" in towers else None
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.vit_chunk, self.vae_chunk = vit_chunk, vae_chunk
        self.autocast = precision.startswith("bf16")

    def _ctx(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    @torch.no_grad()
    def encode(self, items: list[dict]) -> None:
        """Fills item["tensors"] for every prepared item (ViT views batched across records)."""
        vit_in = [(it, key, t) for it in items for key, t in it["vit"].items()]
        vae_in = [(it, key, t) for it in items for key, t in it["vae"].items()]
        for it in items:
            it["tensors"] = {}
        if vit_in:
            flat = torch.cat([t if t.dim() == 4 else t.unsqueeze(0) for _, _, t in vit_in])
            dtype = next(self.vit.parameters()).dtype
            with self._ctx():
                out = torch.cat([self.vit(c.to(self.device, dtype)) for c in flat.split(self.vit_chunk)])
            at = 0
            for it, key, t in vit_in:
                n = t.shape[0] if t.dim() == 4 else 1
                feats = out[at:at + n] if t.dim() == 4 else out[at]
                it["tensors"][key] = feats.to("cpu", self.dtype).clone()
                at += n
        if vae_in:
            flat = torch.stack([t for _, _, t in vae_in])
            from src.models.detokenizer import encode_posterior  # fp32, outside autocast: as training

            moments = torch.cat([encode_posterior(self.vae, c.to(self.device)).parameters
                                 for c in flat.split(self.vae_chunk)])
            for (it, key, _), m in zip(vae_in, moments):
                # the VAE runs in fp32 (SDXL overflows in half); its posterior is stored in --vae-dtype
                it["tensors"][key] = m.float().to("cpu", self.vae_dtype).clone()


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", required=True, help="experiment whose stage and data config to use")
    ap.add_argument("--out", required=True, help="feature store directory (data.features_dir)")
    ap.add_argument("--source", action="append", default=[], help="record source (default: the data config's)")
    ap.add_argument("--source-name", default=None, help="source name for --source (default: file stem)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="stored ViT feature dtype")
    ap.add_argument("--vae-dtype", default="float32", choices=sorted(DTYPES), help="stored VAE posterior dtype")
    ap.add_argument("--layout", default="mds", choices=LAYOUTS, help="MDS shards, or one file per record")
    ap.add_argument("--shard-bytes", type=int, default=1 << 27, help="MDS shard size limit (--layout mds)")
    ap.add_argument("--precision", default=None, help="default: the experiment's trainer.precision")
    ap.add_argument("--batch-views", type=int, default=64, help="ViT views per forward")
    ap.add_argument("--records-per-step", type=int, default=16)
    ap.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    ap.add_argument("--shard", default="0/1", help="i/n: this process handles records with hash %% n == i")
    ap.add_argument("--skip-existing", action="store_true", help="keep records already in the store")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m src.train")
    args = ap.parse_args(argv)

    import hydra
    from omegaconf import OmegaConf

    from src.specs.base import model_args
    from src.specs.registry import spec_of
    from src.utils.checkpoint_kind import model_family

    cfg = compose(args.experiment, args.overrides)
    family = model_family(cfg.model)
    if family not in ("seedx_mllm", "detokenizer"):
        raise ValueError(f"--experiment {args.experiment}: its model ({family}) has no ViT features to precompute; "
                         "pick a SEED-X MLLM or de-tokenizer experiment")
    spec = spec_of(family)
    stage_args = OmegaConf.to_container(cfg.stage, resolve=True)
    cls = spec.stages[spec.stage_of_args(stage_args)]
    module = cls(**model_args(cls, stage_args))  # parses the model config; builds only what is asked below
    dm = hydra.utils.instantiate(cfg.data, features_dir=None)
    job: Job = DetokJob(cfg, dm) if family == "detokenizer" else MLLMJob(cfg, dm)
    towers = module.build_frozen_encoders()
    precision = str(args.precision or cfg.trainer.precision)
    encoder = Encoder(towers, torch.device(args.device), precision, DTYPES[args.dtype], args.batch_views,
                      max(1, args.batch_views // 4), DTYPES[args.vae_dtype])
    shard_i, shard_n = (int(x) for x in args.shard.split("/"))

    if args.source:
        sources = [parse_source(p, args.source_name) for p in args.source]
    else:
        seen, sources = set(), []
        for s in list(cfg.data.train_sources) + list(cfg.data.get("val_sources") or []):
            s = SourceConfig(**OmegaConf.to_container(s, resolve=True))
            if s.path not in seen:
                seen.add(s.path)
                sources.append(s)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vit_cfg = OmegaConf.to_container(cfg.model.vit, resolve=True)
    manifest = {
        "format": FORMAT, "kind": job.kind, "experiment": args.experiment, "overrides": args.overrides,
        **job.expect(), "tokens": int(vit_cfg["n_queries"]), "dim": int(vit_cfg["output_dim"]),
        "dtype": args.dtype, "vae_dtype": args.vae_dtype, "layout": args.layout, "precision": precision, "vit": vit_cfg, "init_seed": getattr(module, "init_seed", None),
        "vae_scaling_factor": (float(towers["vae"].config.scaling_factor) if "vae" in towers else None),
        "sources": [s.path for s in sources],
    }
    if shard_i == 0:
        tmp = out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / MANIFEST)

    counts: Counter[str] = Counter()
    t0 = time.time()
    # --skip-existing in the shard layout: the ids already stored (any part) are skipped
    existing = (FeatureStore(out).entries.index if args.skip_existing and args.layout == "mds" else None)
    writer = open_writer(out, args.layout, shard_i, shard_n, adding=args.skip_existing, shard_bytes=args.shard_bytes)

    def stored(r: dict) -> bool:
        if existing is not None:
            return record_key(r["source"], r["id"]) in existing
        return record_path(out, r["source"], r["id"]).is_file()

    def todo(src: SourceConfig) -> Iterator[dict]:
        """Prepared records of `src` for this worker; counts travel as {"count": key} items (workers
        cannot update the main process's counter)."""
        info = torch.utils.data.get_worker_info()
        for n, r in enumerate(iter_records(src)):
            # webdataset splits shards across workers itself; split the other sources here.
            if info is not None and src.kind != "shards" and n % info.num_workers != info.id:
                continue
            if isinstance(r, SkippedSample):
                yield {"count": f"skipped/{r.reason}"}
            elif int(record_key(r["source"], r["id"]), 16) % shard_n != shard_i:
                continue
            elif not record_images(r):
                yield {"count": "no_image"}  # text-only: nothing to encode, the datamodule needs no entry
            elif args.skip_existing and stored(r):
                yield {"count": "existing"}
            else:
                yield job.prepare(r)

    class Prepared(torch.utils.data.IterableDataset):
        def __iter__(self):
            for src in sources:
                yield from todo(src)

    loader = torch.utils.data.DataLoader(Prepared(), batch_size=None, num_workers=args.num_workers,
                                         collate_fn=lambda x: x)
    pending: list[dict] = []

    def flush() -> None:
        good = [it for it in pending if "skipped" not in it]
        encoder.encode(good)
        for it in pending:
            r = it["record"]
            if "skipped" in it:
                writer.write(r["source"], r["id"], {}, [], skipped=it["skipped"])
                counts[f"skipped/{it['skipped']['reason']}"] += 1
            else:
                writer.write(r["source"], r["id"], it["tensors"], it["images"])
                counts["written"] += 1
        pending.clear()

    def shown() -> dict[str, int]:
        return {"written": counts["written"], "skipped": sum(n for k, n in counts.items() if k.startswith("skipped/")),
                "existing": counts["existing"]}

    for item in progress(loader, desc=f"precompute {job.kind} features", unit="rec", counts=shown):
        if "count" in item:
            counts[item["count"]] += 1
            continue
        pending.append(item)
        if len(pending) >= args.records_per_step:
            flush()
    flush()
    writer.close()
    stats = {"counts": dict(sorted(counts.items())), "seconds": round(time.time() - t0, 2), "shard": args.shard}
    (out / f"stats-{shard_i}-of-{shard_n}.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps({"out": str(out), **stats}))
    return stats


if __name__ == "__main__":
    main()
