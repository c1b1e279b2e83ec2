"""Log-likelihood scoring of (context, continuation) requests through any attention op, as lm-eval scores them.

Scoring follows lm-evaluation-harness: a request is a (context, continuation) pair and its score is
the summed log-probability of the continuation tokens given the context. The model always runs
through the cache driver protocol (create_cache -> add -> prepare -> model(cache=, meta=) -> free),
so `--mode default` (sdpa) and `--mode paged` (paged KV cache + FlexAttention) execute the same code
apart from the attention op. Each request is scored in two steps over one cache:

    tokens:  c0 c1 c2 c3 | k0 k1 k2          context c*, continuation k*
    step 1:  c0 c1 c2 c3                       logits at c3 only   -> log p(k0)
    step 2:               k0 k1                logits at k0, k1    -> log p(k1), log p(k2)

so the vocabulary-sized logits exist only for continuation tokens, and step 2 attends to context
that is already in the (paged) cache. Requests that share their input (MMLU's four one-token answers
share the whole prompt) are run once.

Requests that share only their context (a TruthfulQA question's answers) share it too where the cache can
fork a sequence (`SequenceCache.can_fork`: the paged cache, whose forked sequences hold the same pages):
step 1 runs each distinct context of a batch once, and each other answer's sequence is a fork of it before
step 2. A contiguous cache (`--mode default`) computes the context once per answer; share_context=False
gives the paged cache the same work, for a like-for-like timing of the attention ops.
"""

import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from fms.bench.timing import synchronize
from fms.eval.tasks import EvalError
from fms.modules.attention import get_attention_op


# ---------------------------------------------------------------------------------------------
# tokenization, the lm-evaluation-harness way
# ---------------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool | None = None) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for a causal LM.

    Trailing spaces of the context move to the continuation (" A" scores the space with the
    letter). The whole string is encoded once and split at the context's length, so the
    continuation gets the ids it has in running text. An empty context becomes one BOS (or EOS).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if context:
        whole = tokenizer.encode(context + continuation, add_bos=add_bos)
        context_ids = tokenizer.encode(context, add_bos=add_bos)
        if context_ids:
            return context_ids, whole[len(context_ids):]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    continuation_ids = tokenizer.encode(continuation, add_bos=False)
    if prefix is None:
        if len(continuation_ids) < 2:
            raise EvalError("an empty context needs a BOS or EOS token to condition on, and this tokenizer has neither")
        return continuation_ids[:1], continuation_ids[1:]
    return [prefix], continuation_ids


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenRequest:
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class ScoreRun:
    """What one scoring pass returns: results in request order plus what it cost."""

    results: list[tuple[float, bool]]  # (log-likelihood, is_greedy) per request
    request_batch: list[int | None]  # the forward batch that computed each request (None: nothing to run)
    batch_seconds: list[float]
    input_tokens: int  # tokens run through the model (after sharing identical inputs, and contexts if shared)
    num_rows: int  # distinct model inputs
    peak_cache: dict = field(default_factory=dict)  # cache.memory_stats() at the fullest step
    shared_context: bool = False  # answers with one context forked its sequence (the cache's pages)


@dataclass
class _Row:
    """One model input: the context, then the continuation minus its last token."""

    context: tuple[int, ...]
    extension: tuple[int, ...]
    requests: list[int] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.context) + len(self.extension)


def _build_rows(requests: Sequence[TokenRequest], vocab_size: int, max_len: int) -> list[_Row]:
    rows: dict[tuple, _Row] = {}
    for i, req in enumerate(requests):
        context, continuation = tuple(req.context), tuple(req.continuation)
        if not context:
            raise EvalError(f"request {i} has an empty context: give at least one token (e.g. BOS)")
        if len(continuation) > max_len:
            raise EvalError(
                f"request {i} has a continuation of {len(continuation)} tokens, over the model's context of "
                f"{max_len} tokens"
            )
        bad = [t for t in context + continuation if not 0 <= t < vocab_size]
        if bad:
            raise EvalError(
                f"request {i} has token ids outside the model's vocabulary [0, {vocab_size}): {bad[:5]}; "
                f"the tokenizer does not match the model (pass the model's own --tokenizer)"
            )
        if not continuation:
            continue  # scores 0.0 and is trivially greedy; nothing to run
        # keep the newest tokens when the input exceeds the context, as lm-eval does
        context = context[-(max_len - len(continuation) + 1):]
        key = (context, continuation[:-1])
        if key not in rows:
            rows[key] = _Row(context, continuation[:-1])
        rows[key].requests.append(i)
    return list(rows.values())


