"""Benchmark workloads: seeded random prompts, mixed-length request sets, sweep points, ShareGPT-style files."""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch


def random_prompts(batch_size: int, context_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """batch_size prompts of exactly context_len random token ids; the same (seed, shape) gives the same ids."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_size * 7919 + context_len)
    return torch.randint(0, vocab_size, (batch_size, context_len), generator=generator).tolist()


@dataclass(frozen=True)
class MixedWorkload:
    """Requests with prompt and output lengths drawn from seeded uniform ranges (inclusive)."""

    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    seed: int = 0

    def __post_init__(self):
        for name, (lo, hi) in (("prompt_range", self.prompt_range), ("output_range", self.output_range)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be LO,HI with 1 <= LO <= HI, got {lo},{hi}")
        if self.num_requests < 1:
            raise ValueError(f"the mixed workload needs >= 1 request, got {self.num_requests}")

    @property
    def max_len(self) -> int:
        """The longest request the workload can hold: what a contiguous cache sizes every row for."""
        return self.prompt_range[1] + self.output_range[1]

    def lengths(self, count: int | None = None) -> list[tuple[int, int]]:
        """(prompt, output) lengths; the first num_requests are the workload, later ones extend the same stream."""
        rng = random.Random(self.seed)
        return [(rng.randint(*self.prompt_range), rng.randint(*self.output_range))
                for _ in range(count or self.num_requests)]

    def prompts(self, vocab_size: int) -> tuple[list[list[int]], list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        lens = self.lengths()
        prompts = [torch.randint(0, vocab_size, (p,), generator=generator).tolist() for p, _ in lens]
        return prompts, [o for _, o in lens]



@dataclass(frozen=True)
class SweepPoint:
    batch_size: int
    context_len: int
    sweeps: tuple[str, ...]

    @property
    def sweep(self) -> str:
        return "+".join(self.sweeps)


def sweep_points(batch_sizes, base_context, context_lengths, base_batch) -> list[SweepPoint]:
    """Batch sweep at base_context, then context sweep at base_batch; a shared point is measured once."""
    order: dict[tuple[int, int], list[str]] = {}
    for b in batch_sizes:
        order.setdefault((b, base_context), []).append("batch")
    for c in context_lengths:
        order.setdefault((base_batch, c), []).append("context")
    return [SweepPoint(b, c, tuple(s)) for (b, c), s in order.items()]



def workload_pages(lengths, page_size: int) -> int:
    return sum(math.ceil((p + o) / page_size) for p, o in lengths)




def sharegpt_workload(path: Path, tokenizer, num_requests: int, seed: int, max_len: int):
    """(prompts, output lengths) from [{"conversations": [{"value": human}, {"value": reply}, ...]}, ...]
    or [{"prompt": str, "completion": str}, ...]; pairs too short (< 4 tokens) or too long are skipped."""
    data = json.loads(Path(path).read_text())
    pairs = []
    for item in data:
        if "conversations" in item and len(item["conversations"]) >= 2:
            pairs.append((item["conversations"][0]["value"], item["conversations"][1]["value"]))
        elif "prompt" in item:
            pairs.append((item["prompt"], item.get("completion", item.get("output", ""))))
    random.Random(seed).shuffle(pairs)
    prompts, outputs = [], []
    for prompt, reply in pairs:
        p, o = tokenizer.encode(prompt), len(tokenizer.encode(reply))
        if len(p) < 4 or o < 4 or len(p) + o > max_len:
            continue
        prompts.append(p)
        outputs.append(o)
        if len(prompts) == num_requests:
            break
    if not prompts:
        raise ValueError(f"no usable prompt/reply pairs in {path} (need >= 4 tokens each, <= {max_len} in all)")
    return prompts, outputs
