"""The device sampler: greedy rows, temperature, top-k / top-p filtering, counter-based noise."""

import pytest
import torch

from fms.serving.request import SamplingParams
from fms.runtime.sampler import argmax_rows, SamplingTensors, sample, uniform_noise

pytestmark = pytest.mark.paged


def _params(rows, vocab):
    return SamplingTensors.build([p for p, _ in rows], [s for _, s in rows], vocab, "cpu")


def test_greedy_rows_take_the_argmax_and_sampled_rows_follow_their_seed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    rows = [(SamplingParams(), 1), (SamplingParams(temperature=1.0), 7), (SamplingParams(), 2),
            (SamplingParams(temperature=1.0, top_k=1), 9)]
    positions = torch.tensor([3, 3, 3, 3])
    out = sample(logits, _params(rows, 50), positions)
    argmax = logits.argmax(-1)
    assert out[0] == argmax[0] and out[2] == argmax[2] and out[3] == argmax[3]  # top_k=1 is greedy
    assert torch.equal(sample(logits, None), argmax)
    # a row's draw depends on its own seed and position only, not on the other rows
    alone = sample(logits[1:2], _params(rows[1:2], 50), positions[1:2])
    assert alone[0] == out[1]


def test_sampled_frequencies_match_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    n = 20000
    rows = [(SamplingParams(temperature=0.7), 42)] * n
    out = sample(logits.expand(n, -1), _params(rows, 5), torch.arange(n))
    freq = torch.bincount(out, minlength=5).float() / n
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[3.0, 2.5, 2.0, 0.0, -1.0, -2.0]])
    n = 4000
    top_k = sample(logits.expand(n, -1), _params([(SamplingParams(temperature=2.0, top_k=2), 5)] * n, 6),
                   torch.arange(n))
    assert set(top_k.tolist()) == {0, 1}
    probs = (logits[0] / 2.0).softmax(-1)
    # the smallest set of top tokens whose mass reaches top_p
    top_p = float(probs[:3].sum()) - 1e-3
    kept = sample(logits.expand(n, -1), _params([(SamplingParams(temperature=2.0, top_p=top_p), 5)] * n, 6),
                  torch.arange(n))
    assert set(kept.tolist()) == {0, 1, 2}


def test_noise_is_uniform_and_keyed_by_seed_and_position():
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([10, 11, 10]), 100_000)
    assert bool(((u > 0) & (u < 1)).all())
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(torch.tensor([2]), torch.tensor([10]), 100_000)
    assert torch.equal(again[0], u[2])


@pytest.mark.parametrize("vocab", [100, 8192, 32000, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_equals_argmax_with_ties(vocab, dtype):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randint(-3, 4, (6, vocab), generator=g).to(dtype)  # few distinct values: many ties
    x[1] = 0  # the whole row tied
    x[2, -1] = 10  # maximum in the last column
    x[3, vocab // 3] = x[3, vocab // 2] = 10  # a tie between two blocks
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
