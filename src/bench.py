"""`python -m src.bench [--out DIR] [--steps N] [--trials R] [--device cpu|cuda] [--size tiny|small|1b] [--no-init]`.

Times, in one run, the SEED-X MLLM stage built from the real configs (experiment=seedx_pretrain_tiny plus
the size's overrides; random init, the tiny tokenizer, the bundled sample data):

(a) ``lightning_vs_bare``: step time of a Lightning Trainer (no logger, checkpointing, progress bar or
    model summary; with our ThroughputMonitor unless --no-monitor, so its cost is inside the ratio) / step
    time of a bare loop doing the same math (move batch, forward, backward, clip, optimizer.step,
    zero_grad, scheduler.step) on the same fixed batches. Goal <= 1.05.
(b) ``data_vs_model``: samples/s the MLLMDataModule train loader produces (its configured workers,
    collation included) / samples/s the bare model step consumes. Goal >= 3.
(c) ``packed_vs_padded``: non-pad tokens/s of the bare step on the same samples collated with
    data.packing=true vs false.
    Cross-check: ``lightning_vs_bare_from_overhead`` = 1 + (Lightning - bare step time with the model math
    swapped for a one-parameter loss) / bare step time: the loop's own per-step cost, which machine load
    barely moves, where the direct ratio of two ~0.2 s steps swings by several % on a shared CPU.
(d) on CUDA (or with --peak-flops): ``mfu`` = analytic model FLOPs per step (src/utils/flops.py) / the
    Lightning step time / device peak (dense bf16 table by GPU name).
(e) ``init_rss_over_full`` (src/bench_init.py): 2 gloo processes build ``--init-size`` (default 1b) as
    strategy=fsdp2 does, weights from a saved local HF folder + ViT ``.pt``: peak RSS growth per rank during
    the build / full model bytes. Goal <= 0.75 (a rank that loads the whole model is >= 1).
    ``detok_init_rss_over_full``: the same for de-tokenizer stage 1 at ``--detok-init-size`` (default
    sdxl_reduced: SDXL's UNet with fewer transformer layers, SDXL's VAE, the 1b ViT; src/bench_config.py), weights
    from a saved diffusers folder + ViT ``.pt``. Goal <= 0.75.
(g) ``generate_vs_hf`` and ``detok_vs_diffusers`` (src/bench_generation.py, CPU): tokens/s of our KV-cached
    MLLMGenerator / tokens/s of transformers ``generate`` on the same `small` Llama (same prompts, greedy, same
    length), and images/s of our de-tokenizer denoising loop / the same steps through diffusers'
    StableDiffusionXLPipeline (tiny de-tokenizer twin). Goal >= 1.0 each.
(h) ``feature_store_vs_live`` (src/bench_features.py, CPU, ``--features-size``, default small): samples/s of
    the MLLM training step fed ViT features from a feature store in MDS shards (bf16) / the same step on the
    same samples fed pixels through the frozen ViT; with the store's bytes per sample. Goal >= 1.0.
(f) ``data_samples_per_s_per_worker_fullres``: one loader worker on experiment=seedx_pretrain's data path
    (448 px views, all grids) over the bundled photos at their own sizes: data.num_workers per GPU must be
    at least the model's samples/s per GPU over this.

Noise: every round runs one trial of each kind back to back (Lightning, bare, data, packed/padded), each
repeating one fixed batch (round r: the r-th of `groups` batches of good samples) after its own warm-up
steps; a trial's step time is the median start-to-start period of its steps (CPU; on CUDA the synced
window mean), and every figure is the median over rounds of per-round values, so load from other
processes hits both sides of a ratio alike. Trainable weights are restored before each trial. On CPU the bench pins torch to `--threads` intra-op threads (default 1): the tiny model gains
nothing from more, and on a shared machine spinning OpenMP threads make 2-thread timings swing 10x.

Writes ``<out>/bench.json`` and ``<out>/bench.md``, prints the table, and prints as its last line one JSON
object with (at least) lightning_vs_bare, data_vs_model and packed_vs_padded.
"""

from __future__ import annotations

import src.bootstrap  # noqa: F401  (environment defaults: before any library reads them)

# isort: split

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import contextlib
import itertools
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, open_dict
from torch.utils.data import DataLoader

