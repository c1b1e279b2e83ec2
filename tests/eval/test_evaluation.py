"""Log-likelihood scoring vs plain forward logits, task prompts and metrics, local data loaders, the lm-eval adapter."""

import json
from pathlib import Path

import pytest
import torch

from fms.models import get_model
from fms.eval.data import SAMPLE_DATA_DIR, load_task_data, sample_data_path
from fms.eval.modes import choice_scores, evaluate
from fms.eval.scoring import TokenRequest, encode_pair, score_requests
from fms.eval.tasks import EvalDataError, EvalError, MultipleChoiceItem, build_questions, get_task
from fms.utils.tokenizers import get_tokenizer

# fp32 on CPU: cached (sdpa / paged) and plain forwards differ only by summation order
LOGPROB_ATOL = 1e-4
NANO_VOCAB = 512
REPO = Path(__file__).resolve().parents[2]


def build_tiny_tokenizer(folder: Path, vocab_size: int = NANO_VOCAB) -> Path:
    """A byte-level BPE whose ids fit llama 'nano' (vocab 512), with <s> added to every encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True, exist_ok=True)
    texts = [p.read_text(encoding="utf-8") for p in sorted((REPO / "fms" / "resources").rglob("*"))
             if p.suffix in (".txt", ".csv", ".json", ".jsonl")]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>"}))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    tok = get_tokenizer(tokenizer_dir)
    assert tok.vocab_size <= NANO_VOCAB
    return tok


@pytest.fixture(scope="module")
def nano():
    return get_model("llama", "nano")


def reference_logprob(model, context, continuation) -> tuple[float, bool]:
    """Sum of log p(continuation token) from one plain forward (no cache) over context + continuation[:-1]."""
    full = list(context) + list(continuation)
    max_len = model.config.max_position_embeddings
    full = full[-(max_len + 1):]
    with torch.no_grad():
        logp = model(torch.tensor([full[:-1]])).float().log_softmax(dim=-1)[0]  # (T, V)
    start = len(full) - 1 - len(continuation)
    picked = [logp[start + k, token].item() for k, token in enumerate(continuation)]
    greedy = all(logp[start + k].argmax().item() == token for k, token in enumerate(continuation))
    return sum(picked), greedy


def random_requests(seed: int, n: int, vocab: int = NANO_VOCAB) -> list[TokenRequest]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ctx_len = int(torch.randint(1, 40, (1,), generator=g))
        cont_len = int(torch.randint(1, 5, (1,), generator=g))
        ids = torch.randint(0, vocab, (ctx_len + cont_len,), generator=g).tolist()
        out.append(TokenRequest(tuple(ids[:ctx_len]), tuple(ids[ctx_len:])))
    # one-token answers after one shared context (MMLU's shape) share a single model input
    out += [TokenRequest(out[0].context, (t,)) for t in (5, 17, 300)]
    return out


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
# paged runs eager FlexAttention on CPU (about a second per batch), so it gets the padded case only
@pytest.mark.parametrize("attn_name, batch_size", [("sdpa", 1), ("sdpa", 4), ("paged", 4)])
def test_loglikelihood_equals_plain_forward_sum(nano, attn_name, batch_size):
    requests = random_requests(seed=batch_size, n=7)
    run = score_requests(nano, requests, attn_name, batch_size=batch_size)
    assert run.num_rows == 7 + 1  # the three one-token answers share one model input
    for request, (logprob, greedy) in zip(requests, run.results):
        expected, expected_greedy = reference_logprob(nano, request.context, request.continuation)
        assert logprob == pytest.approx(expected, abs=LOGPROB_ATOL)
        assert greedy == expected_greedy


def shared_context_requests() -> list[TokenRequest]:
    """Three contexts (one page long, a partial last page, three pages and a bit) with several answers each,
    multi-token and one-token, and one context asked alone."""
    g = torch.Generator().manual_seed(11)
    out = []
    for ctx_len, answers in ((16, (3, 2, 1, 4)), (21, (2, 5, 1)), (50, (3, 3)), (9, (2,))):
        context = tuple(torch.randint(0, NANO_VOCAB, (ctx_len,), generator=g).tolist())
        out += [TokenRequest(context, tuple(torch.randint(0, NANO_VOCAB, (n,), generator=g).tolist()))
                for n in answers]
    return out


def test_paged_scoring_forks_one_sequence_per_context_with_the_same_scores(nano):
    """A question's answers fork the sequence of its context (paged): each context runs once per batch, and every
    score equals a plain forward over the whole input; share_context=False and sdpa run every answer's context."""
    requests = shared_context_requests()
    shared = score_requests(nano, requests, "paged", batch_size=4)
    alone = score_requests(nano, requests, "paged", batch_size=4, share_context=False)
    sdpa = score_requests(nano, requests, "sdpa", batch_size=4)
    assert shared.shared_context and not alone.shared_context and not sdpa.shared_context
    assert alone.input_tokens == sdpa.input_tokens == sum(len(r.context) + len(r.continuation) - 1 for r in requests)
    # rows ordered longest context first, 4 per batch: [50, 50, 21, 21] [21, 16, 16, 16] [16, 9]
    contexts_run = 50 + 21 + 21 + 16 + 16 + 9
    assert shared.input_tokens == contexts_run + sum(len(r.continuation) - 1 for r in requests)
    for request, *runs in zip(requests, shared.results, alone.results, sdpa.results):
        expected, expected_greedy = reference_logprob(nano, request.context, request.continuation)
        for logprob, greedy in runs:
            assert logprob == pytest.approx(expected, abs=LOGPROB_ATOL)
            assert greedy == expected_greedy
    with pytest.raises(EvalError, match="share_context=True needs a cache that can fork.*'sdpa'"):
        score_requests(nano, requests, "sdpa", share_context=True)
    with pytest.raises(EvalError, match="share_context must be True, False or None.*'yes'"):
        score_requests(nano, requests, "paged", share_context="yes")


