"""Generation and editing metrics on (prompt or source, output, reference) image sets, with torchmetrics.

* FID (``torchmetrics.image.fid.FrechetInceptionDistance``): outputs against references. The Inception network
  is torch-fidelity's FID Inception, weights from a local file (``metrics.fid_weights``:
  ``pt_inception-2015-12-05-6726825d.pth``), or any feature module (tiny twins, tests).
* CLIPScore (``torchmetrics.multimodal.CLIPScore``): output against its prompt; CLIP-I is the same score between
  output and reference image (MagicBrush), /100. CLIP from a local Hugging Face folder (``metrics.clip_path``).
* MagicBrush editing metrics: L1 (``torchmetrics`` mean absolute error of [0, 1] pixels at a common size),
  CLIP-I, and DINO (cosine of the CLS features of a DINO ViT from ``metrics.dino_path``, as MagicBrush).

Weights never download: an unset or missing path raises naming its key. ``tiny=True`` builds small random
CLIP / DINO / feature networks from config instead (seeded), so the tiny twins and tests run the same code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

METRIC_SIZE = 224  # images are compared at this size (L1) and fed to the feature networks

__all__ = ["FeatureNets", "clip_i", "clip_score", "dino_similarity", "fid", "l1_distance", "to_tensor"]


def to_tensor(images: list[Image.Image], size: int = METRIC_SIZE) -> torch.Tensor:
    """(N, 3, size, size) float in [0, 1]."""
    arrs = [torch.from_numpy(np.array(im.convert("RGB").resize((size, size), Image.BICUBIC))) for im in images]
    return torch.stack(arrs).permute(0, 3, 1, 2).contiguous().float() / 255.0


def _require(path: str | None, key: str, what: str) -> Path:
    if not path or not Path(path).exists():
        where = f"{path!r} does not exist" if path else "it is not set"
        raise FileNotFoundError(f"{key}: needs {what}, but {where}; set {key}=/local/path (no downloads)")
    return Path(path)


class _CLIPFeatures(nn.Module):
    """A transformers CLIPModel whose get_*_features return tensors (transformers 5 returns model outputs, which
    torchmetrics' CLIPScore does not read)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values):
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask=None):
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class _TinyProcessor:
    """CLIPProcessor's interface for the tiny CLIP: the tiny Llama tokenizer + resize/normalise."""

    def __init__(self, tokenizer, size: int) -> None:
        self.tokenizer, self.size = tokenizer, size

    def __call__(self, text=None, images=None, return_tensors="pt", padding=True):
        if text is not None:
            enc = self.tokenizer([t + self.tokenizer.eos_token for t in text], return_tensors="pt", padding=True)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        pixels = torch.stack([F.interpolate(i.float().unsqueeze(0), size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)[0] for i in images])
        return {"pixel_values": pixels / 255.0 if pixels.max() > 1.5 else pixels}


class _TinyFIDFeatures(nn.Module):
    """A small conv net standing in for Inception in tiny runs and tests (same torchmetrics FID code)."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, dim, 3, 2, 1), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())

    def forward(self, x):
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        return self.net(x)


class FeatureNets:
    """The metric networks, built on first use from local paths (or tiny, from config)."""

    def __init__(self, clip_path: str | None = None, dino_path: str | None = None, fid_weights: str | None = None,
                 tiny: bool = False, tokenizer_path: str | None = None, seed: int = 0) -> None:
        self.clip_path, self.dino_path, self.fid_weights = clip_path, dino_path, fid_weights
        self.tiny, self.tokenizer_path, self.seed = tiny, tokenizer_path, seed
        self._clip = self._dino = None

    def clip(self):
        """(model with tensor features, processor), for torchmetrics' CLIPScore."""
        if self._clip is None:
            from transformers import CLIPConfig, CLIPModel

            if self.tiny:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(_require(self.tokenizer_path, "metrics.tokenizer_path",
                                                                 "a tokenizer folder")), local_files_only=True)
                tok.pad_token = tok.pad_token or tok.unk_token
                cfg = CLIPConfig(text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64,
                                              "num_hidden_layers": 2, "num_attention_heads": 2,
                                              "max_position_embeddings": 128, "eos_token_id": tok.eos_token_id,
                                              "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
                                 vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                                 projection_dim=16)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    model = CLIPModel(cfg)
                processor = _TinyProcessor(tok, 32)
            else:
                from transformers import CLIPProcessor

                path = _require(self.clip_path, "metrics.clip_path", "a local CLIP folder (e.g. clip-vit-large-patch14)")
                model = CLIPModel.from_pretrained(str(path), local_files_only=True)
                processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
            self._clip = (_CLIPFeatures(model.eval()), processor)
        return self._clip

    def dino(self) -> nn.Module:
        if self._dino is None:
            if self.tiny:
                from transformers import ViTConfig, ViTModel

                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed + 1)
                    self._dino = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                    num_attention_heads=2, image_size=32, patch_size=8),
                                          add_pooling_layer=False).eval()
            else:
                from transformers import AutoModel

                path = _require(self.dino_path, "metrics.dino_path", "a local DINO ViT folder (e.g. dino-vits16)")
                self._dino = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        return self._dino

    def fid_metric(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        if self.tiny:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + 2)
                feature = _TinyFIDFeatures()
            return FrechetInceptionDistance(feature=feature, normalize=True, input_img_size=(3, 64, 64))
        weights = _require(self.fid_weights, "metrics.fid_weights",
                           "torch-fidelity's FID Inception weights (pt_inception-2015-12-05-6726825d.pth)")
        return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))


@torch.no_grad()
def fid(nets: FeatureNets, outputs: list[Image.Image], references: list[Image.Image]) -> float:
    if len(outputs) < 2 or len(references) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(outputs)} outputs and {len(references)} references")
    metric = nets.fid_metric()
    metric.update(to_tensor(references, 299 if not nets.tiny else 64), real=True)
    metric.update(to_tensor(outputs, 299 if not nets.tiny else 64), real=False)
    return float(metric.compute())


@torch.no_grad()
def clip_score(nets: FeatureNets, images: list[Image.Image], prompts: list[str]) -> float:
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=nets.clip)
    metric.update(list((to_tensor(images) * 255).to(torch.uint8)), list(prompts))
    return float(metric.compute())


@torch.no_grad()
def clip_i(nets: FeatureNets, outputs: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean cosine of the CLIP image embeddings of output and reference (MagicBrush CLIP-I), in [-1, 1]."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=nets.clip)
    metric.update(list((to_tensor(outputs) * 255).to(torch.uint8)), list((to_tensor(references) * 255).to(torch.uint8)))
    return float(metric.compute()) / 100.0


@torch.no_grad()
def dino_similarity(nets: FeatureNets, outputs: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean cosine of the DINO CLS features of output and reference (MagicBrush DINO)."""
    model = nets.dino()
    size = model.config.image_size
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def cls(images):
        x = (to_tensor(images, size) - mean) / std
        return model(pixel_values=x).last_hidden_state[:, 0]

    return float(F.cosine_similarity(cls(outputs), cls(references), dim=-1).mean())


@torch.no_grad()
def l1_distance(outputs: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean absolute pixel difference in [0, 1] at METRIC_SIZE (MagicBrush L1)."""
    from torchmetrics.regression import MeanAbsoluteError

    metric = MeanAbsoluteError()
    metric.update(to_tensor(outputs), to_tensor(references))
    return float(metric.compute())
