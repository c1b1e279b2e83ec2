"""One bad request among good ones: a bad prompt or bad sampling parameters are refused when the
request is made (ValueError naming the value) and leave the engine untouched; odd but valid
parameters (64-bit seeds, tiny temperature / top_p) run alongside. Either way the good requests'
greedy outputs equal the reference computed without the bad one."""

import re

import numpy as np
import pytest
import torch

from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate

pytestmark = pytest.mark.paged

NEW = 6
VOCAB = 512  # llama "nano"
TOKEN_IDS = "token ids must be ints (Python or NumPy ints, or a 1-D integer tensor / NumPy array)"
SEEDS = "seed must be None or an int in [-2**63, 2**64 - 1]"


@pytest.fixture(scope="module")
def model(llama_nano):
    return llama_nano


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (4, 11, 19)]


@pytest.fixture(scope="module")
def reference(model, prompts):
    out = generate(model, prompts, NEW, attn_name="sdpa")
    assert len({t for seq in out for t in seq}) >= 8  # diverse tokens: equality can catch a mix-up
    return out


def _engine(model):
    return LLMEngine(model, page_size=16, num_pages=32, max_num_seqs=8)


def _start_good(engine, prompts) -> list:
    """Queue the good requests and run two steps, so that the bad one arrives mid-flight."""
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in prompts]
    engine.step()
    engine.step()
    return ids


def _finish(engine, ids) -> list:
    while engine.has_unfinished_requests():
        engine.step()
    return [engine.pop_output(rid) for rid in ids]


BAD_PROMPTS = [
    ([1.9, 2.2], f"{TOKEN_IDS}, got 1.9 (float) at index 0"),
    ([5, True, 6], f"{TOKEN_IDS}, got True (bool) at index 1"),
    (np.array([1.0, 2.0]), f"{TOKEN_IDS}, got dtype float64 (ndarray)"),
    (torch.tensor([[1, 2]]), "prompt must be a 1-D sequence of token ids, got shape (1, 2)"),
    ([1, VOCAB], f"prompt has token ids outside the vocabulary [0, {VOCAB}): [{VOCAB}]"),
    ([], "prompt is empty"),
    ("no tokenizer here", "got a text prompt but the engine has no tokenizer"),
]


@pytest.mark.parametrize("bad_prompt, message", BAD_PROMPTS, ids=[
    "float-ids", "bool-id", "numpy-float", "2d-tensor", "outside-vocab", "empty", "text-without-tokenizer"])
def test_bad_prompt_is_refused_at_add_request_and_the_others_run_on(model, prompts, reference, bad_prompt, message):
    engine = _engine(model)
    ids = _start_good(engine, prompts)
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request(bad_prompt, SamplingParams(max_new_tokens=NEW))
    assert set(engine.requests) == set(ids)  # nothing of the bad request stays behind
    assert [o.token_ids for o in _finish(engine, ids)] == reference


BAD_PARAMS = [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (dict(temperature=1.0, top_k=1.5), "top_k must be None (no limit) or an int >= 1, got 1.5"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p must be a number in (0, 1], got nan"),
    (dict(temperature=1.0, seed="abc"), f"{SEEDS}, got 'abc'"),
    (dict(temperature=1.0, seed=2**64), f"{SEEDS}, got {2**64}"),
    (dict(max_tokens=3, max_new_tokens=4), "max_new_tokens=4 and max_tokens=3 name the same limit"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(stop_token_ids=[2.5]), "stop_token_ids must be ints >= 0, got [2.5]"),
]


@pytest.mark.parametrize("kwargs, message", BAD_PARAMS, ids=[
    "temperature-nan", "temperature-inf", "top_k-float", "top_p-nan", "seed-str", "seed-2**64", "max_tokens-conflict",
    "max_new_tokens-0", "stop-float"])
def test_bad_sampling_params_are_refused_and_the_others_run_on(model, prompts, reference, kwargs, message):
    engine = _engine(model)
    ids = _start_good(engine, prompts)
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request(prompts[0], SamplingParams(**kwargs))
    with pytest.raises(ValueError, match="params must be a SamplingParams, got dict"):
        engine.add_request(prompts[0], kwargs)
    assert set(engine.requests) == set(ids)
    assert [o.token_ids for o in _finish(engine, ids)] == reference


ODD_PARAMS = [
    dict(temperature=1.0, seed=2**63),  # used to overflow the int64 pack and stall every later step
    dict(temperature=1.0, seed=-1),
    dict(temperature=1.0, seed=2**64 - 1),
    dict(temperature=1.0, top_k=np.int64(5), seed=np.uint64(2**63 + 9)),
    dict(temperature=1e-44, seed=1),  # greedy: used to sample the first of the infinite logits
    dict(temperature=1.0, top_p=1e-50, seed=1),  # keeps the top token: used to drop every token
]


@pytest.mark.parametrize("kwargs", ODD_PARAMS, ids=[
    "seed-2**63", "seed-minus-1", "seed-2**64-1", "numpy-values", "temperature-1e-44", "top_p-1e-50"])
def test_odd_but_valid_params_run_beside_the_others(model, prompts, reference, kwargs):
    engine = _engine(model)
    ids = _start_good(engine, prompts)
    odd = engine.add_request(prompts[1], SamplingParams(max_tokens=NEW, **kwargs))
    outs = _finish(engine, ids + [odd])
    assert [o.token_ids for o in outs[:3]] == reference
    assert outs[3].finish_reason == "length" and len(outs[3].token_ids) == NEW
    assert all(0 <= t < VOCAB for t in outs[3].token_ids)
    alone = _engine(model).generate([prompts[1]], SamplingParams(max_tokens=NEW, **kwargs), use_tqdm=False)[0]
    assert outs[3].token_ids == alone.token_ids  # seeded: the same tokens whatever else is in the batch
    if kwargs.get("temperature") == 1e-44 or kwargs.get("top_p") == 1e-50:
        assert outs[3].token_ids == reference[1]  # greedy


def test_seeds_apart_by_2_to_the_32_sample_apart(model, prompts):
    params = [SamplingParams(temperature=1.0, max_new_tokens=NEW, seed=s) for s in (1, 1 + 2**32, 1, 1 - 2**63)]
    outs = _engine(model).generate([prompts[0]] * 4, params, use_tqdm=False)
    tokens = [o.token_ids for o in outs]
    assert tokens[0] == tokens[2]  # the same seed: the same samples
    assert tokens[0] != tokens[1] and tokens[0] != tokens[3] and tokens[1] != tokens[3]
