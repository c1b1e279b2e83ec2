"""Summarization: data loading (JSON, JSON lines, CSV; CNN/DailyMail and XSum fields), ROUGE/BLEU, end to end."""

import json
from pathlib import Path

import pytest

from fms.eval.summarization import (
    PROMPT_SUFFIX,
    build_prompt,
    load_summarization_data,
    score_summaries,
    summarize_and_score,
)

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
sacrebleu = pytest.importorskip("sacrebleu")

SAMPLE = Path(__file__).resolve().parents[2] / "fms" / "resources" / "eval" / "summarization_sample.json"


def test_shipped_sample_loads():
    examples = load_summarization_data(SAMPLE)
    assert len(examples) == 2
    assert examples[0]["id"] == "fms-sample-1"
    assert examples[0]["article"].startswith("The town council of Greywater")
    assert examples[1]["summary"].startswith("Grey seals have returned")


def test_scores_equal_the_libraries_on_the_shipped_pair():
    examples = load_summarization_data(SAMPLE)
    references = [e["summary"] for e in examples]
    # The first sentence of each article as a lead-1 baseline summary.
    predictions = [e["article"].split(". ")[0] + "." for e in examples]
    got = score_summaries(predictions, references)

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per_example = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = sum(s[name].fmeasure for s in per_example) / len(per_example)
        assert got[name] == pytest.approx(expected, abs=1e-12)
        assert [e[name] for e in got["per_example"]] == pytest.approx([s[name].fmeasure for s in per_example])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-12)
    assert 0 < got["rouge1"] < 1 and 0 < got["bleu"] < 100  # neither trivial nor perfect

    perfect = score_summaries(references, references)
    assert perfect["rouge1"] == perfect["rougeL"] == 1.0 and perfect["bleu"] == pytest.approx(100.0)


def test_xsum_json_lines_and_csv_layouts(tmp_path):
    lines = tmp_path / "xsum.jsonl"
    lines.write_text(json.dumps({"id": "a", "document": "Doc one.", "summary": "One."}) + "\n\n"
                     + json.dumps({"id": "b", "document": "Doc two.", "summary": "Two."}) + "\n")
    assert [e["article"] for e in load_summarization_data(lines)] == ["Doc one.", "Doc two."]
    table = tmp_path / "cnn.csv"
    table.write_text('id,article,highlights\n1,"Line one, with a comma.","First.\nSecond."\n')
    assert load_summarization_data(table) == [
        {"id": "1", "article": "Line one, with a comma.", "summary": "First.\nSecond."}
    ]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("missing.json", '[{"article": "Text."}]', "record 0 has no highlights or summary field; it has ['article']"),
        ("no_article.jsonl", '{"summary": "S."}\n{"document": "D.", "summary": "S."}\n',
         "line 1 has no article or document field"),
        ("not_json.json", "article: text\nsummary: short\n", "line 1 is not valid JSON"),
        ("bad_line.jsonl", '{"document": "D.", "summary": "S."}\n{"document": \n', "line 2 is not valid JSON"),
        ("empty_summary.json", '[{"document": "D.", "summary": "  "}]', "field 'summary' must be a non-empty string"),
        ("number.json", '[{"document": 3, "summary": "S."}]', "field 'document' must be a non-empty string"),
        ("scalar.json", '"just a string"', "holds a JSON str; expected a list of objects"),
        ("list_of_lists.json", '[["a", "b"]]', "record 0 is a list, not an object"),
        ("empty.json", "[]", "holds no examples"),
        ("header.csv", "text,label\nsome text,x\n", "the CSV header ['text', 'label'] lacks fields"),
    ],
)
def test_malformed_data_names_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_summarization_data(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_summarization_data("/nonexistent/news.jsonl")


def test_summarize_and_score_end_to_end():
    from fms.models import get_model
    from fms.utils.tokenizers import get_tokenizer

    tokenizer = get_tokenizer(None)
    model = get_model("gpt2", "micro", seed=0)
    examples = load_summarization_data(SAMPLE)
    result = summarize_and_score(model, tokenizer, examples, "sdpa", max_new_tokens=6, batch_size=2,
                                 max_prompt_tokens=64)
    assert result["num_examples"] == 2 and len(result["predictions"]) == 2
    assert result["references"] == [e["summary"] for e in examples]
    rescored = score_summaries(result["predictions"], result["references"])
    for name in ("rouge1", "rouge2", "rougeL", "bleu"):
        assert result[name] == rescored[name]
    for entry in result["per_example"]:
        assert entry["prompt_tokens"] <= 64 and 1 <= entry["new_tokens"] <= 6 and entry["inference_ms"] > 0
    assert result["peak_gpu_memory_bytes"] is None  # CPU
    assert result["kv_cache"]["kv_bytes_in_use"] > 0
    # the cue survives the cut of a long article
    cue = tokenizer.encode(PROMPT_SUFFIX, add_bos=False)
    prompt = build_prompt(tokenizer, examples[0]["article"], 64)
    assert len(prompt) == 64 and prompt[-len(cue):] == cue


def test_summarize_and_score_validates_inputs():
    with pytest.raises(ValueError, match="examples is empty"):
        summarize_and_score(None, None, [], "sdpa", 4)
    with pytest.raises(ValueError, match=r"examples\[0\] has no highlights or summary field"):
        summarize_and_score(None, None, [{"article": "x"}], "sdpa", 4)
