"""Caller token ids (fms.runtime.inputs) and generate()'s argument checks: what is accepted, and each bad
input refused with a message naming the value."""

import re

import numpy as np
import pytest
import torch

from fms.runtime.inputs import as_int, eos_token_ids, prompt_batch, prompt_token_ids
from fms.utils.generation import generate

VOCAB = 512  # llama "nano"


@pytest.mark.parametrize("prompt", [
    [3, 1, 4],
    (3, 1, 4),
    [np.int64(3), np.int32(1), np.uint8(4)],
    np.array([3, 1, 4], dtype=np.int32),
    np.array([3, 1, 4], dtype=np.uint16),
    torch.tensor([3, 1, 4]),
    torch.tensor([3, 1, 4], dtype=torch.int32),
    [torch.tensor(3), torch.tensor(1), torch.tensor(4)],
], ids=["list", "tuple", "numpy-scalars", "numpy-int32", "numpy-uint16", "tensor", "tensor-int32", "0d-tensors"])
def test_integer_prompts_become_python_int_lists(prompt):
    ids = prompt_token_ids(prompt, VOCAB)
    assert ids == [3, 1, 4] and all(type(t) is int for t in ids)


@pytest.mark.parametrize("prompt, message", [
    ([1.9, 2.2], "got 1.9 (float) at index 0"),
    ([1, 2.0], "got 2.0 (float) at index 1"),
    ([True, 2], "got True (bool) at index 0"),
    ([1, np.bool_(False)], "got False (bool) at index 1"),
    ([1, np.float32(2)], "got 2.0 (float32) at index 1"),
    ([1, "2"], "got '2' (str) at index 1"),
    ([1, None], "got None (NoneType) at index 1"),
    (torch.tensor([1.0, 2.0]), "got dtype torch.float32 (Tensor)"),
    (torch.tensor([True, False]), "got dtype torch.bool (Tensor)"),
    (np.array([1.5, 2.5]), "got dtype float64 (ndarray)"),
    (torch.tensor([[1, 2]]), "must be a 1-D sequence of token ids, got shape (1, 2)"),
    (np.array([[1, 2]]), "must be a 1-D sequence of token ids, got shape (1, 2)"),
    ("hello", "got text 'hello' (str): encode it with a tokenizer first"),
    (7, "must be a sequence of token ids, got 7 (int)"),
    ([], "prompt is empty"),
    ([1, VOCAB], rf"outside the vocabulary [0, {VOCAB}): [{VOCAB}]"),
    ([-3, 1], rf"outside the vocabulary [0, {VOCAB}): [-3]"),
])
def test_bad_prompts_are_refused_naming_the_value(prompt, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prompt_token_ids(prompt, VOCAB)


def test_as_int_refuses_bools_and_floats():
    assert [as_int(v) for v in (5, np.int16(5), torch.tensor(5))] == [5, 5, 5]
    assert [as_int(v) for v in (True, np.bool_(True), 5.0, torch.tensor(5.0), torch.tensor([5]), "5")] == [None] * 6


@pytest.mark.parametrize("prompts, message", [
    ([1, 2, 3], "one per sequence), got a flat list of ints [1, 2, 3] (list): wrap a single prompt as [ids]"),
    ("hello", "one per sequence), got text 'hello' (str)"),
    (torch.tensor([[1, 2], [3, 4]]), "got shape (2, 2) (Tensor): pass list(batch)"),
    ({1: [1]}, "one per sequence), got {1: [1]} (dict)"),
    ([], "prompts is empty"),
    ([[1, 2], [1.5]], "prompt 1: token ids must be ints"),
    ([[1, 2], "hi"], "prompt 1 must be token ids, got text 'hi' (str)"),
    ([[1, 2], 3], "prompt 1 must be a sequence of token ids, got 3 (int)"),
])
def test_bad_batches_say_what_shape_is_wanted(prompts, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prompt_batch(prompts, VOCAB)


@pytest.mark.parametrize("value, expected", [
    (None, ()), (2, (2,)), (np.int64(2), (2,)), ([2, 5], (2, 5)), ((), ()), (torch.tensor([2, 5]), (2, 5)),
])
def test_eos_token_ids_accepted(value, expected):
    assert eos_token_ids(value, VOCAB) == expected


@pytest.mark.parametrize("value, message", [
    ("x", "eos_token_id must be a token id (int) or a sequence of them, got 'x' (str)"),
    (VOCAB, f"eos_token_id has token ids outside the vocabulary [0, {VOCAB}): [{VOCAB}]"),
    ([1, -1], f"outside the vocabulary [0, {VOCAB}): [-1]"),
    (2.0, "eos_token_id must be a sequence of token ids, got 2.0 (float)"),
    ([2.0], "got 2.0 (float) at index 0"),
    (True, "got True (bool)"),
])
def test_bad_eos_token_ids_are_refused(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        eos_token_ids(value, VOCAB)


# ---------------------------------------------------------------------------------------------
# generate(): the same checks, before anything is allocated
# ---------------------------------------------------------------------------------------------
PROMPT = [5, 17, 300, 42, 9]


def test_generate_takes_numpy_and_tensor_prompts_like_lists(llama_nano):
    reference = generate(llama_nano, [PROMPT], 4, attn_name="sdpa")
    assert generate(llama_nano, [np.array(PROMPT)], np.int64(4), attn_name="sdpa") == reference
    assert generate(llama_nano, [torch.tensor(PROMPT, dtype=torch.int32)], 4, attn_name="sdpa") == reference


def test_generate_stops_at_a_numpy_eos(llama_nano):
    reference = generate(llama_nano, [PROMPT], 6, attn_name="sdpa")[0]
    eos = reference[2]
    out = generate(llama_nano, [PROMPT], 6, attn_name="sdpa", eos_token_id=np.int64(eos))[0]
    assert out == reference[:reference.index(eos) + 1]


@pytest.mark.parametrize("prompts, kwargs, message", [
    (PROMPT, {}, "got a flat list of ints [5, 17, 300, 42, 9] (list): wrap a single prompt as [ids]"),
    ("hello", {}, "got text 'hello' (str): encode it with a tokenizer first"),
    ([[1.9, 2.2]], {}, "prompt 0: token ids must be ints (Python or NumPy ints, or a 1-D integer tensor / NumPy "
                       "array), got 1.9 (float) at index 0"),
    ([[1, 2], [True, 2]], {}, "prompt 1: token ids must be ints (Python or NumPy ints, or a 1-D integer tensor / "
                              "NumPy array), got True (bool) at index 0"),
    ([[1, 2]], {"eos_token_id": "x"}, "eos_token_id must be a token id (int) or a sequence of them, got 'x'"),
    ([[1, 2]], {"eos_token_id": [3, VOCAB]}, f"eos_token_id has token ids outside the vocabulary [0, {VOCAB})"),
    ([[1, 2]], {"seed": "abc"}, "seed must be None or an int in [-2**63, 2**64 - 1], got 'abc'"),
    ([[1, 2]], {"seed": 2**64}, f"seed must be None or an int in [-2**63, 2**64 - 1], got {2**64}"),
    ([[1, 2]], {"do_sample": True, "temperature": float("nan")}, "temperature must be a finite number >= 0"),
    ([[1, 2]], {"do_sample": True, "temperature": float("inf")}, "got inf"),
    ([[1, 2]], {"do_sample": True, "temperature": -1.0}, "temperature must be > 0 when sampling"),
    ([[1, 2]], {"do_sample": True, "top_k": 1.5}, "top_k must be None (no limit) or an int >= 1, got 1.5"),
    ([[1, 2]], {"do_sample": True, "top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
    ([[1, 2]], {"prefill_chunk_size": 2.5}, "prefill_chunk_size must be >= 1 (an int) or None, got 2.5"),
])
def test_generate_refuses_bad_arguments_naming_the_value(llama_nano, prompts, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(llama_nano, prompts, 4, attn_name="sdpa", **kwargs)


def test_generate_max_new_tokens_must_be_ints(llama_nano):
    message = "max_new_tokens must be an int >= 0 or one such int per prompt (1), got 2.5"
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(llama_nano, [[1, 2]], 2.5, attn_name="sdpa")
    with pytest.raises(ValueError, match=re.escape("one such int per prompt (2), got [1, True]")):
        generate(llama_nano, [[1, 2], [3]], [1, True], attn_name="sdpa")