def test_forked_scoring_returns_every_page_even_when_a_step_fails(nano):
    from fms.eval.scoring import _build_rows, _score_batch
    from fms.modules.attention import get_attention_op

    requests = shared_context_requests()[:4]  # one context, four answers
    rows = _build_rows(requests, NANO_VOCAB, nano.config.max_position_embeddings)
    op = get_attention_op("paged")
    cache = op.create_cache(nano.cache_spec(), max_batch_size=4, max_seq_len=32, page_size=16)
    free = cache.manager.num_free_pages
    scores, stats, tokens_run = _score_batch(nano, op, cache, rows, requests, "cpu", share_context=True)
    assert tokens_run == 16 + (2 + 1 + 0 + 3) and len(scores) == 4
    # three forks of a full page share it; the three extended rows each got one page of their own
    assert stats["pages_in_use"] == 1 + 3
    assert cache.sequences == [] and cache.manager.num_free_pages == free

    calls = []

    def failing(*args, **kwargs):  # step 2 fails after the forks
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return nano(*args, **kwargs)

    failing.config = nano.config
    with pytest.raises(RuntimeError, match="injected"):
        _score_batch(failing, op, cache, rows, requests, "cpu", share_context=True)
    assert cache.sequences == [] and cache.manager.num_free_pages == free
    cache.manager.check_invariants()


def test_is_greedy_true_for_the_argmax_continuation(nano):
    context = [1, 40, 41, 42, 43]
    greedy_tokens = []
    with torch.no_grad():
        for _ in range(3):
            greedy_tokens.append(int(nano(torch.tensor([context + greedy_tokens]))[0, -1].argmax()))
    other = (greedy_tokens[0] + 1) % NANO_VOCAB
    requests = [TokenRequest(tuple(context), tuple(greedy_tokens)), TokenRequest(tuple(context), (other,))]
    for attn_name in ("sdpa", "paged"):
        results = score_requests(nano, requests, attn_name, batch_size=2).results
        assert [greedy for _, greedy in results] == [True, False]


def test_long_context_keeps_the_newest_tokens(nano):
    short = get_model("llama", "nano", max_position_embeddings=48)
    request = TokenRequest(tuple(range(3, 83)), (7, 8, 9))  # 82 input tokens > 48
    (logprob, _), = score_requests(short, [request], "paged").results
    assert logprob == pytest.approx(reference_logprob(short, request.context, request.continuation)[0],
                                    abs=LOGPROB_ATOL)


def test_scoring_rejects_bad_requests(nano):
    with pytest.raises(EvalError, match=r"outside the model's vocabulary \[0, 512\)"):
        score_requests(nano, [TokenRequest((1, 2), (600,))])
    with pytest.raises(EvalError, match="empty context"):
        score_requests(nano, [TokenRequest((), (3,))])
    assert score_requests(nano, [TokenRequest((1, 2), ())]).results == [(0.0, True)]


