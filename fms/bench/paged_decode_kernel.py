"""Triton paged decode kernel vs SDPA over contiguous K/V (and paged FlexAttention prefill): inputs, timing, report."""

import itertools
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

NUM_Q_HEADS, NUM_KV_HEADS = 32, 8  # Llama-3 8B and 3.2-1B both; head_dim is 128 and 64 (--head-dim)
ROTATION_BYTES = 256 * 2**20  # K+V bytes to cycle through per timed function (>> 50 MB L2)
MAX_SETS = 64
BF16_ATOL = 2e-2



@dataclass
class PagedDecodeBenchConfig:
    """One kernel benchmark run (CUDA only): page size, points, kernel knobs, what else to time."""

    page_size: int = 16
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    context_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    num_splits: int | None = None
    pages_per_iter: int | None = None
    num_warps: int | None = None  # None: the launcher's default for the head_dim (DECODE_LAUNCH)
    num_stages: int | None = None
    sweep: bool = False
    flex: bool = False
    memory_fraction: float = 0.8
    out: str | None = None
    graphs: bool = True
    prefill: bool = False
    head_dim: int = 128

    def __post_init__(self):
        if self.head_dim not in (64, 128, 256):
            raise ValueError(f"head_dim must be one of 64, 128, 256, got {self.head_dim}")
        if self.page_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"page_size must be one of 16, 32, 64, 128, 256, got {self.page_size}")
        for name in ("batch_sizes", "context_lengths"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ValueError(f"{name} need values >= 1, got {getattr(self, name)}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")


def make_set(batch_size, context_len, page_size, device, with_repeated, head_dim):
    """One input set: q, a shuffled page pool, and the same K/V contiguous for SDPA."""
    pages_per_seq = math.ceil(context_len / page_size)
    num_pages = batch_size * pages_per_seq
    shape = (batch_size, NUM_KV_HEADS, context_len, head_dim)
    dense_k = torch.randn(shape, device=device, dtype=torch.bfloat16)  # (B, Hkv, L, D)
    dense_v = torch.randn(shape, device=device, dtype=torch.bfloat16)
    page_table = torch.randperm(num_pages, device=device).to(torch.int32).view(batch_size, pages_per_seq)
    pos = torch.arange(context_len, device=device)
    slots = (page_table.long()[:, pos // page_size] * page_size + pos % page_size).flatten()  # (B*L,)
    pool_shape = (NUM_KV_HEADS, num_pages * page_size, head_dim)
    k_pool = torch.zeros(pool_shape, device=device, dtype=torch.bfloat16)
    v_pool = torch.zeros(pool_shape, device=device, dtype=torch.bfloat16)
    # (B, Hkv, L, D) -> (Hkv, B*L, D) in slot order
    k_pool[:, slots] = dense_k.transpose(0, 1).reshape(NUM_KV_HEADS, -1, head_dim)
    v_pool[:, slots] = dense_v.transpose(0, 1).reshape(NUM_KV_HEADS, -1, head_dim)
    page_logical = torch.empty(num_pages, dtype=torch.int32, device=device)
    page_logical[page_table.long().flatten()] = torch.arange(pages_per_seq, device=device, dtype=torch.int32).repeat(
        batch_size
    )
    s = dict(
        q=torch.randn(batch_size, NUM_Q_HEADS, head_dim, device=device, dtype=torch.bfloat16),
        k_pool=k_pool,
        v_pool=v_pool,
        page_table=page_table,
        seq_lens=torch.full((batch_size,), context_len, dtype=torch.int32, device=device),
        page_logical=page_logical,
        dense_k=dense_k,
        dense_v=dense_v,
    )
    if with_repeated:
        group = NUM_Q_HEADS // NUM_KV_HEADS
        s["rep_k"] = dense_k.repeat_interleave(group, dim=1)  # (B, Hq, L, D)
        s["rep_v"] = dense_v.repeat_interleave(group, dim=1)
    return s


def rotating(fn, sets):
    """A zero-argument callable that runs fn on the next input set each call."""
    counter = itertools.count()
    return lambda: fn(sets[next(counter) % len(sets)])


def flex_decode_fn(page_size, context_len, scale):
    """The lead's paged FlexAttention path for one decode step, or None if it is not importable."""
    try:
        from fms.modules.attention import flex_attention
        from fms.cache.paged import build_paged_block_mask
    except ImportError as e:
        print(f"  flex: skipped ({e})")
        return None

    masks = {}

    def run(s):
        key = id(s["page_table"])
        if key not in masks:  # one BlockMask per input set, built outside the timed region
            b = s["q"].shape[0]
            q_start = (s["seq_lens"] - 1).long()
            num_new = torch.ones(b, dtype=torch.int64, device=q_start.device)
            masks[key] = build_paged_block_mask(
                s["page_table"], q_start, num_new, 1, page_size, s["page_logical"], s["k_pool"].shape[1], None
            )
        out = flex_attention(
            s["q"][:, :, None], s["k_pool"][None], s["v_pool"][None], scale=scale, block_mask=masks[key]
        )
        return out[:, :, 0]

    return run


def sweep_configs(page_size):
    configs = []
    # Triton's pipeliner double-buffers the page-indirect K/V tiles only from num_stages=5 on.
    for block_n in (32, 64, 128, 256):
        if block_n < page_size:
            continue
        for num_warps, num_stages in ((2, 2), (2, 3), (4, 1), (4, 2), (4, 3), (4, 5), (8, 3)):
            configs.append(dict(pages_per_iter=block_n // page_size, num_warps=num_warps, num_stages=num_stages))
    return configs


def run_paged_decode_bench(args: "PagedDecodeBenchConfig") -> list[dict]:
    """Every (batch, context) point: check against SDPA, then time; prints a table, writes args.out."""
    if not torch.cuda.is_available():
        raise RuntimeError("the paged decode kernel benchmark needs a CUDA GPU")
    from triton.testing import do_bench

    from fms.triton.paged_decode import (
        choose_num_splits,
        default_launch,
        default_pages_per_iter,
        paged_decode_attention,
    )

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    if args.prefill:
        return prefill_main(args, device, props)
    scale = args.head_dim**-0.5
    ps = args.page_size
    started = time.time()
    results = []

    def bench(fn, sets, rep=100):
        """Median ms per call. With --graphs (default) one CUDA graph runs fn over every input set, so
        host launch overhead (tens of microseconds per Python-launched kernel) stays out of the numbers,
        as it does in a graph-captured decode step."""
        if args.graphs:
            try:
                for s in sets:
                    fn(s)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for s in sets:
                        fn(s)
                return do_bench(graph.replay, warmup=rep // 4, rep=rep, return_mode="median") / len(sets)
            except Exception as e:  # a path that cannot be captured is timed eagerly, and says so
                print(f"  graph capture failed ({type(e).__name__}: {e}); timing eagerly")
        return do_bench(rotating(fn, sets), warmup=rep // 4, rep=rep, return_mode="median")

    print(f"{props.name}, {props.multi_processor_count} SMs; Hq={NUM_Q_HEADS} Hkv={NUM_KV_HEADS} D={args.head_dim} bf16, "
          f"page_size={ps}")
    header = (f"{'batch':>5} {'ctx':>6} {'splits':>6} {'ours ms':>8} {'GB/s':>6} {'sdpa ms':>8} {'form':>4} "
              f"{'ours/sdpa':>9} {'max err':>8}" + (f" {'flex ms':>8}" if args.flex else "")
              + (f" {'best ms':>8} best config" if args.sweep else ""))
    print(header)
    for batch_size, context_len in itertools.product(args.batch_sizes, args.context_lengths):
        kv_bytes = batch_size * context_len * NUM_KV_HEADS * args.head_dim * 2 * 2  # K+V, bf16
        group = NUM_Q_HEADS // NUM_KV_HEADS
        free = torch.cuda.mem_get_info(device)[0] * args.memory_fraction
        set_bytes = 2 * kv_bytes  # pool + contiguous copy
        with_repeated = set_bytes + group * kv_bytes <= free
        per_set = set_bytes + (group * kv_bytes if with_repeated else 0)
        if per_set > free:
            print(f"{batch_size:>5} {context_len:>6}  skipped: needs {per_set / 2**30:.1f} GiB, "
                  f"{free / 2**30:.1f} GiB allowed")
            continue
        num_sets = max(1, min(MAX_SETS, math.ceil(ROTATION_BYTES / kv_bytes), int(free // per_set)))
        sets = [make_set(batch_size, context_len, ps, device, with_repeated, args.head_dim) for _ in range(num_sets)]

        knobs = dict(num_splits=args.num_splits, pages_per_iter=args.pages_per_iter,
                     num_warps=args.num_warps, num_stages=args.num_stages)
        ppi = args.pages_per_iter or default_pages_per_iter(ps, args.head_dim)
        splits = args.num_splits or choose_num_splits(
            batch_size, NUM_KV_HEADS, context_len, ps * ppi, props.multi_processor_count
        )

        def ours(s, **kw):
            return paged_decode_attention(
                s["q"], s["k_pool"], s["v_pool"], s["page_table"], s["seq_lens"], ps, scale,
                max_seq_len=context_len, **kw,
            )

        def sdpa_gqa(s):
            return F.scaled_dot_product_attention(
                s["q"][:, :, None], s["dense_k"], s["dense_v"], scale=scale, enable_gqa=True
            )[:, :, 0]

        def sdpa_rep(s):
            return F.scaled_dot_product_attention(s["q"][:, :, None], s["rep_k"], s["rep_v"], scale=scale)[:, :, 0]

        s0 = sets[0]
        expected = sdpa_gqa(s0).float()
        max_err = (ours(s0, **knobs).float() - expected).abs().max().item()
        if max_err > BF16_ATOL:
            print(f"  WARNING: max |ours - sdpa| = {max_err:.3g} > {BF16_ATOL} at batch {batch_size} ctx {context_len}")

        _, warps, stages = default_launch(args.head_dim)
        row = dict(batch_size=batch_size, context_len=context_len, page_size=ps, num_splits=splits,
                   pages_per_iter=ppi, num_warps=args.num_warps or warps, num_stages=args.num_stages or stages,
                   kv_bytes=kv_bytes, num_input_sets=num_sets, max_abs_err_vs_sdpa=max_err)
        row["ours_ms"] = bench(lambda s: ours(s, **knobs), sets)
        row["sdpa_gqa_ms"] = bench(sdpa_gqa, sets)
        row["sdpa_repeated_ms"] = bench(sdpa_rep, sets) if with_repeated else None
        best_form = "gqa"
        row["sdpa_ms"] = row["sdpa_gqa_ms"]
        if row["sdpa_repeated_ms"] is not None and row["sdpa_repeated_ms"] < row["sdpa_gqa_ms"]:
            best_form, row["sdpa_ms"] = "rep", row["sdpa_repeated_ms"]
        row["sdpa_form"] = best_form
        row["ours_gbps"] = kv_bytes / row["ours_ms"] / 1e6
        row["sdpa_gbps"] = kv_bytes / row["sdpa_ms"] / 1e6
        row["ratio_to_sdpa"] = row["ours_ms"] / row["sdpa_ms"]

        if args.flex:
            flex = flex_decode_fn(ps, context_len, scale)
            row["flex_ms"] = None
            if flex is not None:
                try:
                    flex_err = (flex(s0).float() - expected).abs().max().item()
                    row["flex_max_abs_err"] = flex_err
                    for s in sets:  # build every set's BlockMask before timing
                        flex(s)
                    row["flex_ms"] = bench(flex, sets)
                except Exception as e:  # the flex path is optional; report and go on
                    print(f"  flex: failed ({type(e).__name__}: {e})")

        if args.sweep:
            sweep = []
            for cfg in sweep_configs(ps):
                for cfg_splits in sorted({max(1, splits // 2), splits, splits * 2}):
                    kw = dict(cfg, num_splits=cfg_splits)
                    err = (ours(s0, **kw).float() - expected).abs().max().item()
                    ms = bench(lambda s, kw=kw: ours(s, **kw), sets, rep=40)
                    sweep.append(dict(kw, ms=ms, max_err=err))
            row["sweep"] = sweep
            row["sweep_best"] = min(sweep, key=lambda r: r["ms"])

        line = (f"{batch_size:>5} {context_len:>6} {splits:>6} {row['ours_ms']:>8.4f} {row['ours_gbps']:>6.0f} "
                f"{row['sdpa_ms']:>8.4f} {best_form:>4} {row['ratio_to_sdpa']:>9.2f} {max_err:>8.1e}")
        if args.flex:
            line += f" {row['flex_ms']:>8.4f}" if row.get("flex_ms") is not None else f" {'-':>8}"
        if args.sweep:
            best = row["sweep_best"]
            line += (f" {best['ms']:>8.4f} ppi={best['pages_per_iter']} w={best['num_warps']} "
                     f"st={best['num_stages']} sp={best['num_splits']}")
        print(line, flush=True)
        results.append(row)
        del sets, s0, expected
        torch.cuda.empty_cache()

    import triton

    report = dict(
        device=props.name,
        num_sms=props.multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        shape=dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=args.head_dim, dtype="bfloat16"),
        args=asdict(args),
        seconds=time.time() - started,
        results=results,
    )
    print(f"done in {report['seconds']:.0f} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.out}")
    return results


def prefill_main(args, device, props):
    """Causal prefill of B sequences of L tokens: paged FlexAttention over the pool vs SDPA."""
    from triton.testing import do_bench

    from fms.modules.attention import flex_attention
    from fms.cache.paged import build_paged_block_mask

    ps, scale, results = args.page_size, args.head_dim**-0.5, []
    print(f"{props.name}: prefill, Hq={NUM_Q_HEADS} Hkv={NUM_KV_HEADS} D={args.head_dim} bf16, page_size={ps}")
    print(f"{'batch':>5} {'ctx':>6} {'paged ms':>9} {'sdpa ms':>8} {'paged/sdpa':>10} {'TFLOP/s':>8} {'max err':>8}")
    for batch_size, context_len in itertools.product(args.batch_sizes, args.context_lengths):
        tokens = batch_size * context_len
        need = tokens * (NUM_Q_HEADS * 3 + NUM_KV_HEADS * 4) * args.head_dim * 2
        if need > torch.cuda.mem_get_info(device)[0] * args.memory_fraction or tokens > 2**20:
            print(f"{batch_size:>5} {context_len:>6}  skipped (memory)")
            continue
        s = make_set(batch_size, context_len, ps, device, False, args.head_dim)
        q = torch.randn(batch_size, NUM_Q_HEADS, context_len, args.head_dim, device=device, dtype=torch.bfloat16)
        q_start = torch.zeros(batch_size, dtype=torch.int64, device=device)
        num_new = torch.full((batch_size,), context_len, dtype=torch.int64, device=device)
        mask = build_paged_block_mask(s["page_table"], q_start, num_new, context_len, ps, s["page_logical"],
                                      s["k_pool"].shape[1], None)

        options = {"BLOCK_N": min(ps, 64)}  # as PagedOp does

        def paged(q=q, s=s, mask=mask):
            return flex_attention(q, s["k_pool"][None], s["v_pool"][None], scale=scale, block_mask=mask,
                                  kernel_options=options)

        def sdpa(q=q, s=s):
            return F.scaled_dot_product_attention(q, s["dense_k"], s["dense_v"], scale=scale, is_causal=True,
                                                  enable_gqa=True)

        err = (paged().float() - sdpa().float()).abs().max().item()
        paged_ms = do_bench(paged, warmup=10, rep=50, return_mode="median")
        sdpa_ms = do_bench(sdpa, warmup=10, rep=50, return_mode="median")
        flops = 4 * batch_size * NUM_Q_HEADS * args.head_dim * context_len * context_len / 2  # causal half
        row = dict(batch_size=batch_size, context_len=context_len, page_size=ps, paged_ms=paged_ms, sdpa_ms=sdpa_ms,
                   ratio_to_sdpa=paged_ms / sdpa_ms, paged_tflops=flops / paged_ms / 1e9, max_abs_err=err)
        results.append(row)
        print(f"{batch_size:>5} {context_len:>6} {paged_ms:>9.3f} {sdpa_ms:>8.3f} {row['ratio_to_sdpa']:>10.2f} "
              f"{row['paged_tflops']:>8.0f} {err:>8.1e}", flush=True)
        del s, q, mask
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=props.name, torch=torch.__version__, mode="prefill", args=asdict(args),
                           results=results), f, indent=2, default=str)
    return results


