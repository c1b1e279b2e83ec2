"""Roofline limits of inference work, derived from the bytes and FLOPs it needs: decode steps, prefill, serving runs.

A decode step must at least stream every weight once and read the cache of every live sequence:

    step bytes  = weight bytes (all parameters: count x dtype size)
                + kv_bytes_per_token x (tokens each live sequence attends to, the new one included)
                + 2 x Mamba state bytes per live sequence (hybrids: the state is read and written back)
    step floor  = step bytes / memory bandwidth

A prefill must at least do the matmuls of its tokens: FLOPs = 2 x parameters x prompt tokens (attention
score/value FLOPs are not included: at serving prompt lengths they are a few percent of the matmuls),
floor = FLOPs / peak FLOP/s. A continuous-batching run is simulated step by step (which requests are
live, their context lengths) to sum the decode bytes; its floor is decode floor + prefill floor, and
the output tok/s limit is output tokens / that floor.

Weight bytes count the input embedding table although a step gathers only a few of its rows: with
tied embeddings (Llama-3.2-1B) the same table is streamed as the LM head, so the count is exact there.
"""

from dataclasses import asdict, dataclass

# Measured on an H200 (device-to-device copy, bytes read + written per second) and its dense bf16 peak.
H200_COPY_BANDWIDTH_BYTES_PER_S = 4.28e12
H200_BF16_PEAK_FLOPS = 790e12


