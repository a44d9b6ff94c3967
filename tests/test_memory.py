"""The analytic memory estimate: its arithmetic, and the 13B presets fit their GPUs."""

import pytest

from src.inspect import build_on_meta, memory_estimate
from src.utils.memory import GIB, estimate_sharded_memory
from tests.helpers import compose_cfg


@pytest.mark.unit
def test_estimate_arithmetic_by_hand():
    est = estimate_sharded_memory(total_params=1000, trainable_params=100, largest_unit_params=50, world_size=4,
                                  tokens_per_gpu=10, layers=2, hidden=8, vocab=20)
    assert est.sharded_state == (900 * 4 + 100 * 16) / 4
    assert est.gathered_blocks == 2 * 50 * 2
    assert est.checkpoints == 10 * 2 * 8 * 2
    assert est.one_block == 10 * 34 * 8
    assert est.logits == 10 * 20 * 12
    assert est.total == est.sharded_state + 200 + 320 + 2720 + 2400 + 2 * GIB


@pytest.mark.config
@pytest.mark.parametrize(("preset", "gpu_gib"), [("mllm_13b_8x80g", 80), ("mllm_13b_8x40g", 40)])
def test_13b_presets_fit_with_headroom(preset, gpu_gib):
    cfg = compose_cfg("seedx_pretrain", overrides=[f"preset={preset}"])
    assert cfg.strategy._target_ == "src.parallel.FSDP2Strategy"
    est = memory_estimate(build_on_meta(cfg), cfg)
    assert 0.25 * gpu_gib < est["total"] < 0.7 * gpu_gib, est  # leave room for fragmentation and the ViT