@torch.no_grad()
def score_requests(
    model,
    requests: Sequence[TokenRequest],
    attn_name: str = "sdpa",
    batch_size: int = 8,
    cache_options: dict | None = None,
    warmup: bool = False,
    progress: bool = False,
    desc: str | None = None,
    share_context: bool | None = None,
) -> ScoreRun:
    """Log-likelihood and is_greedy of each continuation given its context.

    Rows run longest context first (rows with one context next to each other), `batch_size` per forward; each
    batch's sequences are freed from the cache after it. With warmup, the first and last batches run once,
    untimed, before the timed pass (CUDA compilation of the attention kernels). share_context: run each distinct
    context of a batch once and fork it for the other answers (None: wherever the cache can fork).
    """
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    if share_context not in (None, True, False):
        raise EvalError(f"share_context must be True, False or None (where the cache can fork), got {share_context!r}")
    op = get_attention_op(attn_name)
    config = model.config
    device = model.embedding.weight.device
    rows = _build_rows(requests, config.vocab_size, config.max_position_embeddings)
    results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    request_batch: list[int | None] = [None] * len(requests)
    run = ScoreRun(results, request_batch, [], 0, len(rows))
    if not rows:
        return run
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].context), rows[r].context, -len(rows[r].extension)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    cache = op.create_cache(
        model.cache_spec(), max_batch_size=min(batch_size, len(rows)),
        max_seq_len=max(row.length for row in rows), **(cache_options or {}),
    )
    if share_context and not cache.can_fork:
        raise EvalError(f"share_context=True needs a cache that can fork a sequence; the {attn_name!r} op's "
                        f"{type(cache).__name__} cannot (pass share_context=None or False)")
    run.shared_context = cache.can_fork if share_context is None else share_context
    if warmup:
        # the longest and the shortest batch: two shapes, so torch.compile has made its shapes dynamic
        for batch in {0: batches[0], len(batches) - 1: batches[-1]}.values():
            _score_batch(model, op, cache, [rows[r] for r in batch], requests, device, run.shared_context)

    from tqdm.auto import tqdm

    for b, batch in enumerate(tqdm(batches, desc=desc or attn_name, disable=not progress, file=sys.stderr)):
        synchronize(device)
        start = time.perf_counter()
        scores, stats, tokens_run = _score_batch(model, op, cache, [rows[r] for r in batch], requests, device,
                                                 run.shared_context)
        synchronize(device)
        run.batch_seconds.append(time.perf_counter() - start)
        run.input_tokens += tokens_run
        if stats["kv_bytes_in_use"] >= run.peak_cache.get("kv_bytes_in_use", -1):
            run.peak_cache = stats
        for i, score in scores.items():
            results[i] = score
            request_batch[i] = b
    return run


def _score_batch(model, op, cache, rows: list[_Row], requests, device,
                 share_context: bool = False) -> tuple[dict[int, tuple[float, bool]], dict, int]:
    """Scores of the batch's requests, the cache's memory stats at its fullest, and the tokens run."""
    seq_ids = list(range(len(rows)))
    # the sequence whose step 1 computes each row's context: the batch's first row with that context when shared
    first_with: dict[tuple[int, ...], int] = {}
    source = [first_with.setdefault(row.context, s) if share_context else s for s, row in enumerate(rows)]
    contexts = [s for s in seq_ids if source[s] == s]
    added = []
    try:
        for s in contexts:
            cache.add(s)
            added.append(s)
        # step 1: every distinct context, logits at its last token only
        meta = cache.prepare(contexts, [len(rows[s].context) for s in contexts])
        tokens = _right_padded([rows[s].context for s in contexts], meta.query_len, device)
        last = _to_device([len(rows[s].context) - 1 for s in contexts], device)
        first = model(tokens, attn_name=op.name, logits_positions=last, cache=cache, meta=meta)
        first = first[:, 0].float().log_softmax(dim=-1)  # (number of contexts, V)
        # step 2: continuations longer than one token, logits at every fed token; a row whose context another
        # row computed starts as a fork of that sequence (its pages shared, the partial last one copied on write)
        extended = [s for s in seq_ids if rows[s].extension]
        forks = [(source[s], s) for s in extended if source[s] != s]
        if forks:
            cache.fork_many(forks)
            added += [child for _, child in forks]
        rest = None
        if extended:
            meta = cache.prepare(extended, [len(rows[s].extension) for s in extended])
            tokens = _right_padded([rows[s].extension for s in extended], meta.query_len, device)
            rest = model(tokens, attn_name=op.name, cache=cache, meta=meta).float().log_softmax(dim=-1)  # (B2, T, V)
        stats = cache.memory_stats().as_dict()
    finally:
        for seq_id in added:
            cache.free(seq_id)
    tokens_run = sum(len(rows[s].context) for s in contexts) + sum(len(rows[s].extension) for s in extended)

    row_in_first = {s: k for k, s in enumerate(contexts)}
    row_in_rest = {s: k for k, s in enumerate(extended)}
    logprobs, greedy, owners = [], [], []
    for s, row in enumerate(rows):
        m = len(row.extension) + 1
        k = row_in_first[source[s]]
        row_logp = first[k:k + 1]
        if m > 1:
            row_logp = torch.cat([row_logp, rest[row_in_rest[s], : m - 1]])  # (m, V)
        targets = _to_device([requests[i].continuation for i in row.requests], device)  # (R, m)
        picked = row_logp[torch.arange(m, device=device)[None, :], targets]  # (R, m)
        logprobs.append(picked.sum(dim=-1))
        greedy.append((row_logp.argmax(dim=-1)[None, :] == targets).all(dim=-1))
        owners += row.requests
    values = torch.cat(logprobs).tolist()
    is_greedy = torch.cat(greedy).tolist()
    return {i: (v, g) for i, v, g in zip(owners, values, is_greedy)}, stats, tokens_run


def _right_padded(seqs: Sequence[Sequence[int]], width: int, device) -> torch.Tensor:
    return _to_device([list(s) + [0] * (width - len(s)) for s in seqs], device)


def _to_device(values, device) -> torch.Tensor:
    """An int64 tensor of nested lists on device. torch.tensor(..., device=cuda) copies blocking, which waits for
    every queued kernel; a non-blocking copy of the fresh host tensor lets the host run ahead."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


