"""Few-row projections (decode at batch 1 and 2) as a Triton GEMV kernel, optionally fused with SwiGLU, and with a
block's RMSNorm before it or its residual add after it (KernelConfig.fuse_norm).

At one or two tokens per step every projection is a matrix-vector product that reads its whole weight
once. On the H100, cuBLAS picks split-K kernels for the small matrices of a 1B model: they add a
reduction launch and stay well under the copy bandwidth (`scripts/bench_gemv.py`). This kernel
gives each program a few full output rows (no split-K), multiplies each weight tile by every input row
(up to MAX_ROWS) while it is loaded, and can compute the SwiGLU product silu(gate) * up of its input
chunk on the fly, which removes the MLP's activation kernel.

`fms.modules.linear.Linear` is an `nn.Linear` (same parameters, same checkpoint names) that sends an input through
`gemv` when `fits` says so, and through `F.linear` otherwise; `swiglu_down` does the same for the SwiGLU down
projection. The torch expression each replaces is the reference (`gemv_reference`). Whether a layer
uses the kernel at all is its own setting (`KernelConfig.gemv`, fms.modules.kernel_config).

Under torch.compile, `gemv` is the opaque op fms::gemv for any number of rows and decides at run time: the
kernel for at most MAX_ROWS rows, cuBLAS (after a one-pass SwiGLU kernel where asked) for more, or the split-K
kernel (fms.triton.splitk) for 3-256 bf16/fp16 rows where this GPU's table lists it for that row count. So a graph
compiled with a symbolic batch size holds no guard on it, and the engine's batch-1 decode runs in the batch-2
graph (one idle row) instead of a second compile of its own (dynamo specializes a size of 1), or, with an unbacked
batch size (fms.runtime.compiled.unbacked_batch), in a batch-1 graph from the same trace. `fits` sends
only one-token rows (decode) there; a compiled prefill traces F.linear (`one_token_rows`).
"""

import functools
import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from fms.triton.rmsnorm import rms_norm_reference, rms_norm_rows
from fms.triton.splitk import HALF_DTYPES, MAX_DOT_ROWS, check_config, splitk_linear
from fms.triton.support import can_run_triton, check_rows_input, positive_ints, tl, triton

# Input rows the kernel multiplies in one pass over the weight: batch-1 decode (padded to the engine's batch-2
# graph when compiled) and batch-2 decode. More rows go to cuBLAS or the split-K kernel (the table's choice). The
# kernel holds one accumulator per row, two of them (TWO_ROWS), so this cannot grow without the kernel.
MAX_ROWS = 2


