"""LLMEngine sampling through SamplingParams: top_p keeps exactly the nucleus of the model's own
next-token distribution; unseeded requests take their seeds from torch's generator, so
torch.manual_seed makes a run repeatable and different seeds give different samples."""

import pytest
import torch

from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate

pytestmark = pytest.mark.paged

TEMPERATURE = 0.3  # llama "nano" (seed 0) here: top-1 ~0.35, top-3 ~0.51 of the mass
NUM_DRAWS = 200


@pytest.fixture(scope="module")
def model():
    return get_model("llama", "nano", seed=0)


@pytest.fixture(scope="module")
def prompt():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 512, (9,), generator=g).tolist()


def _engine(model, **options):
    return LLMEngine(model, page_size=16, num_pages=64, max_num_seqs=16, **options)


def _first_tokens(model, prompt, **params):
    """One sampled first token from each of NUM_DRAWS requests for the same prompt, seeds 0.."""
    engine = _engine(model)
    outs = engine.generate([prompt] * NUM_DRAWS, [SamplingParams(max_new_tokens=1, temperature=TEMPERATURE,
                                                                 seed=s, **params) for s in range(NUM_DRAWS)],
                           use_tqdm=False)
    return torch.tensor([o.token_ids[0] for o in outs])


def test_top_p_samples_only_the_nucleus(model, prompt):
    with torch.no_grad():  # the distribution from a plain forward: no cache, no sampler
        logits = model(torch.tensor([prompt]))[0, -1].double()
    probs, order = (logits / TEMPERATURE).softmax(-1).sort(descending=True)
    cum = probs.cumsum(0)
    assert 0.2 < probs[0] < 0.6 and cum[2] < 0.7
    nucleus = order[:3]  # top_p halfway between the top-2 and top-3 mass
    kept = _first_tokens(model, prompt, top_p=float(cum[1] + cum[2]) / 2)
    assert torch.isin(kept, nucleus).all(), f"tokens outside the nucleus {nucleus.tolist()}: {kept.unique().tolist()}"
    assert set(kept.tolist()) == set(nucleus.tolist())
    assert abs(float((kept == nucleus[0]).double().mean()) - float(probs[0] / cum[2])) < 0.1
    unfiltered = _first_tokens(model, prompt, top_p=1.0)
    assert (~torch.isin(unfiltered, nucleus)).double().mean() > 0.3


@pytest.mark.parametrize("max_decode_steps", [1, 4])
def test_tiny_top_p_is_greedy_at_every_step(model, max_decode_steps):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (4, 11, 17)]
    greedy = generate(model, prompts, 12, attn_name="sdpa")
    assert len({t for o in greedy for t in o}) >= 12
    engine = _engine(model, max_decode_steps=max_decode_steps)

    def run(top_p):
        params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_p=top_p, seed=s, ignore_eos=True)
                  for s in range(len(prompts))]
        return [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]

    assert run(1e-6) == greedy
    assert run(1.0) != greedy


@pytest.fixture(scope="module")
def sample_prompts():
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 13, 20)]
    return prompts + prompts[:1]  # the same prompt twice: two requests, two seeds


@pytest.mark.parametrize("max_decode_steps", [1, 4])
def test_unseeded_requests_follow_torch_manual_seed(model, sample_prompts, max_decode_steps):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)

    def run(torch_seed):
        torch.manual_seed(torch_seed)
        engine = _engine(model, max_decode_steps=max_decode_steps)
        return [o.token_ids for o in engine.generate(sample_prompts, params, use_tqdm=False)]

    first = run(0)
    assert run(0) == first, "torch.manual_seed(0) twice gave different samples"
    assert first[0] != first[3], "two unseeded requests for the same prompt drew the same samples"
    others = [run(s) for s in (1, 2)]
    assert all(o != first for o in others) and others[0] != others[1], "different torch seeds gave the same samples"


def test_unseeded_requests_in_one_engine_continue_the_torch_stream(model, sample_prompts):
    """Requests added later in the same run draw fresh seeds, repeatably from torch.manual_seed."""
    params = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True)

    def run():
        torch.manual_seed(7)
        engine = _engine(model)
        return [[o.token_ids for o in engine.generate(sample_prompts[:2], params, use_tqdm=False)]
                for _ in range(2)]

    a_first, a_second = run()
    assert a_first != a_second
    assert run() == [a_first, a_second]
