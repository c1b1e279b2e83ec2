"""Stop strings, logprobs and min_tokens in the engine (usable from Python): stop strings spanning tokens and
decode windows, the text cut before them, logprobs equal to log_softmax of a plain forward's logits."""

import pytest
import torch

from fms.serving import LLMEngine, SamplingParams
from fms.serving.detokenizer import IncrementalDetokenizer
from fms.utils.tokenizers import get_tokenizer

PROMPTS = [[1, 77, 300, 12, 45, 9], [1, 5, 6, 7]]
MAX_TOKENS = 24
WINDOW = 4
# fp32, paged attention vs a plain forward: logits of size ~20 (init_std 0.5) differ by ~1e-4 after the
# different summation orders
TOL = 1e-3


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def model():
    """llama "micro" (the shipped tokenizer's vocabulary) with larger random weights, so greedy text varies."""
    from fms.models import get_model

    return get_model("llama", "micro", seed=0, init_std=0.5)


@pytest.fixture(scope="module")
def engine(model, tokenizer):
    return LLMEngine(model, tokenizer, max_decode_steps=WINDOW, num_pages=64)


@pytest.fixture(scope="module")
def greedy(engine):
    """The greedy tokens of each prompt, without stop strings (the reference the stop tests cut)."""
    outs = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), use_tqdm=False)
    tokens = [o.token_ids for o in outs]
    assert all(len(set(t)) >= 8 for t in tokens), tokens  # diverse enough to hold distinct stop strings
    return tokens


def _stop_at_boundary(tokenizer, tokens, boundary):
    """A 4-character stop string spanning the text boundary after tokens[:boundary], found first there."""
    full = tokenizer.decode(tokens)
    end = len(tokenizer.decode(tokens[:boundary]))
    for shift in range(0, 3):
        start = end - 2 - shift
        stop = full[start:start + 4]
        if start >= 0 and len(stop) == 4 and "\ufffd" not in stop and stop.strip() and full.find(stop) == start \
                and start < end < start + 4:
            return stop, start
    return None, None


@pytest.mark.parametrize("boundary", [1, 2, 4, 5, 8, 9])
def test_stop_string_spanning_tokens_and_windows(engine, tokenizer, greedy, boundary):
    # The first token comes from the prefill step, then decode windows of 4: boundaries 1, 5 and 9 sit
    # between steps, the others inside a window.
    tokens = greedy[0]
    stop, start = _stop_at_boundary(tokenizer, tokens, boundary)
    if stop is None:
        pytest.skip(f"no clean 4-character stop string spans the boundary after token {boundary}")
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop]),
                          use_tqdm=False)[0]
    full = tokenizer.decode(tokens)
    # the shortest prefix of the reference tokens whose text contains the stop string
    keep = next(k for k in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:k]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[:start]
    assert out.token_ids == tokens[:keep]
    assert engine.stats()["num_used_pages"] == 0  # the stopped request gave its pages back


def test_include_stop_str_and_earliest_of_several(engine, tokenizer, greedy):
    tokens = greedy[1]
    full = tokenizer.decode(tokens)
    early, late = full[6:9], full[12:15]
    assert full.find(early) == 6 and "\ufffd" not in early + late
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=[late, early], include_stop_str_in_output=True)
    out = engine.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    assert out.text == full[:9] and out.stop_reason == early


def test_stop_strings_with_other_requests_in_the_batch(engine, tokenizer, greedy):
    full = tokenizer.decode(greedy[0])
    stop = full[10:13]
    assert full.find(stop) == 10
    outs = engine.generate(PROMPTS, [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=[stop]),
                                     SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)], use_tqdm=False)
    assert outs[0].text == full[:10] and outs[0].finish_reason == "stop"
    assert outs[1].token_ids == greedy[1] and outs[1].finish_reason == "length"


def test_min_tokens_holds_back_a_stop_token(engine, greedy):
    tokens = greedy[0]
    first = tokens[0]
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                                                       stop_token_ids=[first]), use_tqdm=False)[0]
    assert out.token_ids == [first] and out.finish_reason == "stop"
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=[first],
                                                       min_tokens=3), use_tqdm=False)[0]
    later = [j for j in range(3, len(tokens)) if tokens[j] == first]
    expected = tokens[:later[0] + 1] if later else tokens
    assert out.token_ids == expected