if triton is not None:
    @triton.jit
    def _load_x(x_ptrs, col_ok, K, SILU_MUL: tl.constexpr):
        """One input row's chunk in fp32; silu(gate) * up rounded once to the activation dtype for [gate | up]
        rows, as the fused elementwise kernel it replaces."""
        if SILU_MUL:
            gate = tl.load(x_ptrs, mask=col_ok, other=0.0).to(tl.float32)
            up = tl.load(x_ptrs + K, mask=col_ok, other=0.0).to(tl.float32)
            return (gate * tl.sigmoid(gate) * up).to(x_ptrs.dtype.element_ty).to(tl.float32)
        return tl.load(x_ptrs, mask=col_ok, other=0.0).to(tl.float32)

    @triton.jit
    def _store(y, out_ptrs, res_ptrs, row_ok, res_scale, RESIDUAL: tl.constexpr, SCALE_RESIDUAL: tl.constexpr):
        """Store the output rounded to its dtype; with RESIDUAL, residual + res_scale * output, each step rounded as
        the torch expression it replaces (the product, then the sum)."""
        out_ty = out_ptrs.dtype.element_ty
        y = y.to(out_ty)
        if RESIDUAL:
            y = y.to(tl.float32)
            if SCALE_RESIDUAL:
                y = (y * res_scale).to(out_ty).to(tl.float32)
            y = (tl.load(res_ptrs, mask=row_ok, other=0.0).to(tl.float32) + y).to(out_ty)
        tl.store(out_ptrs, y, mask=row_ok)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, bias_ptr, norm_ptr, res_ptr, out_ptr, N, K, stride_x, stride_w, stride_res,
                     stride_out, eps, res_scale,
                     TWO_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU_MUL: tl.constexpr,
                     HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                     SCALE_RESIDUAL: tl.constexpr):
        # one (BLOCK_N, BLOCK_K) fp32 accumulator per input row: the second row costs registers and FMAs, not
        # another pass over the weight
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :]
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        # NORM: every program sees the whole input row anyway, so it sums its squares on the way and scales its
        # dot products by 1/rms at the end: sum_k w[n, k] * g[k] * x[k] / rms(x), with no pass of its own
        squares0 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        squares1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            col_ok = (k0 + cols) < K
            if EVEN_K:
                w = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0, eviction_policy="evict_first")
            else:
                w = tl.load(w_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                            eviction_policy="evict_first")
            w = w.to(tl.float32)
            x0 = _load_x(x_ptr + k0 + cols, col_ok, K, SILU_MUL)
            if NORM:
                g = tl.load(norm_ptr + k0 + cols, mask=col_ok, other=0.0).to(tl.float32)
                squares0 += x0 * x0
                x0 = x0 * g
            acc0 += w * x0[None, :]
            if TWO_ROWS:
                x1 = _load_x(x_ptr + stride_x + k0 + cols, col_ok, K, SILU_MUL)
                if NORM:
                    squares1 += x1 * x1
                    x1 = x1 * g
                acc1 += w * x1[None, :]
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        y = tl.sum(acc0, axis=1)
        if NORM:
            y = y * tl.rsqrt(tl.sum(squares0, axis=0) / K + eps)
        if HAS_BIAS:
            y += bias
        _store(y, out_ptr + rows, res_ptr + rows, row_ok, res_scale, RESIDUAL, SCALE_RESIDUAL)
        if TWO_ROWS:
            y1 = tl.sum(acc1, axis=1)
            if NORM:
                y1 = y1 * tl.rsqrt(tl.sum(squares1, axis=0) / K + eps)
            if HAS_BIAS:
                y1 += bias
            _store(y1, out_ptr + stride_out + rows, res_ptr + stride_res + rows, row_ok, res_scale, RESIDUAL,
                   SCALE_RESIDUAL)

    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, total, K, stride_x, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = i < total
        row = i // K
        col = i % K
        gate = tl.load(x_ptr + row * stride_x + col, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + K + col, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + i, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


# (BLOCK_N, BLOCK_K, num_warps, num_stages): the best total over the sweep of scripts/bench_gemv.py
# on the H100 for every Llama-3.2-1B projection, the LM head and the fused SwiGLU down projection
# (final_project/results/session5/bench_gemv.json, one row); BLOCK_K shrinks to fit a smaller K
BLOCKS = (2, 1024, 4, 2)

# Per-GPU tables of the fastest choice per (rows, N, K, silu_mul), written by `scripts/bench_gemv.py --write_table`
# on that GPU: a kernel config, or "cublas" where F.linear was faster. One JSON file per device name (as
# torch.cuda.get_device_name gives it, non-alphanumerics as "_"). Shapes a table does not list use BLOCKS.
TABLE_DIR = Path(__file__).resolve().parents[1] / "resources" / "gemv"
# A folder of the user's own tables (a GPU with none shipped, or more shapes), as vLLM's VLLM_TUNED_CONFIG_FOLDER for
# its MoE kernels: for a device, its entries are taken over the shipped table's.
TABLE_DIR_ENV = "FMS_GEMV_TABLE_DIR"
CUBLAS = "cublas"


def table_path(device_name: str, folder: Path | None = None) -> Path:
    return Path(folder or TABLE_DIR) / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def _check_choice(choice, where: str, rows: int = 1, k: int = 0):
    """A table entry's choice: CUBLAS, GEMV blocks for rows <= MAX_ROWS, a split-K config (fms.triton.splitk) above."""
    if choice == CUBLAS:
        return CUBLAS
    if rows > MAX_ROWS:
        return check_config(choice, k, f"{where}: choice for {rows} rows (split-K kernel)")
    if isinstance(choice, (list, tuple)) and len(choice) == 4 and positive_ints(choice):
        return tuple(choice)
    raise ValueError(f"{where}: choice must be {CUBLAS!r} or [BLOCK_N, BLOCK_K, num_warps, num_stages] of ints >= 1, "
                     f"got {choice!r}")


def read_table(path: Path) -> dict[tuple[int, int, int, bool], tuple | str]:
    """{(rows, n, k, silu_mul): blocks tuple or CUBLAS} from a table file; ValueError naming the file and entry.
    Entries for more than MAX_ROWS rows (up to MAX_DOT_ROWS) hold a split-K config (fms.triton.splitk) or CUBLAS."""
    try:
        entries = json.loads(Path(path).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"GEMV table {path}: not a JSON object with 'entries' ({type(e).__name__}: {e})") from None
    table = {}
    for i, entry in enumerate(entries):
        where = f"GEMV table {path}, entry {i}"
        try:
            key = (entry["rows"], entry["n"], entry["k"], entry["silu_mul"])
        except (KeyError, TypeError):
            raise ValueError(f"{where}: needs rows, n, k, silu_mul and choice, got {entry!r}") from None
        if not (positive_ints(key[:3]) and isinstance(key[3], bool) and key[0] <= MAX_DOT_ROWS):
            raise ValueError(f"{where}: rows (1 to {MAX_DOT_ROWS}), n and k must be ints >= 1 and silu_mul a bool, "
                             f"got {entry!r}")
        table[key] = _check_choice(entry.get("choice"), where, key[0], key[2])
    return table


def write_table(path: Path, device_name: str, entries: list[dict], source: dict) -> None:
    """Write a table (entries: dicts of rows, n, k, silu_mul, choice and the timings behind it); read back to check."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({"device": device_name, "source": source, "entries": entries}, indent=1) + "\n")
    read_table(path)


def tables_for(device_name: str, user_dir: str | None = None) -> dict:
    """The table fms uses on a GPU of this name: the shipped one's entries, then those of the same file name in
    user_dir (FMS_GEMV_TABLE_DIR) over them. ValueError if user_dir is not a folder or a table is invalid."""
    table = {}
    shipped = table_path(device_name)
    if shipped.is_file():
        table.update(read_table(shipped))
    if user_dir:
        if not Path(user_dir).is_dir():
            raise ValueError(f"{TABLE_DIR_ENV}={user_dir!r} is not a folder; it names a folder of GEMV tables "
                             f"(`fms bench gemv --write_table FOLDER` writes one there)")
        own = table_path(device_name, Path(user_dir))
        if own.is_file():
            table.update(read_table(own))
    return table


@functools.cache
def _tables(device_name: str, user_dir: str | None) -> dict:
    return tables_for(device_name, user_dir)


def _table_for(device_index: int) -> dict:
    return _tables(torch.cuda.get_device_name(device_index), os.environ.get(TABLE_DIR_ENV) or None)


def table_choice(device_index: int, rows: int, n: int, k: int, silu_mul: bool):
    """The table's choice on this CUDA device for rows of a (n, k) weight: blocks or CUBLAS, else BLOCKS up to
    MAX_ROWS; above, a split-K config or CUBLAS, else CUBLAS (a row count the table does not list stays on cuBLAS:
    only measured choices change what runs, and the engine's decode graphs run at its batch buckets' row counts)."""
    return _table_for(device_index).get((rows, n, k, silu_mul), BLOCKS if rows <= MAX_ROWS else CUBLAS)


def tuned_choice(x: torch.Tensor, weight: torch.Tensor, rows: int, silu_mul: bool):
    """table_choice for x's device and this weight (rows up to MAX_ROWS: the GEMV kernel's); BLOCKS off CUDA."""
    return table_choice(_index(x), rows, *weight.shape, silu_mul) if x.is_cuda else BLOCKS


def tuned_dot_choice(x: torch.Tensor, weight: torch.Tensor, rows: int, silu_mul: bool):
    """For more than MAX_ROWS rows: table_choice's split-K config for x's device and this weight, or CUBLAS (off
    CUDA)."""
    if not x.is_cuda:
        return CUBLAS
    return table_choice(_index(x), rows, *weight.shape, silu_mul)


def _index(x: torch.Tensor) -> int:
    return x.device.index if x.device.index is not None else torch.cuda.current_device()


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   silu_mul: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                   residual: torch.Tensor | None = None, residual_scale: float = 1.0) -> torch.Tensor:
    """What the kernel computes, in torch: F.linear(x, weight, bias), with x = silu(gate) * up for x = [gate | up]
    when silu_mul, x = RMSNorm(x) (rms_norm_reference) when norm_weight is given, and residual + residual_scale *
    the product when residual is given: the layers' own unfused expressions."""
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    if silu_mul:
        gate, up = x.split(x.shape[-1] // 2, dim=-1)
        x = F.silu(gate.float()).mul(up.float()).to(x.dtype)
    return add_residual(F.linear(x, weight, bias), residual, residual_scale)


def add_residual(y: torch.Tensor, residual: torch.Tensor | None, scale: float = 1.0) -> torch.Tensor:
    """residual + scale * y, as a pre-norm block adds a sublayer's output (y where residual is None)."""
    if residual is None:
        return y
    return residual + (y if scale == 1.0 else scale * y)  # a product by 1.0 is exact: skip its kernel


def fits(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether `gemv(x, weight, max_rows=max_rows)` should compute x @ weight.T: x is CUDA, of the weight's dtype,
    for inference (the kernel has no backward; with gradients on, F.linear runs), and it has at most max_rows rows,
    or it is being compiled with one token per row (the op then picks the kernel or cuBLAS at run time, so that no
    graph depends on the row count; see one_token_rows)."""
    return (triton is not None and x.is_cuda and x.dtype == weight.dtype
            and weight.dim() == 2 and weight.stride(1) == 1
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and (one_token_rows(x) if torch.compiler.is_compiling() else x.numel() <= max_rows * x.shape[-1]))


def one_token_rows(x: torch.Tensor) -> bool:
    """Under torch.compile: whether x's rows are one token each, as in a decode step: (B, 1, K) with the token
    count the constant 1, or (B, K). Only those graphs go through the op fms::gemv (a batch of 1 or 2 takes the
    kernel there). A graph whose token count is a symbol (a prefill, (1, T, K) packed or (B, T, K) padded) traces
    F.linear, which inductor hands to cuBLAS directly: through the op each projection of a prefill step cost
    ~180 us of host time against ~70 us for the matmul alone (64 calls, 11.5 of a 185-token step's 38.5 ms under
    torch.profiler on the H100, final_project/results/session25/probe). The check reads the size's type, not its
    value, so it adds no guard to the graph."""
    if x.dim() < 3:
        return True
    tokens = x.shape[-2]
    return type(tokens) is int and tokens == 1


def silu_mul_rows(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for rows x = [gate | up] (2D, last dim contiguous), computed in fp32 and rounded once: one
    Triton kernel, as inductor fuses the same expression."""
    m, width = x.shape
    k = width // 2
    out = torch.empty(m, k, device=x.device, dtype=x.dtype)
    if out.numel():
        block = 1024
        _silu_mul_kernel[(triton.cdiv(m * k, block),)](x, out, m * k, k, x.stride(0), BLOCK=block)
    return out


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
            blocks=None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            residual: torch.Tensor | None = None, residual_scale: float = 1.0,
            out_shape: tuple | None = None) -> torch.Tensor:
    """The kernel on x (M <= MAX_ROWS rows of K, or of 2K = [gate | up] with silu_mul) -> (M, N), or a new tensor of
    out_shape holding M * N values; with norm_weight the rows are RMS-normalised first (in the kernel), with
    residual (M, N) the result is residual + residual_scale * product (in the kernel's epilogue)."""
    n, k = weight.shape
    check_rows_input("gemv", x, weight, silu_mul, MAX_ROWS)
    m = x.shape[0]
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"gemv's norm_weight must have shape ({k},) for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(norm_weight.shape)}")
    if residual is not None:
        residual = residual.reshape(m, n)
        if residual.stride(1) != 1:
            residual = residual.contiguous()
    block_n, block_k, warps, stages = blocks or BLOCKS
    block_k = min(block_k, triton.next_power_of_2(k))
    x = x.contiguous()
    result = torch.empty(out_shape or (m, n), device=x.device, dtype=weight.dtype)
    out = result.view(m, n)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight,
        residual if residual is not None else out, out, n, k, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), eps, residual_scale,
        TWO_ROWS=m == 2, BLOCK_N=block_n, BLOCK_K=block_k, SILU_MUL=silu_mul,
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, NORM=norm_weight is not None,
        RESIDUAL=residual is not None, SCALE_RESIDUAL=residual_scale != 1.0, num_warps=warps, num_stages=stages)
    return result


