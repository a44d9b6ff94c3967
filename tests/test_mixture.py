"""MixtureSampler: proportions, per-source permutation walk, determinism, epochs, resumable state, errors."""

import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset

from src.data.mixture import MixtureSampler

pytestmark = pytest.mark.unit

def test_proportions_follow_weights():
    sampler = MixtureSampler([50, 30], [3.0, 1.0], num_samples=20000, seed=0)
    draws = list(sampler)
    assert len(draws) == 20000 and len(sampler) == 20000
    from_first = sum(i < 50 for i in draws) / len(draws)
    assert abs(from_first - 0.75) < 0.02
    assert all(0 <= i < 80 for i in draws)

def test_each_source_is_walked_through_a_permutation_then_cycles():
    sizes = [7, 5]
    sampler = MixtureSampler(sizes, [1.0, 1.0], num_samples=60, seed=4)
    draws = list(sampler)
    first = [i for i in draws if i < 7]
    second = [i - 7 for i in draws if i >= 7]
    for walk, size in ((first, 7), (second, 5)):
        full = len(walk) // size
        assert full >= 2
        for c in range(full):  # every complete cycle visits each sample exactly once
            assert sorted(walk[c * size:(c + 1) * size]) == list(range(size))
    assert first[:7] != first[7:14] or second[:5] != second[5:10]  # a fresh permutation per cycle

def test_deterministic_per_seed_and_epoch():
    def draws(seed, epoch):
        s = MixtureSampler([10, 20, 5], [1.0, 2.0, 0.5], num_samples=200, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert draws(0, 3) == draws(0, 3)
    assert draws(0, 3) != draws(0, 4)
    assert draws(0, 3) != draws(1, 3)

def test_finished_pass_advances_epoch_unless_set():
    s = MixtureSampler([10, 10], [1.0, 1.0], num_samples=30, seed=0)
    e0 = list(s)
    assert s.epoch == 1
    e1 = list(s)
    assert e1 != e0 and e1 == s.indices(1).tolist()
    s.set_epoch(0)
    assert list(s) == e0

def test_zero_weight_source_is_never_drawn():
    draws = list(MixtureSampler([10, 0, 10], [1.0, 0.0, 0.0], num_samples=100, seed=0))
    assert all(i < 10 for i in draws)

def test_state_round_trip_resumes_mid_epoch():
    a = MixtureSampler([13, 8], [3.0, 1.0], num_samples=50, seed=7)
    a.set_epoch(2)
    full = a.indices(2).tolist()
    it = iter(a)
    head = [next(it) for _ in range(17)]
    state = a.state_dict()
    assert state["epoch"] == 2 and state["consumed"] == 17

    b = MixtureSampler([13, 8], [3.0, 1.0], num_samples=50, seed=7)
    b.load_state_dict(state)
    b.set_epoch(2)  # Lightning calls set_epoch(current epoch) on resume: the position survives
    rest = list(b)
    assert head + rest == full
    assert b.state_dict()["epoch"] == 3 and b.state_dict()["consumed"] == 0
    assert list(b) == b.indices(3).tolist()  # then whole epochs again

def test_works_as_a_dataloader_sampler():
    data = ConcatDataset([TensorDataset(torch.arange(6)), TensorDataset(torch.arange(100, 104))])
    sampler = MixtureSampler([6, 4], [1.0, 1.0], num_samples=12, seed=0)
    expected = sampler.indices(0).tolist()
    got = [int(x) for (batch,) in DataLoader(data, batch_size=5, sampler=sampler) for x in batch]
    assert got == [int(data[i][0]) for i in expected]
    assert {i < 6 for i in expected} == {True, False}  # both sources are in play

@pytest.mark.parametrize("sizes, weights, match", [
    ([10, 10], [1.0, -1.0], "source coco has weight -1.0"),
    ([10, 10], [1.0, float("nan")], "source coco has weight nan"),
    ([10, 0], [1.0, 2.0], "source coco has weight 2.0 but no samples"),
    ([10, 10], [0.0, 0.0], "all source weights are 0"),
    ([10, 10], [1.0], "2 sizes but 1 weights"),
])
def test_weight_validation_names_the_source(sizes, weights, match):
    with pytest.raises(ValueError, match=match):
        MixtureSampler(sizes, weights, num_samples=10, seed=0, names=["laion", "coco"])

def test_unnamed_sources_are_numbered():
    with pytest.raises(ValueError, match="source #1"):
        MixtureSampler([3, 3], [1.0, -2.0], num_samples=4, seed=0)