@dataclass(frozen=True)
class ModelCost:
    """What a model's work costs in memory traffic and arithmetic: the inputs of every roofline figure."""

    num_parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    state_bytes_per_sequence: int = 0  # Mamba state of one sequence (0 for pure attention)

    def __post_init__(self):
        for name in ("num_parameters", "weight_bytes", "kv_bytes_per_token", "state_bytes_per_sequence"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @classmethod
    def of(cls, model) -> "ModelCost":
        """From the model's parameters (count and dtype) and its cache spec."""
        params = list(model.parameters())
        spec = model.cache_spec()
        state = spec.state_spec
        return cls(num_parameters=sum(p.numel() for p in params),
                   weight_bytes=sum(p.numel() * p.element_size() for p in params),
                   kv_bytes_per_token=spec.kv_bytes_per_token,
                   state_bytes_per_sequence=0 if state is None else state.bytes_per_sequence)


def _check_rates(bandwidth: float, peak_flops: float) -> None:
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0 bytes/s, got {bandwidth}")
    if not peak_flops > 0:
        raise ValueError(f"peak_flops must be > 0 FLOP/s, got {peak_flops}")


def decode_step_bytes(cost: ModelCost, context_lens) -> int:
    """Bytes one decode step must move; context_lens: tokens each live sequence attends to (the new one included)."""
    return (cost.weight_bytes + cost.kv_bytes_per_token * sum(context_lens)
            + 2 * cost.state_bytes_per_sequence * len(context_lens))


def prefill_flops(cost: ModelCost, num_tokens: int) -> float:
    """2 x parameters x prompt tokens: the matmul FLOPs (attention score/value FLOPs not included)."""
    return 2.0 * cost.num_parameters * num_tokens


def batch1_decode_limit_tok_s(cost: ModelCost, context_len: int = 0,
                              bandwidth: float = H200_COPY_BANDWIDTH_BYTES_PER_S) -> float:
    """Tokens/s one sequence can decode at most: bandwidth / (weights + its KV + its state) per token."""
    _check_rates(bandwidth, 1.0)
    return bandwidth / decode_step_bytes(cost, [context_len + 1])


@dataclass(frozen=True)
class Roofline:
    """The floor of one run and what it was derived from (all sizes in bytes, times in seconds)."""

    limit_tok_s: float  # output tokens / (decode_s + prefill_s)
    decode_s: float
    prefill_s: float
    num_output_tokens: int
    num_prompt_tokens: int
    num_decode_steps: int
    decode_bytes: int  # summed over every decode step
    weight_bytes_per_step: int
    mean_bytes_per_step: float
    prefill_flops: float
    bandwidth_bytes_per_s: float
    peak_flops: float
    kv_bytes_per_token: int
    state_bytes_per_sequence: int
    note: str = "prefill FLOPs = 2 x parameters x prompt tokens (no attention FLOPs)"

    def as_dict(self) -> dict:
        return asdict(self)

    def pct_of_limit(self, output_tok_s: float | None) -> float | None:
        """A measured output tok/s as a percentage of the limit."""
        return None if output_tok_s is None else 100.0 * output_tok_s / self.limit_tok_s


def serving_roofline(cost: ModelCost, prompt_lens, output_lens, max_num_seqs: int,
                     bandwidth: float = H200_COPY_BANDWIDTH_BYTES_PER_S,
                     peak_flops: float = H200_BF16_PEAK_FLOPS) -> Roofline:
    """The floor of serving these requests with continuous batching of up to max_num_seqs sequences.

    Requests are admitted in order as slots free up; a request's prefill gives its first output token,
    then each decode step gives every live request one more token and reads its whole context.
    """
    _check_rates(bandwidth, peak_flops)
    if len(prompt_lens) != len(output_lens) or not prompt_lens:
        raise ValueError(f"need one output length per prompt (>= 1 request), got {len(prompt_lens)} prompts "
                         f"and {len(output_lens)} output lengths")
    if min(prompt_lens) < 1 or min(output_lens) < 1:
        raise ValueError("prompt and output lengths must all be >= 1")
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    waiting = list(zip(prompt_lens, output_lens))[::-1]  # pop() takes the next request
    live: list[list[int]] = []  # [cached tokens, output tokens still to decode]
    num_steps, decode_bytes = 0, 0
    while waiting or live:
        while waiting and len(live) < max_num_seqs:
            prompt, output = waiting.pop()
            if output > 1:  # the prefill sampled the first token
                live.append([prompt, output - 1])
        if not live:
            continue
        # each live sequence feeds its newest token and attends to everything cached plus that token
        decode_bytes += decode_step_bytes(cost, [cached + 1 for cached, _ in live])
        num_steps += 1
        for seq in live:
            seq[0] += 1
            seq[1] -= 1
        live = [seq for seq in live if seq[1] > 0]
    num_prompt, num_output = sum(prompt_lens), sum(output_lens)
    flops = prefill_flops(cost, num_prompt)
    decode_s, prefill_s = decode_bytes / bandwidth, flops / peak_flops
    return Roofline(limit_tok_s=num_output / (decode_s + prefill_s), decode_s=decode_s, prefill_s=prefill_s,
                    num_output_tokens=num_output, num_prompt_tokens=num_prompt, num_decode_steps=num_steps,
                    decode_bytes=decode_bytes, weight_bytes_per_step=cost.weight_bytes,
                    mean_bytes_per_step=decode_bytes / num_steps if num_steps else 0.0, prefill_flops=flops,
                    bandwidth_bytes_per_s=bandwidth, peak_flops=peak_flops,
                    kv_bytes_per_token=cost.kv_bytes_per_token,
                    state_bytes_per_sequence=cost.state_bytes_per_sequence)


def static_roofline(cost: ModelCost, batch_size: int, context_len: int, max_new_tokens: int,
                    bandwidth: float = H200_COPY_BANDWIDTH_BYTES_PER_S,
                    peak_flops: float = H200_BF16_PEAK_FLOPS) -> Roofline:
    """The floor of one static batch: batch_size prompts of context_len tokens, max_new_tokens each."""
    return serving_roofline(cost, [context_len] * batch_size, [max_new_tokens] * batch_size, batch_size,
                            bandwidth, peak_flops)


def limit_fields(roofline: Roofline, output_tok_s: float | None) -> dict:
    """What a benchmark row records: the limit, the measured share of it, and the inputs used."""
    pct = roofline.pct_of_limit(output_tok_s)
    return {"limit_tok_s": roofline.limit_tok_s, "pct_of_limit": pct, "roofline": roofline.as_dict()}
