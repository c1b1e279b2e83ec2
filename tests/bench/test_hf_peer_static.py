"""The HF static-generate peer (fms.bench.hf_peer.hf_static_generate_point, `--peers hf_generate`): on tiny fp32
models its greedy tokens, taken from left-padded batches, equal our engine's for the same mixed-length prompts;
only real tokens are counted; bad batch sizes are refused; the serving benchmark writes its row."""

import json

import pytest
import torch

from fms.bench import targets
from fms.bench.hf_peer import hf_static_generate_point, hf_twin, static_batches
from fms.bench.serving import ServingBenchConfig, run_serving_benchmark
from fms.bench.targets import JobContext
from fms.bench.workloads import MixedWorkload
from fms.models import get_model
from fms.runtime.sampling_params import SamplingParams
from fms.serving import LLMEngine
from scripts import benchmark_serving

pytest.importorskip("transformers", reason="transformers is not installed")

CPU = torch.device("cpu")
# h-nano's own random weights greedily repeat one token per prompt; these give varied sequences (as in
# tests/models/test_granite_hybrid.py), so that equal tokens say something
MODELS = {"llama micro": ("llama", "micro", {}),
          "granite_hybrid h-nano": ("granite_hybrid", "h-nano", dict(seed=5, embedding_multiplier=1.0, init_std=0.3))}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    """(architecture, fp32 model, its HF twin, mixed-length prompts, mixed output lengths, our engine's tokens)."""
    architecture, variant, options = MODELS[request.param]
    model = get_model(architecture, variant, data_type="fp32", **options)
    # 3..40-token prompts: left padding of up to 37 columns, crossing h-nano's 16-token Mamba chunks and pages
    prompts, output_lens = MixedWorkload(5, (3, 40), (4, 9), seed=1).prompts(model.config.vocab_size)
    engine = LLMEngine(model, page_size=16, num_pages=64, max_num_seqs=8)
    outs = engine.generate(prompts, [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in output_lens],
                           use_tqdm=False)
    return architecture, model, hf_twin(model, architecture), prompts, output_lens, [o.token_ids for o in outs]


@pytest.mark.parametrize("batch_size", [None, 2])
def test_static_generate_equals_our_engine_greedy(case, batch_size):
    _, _, hf_model, prompts, output_lens, ours = case
    assert len({len(p) for p in prompts}) > 1 and len(set(output_lens)) > 1
    assert all(len(set(tokens)) > 1 for tokens in ours)  # not one repeated token
    point = hf_static_generate_point(hf_model, prompts, output_lens, batch_size=batch_size, device=CPU)
    assert point["outputs"] == ours
    # counted: each request's own length; generated: every row of a batch runs to the batch's longest
    batches = [range(0, 5)] if batch_size is None else [range(0, 2), range(2, 4), range(4, 5)]
    assert point["num_output_tokens"] == sum(output_lens)
    assert point["num_generated_tokens"] == sum(len(b) * max(output_lens[i] for i in b) for b in batches)
    assert point["num_prompt_pad_tokens"] == sum(len(b) * max(len(prompts[i]) for i in b) -
                                                 sum(len(prompts[i]) for i in b) for b in batches)
    assert point["batch_size"] == (5 if batch_size is None else 2) and point["num_batches"] == len(batches)
    assert point["output_tokens_per_s"] == pytest.approx(sum(output_lens) / (point["e2e_latency_ms"] / 1e3))
    assert point["out_of_memory_batch_sizes"] == [] and point["peak_gpu_mem_allocated_gb"] is None


def test_tokens_after_an_eos_are_not_counted(case):
    _, _, hf_model, prompts, output_lens, ours = case
    eos = ours[0][2]  # a token our greedy run produces third in the first request
    expected = [tokens[:tokens.index(eos) + 1] if eos in tokens else tokens for tokens in ours]
    point = hf_static_generate_point(hf_model, prompts, output_lens, eos_token_ids=[eos], device=CPU)
    assert point["outputs"] == expected and len(expected[0]) <= 3
    assert point["num_output_tokens"] == sum(len(t) for t in expected) < sum(output_lens)


def test_left_padded_prompt_ends_where_hf_returns_it(case):
    # HF's output row is [pads, prompt, new tokens]: stripping the left padding gives back the prompt
    _, _, hf_model, prompts, _, ours = case
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), hf_model.generation_config.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = torch.tensor(prompt), 1
    out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    for row, prompt in enumerate(prompts):
        assert out[row, width - len(prompt):width].tolist() == prompt
        assert out[row, width:].tolist() == ours[row][:3]


