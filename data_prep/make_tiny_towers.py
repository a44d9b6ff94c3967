"""Trained tiny VAE + UNet standing in for SDXL's pretrained towers (model/detokenizer=tiny_trained).

    python -m data_prep.make_tiny_towers --out assets/tiny_towers

A random tiny VAE has a posterior that is mostly noise and a random UNet never learned to denoise, so a
tiny de-tokenizer built from them cannot learn from its features (stage 1 trains only the adapter and the
UNet's to_k/to_v, on top of a frozen UNet that full size gets pretrained). This script does, in minutes on
CPU, what SDXL's own training did before SEED-X started:
1. the VAE learns to reconstruct the bundled photos (random crops and flips) with SD's tiny KL weight, so its
   posterior ends up near-deterministic, as a trained VAE's is;
2. `scaling_factor` = 1 / std of the latents, as Stable Diffusion chose its 0.18215 (latents of std ~1);
3. the UNet learns plain eps-denoising of those scaled latents under a null condition (zero text features,
   zero pooled embedding) -- the prior the adapter's features then steer.
It writes a diffusers folder (vae/, unet/, scheduler/; save_pretrained, safetensors) and MANIFEST.json (the
sha256 of every file, of this script, and the numbers measured), which tests check the bundled folder against.
Seeded, deterministic algorithms, a fixed thread count: a rebuild on the same machine is byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "assets" / "sample" / "images"
EXPERIMENT = "seedx_detok_pretrain_tiny"  # whose model.detokenizer (tiny) shapes the towers
WEIGHT_FILES = ("vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors")
log = logging.getLogger("make_tiny_towers")


def tiny_detokenizer_config():
    """The tiny de-tokenizer's config dicts (unet, vae, scheduler, resolution) as training composes them."""
    from hydra import compose, initialize_config_dir

    os.environ.setdefault("PROJECT_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={EXPERIMENT}", "model/detokenizer=tiny"])
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.model.detokenizer, resolve=True)


def photo_paths() -> list[Path]:
    return sorted(p for p in IMAGES.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def load_photos(paths: list[Path]) -> list[Image.Image]:
    """Every readable bundled photo; an unreadable one (the sample data has a deliberately corrupt file) is
    skipped and counted."""
    photos, skipped = [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                photos.append(im.convert("RGB"))
        except OSError:
            skipped.append(p.name)
    log.info("%d photos, %d unreadable skipped %s", len(photos), len(skipped), skipped)
    if not photos:
        raise SystemExit(f"no readable photo under {IMAGES}")
    return photos


def views(photos: list[Image.Image], size: int, per_photo: int, gen: torch.Generator):
    """(pixels in [-1, 1], SDXL time ids) for every photo: its centre crop (what the de-tokenizer data gives)
    plus `per_photo - 1` random crops of a random scale with random flips."""
    from src.data.images import vae_view

    pixels, time_ids = [], []
    for img in photos:
        for k in range(per_photo):
            side = size if k == 0 else int(torch.randint(size, int(size * 1.6) + 1, (1,), generator=gen))
            x, original, (top, left) = vae_view(img, side)  # shorter side to `side`, centre crop
            if side > size:
                top = int(torch.randint(0, side - size + 1, (1,), generator=gen))
                left = int(torch.randint(0, side - size + 1, (1,), generator=gen))
                x = x[:, top:top + size, left:left + size]
            if k and bool(torch.rand(1, generator=gen) < 0.5):
                x = x.flip(-1)
            pixels.append(x)
            time_ids.append(torch.tensor([*original, top, left, size, size], dtype=torch.float32))
    return torch.stack(pixels), torch.stack(time_ids)


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, kl_weight: float, gen: torch.Generator):
    """Reconstruction (sum of squared errors per image) + kl_weight x KL (summed), SD's weighting; the
    posterior is sampled, so noise in it costs reconstruction and the encoder learns to make it small."""
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(pixels), (batch,), generator=gen)
        x = pixels[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = ((recon - x) ** 2).sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("vae step %d: rec/pixel %.4f kl %.1f", step, rec.item() / x[0].numel(), kl.item())
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def posterior_stats(vae, pixels: torch.Tensor) -> dict[str, float]:
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.mean).sample.clamp(-1, 1)
    return {
        "latent_std": posterior.mean.std().item(),  # what scaling_factor normalises
        "posterior_std": posterior.std.mean().item(),  # the noise sample() adds (a trained VAE's is tiny)
        "posterior_mean_spread": posterior.mean.std(dim=0).mean().item(),  # how far images' means differ
        "recon_mse": F.mse_loss(recon, pixels).item(),  # in [-1, 1] pixels
    }


