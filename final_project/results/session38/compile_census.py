"""How many Triton compiles the paged decode kernels take across the engine's CUDA-graph batch sizes (CPU, no GPU
needed): each distinct launch key is one compile at engine start-up (tests/triton/launch_keys.py says what a key
holds). Prints, per model shape, the split counts per batch and the number of distinct keys per kernel.

    PYTHONPATH=. python final_project/results/session38/compile_census.py
"""
import torch

from fms.triton import paged_decode as module
from tests.triton.launch_keys import LaunchRecorder
from tests.triton.test_paged_decode import GRAPH_BATCHES, fused_qkv_slice

module.can_run_triton = lambda device: True
module.sm_count = lambda device: 132
for name, hq, hkv, d in (("llama-3.2-1b", 32, 8, 64), ("llama-3.1-8b", 32, 8, 128), ("granite-4.0-h-1b", 12, 4, 128)):
    split = module._paged_decode_split_kernel = LaunchRecorder(module._paged_decode_split_kernel.kernel
                                                               if isinstance(module._paged_decode_split_kernel,
                                                                             LaunchRecorder)
                                                               else module._paged_decode_split_kernel)
    merge = module._paged_decode_merge_kernel = LaunchRecorder(module._paged_decode_merge_kernel.kernel
                                                               if isinstance(module._paged_decode_merge_kernel,
                                                                             LaunchRecorder)
                                                               else module._paged_decode_merge_kernel)
    pool = torch.zeros(hkv, 128, d, dtype=torch.bfloat16)
    per_batch = []
    for b in sorted(GRAPH_BATCHES, reverse=True):  # the engine captures the largest first
        n_split, n_merge = len(split.variants), len(merge.variants)
        q = fused_qkv_slice(torch.zeros(b, hq, d, dtype=torch.bfloat16), hkv)
        module.paged_decode_attention(q, pool, pool, torch.zeros(b, 256, dtype=torch.int32),
                                      torch.ones(b, dtype=torch.int32), 16, 0.1)
        new = (len(split.variants) - n_split) + (len(merge.variants) - n_merge)
        per_batch.append(f"{b}:{split.launches[-1][0][2]} splits, {new} new")
    print(f"{name}: split kernel {len(split.variants)} keys, merge kernel {len(merge.variants)} keys; "
          + "; ".join(per_batch))

# What else compiles for Granite-4.0-H-1B's small buckets (after this session's change): the GEMV kernel at two rows
# (batch 1 and 2 replay the 2-row graph; Granite's shapes have no table entry, so the default blocks) and the Mamba
# decode kernel, whose rows per program (BLOCK_P, a constexpr) halve at small batches.
from fms.triton import gemv  # noqa: E402
from fms.triton.mamba_decode import choose_block_p  # noqa: E402

rec = gemv._gemv_kernel = LaunchRecorder(gemv._gemv_kernel)
shapes = [("qkv", 2560, 1536, False), ("o", 1536, 1536, False), ("mamba in_proj", 6448, 1536, False),
          ("mamba out_proj", 1536, 3072, False), ("mlp gate|up", 8192, 1536, False), ("mlp down", 1536, 4096, True),
          ("lm head", 100352, 1536, False)]
for _, n, k, silu in shapes:
    gemv._launch(torch.zeros(2, 2 * k if silu else k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.bfloat16),
                 None, silu)
print(f"granite-4.0-h-1b GEMV at 2 rows, default blocks: {len(rec.variants)} keys over {len(shapes)} projections")
print("granite-4.0-h-1b Mamba decode BLOCK_P per bucket:",
      {b: choose_block_p(b, 48, 64, 128, 132) for b in sorted(GRAPH_BATCHES, reverse=True)})