from src.bench_config import DETOK_SIZES, EXPERIMENT, SIZES, compose_bench_cfg
from src.stages.base import build_lr_scheduler, param_groups
from src.utils.config import CONF_DIR
from src.utils.flops import device_peak_flops

GOALS: dict[str, tuple[str, float | None]] = {
    "lightning_vs_bare": ("<=", 1.05),
    "data_vs_model": (">=", 3.0),
    "packed_vs_padded": ("report", None),
    "mfu": ("report", None),
    "init_rss_over_full": ("<=", 0.75),
    "detok_init_rss_over_full": ("<=", 0.75),
    "data_samples_per_s_per_worker_fullres": ("report", None),
    "generate_vs_hf": (">=", 1.0),
    "detok_vs_diffusers": (">=", 1.0),
    "feature_store_vs_live": (">=", 1.0),
}

log = logging.getLogger(__name__)


# ---- build -------------------------------------------------------------------------------------------
def _identity(x):
    return x


def _to_device(batch, device: torch.device):
    """A batch (src/data/batch.py dataclass, or a dict) with its tensors on ``device``, as Lightning moves it."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def _clock(device: torch.device, sync: bool) -> float:
    if sync and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def good_sample_groups(dm, n_groups: int) -> list[list[dict]]:
    """`n_groups` groups of `batch_size` good samples of the train set, in order (cycled if short)."""
    order = list(range(len(dm.train_set)))
    need = n_groups * dm.batch_size
    samples: list[dict] = []
    for i in range(len(order) * max(2, need)):
        s = dm.train_set[order[i % len(order)]]
        if "skipped" not in s:
            samples.append(s)
        if len(samples) == need:
            break
        if i >= len(order) and not samples:
            raise RuntimeError("the train sources have no good sample")
    return [samples[g * dm.batch_size:(g + 1) * dm.batch_size] for g in range(n_groups)]


def timed_indices(warmup: int, steps: int, device: torch.device) -> set[int]:
    """Batch starts to clock: every one of the window on CPU, only its two ends on CUDA (synced there)."""
    if device.type == "cuda":
        return {warmup, warmup + steps}
    return set(range(warmup, warmup + steps + 1))


def step_time(times: dict[int, float], warmup: int, steps: int) -> float:
    """Median start-to-start period on CPU (robust to a descheduled step); the window mean on CUDA."""
    idx = sorted(times)
    if len(idx) == 2:
        return (times[idx[1]] - times[idx[0]]) / steps
    return _median([times[b] - times[a] for a, b in itertools.pairwise(idx)])


class _StepClock(L.Callback):
    """Host time at the start of chosen training batches (CUDA synced there only)."""

    def __init__(self, indices: set[int], device: torch.device) -> None:
        self.indices = indices
        self.device = device
        self.times: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx in self.indices:
            self.times[batch_idx] = _clock(self.device, sync=True)


class Bench:
    def __init__(self, cfg: DictConfig, device: str, warmup: int, steps: int, with_monitor: bool = True) -> None:
        self.cfg = cfg
        self.with_monitor = with_monitor
        self.device = torch.device(device)
        self.warmup, self.steps = warmup, steps
        self.precision = str(cfg.trainer.precision)
        self.clip = cfg.trainer.get("gradient_clip_val")
        if self.precision not in ("32-true", "32", "bf16-mixed"):
            raise ValueError(f"bench supports trainer.precision 32-true or bf16-mixed, got {self.precision}")
        self.module = hydra.utils.instantiate(cfg.stage, _convert_="all")
        self.module.configure_model()
        self.module.to(self.device)
        self.initial = {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}
        self.dm = hydra.utils.instantiate(cfg.data)
        self.dm.setup("fit")

    # one trial = warmup + steps + 1 batch starts: the time between start[warmup] and start[warmup+steps]
    def trial_batches(self, groups_batches: list[dict]) -> list[dict]:
        n = self.warmup + self.steps + 1
        return [groups_batches[i % len(groups_batches)] for i in range(n)]

    def _restore(self) -> None:
        with torch.no_grad():
            for n, p in self.module.named_parameters():
                if n in self.initial:
                    p.copy_(self.initial[n])
                p.grad = None

    def _autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lightning_trial(self, batches: list[dict]) -> float:
        self._restore()
        clock = _StepClock(timed_indices(self.warmup, self.steps, self.device), self.device)
        trainer = L.Trainer(
            accelerator=self.device.type, devices=1, precision=self.precision, max_steps=len(batches),
            max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, gradient_clip_val=self.clip, num_sanity_val_steps=0,
            limit_val_batches=0, callbacks=[clock, *self.extra_callbacks()],
            default_root_dir=self.cfg.paths.output_dir,
        )
        loader = DataLoader(batches, batch_size=None, shuffle=False, collate_fn=_identity)
        trainer.fit(self.module, train_dataloaders=loader)
        return step_time(clock.times, self.warmup, self.steps)

    def extra_callbacks(self) -> list[L.Callback]:
        """Our ThroughputMonitor (as configured in conf/callbacks/default.yaml), logging once per trial."""
        if not self.with_monitor:
            return []
        from src.callbacks.throughput import ThroughputMonitor

        return [ThroughputMonitor(log_every_n_steps=max(self.steps, 1))]

    def bare_trial(self, batches: list[dict]) -> float:
        """The same math as Lightning's automatic optimisation, written out."""
        self._restore()
        module = self.module
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        wd = float(getattr(module.optimizer_factory, "keywords", {}).get("weight_decay", 0.0))
        optimizer = module.optimizer_factory(param_groups(module.trainable_named_parameters(), wd))
        sc = module.scheduler_cfg
        scheduler = build_lr_scheduler(optimizer, sc.get("name", "cosine"), int(sc.get("warmup_steps", 0)),
                                       len(batches), float(sc.get("min_lr_ratio", 0.0)))
        timed = timed_indices(self.warmup, self.steps, self.device)
        times = {}
        for i, batch in enumerate(batches):
            if i in timed:
                times[i] = _clock(self.device, sync=True)
            batch = _to_device(batch, self.device)
            with torch.enable_grad(), self._autocast():
                loss = module.compute_losses(batch, "train")["loss"]
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(params, float(self.clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        return step_time(times, self.warmup, self.steps)

    @contextlib.contextmanager
    def trivial_loss(self):
        """Swap the model math for a one-parameter loss: what is left of a step is the loop's own cost."""
        module = self.module
        param = next(p for p in module.parameters() if p.requires_grad)

        def compute_losses(batch, split):
            loss = (param.float() ** 2).mean()
            return {"loss": loss, "loss_ce": loss.detach(), "loss_mse": loss.detach()}

        module.compute_losses = compute_losses
        try:
            yield
        finally:
            del module.compute_losses  # back to the class method

    def data_trial(self, loader) -> tuple[float, int]:
        """(seconds, good samples) for one epoch of the datamodule's train loader, iterator start included."""
        t0 = time.perf_counter()
        samples = sum(int(b["batch_size"]) for b in loader)
        return time.perf_counter() - t0, samples


# ---- full-resolution data path ------------------------------------------------------------------------
FULLRES_EXPERIMENT = "seedx_pretrain"


def fullres_data_rate(workdir: Path, batches: int = 4, batch_size: int = 8) -> dict[str, Any]:
    """Samples/s of ONE loader worker on the full-size any-resolution path: experiment=seedx_pretrain's data
    config (448 px ViT views, its grids, max_length) over the bundled photos at their own sizes (300-1411
    px, JPEG), with the tiny tokenizer (tokenising is not what is measured). The first batch (worker start)
    is not timed. A cluster needs data.num_workers >= (model samples/s per GPU) / this."""
    from hydra import compose, initialize_config_dir

    from data_prep.make_sample_data import PHOTOS, jpeg_bytes, load_photo

    workdir.mkdir(parents=True, exist_ok=True)
    lines, pixels = [], []
    for name, (_, _, caption) in PHOTOS.items():
        im = load_photo(name, max_side=None)
        pixels.append(im.size[0] * im.size[1])
        (workdir / f"{name}.jpg").write_bytes(jpeg_bytes(im))
        lines.append(json.dumps({"id": f"fullres/{name}", "source": "fullres", "turns": [
            {"role": None, "content": [{"image": f"{name}.jpg"}, {"text": caption}]}]}))
    (workdir / "fullres.jsonl").write_text("\n".join(lines) + "\n")
    n = batch_size * (batches + 1)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"experiment={FULLRES_EXPERIMENT}", "model.llm.tokenizer=${paths.root_dir}/assets/tokenizers/tiny-llama",
            f"data.train_sources=[{{path: '{workdir / 'fullres.jsonl'}', kind: jsonl, name: fullres}}]",
            "data.num_workers=1", f"data.batch_size={batch_size}", f"data.samples_per_epoch={n}"])
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up and first decode: not the steady rate
    t0 = time.perf_counter()
    samples = sum(int(b["batch_size"]) for b in it)
    seconds = time.perf_counter() - t0
    del it
    return {"data_samples_per_s_per_worker_fullres": samples / seconds,
            "fullres_mean_megapixels": sum(pixels) / len(pixels) / 1e6,
            "fullres_vit_image_size": int(cfg.data.vit_image_size), "fullres_grids": len(cfg.data.grids)}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ---- the run --------------------------------------------------------------------------------------------
