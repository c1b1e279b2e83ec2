"""LLMEngine prefix caching serves a cached page only to a prompt that holds exactly its tokens.

Prompts that differ from a cached one at a page's last token, at the next page's first token or at
the last prompt token must give the greedy tokens of SDPA generate() run on each prompt alone, and
the engine with prefix caching off must give the same tokens as with it on.
"""

import pytest
import torch

from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate

pytestmark = pytest.mark.paged

PAGE = 16
NEW = 8
GREEDY = SamplingParams(max_new_tokens=NEW, ignore_eos=True)  # generate() has no EOS here either


@pytest.fixture(scope="module")
def model():
    return get_model("llama", "nano", seed=0)


@pytest.fixture(scope="module")
def base_prompt():
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, 512, (2 * PAGE + 8,), generator=g).tolist()  # pages 0, 1 full, 8 tokens on page 2


def _changed_at(prompt, index):
    out = list(prompt)
    out[index] = out[index] % 511 + 1  # another id in [1, 511]
    return out


# (position changed, tokens a later prompt may take from the cache after the earlier ones ran)
DIVERGENCES = [
    (PAGE - 1, 0),  # last token of page 0: no page of the first prompt is this prompt's
    (PAGE, PAGE),  # first token of page 1: page 0 only
    (2 * PAGE - 1, PAGE),  # last token of page 1: page 0 only
    (2 * PAGE + 7, 2 * PAGE),  # last prompt token: both full pages
]


@pytest.fixture(scope="module")
def prompts(base_prompt):
    return [base_prompt] + [_changed_at(base_prompt, i) for i, _ in DIVERGENCES]


@pytest.fixture(scope="module")
def reference(model, prompts):
    out = [generate(model, [p], NEW, attn_name="sdpa")[0] for p in prompts]
    # the model must answer differently to these one-token changes, or a wrong cache hit could hide
    assert len({tuple(o) for o in out}) >= 3, out
    assert all(len(set(o)) >= 4 for o in out), out
    return out


def _serve_one_by_one(engine, prompts):
    """Each prompt in its own generate() call, so every later prompt sees the earlier ones' pages."""
    return [engine.generate([p], GREEDY, use_tqdm=False)[0] for p in prompts]


def test_prompts_differing_at_page_edges_get_their_own_tokens(model, prompts, reference):
    engine = LLMEngine(model, page_size=PAGE, num_pages=32)
    outs = _serve_one_by_one(engine, prompts)
    for (index, _), out, expected in zip([(None, 0)] + DIVERGENCES, outs, reference):
        assert out.token_ids == expected, f"prompt changed at position {index}"
    assert [o.num_cached_tokens for o in outs] == [0] + [n for _, n in DIVERGENCES]


def test_a_repeated_prompt_hits_the_cache_and_keeps_its_tokens(model, prompts, reference):
    engine = LLMEngine(model, page_size=PAGE, num_pages=32)
    first, again = _serve_one_by_one(engine, [prompts[0], prompts[0]])
    assert first.token_ids == again.token_ids == reference[0]
    assert again.num_cached_tokens == 2 * PAGE
    assert engine.stats()["prefix_cache_hit_tokens"] == 2 * PAGE


def test_prefix_caching_off_gives_the_same_tokens_and_caches_nothing(model, prompts, reference):
    """A shared-prefix workload (a system prompt, then several questions) with caching on and off."""
    g = torch.Generator().manual_seed(3)
    shared = prompts[0][: 2 * PAGE + 3]
    workload = [shared + torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 6, 13, 29)]
    on = LLMEngine(model, page_size=PAGE, num_pages=32)
    off = LLMEngine(model, page_size=PAGE, num_pages=32, enable_prefix_caching=False)
    outs = {}
    for name, engine in (("on", on), ("off", off)):
        head = engine.generate(workload[:1], GREEDY, use_tqdm=False)
        rest = engine.generate(workload[1:], GREEDY, use_tqdm=False)
        outs[name] = head + rest
    assert [o.token_ids for o in outs["on"]] == [o.token_ids for o in outs["off"]]
    assert [o.token_ids for o in outs["off"]] == [generate(model, [p], NEW, attn_name="sdpa")[0] for p in workload]
    assert [o.num_cached_tokens for o in outs["on"]] == [0, 2 * PAGE, 2 * PAGE, 2 * PAGE]
    assert [o.num_cached_tokens for o in outs["off"]] == [0, 0, 0, 0]
    assert off.stats()["prefix_caching"] is False and off.stats()["prefix_cache_hit_tokens"] == 0
    assert on.stats()["prefix_cache_hit_tokens"] == 3 * 2 * PAGE
