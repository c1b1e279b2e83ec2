"""Registers, spills and shared memory of the paged decode kernels per launch config, compiled for an H100/H200
(sm_90) on a machine without a GPU: Triton compiles to a cubin without a driver, and its bundled cuobjdump reads the
resource use. Each compile is the one the engine's launch would make: the wrapper (paged_decode_attention) is called
on CPU tensors of the model's decode shapes with a recorder in place of the kernel, and the recorded arguments are
specialized as Triton's launcher does (16-byte aligned pointers and ints divisible by 16 marked so, an int equal to 1
made a constant, do_not_specialize honoured). From the registers follows how many programs an SM holds (65,536
registers, 64 warps), which bounds the loads in flight of a memory-bound kernel.

    PYTHONPATH=[TRITON_SITE:]. python final_project/results/session38/kernel_resources.py [OUT.json]

TRITON_SITE: a folder holding the device's Triton (3.6.0: pip install --no-deps --target DIR triton==3.6.0), so the
code is what the device compiles; the Triton installed here otherwise.
"""
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

from fms.triton import paged_decode as pd
from tests.triton.launch_keys import LaunchRecorder
from tests.triton.test_paged_decode import fused_qkv_slice

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM, MAX_WARPS_PER_SM = 65536, 64
SHAPES = {"llama-3.2-1b": (32, 8, 64), "llama-3.1-8b": (32, 8, 128), "granite-4.0-h-1b": (12, 4, 128)}


def recorded_launches(shape: str, batch: int, **knobs):
    """The (kernel, args, kwargs) of paged_decode_attention's launches at this model shape and batch (pages of 16,
    a 4096-token context, 132 SMs)."""
    hq, hkv, d = SHAPES[shape]
    split = LaunchRecorder(pd._paged_decode_split_kernel)
    merge = LaunchRecorder(pd._paged_decode_merge_kernel)
    saved = pd._paged_decode_split_kernel, pd._paged_decode_merge_kernel, pd.can_run_triton, pd.sm_count
    pd._paged_decode_split_kernel, pd._paged_decode_merge_kernel = split, merge
    pd.can_run_triton, pd.sm_count = (lambda device: True), (lambda device: 132)
    try:
        pool = torch.zeros(hkv, 64 * 16, d, dtype=torch.bfloat16)
        q = fused_qkv_slice(torch.zeros(batch, hq, d, dtype=torch.bfloat16), hkv)
        new_kv = None
        if knobs.pop("write_kv", False):
            fused = torch.zeros(batch, 1, hq + 2 * hkv, d, dtype=torch.bfloat16)  # k, v as slices of the projection
            new_kv = (fused[:, 0, hq:hq + hkv], fused[:, 0, hq + hkv:], torch.zeros(batch, dtype=torch.int64))
        pd.paged_decode_attention(q, pool, pool, torch.zeros(batch, 4096 // 16, dtype=torch.int32),
                                  torch.ones(batch, dtype=torch.int32), 16, 0.125, new_kv=new_kv, **knobs)
    finally:
        pd._paged_decode_split_kernel, pd._paged_decode_merge_kernel, pd.can_run_triton, pd.sm_count = saved
    return [(split.kernel, a, k) for _, a, k in split.launches] + [(merge.kernel, a, k) for _, a, k in merge.launches]


def compile_launch(kernel, args, kwargs) -> dict:
    params = kernel.params
    sig = inspect.signature(kernel.fn)
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        value = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, attr = native_specialize_impl(BaseBackend, value, p.is_const, not p.do_not_specialize,
                                            not p.do_not_specialize_on_alignment)[:2]
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = value
        elif isinstance(attr, str):
            attrs[(i,)] = BaseBackend.parse_attr(attr)
    options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, stack, static, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage).groups())
    dynamic = compiled.metadata.shared  # Triton's shared memory (the pipeline's buffers), allocated at launch
    warps = options.get("num_warps", 4)
    by_regs = REGISTERS_PER_SM // (max(regs, 1) * 32 * warps)
    # 228 KB of shared memory an SM on sm_90, 1 KB of it reserved for each resident block
    by_shared = (228 * 1024) // (static + dynamic + 1024)
    programs = min(by_regs, by_shared, MAX_WARPS_PER_SM // warps)
    ptx = compiled.asm["ptx"]
    return dict(regs=regs, stack=stack, shared_static=static, shared_dynamic=dynamic, local=local,
                programs_by_regs=by_regs, programs_by_shared=by_shared, programs_per_sm=programs,
                warps_per_sm=programs * warps, cp_async=ptx.count("cp.async.cg"))


def main():
    rows = []
    configs = [dict()]  # the shipped launch
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            configs.append(dict(pages_per_iter=block_n // 16, num_warps=warps, num_stages=3))
        for stages in (1, 2, 4, 5):
            configs.append(dict(pages_per_iter=block_n // 16, num_warps=4, num_stages=stages))
    for shape in SHAPES:
        for batch in (128, 2):
            for knobs in configs + [dict(write_kv=True)]:
                if batch == 2 and knobs not in (dict(), dict(write_kv=True)):
                    continue  # batch 2 (the split path, the merge kernel): the shipped launch only
                for kernel, args, kwargs in recorded_launches(shape, batch, **dict(knobs)):
                    name = kernel.fn.__name__.strip("_").replace("paged_decode_", "").replace("_kernel", "")
                    r = compile_launch(kernel, args, kwargs)
                    row = dict(shape=shape, batch=batch, kernel=name, knobs=knobs,
                               launch={k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages",
                                                                              "PAGES_PER_ITER", "SPLIT_PAD")},
                               **r)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    report = {"triton": triton.__version__, "target": "sm_90", "rows": rows}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", sys.argv[1])


if __name__ == "__main__":
    main()
