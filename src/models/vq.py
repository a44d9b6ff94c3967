"""Vector quantiser of the SEED tokenizer (v2: 8192 codes x 32 dims): nearest code, straight-through gradients,
codebook + commitment loss, usage tracking and optional dead-code reset (plain torch).

Forward on z (..., dim), as SEED's released ``VectorQuantizer2`` (``legacy=True``): the code of each vector is
the codebook row at the smallest raw Euclidean distance ``|z|^2 + |e|^2 - 2 z.e`` (un-normalised vectors, the
first index on ties); the output is ``z + sg(e - z)`` (straight through: the decoder's gradient reaches the
encoder unchanged) and the loss is ``mean((sg(e) - z)^2) + beta * mean((e - sg(z))^2)``: the encoder's
commitment term has weight 1 and beta (0.25) multiplies the codebook term, as the released code has it (the
VQ-VAE paper puts beta on the commitment term; the value is the same, only the gradients differ).
``l2_norm`` (ours, not SEED's: the released code has its l2norm commented out) normalises z and the codebook
first, so the search is by cosine and the decoder sees unit vectors. ``usage`` counts every code chosen by a training batch since the last ``reset_usage()``;
:meth:`usage_stats` gives the perplexity of that histogram and the number of codes never chosen (dead).
:meth:`reset_dead_codes` moves each dead code onto a vector of the last batch (drawn with the given generator),
the usual remedy for codebook collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VQConfig", "VectorQuantizer", "perplexity", "usage_stats"]


@dataclass
class VQConfig:
    num_codes: int = 8192
    dim: int = 32
    beta: float = 0.25
    l2_norm: bool = False  # ours: cosine search on normalised vectors (SEED: raw Euclidean)

    def __post_init__(self) -> None:
        if self.num_codes < 2 or self.dim < 1:
            raise ValueError(f"vq: needs num_codes >= 2 and dim >= 1, got {self.num_codes} x {self.dim}")
        if self.beta < 0:
            raise ValueError(f"vq.beta must be >= 0, got {self.beta}")


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.num_codes, cfg.dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.num_codes, 1.0 / cfg.num_codes)
        # Codes chosen by training batches since the last reset. A plain tensor, not a buffer: DDP would
        # overwrite every rank's counts with rank 0's at each forward (broadcast_buffers), and a checkpoint
        # does not need them; the stage sums the ranks' counts itself.
        self.usage = torch.zeros(cfg.num_codes, dtype=torch.long)
        self._last_inputs: torch.Tensor | None = None

    def _prepare(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codebook = self.embedding.weight
        if self.cfg.l2_norm:
            return F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
        return z, codebook

    def codes_of(self, z: torch.Tensor) -> torch.Tensor:
        """The nearest code of every vector of z (..., dim) -> (...); argmin keeps the first index on ties."""
        flat, codebook = self._prepare(z.reshape(-1, self.cfg.dim))
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None])
        return dist.argmin(1).reshape(z.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids -> their (normalised, when l2_norm) codebook vectors."""
        e = self.embedding(codes)
        return F.normalize(e, dim=-1) if self.cfg.l2_norm else e

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        codes = self.codes_of(z)
        zn = F.normalize(z, dim=-1) if self.cfg.l2_norm else z
        e = self.lookup(codes)
        # SEED's legacy loss: commitment (pulls z) at weight 1, beta on the codebook term (pulls e)
        loss = F.mse_loss(e.detach(), zn) + self.cfg.beta * F.mse_loss(e, zn.detach())
        quantized = zn + (e - zn).detach()  # straight-through estimator
        if self.training:
            self.usage = self.usage.to(codes.device) + torch.bincount(codes.reshape(-1), minlength=self.cfg.num_codes)
            self._last_inputs = zn.detach().reshape(-1, self.cfg.dim)
        return {"quantized": quantized, "codes": codes, "loss_vq": loss}

    @torch.no_grad()
    def usage_stats(self) -> dict[str, float]:
        """Perplexity of the code histogram since the last reset (num_codes when uniform, 1 when collapsed) and
        the number of dead (never chosen) codes."""
        return usage_stats(self.usage)

    def reset_usage(self) -> None:
        self.usage = torch.zeros_like(self.usage)

    @torch.no_grad()
    def reset_dead_codes(self, generator: torch.Generator | None = None, counts: torch.Tensor | None = None) -> int:
        """Move every dead code (zero in `counts`, default this module's own usage) onto a random vector of the
        last training batch; returns how many moved."""
        counts = self.usage if counts is None else counts
        dead = (counts == 0).nonzero().flatten()
        if dead.numel() == 0 or self._last_inputs is None:
            return 0
        pick = torch.randint(0, self._last_inputs.shape[0], (dead.numel(),), generator=generator)
        self.embedding.weight[dead.to(self.embedding.weight.device)] = self._last_inputs[
            pick.to(self._last_inputs.device)].to(self.embedding.weight)
        return int(dead.numel())


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram, on its device with no host sync (0 for an empty histogram)."""
    total = counts.sum()
    p = counts.double() / total.clamp(min=1)
    return torch.where(total > 0, torch.exp(-torch.special.xlogy(p, p).sum()), torch.zeros((), dtype=p.dtype,
                                                                                             device=p.device))


@torch.no_grad()
def usage_stats(counts: torch.Tensor) -> dict[str, float]:
    """Perplexity of a code histogram, and how many codes it never chose (dead) or chose (used)."""
    used = float((counts > 0).sum())
    return {"perplexity": float(perplexity(counts)), "dead_codes": float(counts.numel()) - used, "used_codes": used}
