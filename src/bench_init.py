"""Host memory of a sharded build: `python -m src.bench_init [--model mllm|detok] [--size S] [--world 2]`
(part of `make bench`, for both models).

Saves the bench size's weights as local files: for the MLLM (`--model mllm`, default size 1b) its LLM as an HF
folder (safetensors) and its ViT as a `.pt`; for the de-tokenizer (`--model detok`, default size sdxl_reduced,
src/bench_config.py) its ViT `.pt` and a diffusers folder with the UNet and VAE (safetensors). Then starts
`--world` gloo processes that build the stage as `strategy=fsdp2` does on a cluster (meta build -> FSDP2 shard
per block -> fill only the local shards from those files, src/utils/materialize.py). Each rank reports its
RSS before the build and its peak RSS during it (Linux `VmHWM`, reset just before the build). Keys:

- ``full_model_gb``: bytes of every parameter and buffer of the full model, in the dtype it trains in;
- ``init_peak_rss_gb_per_rank``: the largest (peak - before) over ranks;
- ``init_rss_over_full``: that / ``full_model_gb``. A rank that materialised the whole model would be >= 1;
  goal <= 0.75 at 2 ranks (each holds its half plus one tensor in flight and the pages it read).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

GB = 1024**3


def _status_kb(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


DEFAULT_SIZE = {"mllm": "1b", "detok": "sdxl_reduced"}


def weight_overrides(model: str, weights: Path) -> list[str]:
    """The stage reading the files `save_weights` wrote (and nothing random but the trained-from-scratch parts)."""
    if model == "detok":
        return [f"model.vit.weights={weights / 'vit.pt'}", f"model.detokenizer.pretrained_dir={weights / 'sdxl'}",
                "model.detokenizer.allow_random_init=false"]
    return [f"model.llm.weights={weights / 'llm'}", f"model.vit.weights={weights / 'vit.pt'}",
            "model.llm.allow_random_init=false"]


def _stage_cfg(size: str, weights: Path | None, model: str = "mllm"):
    from src.bench_config import compose_bench_cfg

    extra = [] if weights is None else weight_overrides(model, weights)
    return compose_bench_cfg(Path(tempfile.gettempdir()) / "bench_init", size, "cpu", extra, model=model)


def save_weights(size: str, root: Path, model: str = "mllm") -> None:
    """The size's weights as local files, random but fixed (seed 0): the ViT (`.pt`) and the MLLM's LLM (HF folder)
    or the de-tokenizer's UNet and VAE (diffusers folder `sdxl/`), all safetensors."""
    from src.models.qwen_vit import QwenViT, QwenViTConfig

    cfg = _stage_cfg(size, None, model).model
    torch.manual_seed(0)
    if model == "detok":
        from diffusers import DDPMScheduler
        from omegaconf import OmegaConf

        from src.models.detokenizer import DetokenizerConfig, build_unet, build_vae

        detok = DetokenizerConfig(**OmegaConf.to_container(cfg.detokenizer, resolve=True))
        for name, build in (("unet", build_unet), ("vae", build_vae)):
            tower = build(detok, load_weights=False)
            tower.save_pretrained(root / "sdxl" / name, safe_serialization=True)
            del tower
        DDPMScheduler.from_config(dict(detok.scheduler)).save_pretrained(root / "sdxl" / "scheduler")
    else:
        from src.models.mllm import LLMConfig, build_llm

        llm_cfg = LLMConfig(**{**dict(cfg.llm), "config": dict(cfg.llm.config)})
        llm = build_llm(llm_cfg, vocab_size=int(cfg.llm.config.vocab_size), folder_config=False)
        llm.save_pretrained(root / "llm", safe_serialization=True)
        del llm
    vit = QwenViT(QwenViTConfig(**{k: v for k, v in dict(cfg.vit).items() if k != "weights"}))
    torch.save(vit.state_dict(), root / "vit.pt")


def worker(rank: int, world: int, port: int, size: str, weights: str, out: str, model: str = "mllm") -> None:
    """One rank: build on meta, shard, fill from `weights`; writes its RSS figures to `out`.rank.json."""
    import hydra
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from src.parallel import FSDP2Options
    from src.utils.materialize import materialize

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    cfg = _stage_cfg(size, Path(weights), model)
    module = hydra.utils.instantiate(cfg.stage, _convert_="all")
    dist.barrier()
    peak_reset = _reset_peak_rss()
    before_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    module.build_empty(load_weights=True)
    module.shard(FSDP2Options(), mesh)
    materialize(module, module.weight_sources(load_weights=True), "cpu")
    seconds = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM")
    tensors = [*module.parameters(), *module.buffers()]
    full = sum(t.numel() * t.element_size() for t in tensors)  # global shapes (DTensor) or whole buffers
    local = sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)
    Path(f"{out}.{rank}.json").write_text(json.dumps({
        "rank": rank, "before_gb": before_kb * 1024 / GB, "peak_gb": peak_kb * 1024 / GB, "peak_reset": peak_reset,
        "full_model_gb": full / GB, "local_model_gb": local / GB, "build_s": seconds}))
    dist.barrier()
    dist.destroy_process_group()


def measure_init(size: str | None = None, world: int = 2, workdir: str | Path | None = None,
                 timeout: int = 1200, model: str = "mllm") -> dict[str, Any]:
    """Save the weights, run `world` ranks, and return the bench keys (see the module docstring)."""
    size = size or DEFAULT_SIZE[model]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        save_weights(size, root, model)
        save_s = time.perf_counter() - t0
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = root / "rss"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs = [subprocess.Popen([sys.executable, "-m", "src.bench_init", "--worker", str(r), str(world), str(port),
                                   size, str(root), str(out), model], env=env, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        errors = []
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                errors.append(err[-3000:])
        if errors:
            raise RuntimeError("bench_init worker failed:\n" + "\n".join(errors))
        ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(world)]
    growth = max(r["peak_gb"] - r["before_gb"] for r in ranks)
    full = ranks[0]["full_model_gb"]
    return {
        "init_peak_rss_gb_per_rank": growth,
        "full_model_gb": full,
        "init_rss_over_full": growth / full,
        "init_local_model_gb_per_rank": max(r["local_model_gb"] for r in ranks),
        "init_build_s": max(r["build_s"] for r in ranks),
        "init_weights_save_s": save_s,
        "init_size": size,
        "init_model": model,
        "init_world": world,
        "init_peak_reset": all(r["peak_reset"] for r in ranks),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        rank, world, port, size, weights, out, model = argv[1:8]
        worker(int(rank), int(world), int(port), size, weights, out, model)
        return {}
    from src.bench_config import MODELS

    p = argparse.ArgumentParser(prog="python -m src.bench_init", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="mllm", help="the stage built: MLLM or de-tokenizer")
    p.add_argument("--size", default=None, help="a size of the model's table in src/bench_config.py "
                                               f"(default {DEFAULT_SIZE})")
    p.add_argument("--world", type=int, default=2, help="gloo processes")
    p.add_argument("--workdir", default=None, help="where the weights are saved (default the temp dir)")
    a = p.parse_args(argv)
    result = measure_init(a.size, a.world, a.workdir, model=a.model)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
