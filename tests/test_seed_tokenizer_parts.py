"""Building blocks of the SEED tokenizer: the vector quantiser and the causal Q-Former."""

from __future__ import annotations

import pytest
import torch

from src.models.causal_qformer import CausalQFormer, CausalQFormerConfig
from src.models.vq import VectorQuantizer, VQConfig

pytestmark = pytest.mark.unit


def test_straight_through_gradients_reach_the_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(8, 4)
    vq = VectorQuantizer(VQConfig(num_codes=16, dim=4, l2_norm=False))
    x = torch.randn(5, 8)
    out = vq(encoder(x))
    # a decoder loss on the quantised vectors: with the straight-through estimator its gradient w.r.t. the
    # quantised output is passed to the encoder output unchanged
    target = torch.randn(5, 4)
    (out["quantized"] - target).pow(2).sum().backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    z = encoder(x).detach().requires_grad_(True)
    q = vq(z)["quantized"]
    g = torch.randn_like(q)
    q.backward(g)
    torch.testing.assert_close(z.grad, g)  # identity gradient
    torch.testing.assert_close(q.detach(), vq.lookup(vq.codes_of(z)).detach())  # the forward value: the code


def test_vq_loss_value_is_commitment_plus_beta_codebook():  # which term beta weighs: test_seed_tokenizer_official
    vq = VectorQuantizer(VQConfig(num_codes=4, dim=2, beta=0.25, l2_norm=False))
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    z = torch.tensor([[0.9, 0.1], [0.2, 0.0]])
    out = vq(z)
    assert out["codes"].tolist() == [1, 0]
    e = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mse = ((e - z) ** 2).mean()
    assert float(out["loss_vq"]) == pytest.approx(float(mse * 1.25))


def test_codebook_usage_counts_are_exact_on_a_constructed_batch():
    vq = VectorQuantizer(VQConfig(num_codes=4, dim=2, l2_norm=False)).train()
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]))
    # codes 0, 0, 1, 1, 1, 2 (code 3 never): the vectors sit next to those rows
    z = torch.tensor([[0.1, 0.0], [0.0, 0.2], [9.0, 0.0], [10.0, 1.0], [11.0, 0.0], [0.0, 9.5]])
    assert vq(z)["codes"].tolist() == [0, 0, 1, 1, 1, 2]
    assert vq.usage.tolist() == [2, 3, 1, 0]
    stats = vq.usage_stats()
    p = torch.tensor([2, 3, 1], dtype=torch.float64) / 6
    assert stats["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    assert stats["dead_codes"] == 1 and stats["used_codes"] == 3
    moved = vq.reset_dead_codes(torch.Generator().manual_seed(0))
    assert moved == 1 and any(torch.equal(vq.embedding.weight[3], row) for row in z)
    vq.reset_usage()
    assert vq.usage_stats()["dead_codes"] == 4
    vq.eval()
    vq(z)
    assert int(vq.usage.sum()) == 0  # only training batches count


def test_query_i_of_the_causal_qformer_does_not_attend_to_later_queries():
    torch.manual_seed(0)
    cfg = CausalQFormerConfig(num_queries=6, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, encoder_hidden_size=24, cross_attention_frequency=1)
    qf = CausalQFormer(cfg).eval()
    image = torch.randn(2, 9, 24)
    queries = qf.query_tokens.expand(2, -1, -1).clone()
    base = qf(image, queries)
    for j in range(6):
        moved = queries.clone()
        moved[:, j] += torch.randn(32)
        diff = (qf(image, moved) - base).abs().amax(dim=(0, 2))
        assert torch.all(diff[:j] == 0), f"queries before {j} saw query {j}"
        assert diff[j] > 1e-3
    # bidirectional for comparison: every query sees the change
    bi = CausalQFormer(CausalQFormerConfig(**{**cfg.__dict__, "causal": False})).eval()
    bi.load_state_dict(qf.state_dict())
    moved = queries.clone()
    moved[:, 5] += torch.randn(32)
    assert ((bi(image, moved) - bi(image, queries)).abs().amax(dim=(0, 2))[:5] > 0).all()
    assert base.shape == (2, 6, 32)