def test_encode_pair_moves_trailing_space_and_conditions_empty_context_on_bos(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Answer: ", "B")
    assert ctx == tokenizer.encode("Answer:")
    assert ctx + cont == tokenizer.encode("Answer: B")
    ctx, cont = encode_pair(tokenizer, "", "Hello")
    assert ctx == [tokenizer.bos_token_id] and cont == tokenizer.encode("Hello", add_bos=False)


# ---------------------------------------------------------------------------------------------
# tasks: prompts, few-shot, metrics
# ---------------------------------------------------------------------------------------------
def _item(question, gold=0, subject="s", n=4):
    return MultipleChoiceItem(question, tuple(f"{question}-{k}" for k in range(n)),
                              tuple(int(k == gold) for k in range(n)), subject)


def test_mmlu_prompt_format_and_dev_fewshot():
    task = get_task("mmlu")
    dev = {"high_school_physics": [_item("d1", 2, "high_school_physics"), _item("d2", 1, "high_school_physics")]}
    q = build_questions(task, [_item("What?", 0, "high_school_physics")], num_fewshot=1, dev=dev)[0]
    assert q.context == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "d1\nA. d1-0\nB. d1-1\nC. d1-2\nD. d1-3\nAnswer: C\n\n"
        "What?\nA. What?-0\nB. What?-1\nC. What?-2\nD. What?-3\nAnswer:"
    )
    assert q.continuations == (" A", " B", " C", " D")


def test_fewshot_from_other_items_is_deterministic_and_excludes_the_item():
    task = get_task("truthfulqa_mc1")
    items = [_item(f"q{i}") for i in range(6)]
    first = build_questions(task, items, num_fewshot=2, seed=7)
    assert first == build_questions(task, items, num_fewshot=2, seed=7)
    for item, q in zip(items, first):
        assert q.context.endswith(f"Q: {item.question}\nA:")
        assert q.context.count("Q: ") == 3 and f"Q: {item.question}\nA: " not in q.context
    assert q.continuations[0] == f" {item.choices[0]}"
    with pytest.raises(EvalError, match="only 5 other items"):
        build_questions(task, items, num_fewshot=6)


def test_metrics_mc1_picks_argmax_and_mc2_is_true_probability_mass():
    item = MultipleChoiceItem("q", ("t1", "t2", "f1"), (1, 1, 0), "s")
    lls = [-1.0, -2.0, -0.5]
    assert choice_scores(get_task("truthfulqa_mc1"), item, lls) == (2, 0.0)
    prediction, mc2 = choice_scores(get_task("truthfulqa_mc2"), item, lls)
    p = torch.tensor(lls, dtype=torch.float64).exp()
    assert prediction == 2 and mc2 == pytest.approx(float((p[0] + p[1]) / p.sum()))


def test_evaluate_paged_matches_default_on_shipped_truthfulqa(nano, tokenizer):
    # MMLU runs both modes end to end in tests/scripts/test_eval.py
    task = "truthfulqa_mc2"
    data = load_task_data(task, sample_data_path(task), limit=2)
    _, results, comparison = evaluate(nano, tokenizer, task, data.items, ("default", "paged"),
                                                 batch_size=8, warmup=False)
    assert comparison["answer_agreement"] == 1.0
    assert comparison["max_abs_loglikelihood_diff"] < LOGPROB_ATOL
    assert results[0].metrics["accuracy"] == results[1].metrics["accuracy"]
    # paged forked each question's context for its answers; default ran it per answer
    default, paged = (r.metrics for r in results)
    assert paged["shared_context"] and not default["shared_context"]
    assert paged["input_tokens"] < default["input_tokens"]
    _, alone, _ = evaluate(nano, tokenizer, task, data.items, ("paged",), batch_size=8, warmup=False,
                           share_context=False)
    assert not alone[0].metrics["shared_context"] and alone[0].metrics["input_tokens"] == default["input_tokens"]
    assert alone[0].predictions == results[1].predictions


def test_timing_repeats_interleave_the_modes_and_report_the_median_pass(nano, tokenizer, monkeypatch):
    import fms.eval.modes as modes

    task = "truthfulqa_mc2"
    data = load_task_data(task, sample_data_path(task), limit=2)
    order, real = [], modes.run_mode

    def recorded(model, spec, questions, encoded, mode, *args):
        order.append(mode)
        return real(model, spec, questions, encoded, mode, *args)

    monkeypatch.setattr(modes, "run_mode", recorded)
    _, once, _ = evaluate(nano, tokenizer, task, data.items, ("default", "paged"), warmup=False)
    order.clear()
    _, results, comparison = evaluate(nano, tokenizer, task, data.items, ("default", "paged"), warmup=False,
                                      timing_repeats=3)
    assert order == ["default", "paged"] * 3
    assert comparison["answer_agreement"] == 1.0
    for result, single in zip(results, once):
        runs = result.metrics["latency_ms_runs"]
        assert len(runs) == 3 and result.metrics["latency_ms"] in runs
        assert result.loglikelihoods == single.loglikelihoods
    # the paired ratio: repeat i's paged pass over repeat i's default pass; too few repeats for an interval
    default_runs, paged_runs = (r.metrics["latency_ms_runs"] for r in results)
    ratio = comparison["latency_ratio"]
    assert ratio["runs"] == pytest.approx([p / d for d, p in zip(default_runs, paged_runs)])
    assert ratio["median"] == pytest.approx(sorted(ratio["runs"])[1]) and ratio["ci95"] is None
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"timing_repeats must be an int >= 1, got {bad!r}"):
            evaluate(nano, tokenizer, task, data.items, ("default",), timing_repeats=bad)


