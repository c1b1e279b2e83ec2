"""Static-batch generation over any attention op's cache: greedy or sampled, stopping at EOS."""

from typing import Sequence

import torch

from fms.modules.attention import get_attention_op
from fms.runtime.decode import DecodeRow, DecodeWindowRunner, why_no_graphs
from fms.runtime.inputs import as_int, eos_token_ids, prompt_batch
from fms.runtime.sampling_params import SamplingParams, check_seed
from fms.runtime.sampler import SamplingTensors, needs_sampling, sample
from fms.runtime.transfer import to_device


def _per_prompt_counts(max_new_tokens, num_prompts: int) -> list[int]:
    count = as_int(max_new_tokens)
    if count is not None:
        if count < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        return [count] * num_prompts
    counts = [as_int(n) for n in max_new_tokens] if isinstance(max_new_tokens, (list, tuple)) else []
    if len(counts) != num_prompts or any(n is None or n < 0 for n in counts):
        raise ValueError(
            f"max_new_tokens must be an int >= 0 or one such int per prompt ({num_prompts}), got {max_new_tokens!r}"
        )
    return counts


def validate_prompts(prompts, vocab_size: int, max_new_tokens, max_len: int) -> list[list[int]]:
    """Token-id lists (fms.runtime.inputs.prompt_batch), checked against the vocabulary and the context length.

    max_new_tokens: one count for every prompt or one per prompt.
    """
    ids = prompt_batch(prompts, vocab_size)
    counts = _per_prompt_counts(max_new_tokens, len(ids))
    for i, (p, n) in enumerate(zip(ids, counts)):
        if len(p) + n > max_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={n} that is "
                f"{len(p) + n}, over the model's context of {max_len} tokens"
            )
    return ids


def _check_sampling(temperature, top_k, top_p):
    """do_sample's parameters, refused with SamplingParams' messages (which name the value and the range)."""
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling (do_sample=True), got {temperature!r}")
    _sampling_params(True, temperature, top_k, top_p)


def generate(
    model,
    prompts: Sequence,
    max_new_tokens,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    attn_name: str | None = None,
    prefill_chunk_size: int | None = None,
    return_stats: bool = False,
    on_step=None,
    decode_window: int | None = None,
    cuda_graphs: bool = False,
    compile_decode: bool = False,
    **cache_options,
):
    """Generate for a batch of prompts of different lengths; returns the new token ids per prompt.

    max_new_tokens: one count for every prompt, or one per prompt (a row leaves the batch when it
    has its tokens, as at EOS). attn_name picks the attention op (default: the model's);
    cache_options go to its cache (e.g. page_size=, num_pages= for "paged"). With return_stats,
    also returns a dict of cache memory statistics at the fullest point of the run.
    on_step(kind, cache, num_steps) is called after the prefill ("prefill", num_steps 0) and after
    each decode step or window ("decode", the one-token steps it ran), once its tokens are sampled:
    benchmarks time steps with it.

    decode_window=k decodes in windows of up to k one-token steps with one host synchronization
    each (Generator); cuda_graphs and compile_decode apply to those steps. A single call pays the
    graph capture and compilation: reuse a Generator to amortize them.
    """
    ids, counts, seed, eos_token_id = _checked_call(model, prompts, max_new_tokens, do_sample, temperature, top_k,
                                                    top_p, seed, eos_token_id, prefill_chunk_size)
    max_seq_len = max(len(p) + n for p, n in zip(ids, counts))
    generator = Generator(model, attn_name, max_batch_size=len(ids), max_seq_len=max_seq_len,
                          decode_window=decode_window, cuda_graphs=cuda_graphs, compile_decode=compile_decode,
                          **cache_options)
    return generator._run(ids, counts, do_sample, temperature, top_k, top_p, seed, eos_token_id,
                          prefill_chunk_size, return_stats, on_step)


def _checked_call(model, prompts, max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id,
                  prefill_chunk_size):
    """A generation call's arguments checked before anything is allocated.

    -> (token-id lists, count per prompt, seed as an int or None, EOS ids as a tuple of ints).
    """
    config = model.config
    ids = validate_prompts(prompts, config.vocab_size, max_new_tokens, config.max_position_embeddings)
    if do_sample:
        _check_sampling(temperature, top_k, top_p)
    if prefill_chunk_size is not None and (as_int(prefill_chunk_size) is None or prefill_chunk_size < 1):
        raise ValueError(f"prefill_chunk_size must be >= 1 (an int) or None, got {prefill_chunk_size!r}")
    return (ids, _per_prompt_counts(max_new_tokens, len(ids)), check_seed(seed),
            eos_token_ids(eos_token_id, config.vocab_size))


