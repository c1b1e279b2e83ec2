"""SamplingParams validation (every refusal names the parameter and the value) and the decisions the
docstring documents: 64-bit seeds, tiny temperatures greedy, top_p floored, max_tokens as an alias."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from fms.runtime.sampler import SamplingTensors, sample, seed_bits, uniform_noise
from fms.runtime.sampling_params import MIN_TOP_P, SamplingParams
from fms.serving.request import Request

ALLOWED_SEEDS = "seed must be None or an int in [-2**63, 2**64 - 1]"


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0 (0 = greedy), got -0.5"),
    (dict(temperature="hot"), "temperature must be a finite number >= 0 (0 = greedy), got 'hot'"),
    (dict(temperature=True), "got True"),
    (dict(top_k=1.5), "top_k must be None (no limit) or an int >= 1, got 1.5"),
    (dict(top_k=0), "top_k must be None (no limit) or an int >= 1, got 0"),
    (dict(top_k=True), "top_k must be None (no limit) or an int >= 1, got True"),
    (dict(top_p=float("nan")), "top_p must be a number in (0, 1], got nan"),
    (dict(top_p=0.0), "top_p must be a number in (0, 1], got 0.0"),
    (dict(top_p=1.01), "top_p must be a number in (0, 1], got 1.01"),
    (dict(seed="abc"), f"{ALLOWED_SEEDS}, got 'abc'"),
    (dict(seed=1.0), f"{ALLOWED_SEEDS}, got 1.0"),
    (dict(seed=True), f"{ALLOWED_SEEDS}, got True"),
    (dict(seed=2**64), f"{ALLOWED_SEEDS}, got {2**64}"),
    (dict(seed=-(2**63) - 1), f"{ALLOWED_SEEDS}, got {-(2**63) - 1}"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 1, got 2.0"),
    (dict(max_tokens=0), "max_tokens must be an int >= 1, got 0"),
    (dict(max_tokens="8"), "max_tokens must be an int >= 1, got '8'"),
    (dict(max_tokens=8, max_new_tokens=9), "max_new_tokens=9 and max_tokens=8 name the same limit: give one of them"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids must be ints >= 0, got [1.5]"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be ints >= 0, got [True]"),
    (dict(stop_token_ids=3), "stop_token_ids must be a sequence of token ids, got 3"),
])
def test_bad_values_are_refused_naming_parameter_and_value(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SamplingParams(**kwargs)


def test_numpy_values_are_accepted_as_python_numbers():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(4), top_p=np.float64(0.9), seed=np.uint64(7),
                       max_new_tokens=np.int32(3), stop_token_ids=np.array([2, 5]))
    assert (p.temperature, p.top_k, p.top_p, p.seed, p.max_new_tokens, p.stop_token_ids) == (0.5, 4, 0.9, 7, 3, (2, 5))
    assert all(type(v) is int for v in (p.top_k, p.seed, p.max_new_tokens, *p.stop_token_ids))


def test_max_tokens_is_vllms_name_for_max_new_tokens():
    assert SamplingParams().max_new_tokens == 16
    assert SamplingParams(max_tokens=8).max_new_tokens == 8
    assert SamplingParams(max_tokens=8, max_new_tokens=8) == SamplingParams(max_new_tokens=8)
    # replace() keeps working: max_tokens is an init-only alias, not a stored field
    assert replace(SamplingParams(max_tokens=8), max_new_tokens=3).max_new_tokens == 3


def test_temperatures_below_the_minimum_are_greedy():
    for t in (1e-44, 5e-324, 9.9e-6):
        p = SamplingParams(temperature=t, seed=3)
        assert p.temperature == 0.0 and p.is_greedy
    assert SamplingParams(temperature=1e-5).temperature == 1e-5


def _tensors(params, seeds, vocab):
    return SamplingTensors.build(params, seeds, vocab, "cpu")


def test_tiny_temperature_and_top_p_rows_take_the_argmax_among_sampled_rows():
    # before: T = 1e-44 turned the logits into inf / nan and sampled token 0; top_p = 1e-50 became
    # 0 in float32 and dropped every token (token 0 again). The argmax here is token 7, not 0.
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 64, generator=g)
    logits[:, 0], logits[:, 7] = 2.0, 4.0  # logits / 1e-44: both inf, and argmax took the first
    params = [SamplingParams(temperature=1e-44), SamplingParams(temperature=1.0, top_p=1e-50),
              SamplingParams(temperature=1.0)]
    assert params[1].top_p == MIN_TOP_P
    for pos in range(20):
        out = sample(logits, _tensors(params, [11, 12, 13], 64), torch.full((3,), pos))
        assert out[:2].tolist() == [7, 7]


def test_seeds_that_differ_above_bit_32_sample_apart():
    # before: the sampler masked seeds to 32 bits, so 1 and 1 + 2**32 drew the same noise
    positions = torch.arange(50)
    a = uniform_noise(torch.full((50,), 1), positions, 1000)
    b = uniform_noise(torch.full((50,), 1 + 2**32), positions, 1000)
    assert (a != b).float().mean() > 0.99
    logits = torch.zeros(50, 1000)  # uniform distribution: every draw is the noise's argmax
    params = [SamplingParams(temperature=1.0)] * 50
    draws = [sample(logits, _tensors(params, [s] * 50, 1000), positions) for s in (1, 1 + 2**32, 1 + 2**40, 2**63 + 1)]
    for i in range(len(draws)):
        for j in range(i):
            assert (draws[i] != draws[j]).sum() > 40, (i, j)


@pytest.mark.parametrize("seed", [2**63, -1, 2**64 - 1, -(2**63), 2**63 - 1])
def test_seeds_across_the_64_bit_range_pack_and_sample(seed):
    p = SamplingParams(temperature=1.0, seed=seed)
    tensors = _tensors([p, p], [seed, seed], 100)
    assert tensors.seeds.dtype == torch.int64
    logits = torch.zeros(2, 100)
    out = sample(logits, tensors, torch.tensor([5, 5]))
    assert out[0] == out[1] and 0 <= int(out[0]) < 100


def test_seed_bits_is_the_64_bit_pattern():
    assert seed_bits(0) == 0 and seed_bits(2**63 - 1) == 2**63 - 1
    assert seed_bits(2**63) == -(2**63) and seed_bits(2**64 - 1) == -1 and seed_bits(-1) == -1
    assert seed_bits(2**64) == 0 and seed_bits(2**64 + 5) == 5  # generate()'s seed + row wraps


def test_request_checks_an_explicit_seed_and_draws_unseeded_ones_from_torch():
    with pytest.raises(ValueError, match=re.escape(f"{ALLOWED_SEEDS}, got 'x'")):
        Request("r", [1], SamplingParams(), seed="x")
    torch.manual_seed(123)
    first = Request("a", [1], SamplingParams(temperature=1.0)).seed
    torch.manual_seed(123)
    assert Request("b", [1], SamplingParams(temperature=1.0)).seed == first
    assert Request("c", [1], SamplingParams(temperature=1.0, seed=2**63)).seed == 2**63