def test_default_batch_is_halved_on_out_of_memory(case, monkeypatch):
    _, _, hf_model, prompts, output_lens, ours = case
    generate = hf_model.generate

    def fits_two(input_ids, **kwargs):
        if input_ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return generate(input_ids, **kwargs)

    monkeypatch.setattr(hf_model, "generate", fits_two)
    point = hf_static_generate_point(hf_model, prompts, output_lens, device=CPU)
    assert point["out_of_memory_batch_sizes"] == [5, 3] and point["batch_size"] == 2 and point["num_batches"] == 3
    assert point["outputs"] == ours
    with pytest.raises(torch.cuda.OutOfMemoryError):  # a batch size asked for is never changed
        hf_static_generate_point(hf_model, prompts, output_lens, batch_size=4, device=CPU)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size_names_the_value(batch_size):
    with pytest.raises(ValueError, match=f"hf_batch_size must be an int >= 1 .* got {batch_size!r}"):
        static_batches(4, batch_size)
    with pytest.raises(ValueError, match=f"got {batch_size!r}"):
        ServingBenchConfig(variant="nano", device="cpu", peers=("hf_generate",), hf_batch_size=batch_size)


def test_batch_size_without_the_peer_is_refused():
    with pytest.raises(ValueError, match=r"hf_batch_size 8 applies to the hf_generate peer only.*got peers \['hf'\]"):
        ServingBenchConfig(variant="nano", device="cpu", peers=("hf",), hf_batch_size=8)


def test_batches_in_workload_order():
    assert static_batches(5, None) == [range(0, 5)]
    assert static_batches(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert static_batches(3, 8) == [range(0, 3)]


@pytest.mark.parametrize("value", ["0", "x"])
def test_bad_hf_batch_size_flag_exits_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exc:
        benchmark_serving.main(["--results_dir", str(tmp_path), "--variant", "nano", "--device", "cpu",
                                "--peers", "hf_generate", "--hf_batch_size", value])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert (f"hf_batch_size must be an int >= 1" in err) if value == "0" else ("invalid int value: 'x'" in err)


@pytest.mark.parametrize("architecture, variant", [("llama", "nano"), ("granite_hybrid", "h-nano")])
def test_serving_benchmark_writes_the_hf_generate_row(tmp_path, architecture, variant):
    results = run_serving_benchmark(ServingBenchConfig(
        architecture=architecture, variant=variant, num_requests=3, prompt_range=(4, 20), output_range=(2, 5),
        device="cpu", peers=("hf_generate",), hf_batch_size=2, results_dir=tmp_path))
    fms, peer = results["results"]
    assert fms["system"] == "fms LLMEngine" and peer["system"] == targets.HF_STATIC_SYSTEM == "hf generate"
    assert "error" not in peer, peer.get("error")
    assert peer["num_output_tokens"] == fms["num_output_tokens"] and peer["num_requests"] == 3
    assert peer["hf_batch_size"] == 2 and peer["num_batches"] == 2 and peer["attn_implementation"] == "sdpa"
    assert peer["tokens_match_fms"] == 1.0  # fp32 on the CPU: the same greedy tokens
    for name in ("ttft", "tpot", "itl"):  # a static batch returns all its tokens at once: no per-token times
        assert [peer[f"{name}_p{q}_ms"] for q in (50, 90, 99)] == [None, None, None]
    assert peer["limit_tok_s"] == fms["limit_tok_s"] and peer["pct_of_limit"] > 0
    assert (peer["hf_mamba_kernels"] is None) == (architecture == "llama")
    written = json.loads((tmp_path / "serving.json").read_text())
    assert written["results"][1]["output_tokens_per_s"] == peer["output_tokens_per_s"]
    header, _, hf_line = (tmp_path / "serving.csv").read_text().splitlines()
    assert hf_line.split(",")[header.split(",").index("hf_batch_size")] == "2"
    measured = targets.ROWS_BY_NAME["serving-hybrid"].read(written)
    assert measured["hf_static_tok_s"] == peer["output_tokens_per_s"] and measured["hf_static_batch_size"] == 2


def test_hybrid_serving_row_runs_the_peer_on_cuda_only():
    job, run_dir = targets.JOBS["serving-hybrid"], targets.REPO / "results" / "serving-hybrid-1"
    cuda = job.argv(JobContext("cuda", run_dir, 60.0))
    assert cuda[cuda.index("--peers") + 1] == "hf_generate" and "--hf_batch_size" not in cuda
    assert "--peers" not in job.argv(JobContext("cpu", run_dir, 60.0))


def test_hybrid_row_shows_a_failed_peer():
    raw = {"results": [{"system": "fms LLMEngine", "output_tokens_per_s": 3_700.0, "ttft_p50_ms": 900.0,
                        "tpot_p50_ms": 10.0},
                       {"system": "hf generate", "error": "OutOfMemoryError: CUDA out of memory"}]}
    row = targets.ROWS_BY_NAME["serving-hybrid"]
    values = row.read(raw)
    assert row.meets(values) is False
    assert row.show(values).endswith("HF static generate: failed: OutOfMemoryError: CUDA out of memory")
    raw["results"][1] = {"system": "hf generate", "output_tokens_per_s": 925.0, "hf_batch_size": 64}
    values = row.read(raw)
    assert row.meets(values) is True and values["fms_over_hf_static"] == 4.0
    assert row.show(values) == "3,700 tok/s (4.0x HF static), TTFT p50 900 ms, TPOT p50 10.0 ms; " \
                               "HF static generate 925 tok/s"