def _check_max_rows(max_rows: int) -> None:
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or not 1 <= max_rows <= MAX_ROWS:
        raise ValueError(f"max_rows must be an int from 1 to {MAX_ROWS} (the kernel's accumulators), got {max_rows!r}")


def _rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool,
                 max_rows: int = MAX_ROWS, blocks=None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                 residual: torch.Tensor | None = None, residual_scale: float = 1.0) -> torch.Tensor:
    """x (..., K or 2K) -> (..., N): the kernel for at most max_rows rows (blocks, else this GPU's table's choice,
    else BLOCKS), else, or where the table chose cuBLAS, F.linear (after silu_mul_rows or rms_norm_rows, and with
    the residual added after). A fused call (norm_weight or residual) takes the kernel for at most max_rows rows
    even where the table chose cuBLAS for the bare product (with BLOCKS): cuBLAS would cost the fused
    kernels' launches back.

    Every path returns a new (..., N) tensor, not a view of a 2-D one, as F.linear on x would: the engine's compiled
    sampling takes the LM head's logits, and a view's base is part of what dynamo guards, so logits from the
    kernel at 2 rows and from cuBLAS at 4 would compile that function twice."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    fused = norm_weight is not None or residual is not None
    choice = None
    if 1 <= rows.shape[0] <= max_rows:
        choice = blocks if blocks is not None else tuned_choice(rows, weight, rows.shape[0], silu_mul)
        if fused and choice == CUBLAS:
            choice = BLOCKS
    if choice is not None and choice != CUBLAS:
        return _launch(rows, weight, bias, silu_mul, choice, norm_weight=norm_weight, eps=eps, residual=residual,
                       residual_scale=residual_scale, out_shape=(*lead, weight.shape[0]))
    if norm_weight is not None:
        rows = rms_norm_rows(rows, norm_weight, eps) if can_run_triton(rows.device) \
            else rms_norm_reference(rows, norm_weight, eps)
    dot = CUBLAS
    # bf16 and fp16 only: the tables time bf16, and tl.dot would multiply fp32 as tf32
    if (MAX_ROWS < rows.shape[0] <= MAX_DOT_ROWS and weight.dtype in HALF_DTYPES and rows.dtype == weight.dtype
            and can_run_triton(rows.device)):
        dot = tuned_dot_choice(rows, weight, rows.shape[0], silu_mul)
    if dot != CUBLAS:  # this GPU's table timed the split-K kernel faster than cuBLAS at these rows
        out = splitk_linear(rows, weight, bias, silu_mul, dot, out_shape=(*lead, weight.shape[0]))
        return add_residual(out, residual, residual_scale)
    if silu_mul and norm_weight is None:
        rows = silu_mul_rows(rows.contiguous())
    return add_residual(F.linear(rows.reshape(*lead, rows.shape[-1]), weight, bias), residual, residual_scale)


@torch.library.custom_op("fms::gemv", mutates_args=())
def _gemv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool, max_rows: int,
             norm_weight: torch.Tensor | None = None, eps: float = 0.0, residual: torch.Tensor | None = None,
             residual_scale: float = 1.0) -> torch.Tensor:
    return _rows_linear(x, weight, bias, silu_mul, max_rows, None, norm_weight, eps, residual, residual_scale)


@_gemv_op.register_fake
def _(x, weight, bias, silu_mul, max_rows, norm_weight=None, eps=0.0, residual=None, residual_scale=1.0):
    return weight.new_empty(*x.shape[:-1], weight.shape[0])


def _check_residual_shape(residual: torch.Tensor, expected: tuple) -> None:
    """A ValueError unless residual's shape is expected (gemv's output). Traced, the same check as torch._check per
    size: a decode step's batch is an unbacked symbol there (fms.runtime.compiled.unbacked_batch), on which a plain
    comparison cannot be decided and breaks the graph."""
    if torch.compiler.is_compiling():
        torch._check(residual.dim() == len(expected))
        for have, want in zip(residual.shape, expected):
            torch._check(have == want)
    elif residual.shape != expected:
        raise ValueError(f"gemv's residual must have the output's shape {expected}, got {tuple(residual.shape)}")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu_mul: bool = False,
         blocks=None, max_rows: int = MAX_ROWS, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
         residual: torch.Tensor | None = None, residual_scale: float = 1.0) -> torch.Tensor:
    """x @ weight.T (+ bias) over x's last dim -> (..., N), with x = [gate | up] and silu(gate) * up taken first
    when silu_mul: the Triton kernel for at most max_rows rows (1 to MAX_ROWS; KernelConfig.gemv_rows), cuBLAS for
    more.

    Fused into the kernel where asked (KernelConfig.fuse_norm; gemv_reference is the expression each replaces):
    norm_weight, eps: x is RMSNorm(x) first (not with silu_mul). residual (..., N): the result is residual +
    residual_scale * product, a pre-norm block's residual add. For more rows the same expression runs unfused
    (one norm kernel, cuBLAS, the add).

    blocks: (BLOCK_N, BLOCK_K, num_warps, num_stages), for benchmarks; the tuned default otherwise.
    Under torch.compile it is the opaque op fms::gemv, which picks at run time; eagerly the same choice in Python.
    """
    _check_max_rows(max_rows)
    if residual is not None:
        _check_residual_shape(residual, (*x.shape[:-1], weight.shape[0]))
    if norm_weight is not None and silu_mul:
        raise ValueError("gemv fuses an RMSNorm of x or a SwiGLU of x, not both (norm_weight with silu_mul=True)")
    if torch.compiler.is_compiling():
        return _gemv_op(x, weight, bias, silu_mul, max_rows, norm_weight, eps, residual, residual_scale)
    return _rows_linear(x, weight, bias, silu_mul, max_rows, blocks, norm_weight, eps, residual, residual_scale)