def test_timing_repeats_are_refused_for_summarization():
    from fms.eval.report import EvalConfig

    with pytest.raises(EvalError, match="summarization times one pass, got --timing_repeats 3"):
        EvalConfig(task="summarization", timing_repeats=3)
    with pytest.raises(EvalError, match="--timing_repeats must be >= 1, got 0"):
        EvalConfig(task="mmlu", timing_repeats=0)


# ---------------------------------------------------------------------------------------------
# data loaders
# ---------------------------------------------------------------------------------------------
def test_shipped_files_load_in_every_format():
    mmlu = load_task_data("mmlu", sample_data_path("mmlu"))
    assert {i.subject for i in mmlu.items} == {"astronomy", "computer_science"} and len(mmlu.items) == 8
    assert set(mmlu.dev) == {"astronomy"} and len(mmlu.dev["astronomy"]) == 3
    export = load_task_data("mmlu", SAMPLE_DATA_DIR / "mmlu.jsonl")
    assert [i.gold for i in export.items if i.subject == "nutrition"] == [2, 0, 1]  # int and letter answers
    mc1 = load_task_data("truthfulqa_mc1", sample_data_path("truthfulqa_mc1")).items
    mc2 = load_task_data("truthfulqa_mc2", sample_data_path("truthfulqa_mc2")).items
    assert len(mc1) == len(mc2) == 6 and all(i.gold == 0 and sum(i.labels) == 1 for i in mc1)
    assert all(sum(i.labels) >= 2 for i in mc2)
    assert len(load_task_data("mmlu", sample_data_path("mmlu"), limit=1).items) == 2  # per subject


def test_mmlu_release_layout_with_test_and_dev_folders(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "dev").mkdir()
    (tmp_path / "test" / "logic_test.csv").write_text('"Is it, or not?",yes,no,maybe,never,B\n')
    (tmp_path / "dev" / "logic_dev.csv").write_text("x,a,b,c,d,A\n")
    data = load_task_data("mmlu", tmp_path)
    assert data.items[0].question == "Is it, or not?" and data.items[0].gold == 1
    assert data.dev["logic"][0].question == "x"


def test_hf_layouts_jsonl_and_parquet(tmp_path):
    records = [{"question": "q", "mc1_targets": {"choices": ["yes", "no"], "labels": [0, 1]},
                "mc2_targets": {"choices": ["yes", "no", "ok"], "labels": [0, 1, 1]}}]
    path = tmp_path / "tqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    item = load_task_data("truthfulqa_mc1", path).items[0]
    assert item.choices == ("yes", "no") and item.gold == 1
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (parquet is optional)")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist([{"question": "q", "subject": "law", "choices": ["a", "b", "c", "d"],
                                          "answer": 3}]), tmp_path / "mmlu.parquet")
    item = load_task_data("mmlu", tmp_path / "mmlu.parquet").items[0]
    assert item.subject == "law" and item.gold == 3


def test_unknown_task_lists_allowed():
    with pytest.raises(EvalError, match="unknown task 'mmlu_pro'; allowed: mmlu, truthfulqa_mc1, truthfulqa_mc2"):
        get_task("mmlu_pro")


