"""Convert the released SEED tokenizer (AILab-CVC/SEED `seed_quantizer.pt` + LAVIS `eva_vit_g.pth`) into a
`seed_tokenizer_v2` checkpoint of this repo.

    python -m data_prep.convert_seed_tokenizer --quantizer seed_quantizer.pt --eva eva_vit_g.pth --out DIR \\
        [--experiment seed_tokenizer_v2] [hydra overrides ...]

Local files only. Writes ``DIR/seed_tokenizer.ckpt`` (every tokenizer tensor: EVA ViT, Q-Former, codebook,
task layers, both decoder branches and the head, under this repo's names; hyper-parameters of the experiment
with ``weights_in_checkpoint: true``, so nothing else is read for them) and ``DIR/conversion_report.json``
(the key map, and every released tensor the model does not use, with the reason). The checkpoint serves
``data_prep.tokenize_images --ckpt``, ``src.generate ... image_tokenizer.ckpt_path=`` / ``mode=recon
ckpt_path=`` and ``stage.init_from`` of stage 2. The frozen CLIP-H target encoder (training) and the unCLIP
pipeline (drawing) still come from ``model.seed_decoder.pretrained_dir`` (pass it as an override).

Sizes come from the tensor shapes where they determine them (codebook, widths, query count, layer and block
counts, head widths), everything else (attention heads, eps, the decoder's target) from the experiment.
Key names: ``visual_encoder.*`` / the EVA file as timm's Eva reads it (``vit.*``); ``ln_vision``,
``query_tokens`` and ``Qformer.bert.*`` (BERT names -> transformers' Blip2QFormer names: ``embeddings.LayerNorm``
-> ``layernorm``, ``attention.self`` -> ``attention.attention``, ``crossattention.self`` ->
``crossattention.attention``) under ``qformer.``; ``quantize``, ``encode_task_layer``, ``decode_task_layer``,
``pos_embed``, ``blocks``, ``pos_embed_image``, ``blocks_image``, ``image_down``, ``distill_image_proj``,
``reverse_tokens`` and ``Reverse_Qformer.bert.*`` (-> ``reverse_qformer.*``) under ``codec.``, unchanged.
The released file holds more than the inference model uses (the text side, stage-1 heads, the other
decoder head...): those are listed in the report, never silently dropped; a key no rule knows, and every key
the model needs but the file lacks, are named together and the conversion stops.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from src.models.seed_qformer_weights import bert_rules, rename

CKPT_NAME = "seed_tokenizer.ckpt"
REPORT_NAME = "conversion_report.json"


# released name -> this repo's name (first match wins)
RULES: list[tuple[str, str]] = [
    (r"^visual_encoder\.(.+)$", r"vit.\1"),
    (r"^ln_vision\.(weight|bias)$", r"qformer.ln_vision.\1"),
    (r"^query_tokens$", r"qformer.query_tokens"),
    *bert_rules("Qformer.bert", "qformer.qformer"),
    *bert_rules("Reverse_Qformer.bert", "codec.reverse_qformer"),
    ((r"^(quantize\.embedding\.weight|encode_task_layer\..+|decode_task_layer\..+|pos_embed|blocks\..+|"
      r"pos_embed_image|blocks_image\..+|image_down\..+|distill_image_proj\..+|reverse_tokens)$"), r"codec.\1"),
]

# released tensors the tokenizer does not use, and why
UNUSED: list[tuple[str, str]] = [
    (r"\.embeddings\.position_ids$", "BERT position-id buffer (the queries have no positions)"),
    (r"^(Reverse_)?Qformer\.cls\.", "BERT LM head (stage-1 captioning)"),
    (r"^(Reverse_)?Qformer\.bert\.embeddings\.(word|position)_embeddings\.", "text embeddings (stage 1)"),
    (r"^(Reverse_)?Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.", "text FFN (stage 1)"),
    (r"^(vision_proj|text_proj|itm_head)\.|^temp$", "stage-1 ITC / ITM heads"),
    (r"^clip_model\.", "the frozen CLIP-H target encoder (training only; this repo builds its own)"),
]


def official_to_ours(key: str) -> str | None:
    return rename(key, RULES)


# this repo's name -> the released one (error messages name what the file should hold)
INVERSE: list[tuple[str, str]] = [
    (r"^vit\.(.+)$", r"visual_encoder.\1"),
    (r"^qformer\.(ln_vision\..+|query_tokens)$", r"\1"),
    (r"^qformer\.qformer\.layernorm\.(.+)$", r"Qformer.bert.embeddings.LayerNorm.\1"),
    (r"^qformer\.qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(.+)$",
     r"Qformer.bert.encoder.layer.\1.\2.self.\3"),
    (r"^qformer\.qformer\.(.+)$", r"Qformer.bert.\1"),
    (r"^codec\.reverse_qformer\.layernorm\.(.+)$", r"Reverse_Qformer.bert.embeddings.LayerNorm.\1"),
    (r"^codec\.reverse_qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(.+)$",
     r"Reverse_Qformer.bert.encoder.layer.\1.\2.self.\3"),
    (r"^codec\.reverse_qformer\.(.+)$", r"Reverse_Qformer.bert.\1"),
    (r"^codec\.(.+)$", r"\1"),
]


def ours_to_official(key: str) -> str:
    for pattern, template in INVERSE:
        if re.match(pattern, key):
            return re.sub(pattern, template, key)
    return key


def read_state(path: str, what: str) -> dict[str, torch.Tensor]:
    """A torch state dict file (bare, or under "model" / "state_dict" as LAVIS and Lightning save them), or a
    .safetensors file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what}={path!r} does not exist (a local file)")
    if str(path).endswith(".safetensors"):  # e.g. src.export's seed_tokenizer/model.safetensors
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{what}={path!r} is not a state dict of tensors")
    return obj


