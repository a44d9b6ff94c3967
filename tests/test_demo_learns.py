"""`make demo`'s learning chain with fixed seeds (slow tier): the tiny twins memorise six photos end to end, the
report shows every stage and mode, and the t2i check can fail -- with the MLLM's output features zeroed before
the de-tokenizer it does. One training run serves every test here (the chain is the slow tier's longest run)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One training run shared by the positive and the negative checks, its report written as `make demo` does."""
    from src.demo import run, write_report

    out = tmp_path_factory.mktemp("demo")
    results, score, ckpts, data = run(out, seed=0)
    write_report(out, results, score, seconds=0.0)
    return out, score, ckpts, data


def test_the_report_shows_every_stage_and_mode(chain):
    out = chain[0]
    report = (out / "report.md").read_text()
    for stage in ("detok_pretrain", "detok_cond", "mllm_pretrain"):
        assert (out / f"loss_{stage}.png").is_file() and f"loss_{stage}.png" in report
        assert (out / stage / "checkpoints" / "last.ckpt").is_file()
    for mode in ("chat", "ground", "t2i", "edit"):
        assert (out / "generate" / mode / "results.jsonl").is_file() and f"### {mode}" in report
    for link in [ln.split("](")[1].rstrip(")") for ln in report.splitlines() if ln.startswith("![")]:
        assert (out / link).is_file(), link
    assert "generate/t2i/" in report and "generate/edit/" in report  # the generated images are shown


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
