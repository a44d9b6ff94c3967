"""The trained tiny towers (assets/tiny_towers, python -m data_prep.make_tiny_towers) that the tiny de-tokenizer
twin can learn on (model/detokenizer=tiny_trained), and the demo's data. The learning chain itself:
tests/test_demo_learns.py (slow)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOWERS = ROOT / "assets" / "tiny_towers"
SCRIPT = ROOT / "data_prep" / "make_tiny_towers.py"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest() -> dict:
    return json.loads((TOWERS / "MANIFEST.json").read_text())


def test_bundled_tiny_towers_are_what_the_script_wrote():
    m = manifest()
    # a changed script must be rerun: the folder records the script that made it
    assert m["script_sha256"] == sha256(SCRIPT), "data_prep/make_tiny_towers.py changed: rerun it (see its docstring)"
    on_disk = sorted(str(p.relative_to(TOWERS)) for p in TOWERS.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    assert on_disk == sorted(m["files"])
    for rel, digest in m["files"].items():
        assert sha256(TOWERS / rel) == digest, rel
    weights = sum((TOWERS / f).stat().st_size for f in m["files"])
    assert weights < 8 * 2**20  # bundled: a few MB


def demo_views():
    from PIL import Image

    from src.data.images import vae_view
    from src.demo import SAMPLE, demo_items

    views = []
    for it in demo_items():
        with Image.open(SAMPLE / it["image"]) as im:
            views.append(vae_view(im.convert("RGB"), 32)[0])
    return torch.stack(views)


def test_trained_tiny_vae_is_near_deterministic_and_its_latents_have_unit_scale():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(TOWERS, subfolder="vae", local_files_only=True).eval()
    random_vae = AutoencoderKL.from_config(vae.config).eval()
    x = demo_views()
    with torch.no_grad():
        post, random_post = vae.encode(x).latent_dist, random_vae.encode(x).latent_dist
        recon = vae.decode(post.mean).sample
    spread = post.mean.std(dim=0).mean()
    # a sample of the posterior is its mean plus little noise (the random VAE's is mostly noise)
    assert post.std.mean() < 0.15 * spread  # bundled build: 0.24 vs 2.35
    assert random_post.std.mean() > random_post.mean.std(dim=0).mean()
    # scaling_factor (1 / latent std, as Stable Diffusion chose its own) brings latents near unit std
    assert 0.6 < (post.mean * vae.config.scaling_factor).std() < 1.6
    assert vae.config.scaling_factor != pytest.approx(0.13025)  # not SDXL's, inherited by tiny.yaml
    assert torch.nn.functional.mse_loss(recon, x) < 0.5 * torch.nn.functional.mse_loss(torch.zeros_like(x), x)


def test_trained_tiny_unet_denoises_better_than_a_random_one():
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from data_prep.make_tiny_towers import eval_denoising

    vae = AutoencoderKL.from_pretrained(TOWERS, subfolder="vae", local_files_only=True).eval()
    unet = UNet2DConditionModel.from_pretrained(TOWERS, subfolder="unet", local_files_only=True).eval()
    scheduler = DDPMScheduler.from_pretrained(TOWERS, subfolder="scheduler", local_files_only=True)
    torch.manual_seed(0)
    random_unet = UNet2DConditionModel.from_config(unet.config).eval()
    x = demo_views()
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    time_ids = torch.tensor([[512.0, 512.0, 0.0, 0.0, 32.0, 32.0]]).expand(len(x), 6)
    trained = eval_denoising(unet, scheduler, latents, time_ids, seed=1)
    random = eval_denoising(random_unet, scheduler, latents, time_ids, seed=1)
    assert trained < 0.7 * random, (trained, random)


@pytest.mark.config
def test_tiny_trained_detokenizer_loads_the_bundled_towers_and_tiny_stays_random(tmp_path):
    import hydra
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from tests.helpers import compose_cfg

    trained = compose_cfg("seedx_detok_pretrain_tiny", tmp_path, ["model/detokenizer=tiny_trained"])
    plain = compose_cfg("seedx_detok_pretrain_tiny", tmp_path)
    assert plain.model.detokenizer.pretrained_dir is None  # shape tests keep their random towers
    assert Path(OmegaConf.to_container(trained.model.detokenizer, resolve=True)["pretrained_dir"]).resolve() == \
        TOWERS.resolve()
    stage = hydra.utils.instantiate(trained.stage, _convert_="all")
    stage.build_models(load_weights=True)
    unet, vae = stage.unet, stage.vae
    saved = load_file(TOWERS / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(unet.state_dict()["conv_in.weight"], saved["conv_in.weight"])
    assert vae.config.scaling_factor == manifest()["vae"]["scaling_factor"]


@pytest.mark.config
def test_pretraining_and_pretrained_prompting_use_the_same_chat_format(tmp_path):
    """Issue 32 item 4: chat records train as `Question:/Answer:` (qa), and src.generate prompts a pre-trained
    checkpoint's chat in the same format."""
    from src.generate import chat_format_of
    from tests.helpers import compose_cfg

    cfg = compose_cfg("seedx_pretrain_tiny", tmp_path)
    assert cfg.data.chat_format == "qa" == chat_format_of("chat", "pretrained")