@pytest.mark.parametrize(
    "name, text, task, message",
    [
        ("bio_test.csv", "q,a,b,c,A\n", "mmlu", r"bio_test.csv row 1: expected 6 columns .*got 5"),
        ("bio_test.csv", "q,a,b,c,d,A\nq2,a,b,c,d,E\n", "mmlu", r"bio_test.csv row 2: field 'answer' .* got 'E'"),
        ("bio_test.csv", "question,A,B,C,D,answer\n", "mmlu", r"row 1: field 'answer'.*no header row"),
        ("x.jsonl", '{"question": "q", "choices": ["a","b","c","d"], "answer": 0}\n{"question": "q"}\n', "mmlu",
         r"x.jsonl line 2: missing field 'choices'"),
        ("x.jsonl", '{"question": "q", "choices": ["a","b"], "answer": 0}\n', "mmlu",
         r"x.jsonl line 1: field 'choices' must hold 4 answers, got 2"),
        ("mc.json", '[{"question": "q", "mc1_targets": {"a": 1, "b": 1}}]', "truthfulqa_mc1",
         r"mc.json record 1 field 'mc1_targets': needs exactly one true answer, got 2"),
        ("mc.json", '[{"question": "q", "mc2_targets": {"a": 1, "b": "yes"}}]', "truthfulqa_mc2",
         r"mc.json record 1 field 'mc2_targets': label of 'b' must be 0 or 1"),
        ("mc.json", '[{"question": "q",}]', "truthfulqa_mc1", r"mc.json is not valid JSON: .* line 1"),
        ("mc.json", "[]", "truthfulqa_mc1", r"mc.json holds no questions"),
        ("bio_test.csv", "\n", "mmlu", r"bio_test.csv holds no questions"),
    ],
)
def test_malformed_or_empty_data_names_file_row_and_field(tmp_path, name, text, task, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(EvalDataError, match=message):
        load_task_data(task, tmp_path / name)


def test_empty_folder_and_missing_data_path(tmp_path, monkeypatch):
    with pytest.raises(EvalDataError, match=r"no MMLU data in .*: expected <subject>_test.csv"):
        load_task_data("mmlu", tmp_path)
    monkeypatch.setenv("FMS_EVAL_DATA", str(tmp_path / "nothing"))
    with pytest.raises(EvalDataError, match=r"no data path: put MMLU CSVs .* in .*nothing/mmlu or pass --data PATH; "
                                            r"this tool never downloads"):
        load_task_data("mmlu", None)


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness adapter
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fms_lm(tokenizer_dir):
    pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install 'ibm-fms[eval]')")
    import importlib

    from lm_eval.api.registry import get_model as get_lm

    importlib.import_module("fms.eval.lm_eval_adapter")  # registers the model type

    return get_lm("fms").create_from_arg_string(
        f"architecture=llama,variant=nano,tokenizer={tokenizer_dir},attn_name=paged,batch_size=2,max_gen_toks=6",
        {"device": "cpu"},
    )


def _instance(request_type, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=idx)


def test_lm_eval_loglikelihood(fms_lm, nano, tokenizer):
    pairs = [("The planet Mercury has the shortest", " year"), ("Answer:", " B"), ("Answer:", " C"),
             ("", "Gravity holds a planet in orbit")]
    results = fms_lm.loglikelihood([_instance("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        if context:
            ctx = tokenizer.encode(context)
            cont = tokenizer.encode(context + continuation)[len(ctx):]
        else:
            ctx, cont = [tokenizer.bos_token_id], tokenizer.encode(continuation, add_bos=False)
        expected, expected_greedy = reference_logprob(nano, ctx, cont)
        assert logprob == pytest.approx(expected, abs=LOGPROB_ATOL) and greedy == expected_greedy
    rolling = fms_lm.loglikelihood_rolling([_instance("loglikelihood_rolling", ("Gravity holds a planet in orbit",))])
    assert rolling[0] == pytest.approx(results[3][0], abs=LOGPROB_ATOL)


def test_lm_eval_generate_until_is_greedy_and_stops_at_until(fms_lm, nano, tokenizer):
    from fms.eval.lm_eval_adapter import FMSLM

    # model and tokenizer objects through the Python API; sdpa keeps the CPU run short
    lm = FMSLM(model=nano, tokenizer=tokenizer, attn_name="sdpa", batch_size=2, max_gen_toks=6)
    prompt = "Which planet has the shortest year?"
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(6):  # greedy reference without any cache
            token = int(nano(torch.tensor([ids]))[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
    new = ids[len(tokenizer.encode(prompt)):]
    full_text = tokenizer.decode([t for t in new if t < tokenizer.vocab_size])
    (text,) = lm.generate_until([_instance("generate_until", (prompt, {"until": [], "max_gen_toks": 6}))])
    assert text == full_text
    stop = full_text[len(full_text) // 2:][:2]
    assert stop, "the reference produced no text to stop at"
    out = lm.generate_until([_instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 6}), 0),
                                 _instance("generate_until", (prompt, {"until": stop, "max_gen_toks": 6}), 1)])
    assert out == [full_text.split(stop)[0]] * 2
