"""The HTTP server's host overhead on the CPU: server vs offline engine with a model whose forward costs little.

Writes a 1-layer, 64-wide Llama checkpoint (random weights, a word-level tokenizer with one word per id) to
a temporary folder and runs scripts/bench_server_vs_offline.py on it on the CPU with one torch thread per
process, so that the gap between `fms serve` and LLMEngine.generate() on the same workload is the
server's own work (HTTP, SSE, JSON, detokenizing, and with --no-engine-process the engine thread and the
event loop sharing the GIL), not the model's. Writes the same JSON as that script (command, device, commit,
both sides, the ratio).

    python scripts/bench_server_overhead.py --output results/server_overhead_cpu.json
    python scripts/bench_server_overhead.py --no-engine-process --output results/server_overhead_cpu_thread.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))


def write_checkpoint(folder: str, vocab_size: int, seed: int, max_len: int = 256) -> str:
    import torch
    import transformers
    from fms.entrypoints.server_vs_offline import write_placeholder_tokenizer

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_len, initializer_range=0.5,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    write_placeholder_tokenizer(folder, vocab_size)
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--prompt-range", default="16,64")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="passed to fms serve (default: fms serve's own, an engine process)")
    p.add_argument("--output", type=Path, default=Path("results/server_overhead_cpu.json"))
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"  # the server child too: the forward is one thread's small matmuls
    import torch

    torch.set_num_threads(1)
    import bench_server_vs_offline

    # the model length fits the longest request (at least 256, the length this script always had)
    max_len = max(256, int(args.prompt_range.partition(",")[2] or args.prompt_range) + args.output_len)
    folder = write_checkpoint(tempfile.mkdtemp(prefix="fms-overhead-model-"), args.vocab_size, 0, max_len)
    engine_args = f"--no-compile --device cpu --dtype fp32 --max-num-seqs {args.num_prompts} --max-model-len {max_len}"
    mode = [] if args.engine_process is None else ["--engine-process" if args.engine_process else "--no-engine-process"]
    report = bench_server_vs_offline.main([
        "--model", folder, "--num-prompts", str(args.num_prompts), "--prompt-range", args.prompt_range,
        "--output-len", str(args.output_len), "--warmup-prompts", "8", "--repeats", str(args.repeats),
        f"--engine-args={engine_args}", "--output", str(args.output),
        *mode])
    # the command that reproduces this file is this script's (the checkpoint folder above is temporary)
    report["command"] = " ".join(shlex.quote(a) for a in ["python", "scripts/bench_server_overhead.py",
                                                         *(sys.argv[1:] if argv is None else argv)])
    args.output.write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