def test_demo_data_is_six_distinct_bundled_photos_with_one_question_each(tmp_path):
    from src.demo import captions, demo_items, originals, write_data

    items = demo_items()
    assert len(items) == 6 and len({it["image"] for it in items}) == 6 and len({it["answer"] for it in items}) == 6
    assert all(it["image"] in captions() for it in items)
    _, pixels = originals()
    # distinct enough to identify by pixel distance: every original is nearest to itself by a margin
    d = torch.cdist(pixels.flatten(1), pixels.flatten(1)) + torch.eye(6) * 1e9
    assert d.min() > 5.0
    files = write_data(tmp_path)
    chat = [json.loads(line) for line in files["chat"].read_text().splitlines()]
    assert [r["turns"][1]["content"][0]["text"] for r in chat] == [it["answer"] for it in items]
    from src.data.records import load_image, read_jsonl, record_images, validate_record  # as training reads

    for key in ("captions", "chat", "edit"):  # training sources, as the training reader reads them
        for line in files[key].read_text().splitlines():
            validate_record(json.loads(line))  # as written (the reader fills in a missing source)
        records = list(read_jsonl(files[key]))
        assert len(records) == 6, key
        for rec in records:
            assert isinstance(rec, dict), rec  # not a SkippedSample
            for item in record_images(rec):
                assert load_image(rec, item).size[0] >= 32
    from src.pipelines.conversation import load_requests  # generation requests, as src.generate reads them

    for mode in ("recon", "t2i", "edit", "chat"):
        assert [r["id"] for r in load_requests(str(files[f"req_{mode}"]), None, None, mode)] == [it["name"] for it in items]


@pytest.mark.slow
def test_make_tiny_towers_rebuilds_the_bundled_folder_byte_identically(tmp_path):
    from data_prep.make_tiny_towers import main

    args = manifest()["args"]
    main(["--out", str(tmp_path), *(f"--{k.replace('_', '-')}={v}" for k, v in args.items())])
    rebuilt = json.loads((tmp_path / "MANIFEST.json").read_text())
    assert rebuilt["files"] == manifest()["files"]
    assert rebuilt["vae"] == manifest()["vae"] and rebuilt["unet"] == manifest()["unet"]


def test_tiny_trained_stage1_trains_the_whole_unet_and_the_recipe_only_to_k_to_v(tmp_path):
    """model.detokenizer.stage1_unet_trainable: `all` on the tiny twin (its to_k/to_v alone barely take up the
    features), `kv` (SEED-X's recipe) everywhere else; anything else is refused naming the key."""
    import hydra
    from omegaconf import OmegaConf

    from src.models.detokenizer import DetokenizerConfig
    from tests.helpers import compose_cfg

    def unet_trainable(overrides):
        cfg = compose_cfg("seedx_detok_pretrain_tiny", tmp_path, overrides)
        module = hydra.utils.instantiate(cfg.stage, _convert_="all")
        module.configure_model()
        return {n: p.requires_grad for n, p in module.unet.named_parameters()}

    whole = unet_trainable(["model/detokenizer=tiny_trained"])
    assert all(whole.values())
    kv = unet_trainable([])
    assert any(kv.values()) and all(t == (".to_k." in n or ".to_v." in n) for n, t in kv.items())
    node = OmegaConf.to_container(compose_cfg("seedx_detok_pretrain_tiny", tmp_path).model.detokenizer, resolve=True)
    with pytest.raises(ValueError, match="model.detokenizer.stage1_unet_trainable"):
        DetokenizerConfig(**{**node, "stage1_unet_trainable": "some"})
