"""Prompt in, text out: one model, one attention backend, greedy or sampled."""

import argparse
import sys

import torch

from fms.models import get_model
from fms.modules.attention import get_attention_op
from fms.utils.generation import generate
from fms.utils.tokenizers import get_tokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--architecture", default="llama", help="llama, granite, granite_hybrid, gpt2 or hf_pretrained")
    p.add_argument("--variant", default=None, help="e.g. micro, 3.2-1b (default: micro without --model_path)")
    p.add_argument("--model_path", default=None, help="HF checkpoint folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / tokenizer.model or a folder; default: shipped")
    p.add_argument("--attn_name", default="sdpa", help="attention op: sdpa, flex or paged")
    p.add_argument("--device_type", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--prompt", action="append", default=None, help="repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--do_sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page_size", type=int, default=16, help="paged op only")
    p.add_argument("--decode_window", type=int, default=None,
                   help="decode up to this many tokens per host synchronization (inputs computed on the device)")
    p.add_argument("--cuda_graphs", action="store_true", help="with --decode_window: replay steps from CUDA graphs")
    p.add_argument("--compile", action="store_true", help="with --decode_window: torch.compile the decode step")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    architecture = "hf_pretrained" if args.model_path and args.architecture == "llama" and not args.variant \
        else args.architecture
    variant = args.variant or (None if args.model_path else "micro")
    try:
        model = get_model(architecture, variant, model_path=args.model_path, device_type=args.device_type,
                          data_type=args.dtype, attn_name=args.attn_name, seed=args.seed)
        tokenizer = get_tokenizer(args.tokenizer or args.model_path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.model_path is None:
        print(f"note: {args.architecture}/{variant} has random weights; the text will be gibberish", file=sys.stderr)
    prompts = args.prompt or ["Paged attention keeps the KV cache"]
    ids = [tokenizer.encode(p) for p in prompts]
    cache_options = get_attention_op(args.attn_name).cache_kwargs(page_size=args.page_size)
    eos = tokenizer.eos_token_id if args.model_path else None
    try:
        outputs = generate(model, ids, args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=eos,
                           decode_window=args.decode_window, cuda_graphs=args.cuda_graphs, compile_decode=args.compile,
                           **cache_options)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, new in zip(prompts, outputs):
        print(f"{prompt}{tokenizer.decode(new)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