def denoising_loss(unet, scheduler, latents, time_ids, gen: torch.Generator) -> torch.Tensor:
    """eps-MSE under the null condition: zero text tokens and zero pooled embedding (SDXL's own empty prompt
    is zeroed this way too with `force_zeros_for_empty_prompt`)."""
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    cross = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - len(time_ids[0]) * unet.config.addition_time_embed_dim
    pred = unet(noisy, t, encoder_hidden_states=torch.zeros(len(latents), 1, cross),
                added_cond_kwargs={"text_embeds": torch.zeros(len(latents), pooled), "time_ids": time_ids}).sample
    return F.mse_loss(pred, noise)


def train_unet(unet, scheduler, latents, time_ids, steps: int, batch: int, gen: torch.Generator):
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        loss = denoising_loss(unet, scheduler, latents[idx], time_ids[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("unet step %d: eps-mse %.4f", step, loss.item())
    return unet.eval().requires_grad_(False)


@torch.no_grad()
def eval_denoising(unet, scheduler, latents, time_ids, seed: int, repeats: int = 4) -> float:
    """Mean eps-MSE over fixed noise draws: comparable before and after training."""
    gen = torch.Generator().manual_seed(seed)
    return sum(denoising_loss(unet, scheduler, latents, time_ids, gen).item() for _ in range(repeats)) / repeats


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out: Path, seed: int, vae_steps: int, unet_steps: int, batch: int, threads: int) -> dict:
    """Train and write the towers; the process's thread count and determinism flag are restored after."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)  # float sums depend on the split; fixed so rebuilds match
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out, seed, vae_steps, unet_steps, batch, threads)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _build(out: Path, seed: int, vae_steps: int, unet_steps: int, batch: int, threads: int) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    cfg = tiny_detokenizer_config()
    size = cfg["resolution"]
    gen = torch.Generator().manual_seed(seed)
    pixels, time_ids = views(load_photos(photo_paths()), size, per_photo=8, gen=gen)
    log.info("%d training views of %dx%d", len(pixels), size, size)

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(dict(cfg["vae"]))
    before_vae = posterior_stats(vae, pixels)
    vae = train_vae(vae, pixels, vae_steps, batch, kl_weight=1e-6, gen=gen)
    stats = posterior_stats(vae, pixels)
    scaling = 1.0 / stats["latent_std"]
    vae.register_to_config(scaling_factor=round(scaling, 5))
    log.info("vae: %s (random init: %s); scaling_factor %.5f", stats, before_vae, scaling)

    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    scheduler = DDPMScheduler.from_config(dict(cfg["scheduler"]))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel.from_config(dict(cfg["unet"]))
    loss_before = eval_denoising(unet, scheduler, latents, time_ids, seed)
    unet = train_unet(unet, scheduler, latents, time_ids, unet_steps, batch, gen)
    loss_after = eval_denoising(unet, scheduler, latents, time_ids, seed)
    log.info("unet eps-mse %.4f -> %.4f", loss_before, loss_after)

    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    manifest = {
        "script_sha256": sha256(Path(__file__)),
        "args": {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch": batch, "threads": threads},
        "files": {f: sha256(out / f) for f in files},
        "vae": {**{k: round(v, 5) for k, v in stats.items()}, "scaling_factor": vae.config.scaling_factor,
                "random_init_posterior_std": round(before_vae["posterior_std"], 5),
                "random_init_posterior_mean_spread": round(before_vae["posterior_mean_spread"], 5)},
        "unet": {"eps_mse_before": round(loss_before, 5), "eps_mse_after": round(loss_after, 5)},
        "train_views": len(pixels),
        "seconds": round(time.perf_counter() - t0),  # informational; not compared by the tests
    }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "assets" / "tiny_towers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--unet-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    # one thread: float sums then never depend on the split, and on a shared 2-core machine it is the faster
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[make_tiny_towers] %(message)s")
    m = build(a.out, a.seed, a.vae_steps, a.unet_steps, a.batch, a.threads)
    print(json.dumps({k: m[k] for k in ("vae", "unet", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