def run_bench(
    out: str | Path = "outputs/bench",
    steps: int = 8,
    trials: int = 10,
    warmup: int = 2,
    device: str = "cpu",
    size: str = "tiny",
    threads: int | None = None,
    data_batches: int = 8,
    groups: int = 4,
    peak_flops: float | None = None,
    overrides: list[str] = (),
    with_monitor: bool = True,
    quiet: bool = True,
    init_size: str | None = "1b",
    init_world: int = 2,
    libraries: bool = True,
    features_size: str | None = "small",
    detok_init_size: str | None = "sdxl_reduced",
) -> dict[str, Any]:
    if steps < 1 or trials < 1 or warmup < 0:
        raise ValueError("--steps and --trials must be >= 1, --warmup >= 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: CUDA is not available here")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads or 1)
    pl_log = logging.getLogger("lightning.pytorch")
    old_level = pl_log.level
    if quiet:
        pl_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return _run(out, steps=steps, trials=trials, warmup=warmup, device=device, size=size,
                        data_batches=data_batches, n_groups=groups, peak_flops=peak_flops,
                        overrides=list(overrides), with_monitor=with_monitor, init_size=init_size,
                        init_world=init_world, libraries=libraries, features_size=features_size,
                        detok_init_size=detok_init_size)
    finally:
        torch.set_num_threads(old_threads)
        pl_log.setLevel(old_level)


