"""Registers, spills and shared memory of the paged decode kernels per launch config, compiled for an H100/H200
(sm_90) on a machine without a GPU: Triton compiles to a cubin without a driver, and its bundled cuobjdump reads the
resource use. From the registers follows how many programs an SM can hold (65,536 registers; at most 32 warps here,
shared memory never binds), which bounds the loads in flight of a memory-bound kernel.

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

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fms.triton import paged_decode as pd

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM, MAX_WARPS_PER_SM = 65536, 64


def _type(name: str) -> str:
    if name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "k_new_ptr", "v_new_ptr"):
        return "*bf16"
    if name in ("page_table_ptr", "seq_lens_ptr", "page_start_ptr"):
        return "*i32"
    if name == "new_slot_ptr":
        return "*i64"
    if name in ("part_out_ptr", "part_lse_ptr"):
        return "*fp32"
    return "fp32" if name == "qk_scale_log2" else "i32"


def compile_resources(kernel, constexprs: dict, num_warps: int, num_stages: int = 1, maxnreg: int | None = None) -> dict:
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in constexprs else _type(n) for n in names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs={})
    options = {"num_warps": num_warps, "num_stages": num_stages, **({} if maxnreg is None else {"maxnreg": maxnreg})}
    compiled = triton.compile(src, target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, stack, shared, local = map(int, re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage).groups())
    programs = min(REGISTERS_PER_SM // (regs * 32 * num_warps), MAX_WARPS_PER_SM // num_warps)
    ptx = compiled.asm["ptx"]
    return dict(regs=regs, stack=stack, shared=shared, local=local, programs_per_sm=programs,
                warps_per_sm=programs * num_warps, cp_async=ptx.count("cp.async"))


def main():
    rows = []
    for head_dim, group in ((64, 4), (128, 4), (128, 3)):  # Llama-3.2-1B, Llama-3.1-8B, Granite-4.0-H-1B
        shipped = pd.default_launch(head_dim)
        for block_n in (32, 64, 128):
            for warps in (2, 4, 8):
                for stages in ((1, 3) if (block_n, warps) == shipped[:2] else (3,)):
                    for write in (False, True):
                        c = dict(GROUP_SIZE=group, GROUP_PAD=16, HEAD_DIM=head_dim, PAGE_SIZE=16,
                                 PAGES_PER_ITER=block_n // 16, HAS_PAGE_START=False, IS_SPLIT=False,
                                 DOT_PRECISION="tf32", WRITE_KV=write)
                        r = compile_resources(pd._paged_decode_split_kernel, c, warps, stages)
                        row = dict(kernel="split", head_dim=head_dim, group=group, block_n=block_n, warps=warps,
                                   stages=stages, write_kv=write, shipped=(block_n, warps, stages) == shipped, **r)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        for block_n in (32, 64, 128):  # the register cap at 4 warps, the write off
            for maxnreg in (168, 128, 96):
                c = dict(GROUP_SIZE=group, GROUP_PAD=16, HEAD_DIM=head_dim, PAGE_SIZE=16, PAGES_PER_ITER=block_n // 16,
                         HAS_PAGE_START=False, IS_SPLIT=False, DOT_PRECISION="tf32", WRITE_KV=False)
                r = compile_resources(pd._paged_decode_split_kernel, c, 4, 3, maxnreg)
                row = dict(kernel="split", head_dim=head_dim, group=group, block_n=block_n, warps=4, stages=3,
                           write_kv=False, maxnreg=maxnreg, shipped=False, **r)
                rows.append(row)
                print(json.dumps(row), flush=True)
    for head_dim in (64, 128):
        for split_pad, warps in ((4, 1), (32, 1), (64, 4)):
            c = dict(HEAD_DIM=head_dim, PAGE_SIZE=16, PAGES_PER_ITER=pd.default_pages_per_iter(16, head_dim),
                     SPLIT_PAD=split_pad, HAS_PAGE_START=False)
            row = dict(kernel="merge", head_dim=head_dim, split_pad=split_pad, warps=warps,
                       **compile_resources(pd._paged_decode_merge_kernel, c, warps))
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"triton": triton.__version__, "target": "sm_90", "rows": rows}
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", sys.argv[1])


if __name__ == "__main__":
    main()
