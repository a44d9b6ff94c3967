"""Shared test setup: no network, W&B offline, deterministic seeds."""
import os

# Set before any library import so nothing can reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs 2 workers on 2 cores) each worker computes on one thread: two workers with
# torch's default pool each would fight for the cores (measured ~15x slower steps on this machine).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
REFERENCE = ASSETS / "reference"


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE


# ---- builds shared by several test modules (each is read-only in the tests that take it) ------------------
@pytest.fixture(scope="session")
def tokenizer():
    """The tiny-llama tokenizer with the SEED-X tokens added. Modules that need another tokenizer (SEED-LLaMA's,
    the plain one) define their own `tokenizer` fixture, which overrides this one."""
    from transformers import AutoTokenizer

    from src.models.vocab import add_seedx_tokens

    tok = AutoTokenizer.from_pretrained(str(ROOT / "assets" / "tokenizers" / "tiny-llama"))
    add_seedx_tokens(tok)
    return tok


@pytest.fixture(scope="session")
def mllm(tmp_path_factory):
    """The tiny SEED-X MLLM as `src.generate` builds it (random-init twin): (generate config, stage, generator).
    Built once for test_generate, test_fidelity and test_app's checks of the decoding loop."""
    from omegaconf import OmegaConf

    from src.pipelines.mllm import MLLMGenerator
    from src.specs.inference import build_mllm
    from tests.helpers import tiny_generate_cfg

    cfg = tiny_generate_cfg(tmp_path_factory.mktemp("mllm"))
    stage = build_mllm(OmegaConf.to_container(cfg.stage, resolve=True))
    return cfg, stage, MLLMGenerator(stage.mllm, stage.vit, stage.tokenizer)
