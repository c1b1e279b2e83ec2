"""The model and engine options shared by `fms serve`, `fms generate` and `fms bench latency`: each engine
option maps one-to-one onto an EngineConfig field, under vLLM's name where vLLM has one."""

from __future__ import annotations

import argparse

from fms.entrypoints.model_loading import LoadedModel, load_model
from fms.runtime.compiled import COMPILE_SCOPES
from fms.serving.config import EngineConfig, parse_graph_sizes
from fms.serving.engine import LLMEngine

# flag -> EngineConfig field (vLLM's name where there is one)
ENGINE_FLAGS = {
    "max_num_seqs": "max_num_seqs",
    "max_model_len": "max_model_len",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "gpu_memory_utilization": "memory_fraction",
    "kv_cache_memory_gb": "memory_gb",
    "num_pages": "num_pages",
    "page_size": "page_size",
    "enable_prefix_caching": "enable_prefix_caching",
    "max_decode_steps": "max_decode_steps",
    "compile_scope": "compile_scope",
    "cuda_graph_sizes": "graph_batch_sizes",
    "unbacked_batch": "unbacked_batch",
}
DTYPE_NAMES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")  # --dtype (fms.models resolves them)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("model", nargs="?", default=None,
                   help="a local HF checkpoint folder or a hub id (org/name); or use --architecture/--variant")
    g.add_argument("--architecture", default=None, help="with --variant: a registered shape with random weights "
                   "(llama, granite, granite_hybrid, gpt2); with a model: check it holds this architecture")
    g.add_argument("--variant", default=None, help="e.g. micro, 3.2-1b (random weights, seeded by --seed)")
    g.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the model's, else shipped)")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", type=int, default=0, help="random weights' seed")


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (EngineConfig)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="sequences per step (default 128 CUDA / 16 CPU)")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default min(ctx, 4096))")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens computed per step (default 8192 CUDA / 256 CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of free GPU memory for KV pages (EngineConfig.memory_fraction; default 0.9)")
    g.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV pages by size (EngineConfig.memory_gb)")
    g.add_argument("--num-pages", type=int, default=None, help="KV pages by count")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse full pages of earlier prompts")
    g.add_argument("--max-decode-steps", type=int, default=EngineConfig.max_decode_steps,
                   help="decode steps per host synchronization (a decode window)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs and no torch.compile (EngineConfig use_cuda_graphs/compile_* = False)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the decode step and the packed prefill (default: on CUDA); --no-compile "
                        "keeps CUDA graphs but skips the compiles, for a start in seconds")
    g.add_argument("--compile-scope", choices=COMPILE_SCOPES, default=None,
                   help="what one torch.compile covers: each decoder layer's two halves around the attention op, "
                        "compiled once for all layers (default; Granite-4.0-H's Mamba layers whole, one compile for "
                        "all), or the whole model (6-10%% more decode throughput; Llama-3.1-8B on an H200: the engine "
                        "starts in ~220 s cold / ~100 s warm instead of ~35 / ~9 s)")
    g.add_argument("--unbacked-batch", action="store_true", default=None,
                   help="with the layers compile scope, trace the compiled decode step's batch size as an unbacked "
                        "symbol: one compile serves every graph size, batch 1 included, which then gets its own "
                        "graph (EngineConfig.unbacked_batch; off by default: on an H100, batch-1 decode +1-8%% "
                        "but serving about 3%% slower)")
    g.add_argument("--cuda-graph-sizes", type=parse_graph_sizes, default=None,
                   help="decode batch sizes captured as CUDA graphs at start-up, e.g. 2,4,8,16,32,64,128 "
                        "(EngineConfig.graph_batch_sizes; default 1,2,4,...,256 up to --max-num-seqs, without the 1 "
                        "when the decode step is compiled, unless --unbacked-batch: batch 1 then runs in the batch-2 "
                        "graph). A batch runs in "
                        "the smallest size that holds it; each size costs start-up time")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N processes (one GPU each; gloo on CPU), started by the command "
                        "itself; rank 0 serves or prints (docs/tensor_parallel.md). 1: one process")


def check_tensor_parallel_size(args) -> int:
    size = args.tensor_parallel_size
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be an int >= 1 (processes to split the model over), "
                         f"got {size}")
    return size


def engine_config(args) -> EngineConfig:
    check_tensor_parallel_size(args)
    options = {field: getattr(args, flag) for flag, field in ENGINE_FLAGS.items() if getattr(args, flag) is not None}
    if args.compile is not None:
        options.update(compile_decode=args.compile, compile_prefill=args.compile)
    if args.enforce_eager:
        options.update(use_cuda_graphs=False, compile_decode=False, compile_prefill=False)
    return EngineConfig(**options)


def build_engine(args) -> tuple[LLMEngine, LoadedModel]:
    """The model the arguments name and an engine over it. With --tensor-parallel-size N > 1 this process must be
    one of N ranks (started by `fms serve` / `fms generate` themselves, or by torchrun): it gets its shard."""
    config = engine_config(args)  # bad options fail before the model loads
    if args.tensor_parallel_size > 1:
        _check_ranks(args.tensor_parallel_size)
    loaded = load_model(args.model, args.architecture, args.variant, args.tokenizer, args.device, args.dtype,
                        args.seed, args.revision, tensor_parallel_size=args.tensor_parallel_size)
    return LLMEngine(loaded.model, loaded.tokenizer, config=config), loaded


def _check_ranks(size: int) -> None:
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    elif "WORLD_SIZE" in os.environ:  # torchrun's environment: get_model joins the group
        world_size = int(os.environ["WORLD_SIZE"])
    else:
        raise ValueError(f"--tensor-parallel-size {size} needs {size} processes: `fms serve` and `fms generate` "
                         f"start them; for other commands use `torchrun --nproc-per-node {size}`")
    if world_size != size:
        raise ValueError(f"--tensor-parallel-size {size} does not match the {world_size} processes started "
                         f"(torchrun --nproc-per-node must equal it)")
