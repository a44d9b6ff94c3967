"""`make demo`'s learning chain with fixed seeds (slow tier): the tiny twins memorise six photos end to end, and
the t2i check can fail -- with the MLLM's output features zeroed before the de-tokenizer it does."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One training run shared by the positive and the negative checks."""
    from src.demo import run

    out = tmp_path_factory.mktemp("demo")
    _, score, ckpts, data = run(out, seed=0)
    return out, score, ckpts, data


def test_the_tiny_chain_memorises_six_photos(chain):
    _, score, _, _ = chain
    assert score["recon"]["score"] >= 5, score["recon"]
    assert score["t2i"]["score"] >= 5, score["t2i"]
    assert score["chat"]["score"] >= 5, score["chat"]


def test_t2i_fails_when_the_mllm_features_are_zeroed(chain, monkeypatch):
    """Negative control: the same checkpoints and prompts, but the de-tokenizer draws from all-zero features
    instead of the MLLM's: the six captions can no longer be told apart, so t2i identification fails."""
    from src import generate
    from src.demo import run_generation, scores

    real = generate.image_decoder_of

    def zeroed(module):
        decoder = real(module)
        decode = decoder.decode
        decoder.decode = lambda features, *a, **k: decode(torch.zeros_like(features), *a, **k)
        return decoder

    monkeypatch.setattr(generate, "image_decoder_of", zeroed)
    out, score, ckpts, data = chain
    results = run_generation(out / "zeroed", data, ckpts, modes=("t2i",), seed=0)
    zeroed_score = scores(results)["t2i"]
    assert zeroed_score["score"] < 5, zeroed_score
    assert score["t2i"]["score"] >= 5  # the same check passes on the real features