def _run(out: Path, *, steps, trials, warmup, device, size, data_batches, n_groups, peak_flops, overrides,
         with_monitor, init_size, init_world, libraries, features_size=None,
         detok_init_size=None) -> dict[str, Any]:
    t_start = time.perf_counter()
    cfg = compose_bench_cfg(out, size, device, overrides)
    L.seed_everything(int(cfg.seed), verbose=False)
    with open_dict(cfg):
        cfg.data.samples_per_epoch = int(cfg.data.batch_size) * data_batches  # one data trial = one epoch
    b = Bench(cfg, device, warmup, steps, with_monitor=with_monitor)
    dm = b.dm
    groups = good_sample_groups(dm, n_groups)
    from src.data.mllm_collate import MLLMCollator

    collate = {
        mode: MLLMCollator(dm.tokenizer.pad_token_id, dm.max_length, packing=mode == "packed",
                           vit_image_size=dm.vit_image_size)
        for mode in ("padded", "packed")
    }
    fixed = {mode: [c(g) for g in groups] for mode, c in collate.items()}
    configured = "packed" if dm.packing else "padded"
    other = "padded" if configured == "packed" else "packed"
    flops = [float(b.module.flops_per_batch(_to_device(bt, b.device))) for bt in fixed[configured]]

    loader = dm.train_dataloader()
    b.data_trial(loader)  # warm-up epoch (worker start-up, file caches)

    keys = ("lightning_step_s", "bare_step_s", f"{other}_step_s", "data_samples_per_s", "model_samples_per_s",
            "packed_tokens_per_s", "padded_tokens_per_s", "model_tflops_per_s", "loop_overhead_s")
    raw: dict[str, list[float]] = {k: [] for k in keys}
    ratios: dict[str, list[float]] = {"lightning_vs_bare": [], "data_vs_model": [], "packed_vs_padded": []}
    for r in range(trials):
        # Round r repeats one fixed batch (group r mod n): homogeneous steps, so the per-step median is the
        # step time, and both sides of every ratio see the same samples.
        g = r % len(groups)
        run = {mode: b.trial_batches([fixed[mode][g]]) for mode in fixed}
        samples, tokens = fixed[configured][g]["batch_size"], fixed["padded"][g]["num_tokens"]
        assert tokens == fixed["packed"][g]["num_tokens"]
        if r % 2 == 0:  # alternate which side goes first, so a trend in the machine's load cancels
            t_l = b.lightning_trial(run[configured])
            t_b = b.bare_trial(run[configured])
        else:
            t_b = b.bare_trial(run[configured])
            t_l = b.lightning_trial(run[configured])
        d_time, d_samples = b.data_trial(loader)
        t_o = b.bare_trial(run[other])
        with b.trivial_loss():
            overhead = b.lightning_trial(run[configured]) - b.bare_trial(run[configured])
        step = {configured: t_b, other: t_o}
        for k, v in (("lightning_step_s", t_l), ("bare_step_s", t_b), (f"{other}_step_s", t_o),
                     ("data_samples_per_s", d_samples / d_time), ("model_samples_per_s", samples / t_b),
                     ("packed_tokens_per_s", tokens / step["packed"]),
                     ("padded_tokens_per_s", tokens / step["padded"]),
                     ("model_tflops_per_s", flops[g] / t_l / 1e12), ("loop_overhead_s", overhead)):
            raw[k].append(v)
        ratios["lightning_vs_bare"].append(t_l / t_b)
        ratios["data_vs_model"].append((d_samples / d_time) / (samples / t_b))
        ratios["packed_vs_padded"].append(step["padded"] / step["packed"])  # same tokens: time ratio
        log.info("round %d (batch %d): lightning %.4fs bare %.4fs %s %.4fs data %.1f samples/s", r, g, t_l, t_b,
                 other, t_o, d_samples / d_time)

    med = {k: _median(v) for k, v in raw.items()}
    dtype = torch.bfloat16 if "bf16" in b.precision else torch.float32
    peak = peak_flops if peak_flops is not None else device_peak_flops(b.device, dtype)
    result: dict[str, Any] = {
        "lightning_vs_bare": _median(ratios["lightning_vs_bare"]),
        "data_vs_model": _median(ratios["data_vs_model"]),
        "packed_vs_padded": _median(ratios["packed_vs_padded"]),
        "mfu": med["model_tflops_per_s"] * 1e12 / peak if peak else None,
        **{k: med[k] for k in keys if k != f"{other}_step_s"},
        "model_flops_per_step": _mean(flops),
        # Noise-robust cross-check of (a): the loop's own cost per step (trivial loss, same batches) over
        # the bare model step.
        "lightning_vs_bare_from_overhead": 1.0 + med["loop_overhead_s"] / med["bare_step_s"],
        "peak_flops": peak,
        "device": torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "cpu",
        "size": size,
        "precision": b.precision,
        "threads": torch.get_num_threads() if b.device.type == "cpu" else None,
        "batch_size": int(dm.batch_size),
        "num_workers": int(dm.num_workers),
        "packing_configured": bool(dm.packing),
        "rows_padded": _mean([bt["input_ids"].shape[0] for bt in fixed["padded"]]),
        "rows_packed": _mean([bt["input_ids"].shape[0] for bt in fixed["packed"]]),
        "width_padded": _mean([bt["input_ids"].shape[1] for bt in fixed["padded"]]),
        "width_packed": _mean([bt["input_ids"].shape[1] for bt in fixed["packed"]]),
        "tokens_per_step": _mean([bt["num_tokens"] for bt in fixed["padded"]]),
        "steps": steps, "trials": trials, "warmup": warmup, "lightning_with_throughput_monitor": with_monitor,
        "per_round": {**ratios, **raw},
    }
    result.update(fullres_data_rate(out / "fullres"))
    from src.bench_init import measure_init

    if init_size:
        result.update(measure_init(init_size, init_world, workdir=out))
    if detok_init_size:
        detok = measure_init(detok_init_size, init_world, workdir=out, model="detok")
        result.update({f"detok_{k}": v for k, v in detok.items()})
    if libraries:
        result.update(library_ratios(out, rounds=min(trials, 5)))
    if features_size:
        result.update(feature_store_ratio(out / "features", features_size, rounds=min(trials, 3)))
    result["wall_s"] = time.perf_counter() - t_start
    write_report(out, result)
    return result


