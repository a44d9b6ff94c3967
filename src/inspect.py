"""`python -m src.inspect experiment=<name>`: build the stage's models on the meta device and count.

No weights are read and no memory is allocated. Prints total and trainable parameters per top-level
module, an analytic memory estimate per GPU, then one JSON line: {"experiment", "total", "trainable",
"modules": {name: {total, trainable}}, "memory_per_gpu_gib": {...}, "feature_store": {...}}. The estimate is, under a sharded
strategy (FSDP, FSDP2, DeepSpeed), the stage's own peak estimate if it has one; otherwise (DDP, one
device) the model state every GPU holds: weights by trainable/frozen in their dtypes, gradients, DDP
buckets, AdamW states (src/utils/memory.py), so e.g. `stage.frozen_dtype=bf16` shows in frozen_weights.
With `data.features_dir=DIR` (a store of data_prep/precompute_features.py) it also reports the store: layout,
entries, bytes on disk and bytes per sample, the stored dtypes, and any part it could not read.
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import json

import hydra
import torch
from omegaconf import DictConfig

from src.utils.config import check_config
from src.utils.memory import estimate_replicated_memory

# `_target_` names of strategies that shard parameters (anything else replicates them: DDP, one device).
SHARDED_STRATEGIES = ("FSDP2Strategy", "fsdp_strategy", "FSDPStrategy", "DeepSpeedStrategy")


def build_on_meta(cfg: DictConfig):
    check_config(cfg)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    if module.builds_empty:
        module.build_empty(load_weights=False)
        return module
    with torch.device("meta"):
        module.build_models(load_weights=False)
    return module


def count_parameters(module: torch.nn.Module) -> dict:
    """Totals, per reported module (the stage's `report_modules()`), and LoRA's share of trainables."""
    per_module = {}
    for name, child in module.report_modules().items():
        params = list(child.parameters()) if isinstance(child, torch.nn.Module) else [child]
        if params:
            per_module[name] = {
                "total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad),
            }
    named = list(module.named_parameters())
    counts = {
        "total": sum(p.numel() for _, p in named),
        "trainable": sum(p.numel() for _, p in named if p.requires_grad),
        "lora_trainable": sum(p.numel() for n, p in named if "lora_" in n and p.requires_grad),
        "modules": per_module,
    }
    # A stage may name modules only training needs (the SEED tokenizer's frozen target encoder): the model
    # itself is reported without them too.
    only = module.training_only_modules() if hasattr(module, "training_only_modules") else {}
    if only:
        skip = {id(p) for m in only.values() for p in m.parameters()}
        counts["without_training_only"] = {
            "excluded": sorted(only),
            "total": sum(p.numel() for _, p in named if id(p) not in skip),
            "trainable": sum(p.numel() for _, p in named if p.requires_grad and id(p) not in skip),
        }
    return counts


def is_sharded(cfg: DictConfig) -> bool:
    target = str((cfg.get("strategy") or {}).get("_target_", ""))
    return target.rpartition(".")[2] in SHARDED_STRATEGIES


def memory_estimate(module, cfg: DictConfig) -> dict | None:
    """Per-GPU memory: a replicated run's model state, or (sharded, for stages that can estimate it) the peak
    at the configured devices x nodes and micro batch."""
    if not is_sharded(cfg):
        return estimate_replicated_memory(module.parameters()).as_gib()
    if not hasattr(module, "memory_estimate") or not isinstance(cfg.trainer.devices, int):
        return None
    strategy = cfg.get("strategy") or {}
    ac = bool(strategy.get("fsdp2", {}).get("activation_checkpointing", False)) or bool(
        (cfg.model.get("llm") or {}).get("gradient_checkpointing", False)
    )
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    return module.memory_estimate(world, cfg.data.batch_size, cfg.data.max_length, ac).as_gib()


def feature_store_stats(cfg: DictConfig) -> dict | None:
    """The configured feature store's size (``FeatureStore.stats``), or None without one."""
    root = (cfg.get("data") or {}).get("features_dir")
    if not root:
        return None
    from src.data.features import FeatureStore

    return FeatureStore(root).stats()


def format_table(counts: dict) -> str:
    rows = [f"{'module':<28}{'total':>18}{'trainable':>18}"]
    for name, c in counts["modules"].items():
        rows.append(f"{name:<28}{c['total']:>18,}{c['trainable']:>18,}")
    rows.append(f"{'TOTAL':<28}{counts['total']:>18,}{counts['trainable']:>18,}")
    if "without_training_only" in counts:
        w = counts["without_training_only"]
        name = f"TOTAL w/o {'+'.join(w['excluded'])}"
        rows.append(f"{name:<28}{w['total']:>18,}{w['trainable']:>18,}")
    if counts["lora_trainable"]:
        rows.append(f"{'(of which LoRA)':<28}{'':>18}{counts['lora_trainable']:>18,}")
    return "\n".join(rows)


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect.yaml")
def main(cfg: DictConfig) -> None:
    module = build_on_meta(cfg)
    counts = count_parameters(module)
    print(format_table(counts))
    memory = memory_estimate(module, cfg)
    if memory:
        what = "peak memory" if is_sharded(cfg) else "model state (replicated, activations not included)"
        print(f"estimated {what} per GPU (GiB, analytic): " + json.dumps(memory))
        counts["memory_per_gpu_gib"] = memory
    store = feature_store_stats(cfg)
    if store:
        per = store["bytes_per_sample"]
        print(f"feature store ({store['layout']}, {store['dtype']} ViT / {store['vae_dtype']} VAE): "
              f"{store['entries']:,} entries, {store['bytes']:,} bytes, "
              f"{'n/a' if per is None else f'{per:,.0f}'} bytes per sample")
        counts["feature_store"] = store
    print(json.dumps({"experiment": cfg.get("task_name"), **counts}))


if __name__ == "__main__":
    main()
