"""fms.bench.roofline: decode bytes, prefill FLOPs and the simulated serving floor, against hand-computed numbers."""

import pytest

from fms.bench.roofline import (
    H200_BF16_PEAK_FLOPS,
    H200_COPY_BANDWIDTH_BYTES_PER_S,
    ModelCost,
    batch1_decode_limit_tok_s,
    decode_step_bytes,
    limit_fields,
    prefill_flops,
    serving_roofline,
    static_roofline,
)
from fms.bench.workloads import MixedWorkload
from fms.models import get_model

# 1000 parameters in 2000 bytes, 10 KV bytes per token; 1000 B/s and 1e4 FLOP/s keep the arithmetic readable
TINY = ModelCost(num_parameters=1000, weight_bytes=2000, kv_bytes_per_token=10)
RATES = dict(bandwidth=1000.0, peak_flops=1e4)


def test_decode_step_bytes_and_prefill_flops():
    # 2000 weight bytes + 10 bytes x (4 + 6) tokens read
    assert decode_step_bytes(TINY, [4, 6]) == 2100
    # a hybrid also reads and writes each live sequence's state: + 2 x 100 x 2 sequences
    hybrid = ModelCost(1000, 2000, 10, state_bytes_per_sequence=100)
    assert decode_step_bytes(hybrid, [4, 6]) == 2500
    assert prefill_flops(TINY, 8) == 16_000  # 2 x 1000 parameters x 8 tokens


def test_serving_floor_simulates_which_requests_are_live():
    # prompts 3 and 5 tokens, 2 and 3 output tokens; the prefill gives each its first token.
    # step 1: both live, attending 3+1 and 5+1 tokens: 2000 + 10 x (4 + 6) = 2100 bytes; the first is done
    # step 2: the second attends 7 tokens: 2000 + 10 x 7 = 2070 bytes
    r = serving_roofline(TINY, [3, 5], [2, 3], max_num_seqs=2, **RATES)
    assert r.num_decode_steps == 2 and r.decode_bytes == 4170
    assert r.decode_s == pytest.approx(4.17)  # 4170 B / 1000 B/s
    assert r.prefill_flops == 16_000 and r.prefill_s == pytest.approx(1.6)  # 2 x 1000 x (3 + 5) / 1e4
    assert r.num_output_tokens == 5 and r.limit_tok_s == pytest.approx(5 / 5.77)
    assert r.mean_bytes_per_step == pytest.approx(2085)


def test_serving_floor_with_one_slot_runs_requests_one_after_the_other():
    # step 1: first request alone, 4 tokens: 2040; then the second: 6 tokens 2060, 7 tokens 2070
    r = serving_roofline(TINY, [3, 5], [2, 3], max_num_seqs=1, **RATES)
    assert r.num_decode_steps == 3 and r.decode_bytes == 6170
    assert r.limit_tok_s == pytest.approx(5 / (6.17 + 1.6))


def test_hybrid_state_and_one_token_requests():
    hybrid = ModelCost(1000, 2000, 10, state_bytes_per_sequence=100)
    # as the two-slot case (4170 bytes) + 2 x 100 per live sequence per step: 2 x 200 + 1 x 200
    assert serving_roofline(hybrid, [3, 5], [2, 3], 2, **RATES).decode_bytes == 4770
    # one output token comes from the prefill alone: no decode step, floor = 2 x 1000 x 4 / 1e4 = 0.8 s
    r = serving_roofline(TINY, [4], [1], 1, **RATES)
    assert r.num_decode_steps == 0 and r.decode_s == 0 and r.limit_tok_s == pytest.approx(1 / 0.8)


def test_static_batch_and_batch1_limits():
    # 2 rows of 4 tokens, 3 new each: steps attend 5 and 6 tokens per row: (2000 + 100) + (2000 + 120)
    r = static_roofline(TINY, batch_size=2, context_len=4, max_new_tokens=3, **RATES)
    assert r.decode_bytes == 4220 and r.prefill_flops == 16_000
    assert r.limit_tok_s == pytest.approx(6 / (4.22 + 1.6))
    # one sequence after 9 cached tokens reads 2000 + 10 x 10 bytes per token
    assert batch1_decode_limit_tok_s(TINY, 9, bandwidth=1000.0) == pytest.approx(1000 / 2100)
    fields = limit_fields(r, r.limit_tok_s / 4)
    assert fields["pct_of_limit"] == pytest.approx(25.0) and fields["roofline"]["bandwidth_bytes_per_s"] == 1000.0


def test_defaults_are_the_h200_figures():
    r = serving_roofline(TINY, [4], [2], 1)
    assert r.bandwidth_bytes_per_s == H200_COPY_BANDWIDTH_BYTES_PER_S == 4.28e12
    assert r.peak_flops == H200_BF16_PEAK_FLOPS == 790e12


def test_model_cost_reads_parameters_and_cache_spec():
    cost = ModelCost.of(get_model("llama", "nano"))
    # embedding 512 x 64 + untied LM head 512 x 64 + 2 layers x (q 64x64, k and v 64x32, o 64x64,
    # MLP 3 x 64 x 128, 2 norms of 64) + final norm 64 = 32768 + 32768 + 2 x 36992 + 64 = 139584, fp32
    assert cost.num_parameters == 139_584 and cost.weight_bytes == 139_584 * 4
    # K and V x 2 attention layers x 2 KV heads x head_dim 16 x 4 bytes
    assert cost.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4 and cost.state_bytes_per_sequence == 0


def test_llama_3_2_1b_reference_point():
    """Sanity check against the figures quoted for the serving workload on an H200 (bf16)."""
    # 128256 x 2048 tied embedding + 16 x (2048 x 3072 qkv + 2048 x 2048 o + 3 x 2048 x 8192 MLP + 2 x 2048 norms)
    # + 2048 final norm = 1_235_814_400 parameters, 2 bytes each; KV: 2 x 16 layers x 8 heads x 64 x 2 bytes
    cost = ModelCost(1_235_814_400, 2_471_628_800, 32_768)
    lengths = MixedWorkload(128, (64, 512), (256, 256), seed=0).lengths()
    r = serving_roofline(cost, [p for p, _ in lengths], [o for _, o in lengths], max_num_seqs=128)
    assert r.decode_s == pytest.approx(0.25, rel=0.03)
    assert r.prefill_s == pytest.approx(0.12, rel=0.03)
    assert r.limit_tok_s == pytest.approx(87.8e3, rel=0.01)


@pytest.mark.parametrize("call, message", [
    (lambda: ModelCost(-1, 0, 0), "num_parameters must be an int >= 0, got -1"),
    (lambda: serving_roofline(TINY, [3], [2, 2], 1), "one output length per prompt"),
    (lambda: serving_roofline(TINY, [3], [2], 0), "max_num_seqs must be >= 1, got 0"),
    (lambda: serving_roofline(TINY, [3], [2], 1, bandwidth=0), "bandwidth must be > 0 bytes/s, got 0"),
])
def test_bad_inputs_name_the_value(call, message):
    with pytest.raises(ValueError) as exc:
        call()
    assert message in str(exc.value)