def library_ratios(out: Path, rounds: int = 5) -> dict[str, Any]:
    """(g): our generation paths against the libraries' own (src/bench_generation.py), CPU, `rounds` medians."""
    from src.bench_generation import compose_detok, detok_vs_diffusers, generate_vs_hf

    return {**generate_vs_hf(compose_bench_cfg(out / "generate", "small", "cpu"), rounds=rounds),
            **detok_vs_diffusers(compose_detok(out / "detok"), rounds=rounds)}


def feature_store_ratio(out: Path, size: str, rounds: int = 3) -> dict[str, Any]:
    """(h): the MLLM step fed a feature store in shards / fed pixels through the frozen ViT (src/bench_features.py)."""
    from src.bench_features import feature_store_vs_live

    cfg = compose_bench_cfg(out, size, "cpu")
    return feature_store_vs_live(cfg, EXPERIMENT, SIZES[size], out, rounds=rounds)


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs)


# ---- report ---------------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(result: dict[str, Any]) -> str:
    rows = [
        ("lightning_vs_bare", "Lightning step time / bare-loop step time"),
        ("data_vs_model", "data loader samples/s / model step samples/s"),
        ("packed_vs_padded", "non-pad tokens/s, packing=true / false"),
        ("mfu", "model FLOPs / Lightning step time / device peak"),
        ("init_rss_over_full", "peak RSS growth per rank during the sharded build / full model bytes"),
        ("detok_init_rss_over_full", "the same for de-tokenizer stage 1 (detok_init_size)"),
        ("data_samples_per_s_per_worker_fullres", "one loader worker, full-size any-res path, photos at own size"),
        ("generate_vs_hf", "tokens/s, our MLLMGenerator / transformers generate (same Llama, prompts, greedy)"),
        ("detok_vs_diffusers", "images/s, our denoise loop / diffusers SDXL pipeline loop (same steps)"),
        ("feature_store_vs_live", "MLLM step samples/s, fed stored ViT features (MDS shards) / fed pixels via the ViT"),
    ]
    lines = ["| metric | value | goal | met | what |", "|---|---|---|---|---|"]
    for key, what in rows:
        op, goal = GOALS[key]
        v = result.get(key)
        if goal is None or v is None:
            goal_s, met = ("report" if goal is None else f"{op} {goal:g}"), ""
        else:
            met = "yes" if (v <= goal if op == "<=" else v >= goal) else "no"
            goal_s = f"{op} {goal:g}"
        lines.append(f"| {key} | {_fmt(v)} | {goal_s} | {met} | {what} |")
    details = (
        ("lightning_vs_bare_from_overhead", "1 + loop_overhead_s / bare_step_s (noise-robust cross-check)"),
        ("loop_overhead_s", "Lightning - bare step time with a trivial loss (the loop's own cost)"),
        ("lightning_step_s", "Lightning step"), ("bare_step_s", "bare-loop step"),
        ("data_samples_per_s", "train loader, configured workers"), ("model_samples_per_s", "bare step"),
        ("packed_tokens_per_s", "non-pad tokens/s"), ("padded_tokens_per_s", "non-pad tokens/s"),
        ("model_flops_per_step", "analytic, src/utils/flops.py"), ("model_tflops_per_s", "Lightning step"),
        ("init_peak_rss_gb_per_rank", "src/bench_init.py, fsdp2 over init_world gloo ranks"),
        ("full_model_gb", "init_size's parameters + buffers"), ("init_build_s", "meta build + shard + fill"),
        ("detok_init_peak_rss_gb_per_rank", "de-tokenizer, fsdp2 over init_world gloo ranks"),
        ("detok_full_model_gb", "detok_init_size's parameters + buffers"),
        ("feature_store_bytes_per_sample", "feature store in shards, src/bench_features.py"),
        ("feature_store_data_samples_per_s", "samples built from the store by id (one process)"),
        ("feature_live_data_samples_per_s", "samples built from pixels (one process)"),
    )
    for key, what in details:
        lines.append(f"| {key} | {_fmt(result.get(key))} | | | {what} |")
    ctx = ", ".join(f"{k}={_fmt(result.get(k))}" for k in ("device", "size", "precision", "threads", "batch_size",
                                                           "num_workers", "rows_padded", "width_padded",
                                                           "rows_packed", "width_packed",
                                                           "steps", "trials", "init_size", "detok_init_size",
                                                           "init_world"))
    return "\n".join(lines) + f"\n\nmedians over {result['trials']} interleaved rounds; {ctx}\n"


