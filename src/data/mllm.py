"""Datamodule for SEED-X MLLM pre-training / SFT: weighted mixture of record sources -> MLLM batches.

Sources are map-style (jsonl files, image folders), read eagerly in ``setup``; read-time
``SkippedSample`` entries stay in the lists so they are counted (``batch["skipped"]``) when reached.
Training draws from a :class:`MixtureSampler` (weights per source, ``samples_per_epoch`` per epoch,
deterministic from ``seed`` and the epoch), each rank its strided share, resumable at the exact global
position (see ``src/data/position.py``); validation walks the val sources in order.
``batch_size`` counts samples; with ``packing`` the collator packs them into rows of ``max_length``.
``features_dir`` (a store of ``data_prep/precompute_features.py``, layout in ``src/data/features.py``): the
datasets build samples from stored ViT features (batches carry ``vit_features``, no image is decoded and
the stage runs no ViT); ``builder`` stays the pixel builder for probes of images outside the store.
``stream_dir`` (``data_prep/write_stream.py``; any source kind, shards too): training streams the sources
from there instead (``src/data/stream.py``: the library's weighted order, our position and builders).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from torch.utils.data import ConcatDataset, DataLoader

from src.data.any_res import DEFAULT_GRIDS
from src.data.mixture import MixtureSampler
from src.data.mllm_collate import MLLMCollator
from src.data.mllm_sequence import SeedXSequenceBuilder
from src.data.position import ResumableDataModule
from src.data.sources import (
    DrawnRecords,
    RecordDataset,
    SourceConfig,
    parse_sources,
    read_source,
    require_exists,
    source_name,
)
from src.data.stream import StreamSettings
from src.models.vocab import add_seedx_tokens
from src.utils.constraints import (
    ConfigModel,
    Fraction,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    StreamDir,
    TokenizerDir,
)

__all__ = ["MLLMDataConfig", "MLLMDataModule", "load_tokenizer"]


class MLLMDataConfig(ConfigModel):
    """The `data` node of the SEED-X MLLM stages (validated before a run by src/utils/config.py)."""

    tokenizer_path: TokenizerDir
    train_sources: list[dict]
    val_sources: list[dict] | None = None
    vit_image_size: PositiveInt = 448
    max_length: PositiveInt = 2048
    packing: bool = False
    batch_size: PositiveInt = 4
    val_batch_size: PositiveInt | None = None
    num_workers: NonNegativeInt = 0
    t2i_ratio: Fraction = 0.0
    samples_per_epoch: PositiveInt | None = None
    seed: int = 0
    truncation: Literal["cut", "skip"] = "cut"
    grids: tuple[str, ...] = DEFAULT_GRIDS
    num_image_tokens: PositiveInt = 64
    min_image_size: PositiveInt = 8
    max_aspect_ratio: PositiveFloat = 8.0
    chat_format: str = "qa"
    features_dir: str | None = None
    t2i_chat_format: str = "plain"
    gen_prompts: bool = False
    edit_responses: bool = False
    stream_dir: StreamDir = None
    stream_cache_dir: str | None = None
    stream_canonical_nodes: PositiveInt = 1


def load_tokenizer(path: str | None, key: str = "data.tokenizer_path", extend=add_seedx_tokens):
    """A local tokenizer directory, extended by ``extend`` (the SEED-X tokens by default; SEED-LLaMA and the
    SEED tokenizer's Q-Former pass their own); pad = unk (else eos) when it has none."""
    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"{key}: tokenizer directory {path!r} does not exist; set {key}=<local dir "
                                f"with tokenizer files> (no downloads at run time)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    extend(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
    return tokenizer


class MLLMDataModule(ResumableDataModule):
    # What turns records into samples, and how the tokenizer is extended (SEED-LLaMA's datamodule swaps both).
    builder_class = SeedXSequenceBuilder
    extend_tokenizer = staticmethod(add_seedx_tokens)
    config_model: ClassVar[type[MLLMDataConfig]] = MLLMDataConfig  # the `data` node it takes

    def __init__(
        self,
        tokenizer_path: str | None,
        train_sources: list[dict],
        val_sources: list[dict] | None = None,
        vit_image_size: int = 448,
        max_length: int = 2048,
        packing: bool = False,
        batch_size: int = 4,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        t2i_ratio: float = 0.0,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        truncation: str = "cut",
        grids: Sequence[str] = DEFAULT_GRIDS,
        num_image_tokens: int = 64,
        min_image_size: int = 8,
        max_aspect_ratio: float = 8.0,
        chat_format: str = "qa",
        features_dir: str | None = None,
        t2i_chat_format: str = "plain",
        gen_prompts: bool = False,
        edit_responses: bool = False,
        stream_dir: str | None = None,
        stream_cache_dir: str | None = None,
        stream_canonical_nodes: int = 1,
    ) -> None:
        super().__init__()
        self.train_sources, self.val_sources = parse_sources(train_sources, val_sources)
        self.stream = StreamSettings.of(stream_dir, stream_cache_dir, stream_canonical_nodes, self.train_sources)
        for s in (self.val_sources if self.stream else self.train_sources + self.val_sources):
            if s.kind == "shards":
                raise ValueError(f"data sources: the MLLM datamodule reads jsonl/folder sources in memory; for "
                                 f"shards write a stream dir (python -m data_prep.write_stream) and set "
                                 f"data.stream_dir ({s.path})")
        self.tokenizer_path = tokenizer_path
        self.vit_image_size = vit_image_size
        self.max_length = max_length
        self.packing = packing
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.builder_kwargs = {
            "vit_image_size": vit_image_size, "grids": tuple(grids), "num_image_tokens": num_image_tokens,
            "max_length": max_length, "truncation": truncation, "t2i_ratio": t2i_ratio, "seed": seed,
            "min_image_size": min_image_size, "max_aspect_ratio": max_aspect_ratio, "chat_format": chat_format,
            "t2i_chat_format": t2i_chat_format, "gen_prompts": gen_prompts, "edit_responses": edit_responses,
        }
        self.features_dir = features_dir
        self.tokenizer = None
        self.builder: SeedXSequenceBuilder | None = None
        self.dataset_builder: SeedXSequenceBuilder | None = None  # = builder, or the feature-store one
        self.collator: MLLMCollator | None = None
        self.train_set: ConcatDataset | None = None
        self.val_set: ConcatDataset | None = None

    def _datasets(self, sources: list[SourceConfig]) -> list[RecordDataset]:
        out = []
        for s in sources:
            require_exists(s)
            out.append(RecordDataset(read_source(s), self.dataset_builder))
        return out

    def _feature_store(self):
        if not self.features_dir:
            return None
        from src.data.features import FeatureStore

        kw = self.builder_kwargs
        return FeatureStore(self.features_dir, expect={
            "kind": "mllm", "vit_image_size": kw["vit_image_size"], "grids": list(kw["grids"])})

    def setup(self, stage: str | None = None) -> None:
        if self.builder is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path, extend=self.extend_tokenizer)
            self.builder = self.builder_class(self.tokenizer, **self.builder_kwargs)
            store = self._feature_store()
            self.dataset_builder = (self.builder_class(self.tokenizer, **self.builder_kwargs, features=store)
                                    if store is not None else self.builder)
            self.collator = MLLMCollator(self.tokenizer.pad_token_id, self.max_length, packing=self.packing,
                                         vit_image_size=self.vit_image_size,
                                         feature_shape=(store.tokens, store.dim) if store is not None else None)
        if self.train_set is None and self.stream:
            self.train_set = self.open_train_stream(self.stream, self.train_sources, self.dataset_builder,
                                                    weighted=True, epoch_size=self.samples_per_epoch, draws=True)
        if self.train_set is None:
            parts = self._datasets(self.train_sources)
            sizes = [len(p) for p in parts]
            self.train_set = DrawnRecords(parts)
            self.train_sampler = MixtureSampler(
                sizes, [s.weight for s in self.train_sources],
                num_samples=self.samples_per_epoch or sum(sizes), seed=self.seed,
                names=[source_name(s) for s in self.train_sources], with_draws=True,
            )
        if self.val_set is None and self.val_sources:
            self.val_set = ConcatDataset(self._datasets(self.val_sources))

    def collate_fn(self):
        return self.collator

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        return self.train_loader(self.train_set, self.batch_size)

    def val_dataloader(self):
        if self.builder is None:
            self.setup("validate")
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.val_batch_size, generator=self.fixed_generator())
