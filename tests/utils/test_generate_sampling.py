"""generate(do_sample=True) through its public API: top_p keeps exactly the nucleus of the model's own
next-token distribution, and an unseeded call is repeatable under torch.manual_seed. Both the
per-token loop (decode_window=None) and decode windows (the serving sampler) are covered."""

import pytest
import torch

from fms.utils.generation import generate

TEMPERATURE = 0.3  # llama "nano" (seed 0) here: top-1 ~0.35, top-3 ~0.51 of the mass
NUM_DRAWS = 400
WINDOWS = [None, 4]


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 512, (9,), generator=g).tolist()


@pytest.fixture(scope="module")
def next_token_probs(llama_nano, prompt):
    """The next-token distribution at TEMPERATURE from a plain forward (no cache, no sampler), descending."""
    with torch.no_grad():
        logits = llama_nano(torch.tensor([prompt]))[0, -1].double()
    probs, order = (logits / TEMPERATURE).softmax(-1).sort(descending=True)
    return probs, order


def _draws(model, prompt, window, **kwargs):
    """NUM_DRAWS first tokens: one batch of identical prompts, each row its own random draw."""
    out = generate(model, [prompt] * NUM_DRAWS, 1, do_sample=True, temperature=TEMPERATURE, seed=5,
                   decode_window=window, **kwargs)
    return torch.tensor([o[0] for o in out])


@pytest.mark.parametrize("window", WINDOWS)
def test_top_p_samples_only_the_nucleus_in_its_proportions(llama_nano, prompt, next_token_probs, window):
    probs, order = next_token_probs
    cum = probs.cumsum(0)
    assert 0.2 < probs[0] < 0.6 and cum[2] < 0.7  # not peaked: an unfiltered draw often leaves the top 3
    # top_p halfway between the top-2 and top-3 mass: the nucleus is exactly the top 3 tokens
    top_p = float(cum[1] + cum[2]) / 2
    nucleus = order[:3]
    kept = _draws(llama_nano, prompt, window, top_p=top_p)
    assert torch.isin(kept, nucleus).all(), f"tokens outside the nucleus {nucleus.tolist()}: {kept.unique().tolist()}"
    freq = torch.stack([(kept == t).double().mean() for t in nucleus])
    expected = probs[:3] / probs[:3].sum()  # ~[0.70, 0.22, 0.09]
    assert torch.allclose(freq, expected, atol=0.07), (freq, expected)
    # the same draws without top_p do leave the nucleus (about half of them)
    unfiltered = _draws(llama_nano, prompt, window, top_p=1.0)
    assert (~torch.isin(unfiltered, nucleus)).double().mean() > 0.3


@pytest.mark.parametrize("window", WINDOWS)
def test_tiny_top_p_is_greedy_at_every_step(llama_nano, window):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (4, 11, 17)]
    greedy = generate(llama_nano, prompts, 12)
    assert len({t for o in greedy for t in o}) >= 12, greedy
    for seed in range(3):
        kwargs = dict(do_sample=True, temperature=1.0, seed=seed, decode_window=window)
        assert generate(llama_nano, prompts, 12, top_p=1e-6, **kwargs) == greedy
        assert generate(llama_nano, prompts, 12, top_p=1.0, **kwargs) != greedy


@pytest.mark.parametrize("window", WINDOWS)
def test_unseeded_sampling_follows_torch_manual_seed(llama_nano, window):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 13)]

    def run(torch_seed):
        torch.manual_seed(torch_seed)
        return generate(llama_nano, prompts, 10, do_sample=True, temperature=1.0, decode_window=window)

    first = run(0)
    assert run(0) == first
    others = [run(s) for s in (1, 2, 3)]
    assert all(o != first for o in others), "different torch seeds gave the same samples"
    assert len({tuple(map(tuple, o)) for o in others}) == 3