def _reference_logprobs(model, prompt, tokens):
    """log_softmax of a plain forward (no cache) at the positions that predicted each output token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]]))[0].double()  # (T, V)
    return logits.log_softmax(-1)[len(prompt) - 1:]


def test_logprobs_equal_log_softmax_of_the_reference(model, engine, greedy):
    k = 5
    outs = engine.generate(PROMPTS, [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=k),
                                     SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)], use_tqdm=False)
    assert outs[1].logprobs is None  # did not ask
    out = outs[0]
    assert out.token_ids == greedy[0] and len(out.logprobs) == len(out.token_ids)
    ref = _reference_logprobs(model, PROMPTS[0], out.token_ids)
    for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.logprob == pytest.approx(ref[i, token].item(), abs=TOL), i
        top_values, top_ids = ref[i].topk(k)
        assert [t for t, _ in lp.top] == top_ids.tolist(), i
        assert [v for _, v in lp.top] == pytest.approx(top_values.tolist(), abs=TOL)
        assert lp.top[0][0] == token  # greedy: the sampled token is the most likely one


def test_logprobs_of_sampled_tokens_and_zero_alternatives(model, engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=1.0, seed=7, logprobs=0)
    out = engine.generate([PROMPTS[1]], params, use_tqdm=False)[0]
    ref = _reference_logprobs(model, PROMPTS[1], out.token_ids)
    assert len(set(out.token_ids)) > 3
    assert [lp.top for lp in out.logprobs] == [[]] * 12
    got = [lp.logprob for lp in out.logprobs]
    assert got == pytest.approx([ref[i, t].item() for i, t in enumerate(out.token_ids)], abs=TOL)


def test_incremental_text_equals_a_whole_decode(tokenizer):
    text = "Caches grow: naïve façade, ✓ done — 東京 ok"
    ids = tokenizer.encode(text, add_bos=False)
    detok = IncrementalDetokenizer(tokenizer, [1])
    sent = []
    for token in ids:  # one token at a time, as decode steps deliver them
        assert detok.add_tokens([token]) is None
        sent.append(detok.text)
    assert detok.text == text
    assert all("\ufffd" not in s for s in sent)  # an incomplete character waits for its next byte
    windowed = IncrementalDetokenizer(tokenizer, [1])
    for i in range(0, len(ids), 3):  # a decode window's tokens at once
        assert windowed.add_tokens(ids[i:i + 3]) is None
    assert windowed.text == text


def test_a_window_ending_mid_character_still_finds_its_stop_at_the_right_token(tokenizer):
    """A window whose last token is the first byte of a two-byte character decodes to no text as a whole; a stop
    string completed by an earlier token of it must still end the output at that token, not a window later."""
    words = tokenizer.encode("the garden path ends here", add_bos=False)
    first_byte, second_byte = tokenizer.encode("\u00e9", add_bos=False)  # one character, two byte tokens
    assert tokenizer.decode([first_byte]).endswith("\ufffd")
    keep = next(k for k in range(1, len(words) + 1) if "path" in tokenizer.decode(words[:k]))
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["path"])
    assert detok.add_tokens(words + [first_byte]) == keep  # the token that completed "path"
    assert detok.stop_reason == "path" and detok.text == "the garden "
    plain = IncrementalDetokenizer(tokenizer, [1], stop=["zzz"])  # no stop: the character completes next window
    assert plain.add_tokens(words + [first_byte]) is None and plain.add_tokens([second_byte, words[0]]) is None
    assert plain.text == tokenizer.decode(words + [first_byte, second_byte, words[0]])


def test_stable_text_holds_back_a_possible_stop_prefix(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [1], stop=["END!"])
    detok.add_tokens(tokenizer.encode("cache EN", add_bos=False))
    assert detok.stable_text(finished=False) == detok.text[:-3]
    assert detok.stable_text(finished=True) == detok.text


@pytest.mark.parametrize("kwargs, message", [
    (dict(stop=[""]), "stop must hold non-empty strings"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
    (dict(logprobs=21), "logprobs must be None or an int in [0, 20]"),
    (dict(logprobs=-1), "logprobs must be None or an int in [0, 20]"),
    (dict(min_tokens=40, max_tokens=8), "min_tokens must be an int in [0, max_new_tokens=8], got 40"),
    (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output must be a bool"),
])
def test_bad_params_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**kwargs)


def test_stop_strings_need_a_tokenizer(llama_nano):
    engine = LLMEngine(llama_nano, num_pages=8)
    with pytest.raises(ValueError, match="stop strings and stream_text need the engine's tokenizer"):
        engine.add_request([1, 2, 3], SamplingParams(stop=["x"]))
    assert SamplingParams(stop="ab").stop == ("ab",) and SamplingParams(max_tokens=3).max_new_tokens == 3
