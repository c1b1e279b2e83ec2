"""HF transformers peers: a twin of our model (same config, same weights) and its timed generate / generate_batch."""

import importlib.util
import time

import torch

from fms.bench.timing import peak_memory_gb, release_memory, reset_peak_memory, synchronize, time_calls


def hf_config_dict(architecture: str, config) -> dict:
    """Our config -> HF config.json fields (the inverse of the models' *_config_from_hf)."""
    c = config
    hf = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=c.bos_token_id,
        eos_token_id=None,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None and c.pad_token_id < c.vocab_size else 0,
        rope_theta=c.rope_theta,
    )
    if c.rope_scaling is not None:
        s = c.rope_scaling
        hf["rope_scaling"] = dict(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                                  high_freq_factor=s.high_freq_factor,
                                  original_max_position_embeddings=s.original_max_position_embeddings)
    if c.sliding_window is not None or c.alibi or c.attn_logit_softcapping is not None:
        raise ValueError("the HF peer supports plain causal attention only (no sliding window/alibi/softcap)")
    if architecture == "llama":
        return dict(hf, model_type="llama")
    granite = dict(embedding_multiplier=c.embedding_multiplier,
                   attention_multiplier=c.attention_multiplier or c.head_dim ** -0.5,
                   residual_multiplier=c.residual_multiplier, logits_scaling=c.logits_scaling)
    if architecture == "granite":
        return dict(hf, model_type="granite", **granite)
    if architecture == "granite_hybrid":
        hybrid = dict(
            hf, **granite, model_type="granitemoehybrid", layer_types=list(c.layer_types),
            position_embedding_type=c.position_embedding_type,
            shared_intermediate_size=c.intermediate_size, intermediate_size=c.expert_intermediate_size or
            c.intermediate_size, num_local_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_token,
        )
        if "mamba" in c.layer_types:
            inner = c.mamba_num_heads * c.mamba_head_dim
            if inner % c.hidden_size:
                raise ValueError(f"HF computes the Mamba width as an integer multiple of hidden_size; {inner} is not")
            hybrid.update(
                mamba_n_heads=c.mamba_num_heads, mamba_d_head=c.mamba_head_dim, mamba_d_state=c.mamba_state_size,
                mamba_n_groups=c.mamba_num_groups, mamba_d_conv=c.mamba_conv_kernel,
                mamba_chunk_size=c.mamba_chunk_size, mamba_conv_bias=c.mamba_conv_bias,
                mamba_proj_bias=c.mamba_proj_bias, mamba_expand=inner // c.hidden_size,
            )
        return hybrid
    raise ValueError(f"no HF peer for architecture {architecture!r}")


def _hf_config(hf: dict):
    import inspect

    from transformers import AutoConfig

    hf = dict(hf)
    model_type = hf.pop("model_type")
    config_class = type(AutoConfig.for_model(model_type))
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:  # transformers v5
        params = {"rope_type": "default", "rope_theta": hf.pop("rope_theta")}
        params.update(hf.pop("rope_scaling", None) or {})
        hf["rope_parameters"] = params
    return AutoConfig.for_model(model_type, **hf)


def hf_twin(model, architecture: str):
    """A HF transformers model with our config and a copy of our weights (same device and dtype)."""
    from transformers import AutoModelForCausalLM

    from fms.utils import serialization

    rules, _ = serialization._RULES[architecture]
    config = _hf_config(hf_config_dict(architecture, model.config))
    param = model.embedding.weight
    with torch.device(param.device):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=param.dtype, attn_implementation="sdpa")
    hf_state = hf_model.state_dict()
    filled = set()
    with torch.no_grad():
        for name, ours in model.named_parameters():
            sources, rule = serialization._sources_for(name, rules)
            if rule.transform is not None:
                raise ValueError(f"cannot invert the checkpoint transform for {name}")
            absent = [src for src in sources if src not in hf_state]
            if absent:
                raise ValueError(f"the installed transformers has no tensor {absent[0]} (for our {name}); "
                                 "its names for this model differ from the checkpoint's")
            if len(sources) == 1:
                pieces = [ours]
            else:
                pieces = ours.split([hf_state[s].shape[0] for s in sources], dim=0)
            for source, piece in zip(sources, pieces):
                if tuple(hf_state[source].shape) != tuple(piece.shape):
                    raise ValueError(f"{name} {list(piece.shape)} does not fit HF {source} "
                                     f"{list(hf_state[source].shape)}")
                hf_state[source].copy_(piece)
                filled.add(source)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    buffers = {n for n, _ in hf_model.named_buffers()}
    missing = sorted(set(hf_state) - filled - tied - buffers)
    if missing:
        raise ValueError(f"HF parameters with no fms counterpart: {missing[:5]}")
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = config.pad_token_id
    return hf_model.eval()