class Generator:
    """Static-batch generation over one cache that lives across calls (up to max_batch_size prompts
    of up to max_seq_len tokens with their new tokens), so that what a run sets up once (the cache,
    a decode window's CUDA graphs and compiled step) serves every call.

    It drives the cache's KV manager as its own scheduler: each step reserves room through the
    manager, the cache applies the grants and builds the step's metadata. Decoding always goes
    through the runtime's decode loop (fms.runtime.decode.DecodeWindowRunner) and its one sampler
    (counter-based noise from seed + row and the position):

    decode_window=None: windows of one step, one host synchronization per generated token.
    decode_window=k: windows of up to k one-token steps run back to back with the inputs computed on
    the device, the host synchronizing once per window: tokens a row samples after its EOS in a
    window are dropped. cuda_graphs replays each step from a CUDA graph captured for max_batch_size
    rows (CUDA only); compile_decode torch.compiles the step. A window reserves room for all its
    steps when it starts, so return_stats counts up to k - 1 tokens per row that a row ending at EOS
    never writes.
    """

    def __init__(self, model, attn_name: str | None = None, *, max_batch_size: int, max_seq_len: int,
                 decode_window: int | None = None, cuda_graphs: bool = False, compile_decode: bool = False,
                 **cache_options):
        self.model = model
        self.op = get_attention_op(attn_name or model.attn_name)
        if decode_window is not None and (isinstance(decode_window, bool) or not isinstance(decode_window, int)
                                          or decode_window < 1):
            raise ValueError(f"decode_window must be an int >= 1 or None, got {decode_window!r}")
        if decode_window is None and (cuda_graphs or compile_decode):
            raise ValueError("cuda_graphs and compile_decode apply to decode windows: give decode_window too")
        self.device = model.embedding.weight.device
        self.cache = self.op.create_cache(model.cache_spec(), max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                                          **cache_options)
        self.kv = self.cache.manager
        self.decode_window = decode_window or 1
        if cuda_graphs:
            why_not = why_no_graphs(model, self.op.name, self.device)
            if why_not is not None:
                raise ValueError(f"cuda_graphs cannot be used here: {why_not}")
        self.runner = DecodeWindowRunner(model, self.cache, self.op.name, self.decode_window,
                                         [max_batch_size] if cuda_graphs else None, compile_model=compile_decode)

    def generate(self, prompts: Sequence, max_new_tokens, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_token_id: int | Sequence[int] | None = None, prefill_chunk_size: int | None = None,
                 return_stats: bool = False, on_step=None):
        """As the module's generate(), over this generator's cache."""
        ids, counts, seed, eos_token_id = _checked_call(self.model, prompts, max_new_tokens, do_sample, temperature,
                                                        top_k, top_p, seed, eos_token_id, prefill_chunk_size)
        return self._run(ids, counts, do_sample, temperature, top_k, top_p, seed, eos_token_id, prefill_chunk_size,
                         return_stats, on_step)

    def _step(self, seq_ids, chunks) -> torch.Tensor:
        """One forward over these prompt chunks (rows right-padded); -> each row's last-token logits (B, V)."""
        cache, num_new = self.cache, [len(c) for c in chunks]
        meta = cache.prepare(seq_ids, num_new)  # reserve through the KV manager, apply, build the metadata
        width = meta.query_len
        tokens = to_device(torch.tensor([c + [0] * (width - len(c)) for c in chunks], dtype=torch.long), self.device)
        last = to_device(torch.tensor([n - 1 for n in num_new], dtype=torch.long), self.device)
        return self.model(tokens, attn_name=self.op.name, logits_positions=last, cache=cache, meta=meta)[:, 0]

    def _decode(self, rows: list[DecodeRow]) -> list[list[int]]:
        """A decode window: room for every row's steps through the manager, then the runtime's loop."""
        seq_ids, steps = [r.seq_id for r in rows], [r.num_steps for r in rows]
        self.cache.check_step(seq_ids, steps)
        self.cache.apply(self.kv.reserve(seq_ids, steps))
        return self.runner.run(rows)

    @torch.no_grad()
    def _run(self, ids, new_counts, do_sample, temperature, top_k, top_p, seed, eos_token_id, prefill_chunk_size,
             return_stats, on_step):
        """generate() on arguments _checked_call has checked."""
        cache, kv = self.cache, self.kv
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
        if len(ids) > cache.max_batch_size:
            raise ValueError(f"{len(ids)} prompts, over this generator's max_batch_size of {cache.max_batch_size}")
        for i, (p, n) in enumerate(zip(ids, new_counts)):
            if len(p) + n > cache.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={n} that is {len(p) + n}, "
                                 f"over this generator's max_seq_len of {cache.max_seq_len}")
        outputs: list[list[int]] = [[] for _ in ids]
        if max(new_counts) == 0:
            return (outputs, {}) if return_stats else outputs
        if kv.sequences:
            raise RuntimeError(f"the cache still holds sequences {kv.sequences} from an interrupted call")

        params = _sampling_params(do_sample, temperature, top_k, top_p)
        # unseeded: drawn from torch's generator, so that torch.manual_seed makes a run repeatable
        base_seed = seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item())
        peak = {}

        def record():
            if not return_stats:
                return
            stats = cache.memory_stats().as_dict()
            if stats["kv_bytes_in_use"] >= peak.get("kv_bytes_in_use", -1):
                peak.update(stats)

        def finish(seq_id, token) -> bool:
            """Record a sampled token; True (and the sequence freed) when the row has ended."""
            outputs[seq_id].append(token)
            if token in eos or len(outputs[seq_id]) >= new_counts[seq_id]:
                kv.free(seq_id)  # pages go back to the pool as soon as a sequence ends
                return True
            return False

        try:
            for seq_id in range(len(ids)):
                slot, _ = kv.add(seq_id)
                cache.init_slots([slot])
            # prefill, in chunks if asked; every row advances by up to one chunk per step
            chunk = prefill_chunk_size or max(len(p) for p in ids)
            done = [0] * len(ids)
            last_logits = [None] * len(ids)
            while any(d < len(p) for d, p in zip(done, ids)):
                rows = [i for i, p in enumerate(ids) if done[i] < len(p)]
                for seq_id in rows:  # a chunked long prompt keeps only the window's pages, like decode
                    cache.release_out_of_window(seq_id)
                chunks = [ids[i][done[i]: done[i] + chunk] for i in rows]
                logits = self._step(rows, chunks)
                for r, i in enumerate(rows):
                    done[i] += len(chunks[r])
                    last_logits[i] = logits[r]
            record()
            next_tokens = _sample_first(torch.stack(last_logits), params, base_seed, [len(p) for p in ids])
            if on_step is not None:
                on_step("prefill", cache, 0)
            active = [i for i, n in enumerate(new_counts) if n > 0]
            next_tokens = next_tokens[active] if len(active) < len(ids) else next_tokens
            for seq_id in set(range(len(ids))) - set(active):
                kv.free(seq_id)
            active = [s for s, t in zip(active, next_tokens.tolist()) if not finish(s, t)]
            while active:  # one decode loop: per-token decoding is a window of one step
                for seq_id in active:
                    cache.release_out_of_window(seq_id)
                rows = [DecodeRow(s, outputs[s][-1], kv.length(s), min(self.decode_window,
                                  new_counts[s] - len(outputs[s])), params, base_seed + s) for s in active]
                sampled = self._decode(rows)
                record()
                if on_step is not None:
                    on_step("decode", cache, max(r.num_steps for r in rows))
                active = [s for s, tokens in zip(active, sampled)
                          if not any(finish(s, t) for t in tokens)]  # stops at the row's first end
        finally:
            for seq_id in kv.sequences:
                kv.free(seq_id)
        return (outputs, peak) if return_stats else outputs


def _sampling_params(do_sample, temperature, top_k, top_p) -> SamplingParams:
    if not do_sample:
        return SamplingParams()
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0 if top_p is None else top_p)


def _sample_first(logits, params, base_seed: int, prompt_lens: list[int]) -> torch.Tensor:
    """The token after each prompt, by the runtime's sampler (row i seeded base_seed + i)."""
    if not needs_sampling([params]):
        return sample(logits, None)
    rows = len(prompt_lens)
    tensors = SamplingTensors.build([params] * rows, [base_seed + i for i in range(rows)], logits.shape[-1],
                                    logits.device)
    return sample(logits, tensors, to_device(torch.tensor(prompt_lens, dtype=torch.long), logits.device))
