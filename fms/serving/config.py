"""EngineConfig: every option of an LLMEngine, validated once, with vLLM's names where they exist."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

from fms.runtime.compiled import DEFAULT_COMPILE_SCOPE, check_compile_scope

DEFAULT_GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A compiled decode step specializes a batch of 1, so a batch-1 graph would trace and compile the step a second time
# (6-11 s of a cold start on the H200, final_project section 11; 12 s of Granite-4.0-H-1B's on the H100, section 25):
# by default batch 1 runs in the batch-2 graph (one idle row). With unbacked_batch (compile_scope "layers") the step
# traces a batch of 1 with the others (fms.runtime.compiled.unbacked_batch) and batch 1 gets its own graph.
COMPILED_GRAPH_BATCH_SIZES = DEFAULT_GRAPH_BATCH_SIZES[1:]
DEFAULT_MAX_MODEL_LEN = 4096  # caps the page-table width (and the decode kernel's split sizing)
DEFAULT_MAX_DECODE_STEPS = 16


def parse_graph_sizes(text: str) -> tuple[int, ...]:
    """A --cuda-graph-sizes value: a comma list of batch sizes ("2,4,8"); EngineConfig checks the values."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of batch sizes like 2,4,8, got {text!r}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineConfig:
    """How an LLMEngine runs. None means "the default for the model's device" (resolved by `for_device`).

    page_size, num_pages / memory_gb / memory_fraction: the page pool (at most one of the three sizes;
    default on CUDA: memory_fraction 0.9 of free GPU memory; on CPU: room for max_num_seqs sequences
    of min(max_model_len, 1024) tokens).
    max_num_seqs, max_num_batched_tokens: per-step limits on sequences and computed tokens
    (defaults: 128 and 8192 on CUDA, 16 and 256 on CPU).
    max_model_len: longest prompt + output (default min(model context, 4096)).
    enable_prefix_caching: keep full pages of finished prompts for later requests that share them.
    use_cuda_graphs: decode steps replay CUDA graphs, captured per batch size in graph_batch_sizes (default:
    1, 2, 4, ..., 256; without the 1 when the decode step is compiled, COMPILED_GRAPH_BATCH_SIZES, unless
    unbacked_batch).
    max_decode_steps: when every running request is decoding and none could be admitted, up to this
    many decode steps run back to back on the device with one host synchronization (a decode window;
    1 = synchronize every token). While the batch has room, windows ramp up 1, 2, 4, ... to it after each step that prefilled.
    compile_decode / compile_prefill: torch.compile the decode step (before graph capture) and the
    packed prefill forward (default on CUDA; each falls back to eager if compilation fails).
    combo_kernels: let inductor fuse the decode step's independent small kernels horizontally
    (measured about 3% batch-1 decode throughput on the H100).
    compile_scope: "layers" (the default: each decoder layer's two halves around the attention op compiled once for
    all layers, so start-up does not grow with depth; fusions across the op and across layers are lost; Mamba
    layers of hybrids compiled whole, one compile for all, in decode steps; models with other layers compile the
    whole model) or "model" (one graph over every layer: higher throughput, minutes of start-up for an 8B model);
    fms.runtime.compiled.
    unbacked_batch: with compile_scope "layers", the compiled decode step takes its batch size as an unbacked symbol
    (fms.runtime.compiled.unbacked_batch): one trace serves every graph size, batch 1 included, which then has its own
    graph by default. Off by default: on an H100 it traces once and batch-1 decode gains 1-8%, but inductor compiles
    the larger buckets into more kernels under an unbacked batch and serving is about 3% slower (final_project
    section 28; its first forms compiled the step twice, sections 25-26).
    """

    page_size: int = 16
    num_pages: int | None = None
    memory_gb: float | None = None
    memory_fraction: float | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    use_cuda_graphs: bool | None = None
    graph_batch_sizes: tuple[int, ...] | None = None
    max_decode_steps: int = DEFAULT_MAX_DECODE_STEPS
    compile_decode: bool | None = None
    compile_prefill: bool | None = None
    combo_kernels: bool = True
    compile_scope: str = DEFAULT_COMPILE_SCOPE
    unbacked_batch: bool = False

    def __post_init__(self):
        check_compile_scope(self.compile_scope)
        for name in ("page_size", "max_decode_steps"):
            _check_count(name, getattr(self, name), optional=False)
        for name in ("num_pages", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            _check_count(name, getattr(self, name), optional=True)
        for name in ("memory_gb", "memory_fraction"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
        if self.memory_fraction is not None and self.memory_fraction > 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction!r}")
        sizes = [n for n in ("num_pages", "memory_gb", "memory_fraction") if getattr(self, n) is not None]
        if len(sizes) > 1:
            raise ValueError(f"give at most one of num_pages, memory_gb, memory_fraction to size the page pool; "
                             f"got {', '.join(f'{n}={getattr(self, n)!r}' for n in sizes)}")
        for name in ("enable_prefix_caching", "combo_kernels", "unbacked_batch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("use_cuda_graphs", "compile_decode", "compile_prefill"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool or None (the device's default), got {value!r}")
        sizes = self.graph_batch_sizes
        if sizes is not None:  # None: the default for the device and compile setting (for_device)
            if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or not sizes \
                    or not all(_is_int(b) and b >= 1 for b in sizes):
                raise ValueError(f"graph_batch_sizes must be a non-empty sequence of ints >= 1, got {sizes!r}")
            object.__setattr__(self, "graph_batch_sizes", tuple(sorted(set(sizes))))

    @classmethod
    def check_names(cls, options) -> None:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; EngineConfig takes {sorted(names)}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        cls.check_names(kwargs)
        return cls(**kwargs)

    def for_device(self, is_cuda: bool, model_context: int) -> "EngineConfig":
        """This config with every device default filled in, checked against the model's context."""
        max_model_len = self.max_model_len or min(model_context, DEFAULT_MAX_MODEL_LEN)
        if max_model_len > model_context:
            raise ValueError(f"max_model_len must be in [1, {model_context}] (the model context), got {max_model_len}")
        if not is_cuda and self.memory_fraction is not None:
            raise ValueError("memory_fraction sizes the pool from free GPU memory; on CPU give num_pages or memory_gb")
        compile_decode = is_cuda if self.compile_decode is None else self.compile_decode
        one_trace = self.unbacked_batch and self.compile_scope == "layers"
        graph_batch_sizes = self.graph_batch_sizes or (COMPILED_GRAPH_BATCH_SIZES if compile_decode and is_cuda
                                                       and not one_trace else DEFAULT_GRAPH_BATCH_SIZES)
        return replace(
            self,
            max_model_len=max_model_len,
            graph_batch_sizes=graph_batch_sizes,
            max_num_seqs=self.max_num_seqs or (128 if is_cuda else 16),
            # a large CUDA budget: fewer, larger prefill forwards amortize each forward's fixed host cost
            max_num_batched_tokens=self.max_num_batched_tokens or (8192 if is_cuda else 256),
            use_cuda_graphs=is_cuda if self.use_cuda_graphs is None else self.use_cuda_graphs,
            compile_decode=compile_decode,
            compile_prefill=is_cuda if self.compile_prefill is None else self.compile_prefill,
        )


def _check_count(name: str, value, optional: bool) -> None:
    if value is None and optional:
        return
    if not _is_int(value) or value < 1:
        allowed = "an int >= 1" + (" or None (the default)" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