def write_report(out: Path, result: dict[str, Any]) -> None:
    from src.utils.run import atomic_write_text

    safe = json.loads(json.dumps(result, default=str), parse_constant=lambda c: None)
    atomic_write_text(out / "bench.json", json.dumps(safe, indent=2) + "\n")
    atomic_write_text(out / "bench.md", "# src.bench\n\n" + markdown_table(result))


def headline(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("lightning_vs_bare", "data_vs_model", "packed_vs_padded", "mfu", "lightning_vs_bare_from_overhead",
            "loop_overhead_s", "lightning_step_s", "bare_step_s",
            "data_samples_per_s", "model_samples_per_s", "packed_tokens_per_s", "padded_tokens_per_s",
            "model_tflops_per_s", "init_peak_rss_gb_per_rank", "full_model_gb", "init_rss_over_full",
            "detok_init_peak_rss_gb_per_rank", "detok_full_model_gb", "detok_init_rss_over_full",
            "data_samples_per_s_per_worker_fullres", "generate_vs_hf", "detok_vs_diffusers",
            "generate_ours_tokens_per_s", "generate_hf_tokens_per_s", "detok_ours_images_per_s",
            "detok_diffusers_images_per_s", "feature_store_vs_live", "feature_store_samples_per_s",
            "feature_live_samples_per_s", "feature_store_bytes_per_sample", "device", "size")
    return {k: (None if isinstance(result.get(k), float) and not math.isfinite(result[k]) else result.get(k))
            for k in keys}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m src.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="outputs/bench")
    p.add_argument("--steps", type=int, default=8, help="timed steps per trial")
    p.add_argument("--trials", type=int, default=10, help="interleaved rounds (medians)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every trial")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default 1)")
    p.add_argument("--data-batches", type=int, default=8, help="batches per data-loader trial")
    p.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU (any device)")
    p.add_argument("--no-monitor", action="store_true", help="Lightning trials without our ThroughputMonitor")
    p.add_argument("--init-size", choices=sorted(SIZES), default="1b",
                   help="size whose sharded build is measured (src/bench_init.py)")
    p.add_argument("--init-world", type=int, default=2, help="gloo processes of the sharded build")
    p.add_argument("--detok-init-size", choices=sorted(DETOK_SIZES), default="sdxl_reduced",
                   help="de-tokenizer size whose sharded build is measured (src/bench_init.py --model detok)")
    p.add_argument("--no-init", action="store_true", help="skip the sharded-build memory measurements")
    p.add_argument("--no-libraries", action="store_true", help="skip generate_vs_hf and detok_vs_diffusers")
    p.add_argument("--features-size", choices=sorted(SIZES), default="small",
                   help="model size of feature_store_vs_live (src/bench_features.py)")
    p.add_argument("--no-features", action="store_true", help="skip feature_store_vs_live")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.num_workers=2")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_bench(a.out, steps=a.steps, trials=a.trials, warmup=a.warmup, device=a.device, size=a.size,
                       threads=a.threads, data_batches=a.data_batches, peak_flops=a.peak_flops,
                       overrides=a.overrides, with_monitor=not a.no_monitor,
                       init_size=None if a.no_init else a.init_size, init_world=a.init_world,
                       detok_init_size=None if a.no_init else a.detok_init_size,
                       libraries=not a.no_libraries, features_size=None if a.no_features else a.features_size)
    print(markdown_table(result))
    print(f"wrote {Path(a.out) / 'bench.json'} and {Path(a.out) / 'bench.md'}")
    print(json.dumps(headline(result)))
    return result


if __name__ == "__main__":
    main()
