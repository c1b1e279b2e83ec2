"""Which FlexAttention kernel options compile and run a chunked prefill over small pages (CUDA), and their error."""

import json
import os
import time

import torch

from fms.bench.compiled import recompile_limits
from fms.cache.paged import build_paged_block_mask
from fms.modules.attention import flex_attention


def probe_flex_page_sizes(out_dir: str = ".") -> list[dict]:
    """Try each (head_dim, page size, kernel options); write probe_flex_page_sizes.json under out_dir."""
    if not torch.cuda.is_available():
        raise RuntimeError("the FlexAttention page-size probe needs a CUDA GPU")
    # every option set is a new compiled kernel: the probe must not fall back to eager after 8 of them
    with recompile_limits(True):
        device = torch.device("cuda")
        results = []
        for head_dim in (64, 128):
            for ps in (16, 32, 64):
                for opts in (None, {"BLOCK_N": ps}, {"BLOCK_M": 64, "BLOCK_N": ps}, {"BLOCK_M": 32, "BLOCK_N": ps},
                             {"BLOCK_M": 64, "BLOCK_N": ps, "num_warps": 4, "num_stages": 1}):
                    if ps >= 64 and opts and opts.get("BLOCK_N") == ps and len(opts) > 1:
                        continue
                    b, hq, hkv, ctx, t = 2, 8, 2, 300, 200
                    num_pages = b * ((ctx + t) // ps + 2)
                    pool_k = torch.randn(hkv, (num_pages + 1) * ps, head_dim, device=device, dtype=torch.bfloat16)
                    pool_v = torch.randn_like(pool_k)
                    width = (ctx + t) // ps + 1
                    table = torch.randperm(num_pages, device=device)[: b * width].view(b, width).to(torch.int32)
                    logical = torch.zeros(num_pages + 1, dtype=torch.int32, device=device)
                    logical[table.long().flatten()] = torch.arange(width, device=device, dtype=torch.int32).repeat(b)
                    q = torch.randn(b, hq, t, head_dim, device=device, dtype=torch.bfloat16)
                    mask = build_paged_block_mask(table, torch.full((b,), ctx, device=device),
                                                  torch.full((b,), t, device=device), t, ps, logical, pool_k.shape[1], None)
                    row = dict(head_dim=head_dim, page_size=ps, options=opts)
                    try:
                        start = time.time()
                        out = flex_attention(q, pool_k[None], pool_v[None], scale=head_dim**-0.5, block_mask=mask,
                                             kernel_options=opts)
                        torch.cuda.synchronize()
                        # dense reference for row 0
                        pos = torch.arange(ctx + t, device=device)
                        slots = table[0].long()[pos // ps] * ps + pos % ps
                        k0, v0 = pool_k[:, slots], pool_v[:, slots]
                        m = pos[None, :] <= (ctx + torch.arange(t, device=device))[:, None]
                        ref = torch.nn.functional.scaled_dot_product_attention(q[:1], k0[None], v0[None], attn_mask=m,
                                                                               scale=head_dim**-0.5, enable_gqa=True)
                        row.update(ok=True, seconds=round(time.time() - start, 1),
                                   max_err=(out[:1].float() - ref.float()).abs().max().item())
                    except Exception as e:  # record and continue: finding what fails is the point
                        row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    print(row, flush=True)
                    results.append(row)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "probe_flex_page_sizes.json"), "w") as f:
        json.dump(dict(torch=torch.__version__, device=torch.cuda.get_device_name(0), results=results), f, indent=1)
    return results