@torch.no_grad()
def hf_generate_point(hf_model, prompts, max_new_tokens, *, repeats, warmup, device) -> dict:
    """HF `generate` (static cache off, attn sdpa) on equal-length prompts: output tokens/s."""
    input_ids = torch.tensor(prompts, dtype=torch.long, device=device)
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                  min_new_tokens=max_new_tokens, do_sample=False)

    def run():
        return hf_model.generate(input_ids, **kwargs)[:, input_ids.shape[1]:]

    e2e, out, peak_alloc = time_calls(run, warmup, repeats, device)
    return {"e2e_latency_ms": e2e, "output_tokens_per_s": out.numel() / (e2e / 1e3),
            "requests_per_s": len(prompts) / (e2e / 1e3), "peak_gpu_mem_allocated_gb": peak_alloc,
            "outputs": out.tolist()}


HF_STATIC_SYSTEM = "hf generate"  # the serving results' row of HF's static generate (peer hf_generate)
WARMUP_NEW_TOKENS = 2  # the static peer's warm-up: one prefill and one decode step of the largest batch


def static_batches(num_requests: int, batch_size: int | None) -> list[range]:
    """Request indices per static batch, in workload order: batch_size at a time (None: all in one)."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"hf_batch_size must be an int >= 1 (requests per HF generate call) or None (all requests "
                         f"in one call), got {batch_size!r}")
    size = num_requests if batch_size is None else min(batch_size, num_requests)
    return [range(start, min(start + size, num_requests)) for start in range(0, num_requests, size)]


def hf_mamba_kernels(hf_model) -> str | None:
    """Which Mamba kernels HF's hybrid layers run: the CUDA packages if importable, else HF's torch reference."""
    # by module, not config: HF's spelling of a Mamba layer type has changed ("mamba", "linear_attention")
    if not any("Mamba" in type(module).__name__ for module in hf_model.modules()):
        return None
    found = [name for name in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(name) is not None]
    return ", ".join(found) if found else "torch reference (mamba_ssm and causal_conv1d not installed)"


def _real_tokens(row: list[int], length: int, eos_token_ids: frozenset[int]) -> list[int]:
    """A row's new tokens as our engine would return them: its own length, up to and including an EOS."""
    row = row[:length]
    for i, token in enumerate(row):
        if token in eos_token_ids:
            return row[:i + 1]
    return row


@torch.no_grad()
def _generate_left_padded(hf_model, prompts, output_lens, eos_token_ids, device) -> tuple[list[list[int]], int, int]:
    """One static HF generate call on prompts of mixed lengths.

    -> (each request's real new tokens, prompt pad tokens, token slots generated: rows x new columns)
    """
    pad_id = hf_model.generation_config.pad_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding: every prompt ends at column width - 1
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    # EOS ignored as our engine ignores it (sampled and kept, never a stop): eos_token_id None. HF's
    # min_new_tokens would instead mask EOS out of the logits, so greedy tokens could differ from ours.
    out = hf_model.generate(input_ids.to(device), attention_mask=attention_mask.to(device),
                            max_new_tokens=max(output_lens), do_sample=False,
                            eos_token_id=sorted(eos_token_ids) or None, pad_token_id=pad_id)
    new = out[:, width:]  # (batch, new tokens); rows that met an EOS go on in pad_id
    real = [_real_tokens(row, n, eos_token_ids) for row, n in zip(new.tolist(), output_lens)]
    return real, int((attention_mask == 0).sum()), new.numel()


