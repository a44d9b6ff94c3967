"""Fill a model built on the meta device, sharded or not, from weight sources, one local shard at a time.

torchtitan's order: build empty (parameters on meta, buffers real), apply the strategy (AC, compile,
FSDP2 `fully_shard`), then `to_empty` on the target device and fill each parameter's *local* shard. A
source is anything that can hand out rows ``[start, stop)`` of one full tensor without producing the rest:
a safetensors slice (HF folders, diffusers folders), a ``torch.load`` tensor memory-mapped while it is read (the
ViT ``.pt``, agent ``.bin``), or a tensor of a small random-init tower built on the CPU under its own seed.
So a rank never holds more of a loaded model than its shard plus one tensor in flight.

Single-process runs call the same `materialize` on an unsharded model (every "shard" is the whole
tensor), so both paths give the same numbers by construction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from src.utils.weights import MissingWeightsError, check_keys_and_shapes

# Wrappers that prefix parameter names (activation checkpointing, per-block compile); state_dict() already
# strips them, named_parameters() does not.
WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


# ---- sources ------------------------------------------------------------------------------------------
class TensorSource:
    """One full tensor, read by rows (dim 0: the dimension FSDP2 shards)."""

    shape: tuple[int, ...]

    def rows(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


class HeldTensor(TensorSource):
    """A tensor already in memory or memory-mapped (slicing an mmap'd tensor reads only those pages)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop] if self.tensor.ndim else self.tensor


class SafetensorsTensor(TensorSource):
    """One tensor of a .safetensors file, sliced on disk (`safe_open(...).get_slice`)."""

    def __init__(self, path: Path, key: str) -> None:
        from safetensors import safe_open

        self.path, self.key = path, key
        with safe_open(str(path), framework="pt") as f:
            self.shape = tuple(f.get_slice(key).get_shape())

    def rows(self, start: int, stop: int) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            s = f.get_slice(self.key)
            return s[start:stop] if self.shape else s[:]


class ExtendedRows(TensorSource):
    """`base` with rows appended up to `num_rows`, each `scale` x the fp32 mean of the base rows (the SEED-X
    init of new vocabulary rows, `src.models.vocab.init_new_embeddings`, computed from the file)."""

    def __init__(self, base: TensorSource, num_rows: int, scale: float, dtype: torch.dtype) -> None:
        self.base, self.scale, self.dtype = base, scale, dtype
        self.old = base.shape[0]
        self.shape = (num_rows, *base.shape[1:])
        self._fill: torch.Tensor | None = None

    def fill(self) -> torch.Tensor:
        if self._fill is None:  # the whole base once (one tensor), cast first as a plain load would
            full = self.base.rows(0, self.old).to(self.dtype)
            self._fill = (self.scale * full.float().mean(dim=0, keepdim=True)).to(self.dtype)
        return self._fill

    def rows(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        if start < self.old:
            parts.append(self.base.rows(start, min(stop, self.old)).to(self.dtype))
        if stop > self.old:
            parts.append(self.fill().expand(stop - max(start, self.old), *self.shape[1:]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class NormalRows(TensorSource):
    """`base` with rows appended up to `num_rows`, drawn from normal(0, `std`) under their own seed: a plain
    `resize_token_embeddings` (transformers `_init_weights`), the init SEED-LLaMA's new vocabulary rows had as
    released. Drawn once, whole, so any slicing of the rows gives the same values."""

    def __init__(self, base: TensorSource, num_rows: int, std: float, dtype: torch.dtype, seed: int) -> None:
        self.base, self.std, self.dtype, self.seed = base, float(std), dtype, int(seed)
        self.old = base.shape[0]
        self.shape = (num_rows, *base.shape[1:])
        self._new: torch.Tensor | None = None

    def new_rows(self) -> torch.Tensor:
        if self._new is None:
            g = torch.Generator().manual_seed(self.seed)
            self._new = (torch.randn(self.shape[0] - self.old, *self.shape[1:], generator=g) * self.std).to(self.dtype)
        return self._new

    def rows(self, start: int, stop: int) -> torch.Tensor:
        parts = []
        if start < self.old:
            parts.append(self.base.rows(start, min(stop, self.old)).to(self.dtype))
        if stop > self.old:
            parts.append(self.new_rows()[max(start, self.old) - self.old: stop - self.old])
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class ZeroPaddedColumns(TensorSource):
    """`base` widened along dim 1 to `shape` with zeros: InstructPix2Pix's conv_in widening
    (`src.models.detokenizer.widen_conv_in`) of a weight read from a file, rows (output channels) at a time."""

    def __init__(self, base: TensorSource, shape: tuple[int, ...]) -> None:
        if len(shape) < 2 or shape[0] != base.shape[0] or shape[2:] != base.shape[2:] or shape[1] < base.shape[1]:
            raise ValueError(f"cannot widen {base.shape} to {shape} along dim 1")
        self.base, self.shape = base, tuple(shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        part = self.base.rows(start, stop)
        pad = part.new_zeros(part.shape[0], self.shape[1] - part.shape[1], *part.shape[2:])
        return torch.cat([part, pad], dim=1)


class TorchFileTensor(TensorSource):
    """One tensor of a zip-format torch checkpoint, memory-mapped only while its rows are read: pages a rank
    touched leave its RSS when the rows are copied, instead of staying mapped until every tensor is filled."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...]) -> None:
        self.path, self.key, self.shape = path, key, shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        tensor = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)[self.key]
        return (tensor[start:stop] if tensor.ndim else tensor).clone()


def prefixed(sources: Mapping[str, TensorSource], prefix: str) -> dict[str, TensorSource]:
    return {prefix + k: v for k, v in sources.items()}


def held(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, TensorSource]:
    return {prefix + k: HeldTensor(v) for k, v in state.items()}


def safetensors_folder(path: str | Path) -> dict[str, TensorSource]:
    """Every tensor of an HF / diffusers folder's safetensors files, by key (nothing is read yet)."""
    path = Path(path)
    index = next(iter(sorted(path.glob("*.safetensors.index.json"))), None)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: SafetensorsTensor(path / f, k) for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingWeightsError(f"{path}: no *.safetensors files (only safetensors folders are loaded shard "
                                  f"by shard; convert .bin folders with transformers' save_pretrained)")
    from safetensors import safe_open

    out: dict[str, TensorSource] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
        out.update({k: SafetensorsTensor(f, k) for k in keys})
    return out


def state_dict_file(path: str | Path) -> dict[str, TensorSource]:
    """A .safetensors file sliced on disk, or a torch checkpoint memory-mapped (`weights_only`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return {k: SafetensorsTensor(path, k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not iterable
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) format cannot be mapped: held in full
        return held(torch.load(path, map_location="cpu", weights_only=True))
    return {k: TorchFileTensor(path, k, tuple(v.shape)) for k, v in state.items()}


# ---- seeds ----------------------------------------------------------------------------------------------
def tower_seed(seed: int, tower: str) -> int:
    """Each random-init tower draws from its own seed, derived from (stage.init_seed, tower name): its values
    do not depend on which other towers exist, in what order they are built, or how many ranks build them."""
    digest = hashlib.sha256(f"{int(seed)}:{tower}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


@contextlib.contextmanager
def seeded(seed: int, tower: str) -> Iterator[None]:
    """Run a tower's own constructor/init under `tower_seed(seed, tower)`; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tower_seed(seed, tower))
        yield


def random_tower(build: Callable[[], nn.Module], seed: int, tower: str, prefix: str) -> dict[str, TensorSource]:
    """A small (or test-size) tower built in full on the CPU under its own seed, as sources under `prefix`."""
    with seeded(seed, tower), torch.device("cpu"):
        module = build()
    return held(module.state_dict(), prefix)


def empty_init():
    """Build parameters on meta and buffers for real (rotary tables etc. are computed, not loaded)."""
    from accelerate import init_empty_weights

    return init_empty_weights(include_buffers=False)


# ---- filling --------------------------------------------------------------------------------------------
def _local_part(param: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(local tensor, first row, end row) of a parameter: a DTensor's shard on dim 0, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param.data, 0, (param.shape[0] if param.ndim else 0)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(param.shape[1:]):
        raise NotImplementedError("only dim-0 sharding (FSDP2) is filled shard by shard")
    local = param.to_local()
    return local, (offset[0] if shape else 0), (offset[0] + shape[0] if shape else 0)


def check_sources(module: nn.Module, sources: Mapping[str, TensorSource], what: str) -> None:
    """Every parameter has a source of its full shape, and every source is used: one error naming them all."""
    own = {clean_name(n): tuple(p.shape) for n, p in module.named_parameters()}
    check_keys_and_shapes(own, {k: tuple(v.shape) for k, v in sources.items()}, f"weights do not match {what}:",
                          "source")


@torch.no_grad()
def materialize(module: nn.Module, sources: Mapping[str, TensorSource], device: torch.device | str,
                what: str = "") -> nn.Module:
    """Allocate `module`'s parameters (only the local shards of FSDP2-sharded ones) on `device` and fill them
    from `sources` (keys: parameter names without wrapper prefixes). Buffers keep their built values."""
    check_sources(module, sources, what or type(module).__name__)
    buffers = {n: b.detach().clone() for n, b in module.named_buffers() if not b.is_meta}
    module.to_empty(device=device)
    for name, b in module.named_buffers():
        if name in buffers:
            b.copy_(buffers[name])
    for name, p in module.named_parameters():
        local, start, stop = _local_part(p)
        if local.numel():
            local.copy_(sources[clean_name(name)].rows(start, stop).reshape(local.shape))
    return module