def _count(state: dict, pattern: str) -> int:
    return len({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def derived_overrides(state: dict[str, torch.Tensor]) -> list[str]:
    """Hydra overrides for every size the released tensors determine."""
    out = []

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"the released tokenizer lacks {key} (is --quantizer a seed_quantizer.pt?)")
        return state[key]

    codes, dim = need("quantize.embedding.weight").shape
    _, queries, width = need("query_tokens").shape
    layers = _count(state, r"^Qformer\.bert\.encoder\.layer\.(\d+)\.")
    blocks = _count(state, r"^blocks\.(\d+)\.")
    inter = need("Qformer.bert.encoder.layer.0.intermediate_query.dense.weight").shape[0]
    out += [f"model.seed_codec.vq.num_codes={codes}", f"model.seed_codec.vq.dim={dim}",
            f"model.qformer.qformer.num_queries={queries}", f"model.qformer.qformer.hidden_size={width}",
            f"model.qformer.qformer.num_hidden_layers={layers}",
            f"model.qformer.qformer.intermediate_size={inter}",
            f"model.eva_vit.width={need('ln_vision.weight').shape[0]}",
            f"model.seed_codec.decode_depth={blocks}"]
    if "image_down.0.weight" in state:
        dims = [state[f"image_down.{2 * i}.weight"].shape[0] for i in range(_count(state, r"^image_down\.(\d+)\."))]
        out += ["model.seed_codec.head=image_down", f"model.seed_codec.image_down_dims=[{','.join(map(str, dims))}]"]
    elif "reverse_tokens" in state:
        reverse = _count(state, r"^Reverse_Qformer\.bert\.encoder\.layer\.(\d+)\.")
        out += ["model.seed_codec.head=reverse_qformer", f"model.seed_codec.reverse_qformer_layers={reverse}"]
    return out


def eva_overrides(eva: dict[str, torch.Tensor]) -> list[str]:
    proj = eva.get("patch_embed.proj.weight")
    pos = eva.get("pos_embed")
    if proj is None or pos is None:
        raise ValueError("--eva: no patch_embed.proj.weight / pos_embed: not an EVA ViT state dict")
    patch = proj.shape[-1]
    side = round((pos.shape[1] - 1) ** 0.5)
    return [f"model.eva_vit.patch_size={patch}", f"model.eva_vit.image_size={side * patch}"]


def convert(quantizer: str, eva: str | None, experiment: str = "seed_tokenizer_v2",
            overrides: list[str] = ()) -> tuple[dict, dict]:
    """(checkpoint, report) of the released tokenizer; raises naming every unknown and missing key."""
    from omegaconf import OmegaConf

    from src.models.eva_vit import EvaViTConfig, build_eva_vit, load_eva_weights
    from src.specs.base import model_args
    from src.specs.inference import compose_experiment
    from src.specs.seed_tokenizer import SEED_TOKENIZER, SeedTokenizerModel
    from src.utils.checkpoint_kind import FAMILY_KEY, STAGE_KEY

    released = read_state(quantizer, "--quantizer")
    has_vit = any(k.startswith("visual_encoder.") for k in released)
    if eva is None and not has_vit:
        raise ValueError("--eva: the released seed_quantizer.pt holds no EVA ViT; give LAVIS eva_vit_g.pth")
    eva_state = read_state(eva, "--eva") if eva else None
    sizes = derived_overrides(released) + (eva_overrides(eva_state) if eva_state is not None else [])
    cfg = compose_experiment(experiment, [*sizes, *overrides])
    stage_cfg = OmegaConf.to_container(cfg.stage, resolve=True)
    stage_cfg.update(weights_in_checkpoint=True, init_from=None, optimizer=None)
    stage_cfg["model"]["eva_vit"]["weights"] = None
    module = SeedTokenizerModel(**model_args(SeedTokenizerModel, stage_cfg))
    with torch.device("meta"):
        module.build_models(load_weights=False)
    own = {k: tuple(v.shape) for k, v in module.state_dict().items() if not k.startswith("target.")}

    state, unused, unknown = {}, {}, []
    for key, tensor in released.items():
        if eva_state is not None and key.startswith("visual_encoder."):
            unused[key] = "EVA ViT taken from --eva"
            continue
        ours = official_to_ours(key)
        if ours is not None and ours in own:
            state[ours] = tensor
            continue
        reason = next((why for pattern, why in UNUSED if re.search(pattern, key)), None)
        other_head = ("codec.reverse_tokens", "codec.reverse_qformer.") if module.codec_cfg.head == "image_down" \
            else ("codec.image_down.",)
        if reason is None and ours is not None and ours.startswith(other_head):
            reason = f"decoder tensor of the other head (this checkpoint: head={module.codec_cfg.head})"
        if reason is None:
            unknown.append(key)
        else:
            unused[key] = reason
    if eva_state is not None:
        vit = build_eva_vit(EvaViTConfig(**{**stage_cfg["model"]["eva_vit"], "allow_random_init": True}), False)
        load_eva_weights(vit, eva)  # timm's layout mapping; blocks past the depth and the head dropped
        state.update({f"vit.{k}": v for k, v in vit.state_dict().items()})
    missing = sorted(k for k in own if k not in state)
    wrong = sorted(f"{k}: released {tuple(state[k].shape)} != model {own[k]}" for k in own.keys() & state.keys()
                   if tuple(state[k].shape) != own[k])
    if unknown or missing or wrong:
        lines = [f"--quantizer {quantizer} does not convert to {experiment} (overrides {sizes + list(overrides)}):"]
        for title, keys in (("unknown released keys", sorted(unknown)),
                            ("missing (released names)", [ours_to_official(k) for k in missing]),
                            ("shape mismatch", wrong)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # the stage computes in fp32
    checkpoint = {"state_dict": state, "hyper_parameters": stage_cfg, FAMILY_KEY: SEED_TOKENIZER.name,
                  STAGE_KEY: SeedTokenizerModel.stage_name,
                  "converted_from": {"quantizer": str(quantizer), "eva": str(eva) if eva else None}}
    report = {"experiment": experiment, "overrides": sizes + list(overrides), "tensors": len(state),
              "parameters": sum(v.numel() for v in state.values()), "unused_released_tensors": unused}
    return checkpoint, report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quantizer", required=True, help="the released seed_quantizer.pt (local)")
    parser.add_argument("--eva", default=None, help="LAVIS eva_vit_g.pth (local)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--experiment", default="seed_tokenizer_v2", help="the config the sizes complete")
    args, overrides = parser.parse_known_args(argv)
    try:
        checkpoint, report = convert(args.quantizer, args.eva, args.experiment, overrides)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"convert_seed_tokenizer: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, args.out / CKPT_NAME)
    (args.out / REPORT_NAME).write_text(json.dumps(report, indent=1))
    print(json.dumps({"checkpoint": str(args.out / CKPT_NAME), "tensors": report["tensors"],
                      "parameters": report["parameters"], "unused_released_tensors": len(report["unused_released_tensors"])}))


if __name__ == "__main__":
    main()