def hf_static_generate_point(hf_model, prompts, output_lens, *, batch_size: int | None = None,
                             eos_token_ids=(), device) -> dict:
    """HF's static `generate` on a serving workload: left-padded batches of batch_size requests, greedy.

    Each batch generates its longest output length; a request's tokens past its own length are
    discarded and not counted (a static batch runs until its longest member). One untimed warm-up
    call comes first: the batch_size longest prompts (the largest batch shape, so the prefill's
    memory peak) with WARMUP_NEW_TOKENS new tokens (prefill and decode both run). With batch_size
    None, all requests go in one batch, halved on CUDA out-of-memory in the warm-up until one fits.
    """
    if len(prompts) != len(output_lens) or not prompts:
        raise ValueError(f"need one output length per prompt and >= 1 prompt, got {len(prompts)} prompts and "
                         f"{len(output_lens)} output lengths")
    eos = frozenset(eos_token_ids)
    size, out_of_memory = len(static_batches(len(prompts), batch_size)[0]), []
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    while True:  # the warm-up
        longest = by_length[-size:]
        try:
            _generate_left_padded(hf_model, [prompts[i] for i in longest],
                                  [min(output_lens[i], WARMUP_NEW_TOKENS) for i in longest], eos, device)
            break
        except torch.cuda.OutOfMemoryError:
            if batch_size is not None or size == 1:
                raise
        out_of_memory.append(size)
        size = (size + 1) // 2
        release_memory(device)  # after the except block, which held the failed call's tensors
    batches = static_batches(len(prompts), size)
    reset_peak_memory(device)
    outputs, num_pad, num_generated = [], 0, 0
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        tokens, pad, generated = _generate_left_padded(hf_model, [prompts[i] for i in batch],
                                                       [output_lens[i] for i in batch], eos, device)
        outputs += tokens
        num_pad += pad
        num_generated += generated
    synchronize(device)
    duration = time.perf_counter() - start
    num_out = sum(len(t) for t in outputs)
    return {"e2e_latency_ms": duration * 1e3, "output_tokens_per_s": num_out / duration,
            "requests_per_s": len(prompts) / duration, "peak_gpu_mem_allocated_gb": peak_memory_gb(device)[0],
            "batch_size": size, "num_batches": len(batches), "out_of_memory_batch_sizes": out_of_memory,
            "num_prompt_pad_tokens": num_pad, "num_output_tokens": num_out, "num_generated_tokens": num_generated,
            "outputs": outputs}


HF_CB_ATTN = ("paged|sdpa", "sdpa", "paged|eager")


def hf_generate_batch_point(hf_model, prompts, max_new_tokens, *, repeats, warmup, device) -> dict:
    """HF continuous batching (`generate_batch`), trying the paged attention implementations in HF_CB_ATTN.

    Where generate_batch takes persistent_manager, the warm-up call builds the manager (cache sized
    from free GPU memory, CUDA graphs captured) and the timed calls reuse it: steady-state throughput.
    Otherwise every timed call includes that set-up (reported as manager_reused False).
    """
    import inspect

    from transformers import GenerationConfig

    if not hasattr(hf_model, "generate_batch"):
        raise RuntimeError("this transformers has no generate_batch (continuous batching)")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=hf_model.generation_config.pad_token_id)
    accepted = inspect.signature(hf_model.generate_batch).parameters
    extra = {"progress_bar": False} if "progress_bar" in accepted else {}
    reuse = "persistent_manager" in accepted
    if reuse:
        extra["persistent_manager"] = True
    destroy = getattr(hf_model, "destroy_cached_continuous_batching_manager", None)
    original = hf_model.config._attn_implementation
    errors = []
    for attn in HF_CB_ATTN:
        try:
            hf_model.set_attn_implementation(attn)

            def run():
                results = hf_model.generate_batch(inputs=prompts, generation_config=gen, **extra)
                tokens = [list(r.generated_tokens) for r in results.values()]
                if len(tokens) != len(prompts) or any(getattr(r, "error", None) for r in results.values()):
                    raise RuntimeError(f"generate_batch returned {len(tokens)} of {len(prompts)} results")
                return tokens

            e2e, tokens, peak_alloc = time_calls(run, max(warmup, 1), repeats, device)
            return {"attn_implementation": attn, "manager_reused": reuse, "e2e_latency_ms": e2e,
                    "output_tokens_per_s": sum(len(t) for t in tokens) / (e2e / 1e3),
                    "requests_per_s": len(prompts) / (e2e / 1e3), "peak_gpu_mem_allocated_gb": peak_alloc,
                    "outputs": tokens, "attempts_failed": errors}
        except Exception as exc:  # noqa: BLE001 - report and try the next implementation
            errors.append(f"{attn}: {type(exc).__name__}: {exc}")
        finally:
            try:
                if destroy is not None:
                    destroy()  # the manager was sized for this point's requests
                hf_model.set_attn_implementation(original)
            except Exception:  # noqa: BLE001
                pass
    raise RuntimeError("generate_batch failed with every attention implementation: " + " | ".join(errors))


