"""The few-row GEMV kernel (fms.triton.gemv: decode at batch 1 and 2) against torch.

On CPU the kernel runs in Triton's interpreter with small block sizes; on CUDA with the tuned ones.
The reference is a float64 matmul of the same inputs (not F.linear, which is the layers' own
fallback). Tolerances: fp32 atol 1e-4 (sums of up to 1k products in a different order); bf16
outputs within 2 bf16 ulps of the output scale of a reference on the same bf16 inputs (each side
rounds once).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed; the GEMV kernel needs it")

from fms.triton import gemv as gemv_mod
from fms.modules.kernel_config import KernelConfig
from fms.modules.linear import Linear, swiglu_down
from fms.triton.gemv import fits, gemv_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
SMALL_BLOCKS = (4, 32, 1, 1)  # interpreter speed: every program is Python


@pytest.fixture
def kernel():  # on CPU, tests/conftest.py has put Triton in interpreter mode
    return lambda x, w, b=None, silu_mul=False: gemv_mod._launch(x, w, b, silu_mul, None if CUDA else SMALL_BLOCKS)


def _reference64(x, w, b=None, silu_mul=False):
    """x @ w.T (+ b) in float64, with x = silu(gate) * up for x = [gate | up] when silu_mul."""
    x = x.double()
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        x = gate * torch.sigmoid(gate) * up
    out = x @ w.double().T
    return out if b is None else out + b.double()


def _inputs(n, k, dtype, silu_mul=False, bias=False, seed=0, rows=1):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    x = torch.randn(rows, 2 * k if silu_mul else k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("n,k", [(24, 64), (13, 96), (5, 40), (64, 200)])  # N, K not multiples of the blocks
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_kernel_matches_torch_fp32(kernel, n, k, silu_mul, bias, rows):
    x, w, b = _inputs(n, k, torch.float32, silu_mul, bias, rows=rows)
    out = kernel(x, w, b, silu_mul)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    ref = _reference64(x, w, b, silu_mul)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)
    # the torch fallback's definition of the same product
    torch.testing.assert_close(gemv_reference(x, w, b, silu_mul).double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_kernel_bf16_rounds_once(kernel, silu_mul, rows):
    n, k = 48, 128
    x, w, b = _inputs(n, k, torch.bfloat16, silu_mul, bias=True, seed=1, rows=rows)
    out = kernel(x, w, b, silu_mul).float()
    if silu_mul:  # the kernel rounds silu(gate) * up once to bf16, then accumulates in fp32
        gate, up = x.float().split(k, dim=-1)
        xr = (F.silu(gate) * up).to(torch.bfloat16).float()
    else:
        xr = x.float()
    ref = F.linear(xr, w.float(), b.float())
    ulp = 2.0 ** (torch.floor(torch.log2(ref.abs().max())) - 7)
    assert (out - ref).abs().max() <= 2 * ulp


def test_kernel_rejects_wrong_width_and_too_many_rows(kernel):
    x, w, _ = _inputs(8, 64, torch.float32)
    with pytest.raises(ValueError, match="1 to 2 rows of 128 values"):
        kernel(x, w, None, True)  # silu_mul needs [gate | up], twice K
    with pytest.raises(ValueError, match=r"1 to 2 rows of 64 values .* got x of shape \(3, 64\)"):
        kernel(torch.randn(3, 64, device=DEVICE), w, None, False)


def test_silu_mul_kernel_is_the_fused_expression_rounded_once():
    """The one-pass SwiGLU kernel the compiled op runs before cuBLAS for more than MAX_ROWS rows."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 2 * 40, generator=g).to(DEVICE, torch.bfloat16)
    gate, up = x.float().split(40, dim=-1)
    ref = (gate * torch.sigmoid(gate) * up).to(torch.bfloat16)
    out = gemv_mod.silu_mul_rows(x)
    assert out.shape == (5, 40) and out.dtype == torch.bfloat16
    assert torch.equal(out, ref) or (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert gemv_mod.silu_mul_rows(x[:0]).shape == (0, 40)


def test_fits_up_to_two_cuda_rows():
    w = torch.randn(16, 32)
    assert gemv_mod.MAX_ROWS == 2
    assert not fits(torch.randn(2, 32), w)
    assert not fits(torch.randn(1, 1, 32).double(), w)
    if CUDA:
        wc = w.cuda()
        assert fits(torch.randn(1, 1, 32, device="cuda"), wc)
        assert fits(torch.randn(2, 1, 32, device="cuda"), wc)
        assert not fits(torch.randn(3, 1, 32, device="cuda"), wc)
        assert not fits(torch.randn(1, 32, device="cuda").half(), wc)  # dtype mismatch: F.linear decides
        with torch.enable_grad():  # the kernel has no backward
            assert not fits(torch.randn(1, 32, device="cuda"), wc.requires_grad_())
    else:
        assert not fits(torch.randn(1, 32), w)  # CPU rows stay on F.linear


@pytest.fixture
def kernel_launches(monkeypatch):
    """Linear and swiglu_down on the path that launches the kernel; returns the list of launches.

    On CUDA the layers' own fits() picks the kernel for up to MAX_ROWS rows. On CPU fits() keeps every row
    on F.linear, so up to MAX_ROWS rows of the weight's dtype are let through to the kernel in Triton's
    interpreter (small blocks) instead; rows that do not fit still take F.linear.
    """
    from fms.modules import linear as linear_mod

    launches = []

    def launch(x, w, b=None, silu_mul=False, max_rows=gemv_mod.MAX_ROWS, **fusion):
        launches.append(silu_mul)
        return gemv_mod.gemv(x, w, b, silu_mul, None if CUDA else SMALL_BLOCKS, max_rows=max_rows, **fusion)

    monkeypatch.setattr(linear_mod, "gemv", launch)
    if not CUDA:
        monkeypatch.setattr(linear_mod, "fits", lambda x, w, max_rows=gemv_mod.MAX_ROWS:
                            x.numel() <= max_rows * x.shape[-1] and x.dtype == w.dtype)
    return launches


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True])
def test_linear_single_row_goes_through_the_kernel(kernel_launches, bias):
    torch.manual_seed(0)
    lin = Linear(96, 40, bias=bias).to(DEVICE)
    assert isinstance(lin, torch.nn.Linear) and set(lin.state_dict()) == ({"weight", "bias"} if bias else {"weight"})
    x = torch.randn(1, 1, 96, device=DEVICE)
    out = lin(x)
    assert kernel_launches == [False] and out.shape == (1, 1, 40)
    torch.testing.assert_close(out.double(), _reference64(x.view(1, -1), lin.weight, lin.bias).view(1, 1, 40),
                               atol=1e-4, rtol=1e-4)
    two = torch.randn(2, 1, 96, device=DEVICE)  # two rows (batch-2 decode): the kernel too
    torch.testing.assert_close(lin(two).double(), _reference64(two, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    assert kernel_launches == [False, False]
    rows = torch.randn(3, 5, 96, device=DEVICE)  # more rows: F.linear
    torch.testing.assert_close(lin(rows).double(), _reference64(rows, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    assert kernel_launches == [False, False]


@torch.no_grad()
def test_swiglu_down_single_row_goes_through_the_fused_kernel(kernel_launches):
    torch.manual_seed(1)
    down = Linear(48, 24, bias=False).to(DEVICE)
    h = torch.randn(1, 1, 96, device=DEVICE)
    out = swiglu_down(h, down)
    assert kernel_launches == [True] and out.shape == (1, 1, 24)
    torch.testing.assert_close(out.double(), _reference64(h.view(1, -1), down.weight, silu_mul=True).view(1, 1, 24),
                               atol=1e-4, rtol=1e-4)
    rows = torch.randn(2, 3, 96, device=DEVICE)  # not one row: the torch expression through down (F.linear)
    torch.testing.assert_close(swiglu_down(rows, down).double(), _reference64(rows, down.weight, silu_mul=True),
                               atol=1e-4, rtol=1e-4)
    assert kernel_launches == [True]


@torch.no_grad()
def test_gemv_off_keeps_single_rows_on_f_linear_with_the_same_outputs(kernel_launches):
    """KernelConfig(gemv=False) on a layer: the row that launched the kernel now takes F.linear; same product."""
    torch.manual_seed(2)
    lin, down = Linear(96, 40, bias=True).to(DEVICE), Linear(48, 24, bias=False).to(DEVICE)
    x, h = torch.randn(1, 1, 96, device=DEVICE), torch.randn(1, 1, 96, device=DEVICE)
    on = (lin(x), swiglu_down(h, down))
    assert kernel_launches == [False, True]
    for layer in (lin, down):
        layer.set_kernels(KernelConfig(gemv=False))
    off = (lin(x), swiglu_down(h, down))
    assert kernel_launches == [False, True]  # no launch with the switch off
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    other = Linear(96, 40, bias=True).to(DEVICE)  # a layer built now still has the default: no global switch
    assert other.kernels == KernelConfig() and other(x).shape == (1, 1, 40) and kernel_launches == [False, True, False]
    with pytest.raises(TypeError, match="kernels must be a KernelConfig"):
        lin.set_kernels(False)


@torch.no_grad()
def test_gemv_rows_one_sends_two_rows_to_f_linear_with_the_same_outputs(kernel_launches):
    """KernelConfig(gemv_rows=1) (FMS_GEMV=1): one row still launches the kernel, two rows (batch 2, or batch 1 padded
    to a graph of 2) take F.linear; the products do not change."""
    torch.manual_seed(3)
    lin, down = Linear(96, 40, bias=True).to(DEVICE), Linear(48, 24, bias=False).to(DEVICE)
    one, two, h2 = (torch.randn(1, 1, 96, device=DEVICE), torch.randn(2, 1, 96, device=DEVICE),
                    torch.randn(2, 1, 96, device=DEVICE))
    before = (lin(two), swiglu_down(h2, down))
    assert kernel_launches == [False, True]
    for layer in (lin, down):
        layer.set_kernels(KernelConfig(gemv_rows=1))
    after = (lin(two), swiglu_down(h2, down))
    assert kernel_launches == [False, True]  # two rows: no launch
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lin(one).double(), _reference64(one, lin.weight, lin.bias), atol=1e-4, rtol=1e-4)
    assert kernel_launches == [False, True, False]  # one row: the kernel


@pytest.mark.parametrize("max_rows", [0, 3, True, 1.0])
def test_gemv_refuses_a_row_bound_the_kernel_cannot_take(max_rows):
    x, w, _ = _inputs(8, 32, torch.float32)
    with pytest.raises(ValueError, match=rf"max_rows must be an int from 1 to 2 .*got {max_rows!r}"):
        gemv_mod.gemv(x, w, max_rows=max_rows)


@torch.no_grad()
@pytest.mark.parametrize("max_rows", [1, 2])
def test_compiled_op_serves_every_row_count_from_one_graph(monkeypatch, max_rows):
    """Under torch.compile, gemv is the opaque op fms::gemv and picks the kernel or cuBLAS at run time: one graph
    with a symbolic batch serves 2, 3 and 6 rows (the engine's decode buckets) with no recompile, and each
    matches torch (kernel for 2 rows, the SwiGLU kernel then F.linear for more)."""
    from torch._dynamo.testing import CompileCounter

    if not CUDA:
        monkeypatch.setattr(gemv_mod, "BLOCKS", SMALL_BLOCKS)  # interpreter speed
    torch._dynamo.reset()
    counter = CompileCounter()
    lin_w, down_w = _inputs(24, 64, torch.float32, seed=4)[1], _inputs(16, 32, torch.float32, seed=5)[1]

    launches, launch = [], gemv_mod._launch

    def counted(x, w, b, silu_mul, blocks=None, **kw):
        launches.append(silu_mul)
        return launch(x, w, b, silu_mul, blocks, **kw)

    monkeypatch.setattr(gemv_mod, "_launch", counted)

    def step(x, h):
        return (gemv_mod.gemv(x, lin_w, max_rows=max_rows),
                gemv_mod.gemv(h, down_w, silu_mul=True, max_rows=max_rows))

    compiled = torch.compile(step, backend=counter, dynamic=True, fullgraph=True)
    for batch in (2, 3, 6):
        x = torch.randn(batch, 1, 64, device=DEVICE)
        h = torch.randn(batch, 1, 64, device=DEVICE)
        launches.clear()
        out, down = compiled(x, h)
        # the kernel for at most max_rows rows (KernelConfig.gemv_rows), decided inside the op
        assert launches == ([False, True] if batch <= max_rows else [])
        assert out.shape == (batch, 1, 24) and down.shape == (batch, 1, 16)
        torch.testing.assert_close(out.double(), _reference64(x, lin_w), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(down.double(), _reference64(h, down_w, silu_mul=True), atol=1e-4, rtol=1e-4)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_compiled_rows_are_one_token_each_only_in_decode_shapes():
    """Under torch.compile with dynamic shapes, fits() hands a projection to the op fms::gemv only when each row is
    one token (a decode step: (B, 1, K) or (B, K), B a symbol); a prefill's symbolic token count, packed (1, T, K)
    or padded (B, T, K), traces F.linear. The decision reads no size's value: one graph per shape family, no
    recompile as B or T change."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    def route(x):  # +1 where the op would run, -1 where F.linear would
        return x + 1 if gemv_mod.one_token_rows(x) else x - 1

    compiled = torch.compile(route, backend=counter, dynamic=True, fullgraph=True)
    expected = [((2, 1, 8), 1), ((3, 1, 8), 1), ((6, 1, 8), 1),  # decode buckets: one graph
                ((1, 5, 8), -1), ((1, 7, 8), -1), ((1, 300, 8), -1),  # packed prefill: one more graph
                ((4, 8), 1), ((9, 8), 1)]  # 2-D rows (a Mamba decode's in_proj input): one more
    for shape, sign in expected:
        assert compiled(torch.zeros(shape)).flatten()[0].item() == sign, shape
    assert counter.frame_count == 3
    # eagerly the row count decides (fits' other branch), not this rule
    assert gemv_mod.one_token_rows(torch.zeros(1, 5, 8)) is False
    assert gemv_mod.one_token_rows(torch.zeros(5, 1, 8)) is True
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch.compile of a CUDA Linear needs a CUDA GPU")
@torch.no_grad()
def test_gpu_compiled_prefill_traces_f_linear_and_decode_the_op():
    """A compiled Linear / SwiGLU down projection over a prefill's symbolic token count has no fms::gemv call in its
    graph (inductor calls cuBLAS itself); over one token per row it has one per projection. Both match torch."""
    torch.manual_seed(0)
    lin = Linear(256, 384, bias=False).cuda().to(torch.bfloat16)
    down = Linear(512, 256, bias=False).cuda().to(torch.bfloat16)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(sum(node.target is torch.ops.fms.gemv.default for node in gm.graph.nodes))
        return gm

    def f(x, h):
        return lin(x), swiglu_down(h, down)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=backend, dynamic=True, fullgraph=True)
    for rows, tokens in ((1, 37), (1, 301), (3, 1), (8, 1)):  # packed prefills, then decode batches
        x = torch.randn(rows, tokens, 256, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(rows, tokens, 1024, device="cuda", dtype=torch.bfloat16)
        gate, up = h.float().split(512, dim=-1)
        ref = (F.linear(x.float(), lin.weight.float()),
               F.linear((F.silu(gate) * up).to(torch.bfloat16).float(), down.weight.float()))
        for a, r in zip(compiled(x, h), ref):
            torch.testing.assert_close(a.float(), r, atol=3e-2, rtol=3e-2)
    assert graphs == [0, 2], graphs  # prefill: F.linear twice; decode: the op for each projection
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the compiled kernel, torch.compile and CUDA graphs need a CUDA GPU")
@torch.no_grad()
def test_gpu_linear_and_swiglu_compiled_and_graphed():
    torch.manual_seed(0)
    lin = Linear(2048, 3072, bias=False).cuda().to(torch.bfloat16)
    down = Linear(8192, 2048, bias=False).cuda().to(torch.bfloat16)
    x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, 1, 16384, device="cuda", dtype=torch.bfloat16)

    def f(x, h):
        return lin(x), swiglu_down(h, down)

    gate, up = h.split(8192, dim=-1)
    ref = (F.linear(x.float(), lin.weight.float()),
           F.linear((F.silu(gate.float()) * up.float()).to(torch.bfloat16).float(), down.weight.float()))
    compiled = torch.compile(f, fullgraph=True)
    for got in (f(x, h), compiled(x, h)):
        for a, r in zip(got, ref):
            assert a.shape == r.shape
            torch.testing.assert_close(a.float(), r, atol=2e-2, rtol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x, h)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out[0].float(), F.linear(x.float(), lin.weight.float()), atol=2e-2, rtol=2e-2)

    # a symbolic batch, as the engine compiles its decode step: Linear hands every row count to the op, which
    # picks the kernel (2 rows) or cuBLAS (3, 8) at run time; one graph for all, no recompile
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    dynamic = torch.compile(f, backend=counter, dynamic=True, fullgraph=True)
    for batch in (2, 3, 8):
        xb = torch.randn(batch, 1, 2048, device="cuda", dtype=torch.bfloat16)
        hb = torch.randn(batch, 1, 16384, device="cuda", dtype=torch.bfloat16)
        gate, up = hb.split(8192, dim=-1)
        ref = (F.linear(xb.float(), lin.weight.float()),
               F.linear((F.silu(gate.float()) * up.float()).to(torch.bfloat16).float(), down.weight.float()))
        for a, r in zip(dynamic(xb, hb), ref):
            assert a.shape == r.shape
            torch.testing.assert_close(a.float(), r, atol=2e-2, rtol=2e-2)
    assert counter.frame_count == 1
    torch._dynamo.reset()


# -- per-GPU tables (fms/resources/gemv): the fastest choice per shape --------------------------------------------
def test_table_round_trip_and_bad_tables_are_refused_naming_the_file_and_entry(tmp_path):
    path = gemv_mod.table_path("NVIDIA H200", tmp_path)
    assert path.name == "NVIDIA_H200.json"
    entries = [{"rows": 1, "n": 3072, "k": 2048, "silu_mul": False, "choice": [4, 512, 8, 2], "us": 6.1},
               {"rows": 2, "n": 128256, "k": 2048, "silu_mul": False, "choice": "cublas", "us": 127.0},
               {"rows": 128, "n": 2048, "k": 8192, "silu_mul": True, "choice": [64, 128, 4, 4, 3], "us": 20.0}]
    gemv_mod.write_table(path, "NVIDIA H200", entries, {"command": "test"})
    assert gemv_mod.read_table(path) == {(1, 3072, 2048, False): (4, 512, 8, 2),
                                         (2, 128256, 2048, False): gemv_mod.CUBLAS,
                                         (128, 2048, 8192, True): (64, 128, 4, 4, 3)}
    bad = tmp_path / "bad.json"
    for body, message in ((["x"], "not a JSON object with 'entries'"),
                          ({"entries": [{"rows": 1, "n": 8}]}, "entry 0: needs rows, n, k, silu_mul and choice"),
                          ({"entries": [{"rows": 257, "n": 8, "k": 8, "silu_mul": False, "choice": "cublas"}]},
                           r"entry 0: rows \(1 to 256\)"),
                          ({"entries": [{"rows": 8, "n": 8, "k": 64, "silu_mul": False, "choice": [4, 512, 8, 2]}]},
                           r"entry 0: choice for 8 rows \(split-K kernel\): must be \[BLOCK_N, BLOCK_K, SPLIT_K"),
                          ({"entries": [{"rows": 8, "n": 8, "k": 64, "silu_mul": False,
                                         "choice": [32, 64, 2, 4, 3]}]},
                           r"entry 0: choice for 8 rows \(split-K kernel\): K=64 is not a multiple of SPLIT_K \* "
                           r"BLOCK_K = 128"),
                          ({"entries": [{"rows": 1, "n": 8, "k": 8, "silu_mul": False, "choice": [4, 0, 1, 1]}]},
                           r"entry 0: choice must be 'cublas' or \[BLOCK_N, BLOCK_K, num_warps, num_stages\]")):
        bad.write_text(__import__("json").dumps(body))
        with pytest.raises(ValueError, match=f"GEMV table {bad}.*{message}"):
            gemv_mod.read_table(bad)


def test_every_shipped_table_reads_and_is_named_for_its_device():
    """Each table in fms/resources/gemv is valid (read_table raises on a bad entry) and sits at the path that
    table_path gives its own device name, the name fms.triton.gemv looks it up by."""
    import json

    shipped = sorted(gemv_mod.TABLE_DIR.glob("*.json"))
    assert {p.name for p in shipped} >= {"NVIDIA_H200.json", "NVIDIA_H100_80GB_HBM3.json"}
    for path in shipped:
        device = json.loads(path.read_text())["device"]
        assert gemv_mod.table_path(device) == path
        table = gemv_mod.read_table(path)
        # the engine's decode graph runs batch 1 and 2 at two rows: every 1B projection is listed at two rows
        for n, k, silu_mul in ((3072, 2048, False), (2048, 2048, False), (16384, 2048, False), (2048, 8192, True),
                               (128256, 2048, False)):
            assert (2, n, k, silu_mul) in table, (path.name, n, k, silu_mul)


def test_a_user_table_folder_adds_to_and_overrides_the_shipped_table(tmp_path, monkeypatch):
    """FMS_GEMV_TABLE_DIR: the user's table for the device is read over the shipped one (its entries win, the rest
    stay); the engine's lookup (table_choice on a device index) follows the variable; a bad folder or table is refused
    naming it."""
    shipped = gemv_mod.read_table(gemv_mod.table_path("NVIDIA H200"))
    key = (2, 3072, 2048, False)
    assert key in shipped and shipped[key] != (8, 64, 2, 3)
    gemv_mod.write_table(gemv_mod.table_path("NVIDIA H200", tmp_path), "NVIDIA H200",
                         [{"rows": 2, "n": 3072, "k": 2048, "silu_mul": False, "choice": [8, 64, 2, 3]},
                          {"rows": 2, "n": 4096, "k": 14336, "silu_mul": False, "choice": "cublas"}], {"command": "t"})
    merged = gemv_mod.tables_for("NVIDIA H200", str(tmp_path))
    assert merged[key] == (8, 64, 2, 3) and merged[(2, 4096, 14336, False)] == gemv_mod.CUBLAS
    assert {k: v for k, v in merged.items() if k not in (key, (2, 4096, 14336, False))} == \
        {k: v for k, v in shipped.items() if k != key}
    assert gemv_mod.tables_for("Some Other GPU", str(tmp_path)) == {}  # no table of its name anywhere

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H200")
    gemv_mod._tables.cache_clear()
    try:
        monkeypatch.setenv(gemv_mod.TABLE_DIR_ENV, str(tmp_path))
        assert gemv_mod.table_choice(0, 2, 3072, 2048, False) == (8, 64, 2, 3)
        monkeypatch.delenv(gemv_mod.TABLE_DIR_ENV)
        assert gemv_mod.table_choice(0, 2, 3072, 2048, False) == shipped[key]
        monkeypatch.setenv(gemv_mod.TABLE_DIR_ENV, str(tmp_path / "missing"))
        with pytest.raises(ValueError, match="FMS_GEMV_TABLE_DIR=.*missing.* is not a folder"):
            gemv_mod.table_choice(0, 2, 3072, 2048, False)
    finally:
        gemv_mod._tables.cache_clear()
    gemv_mod.table_path("NVIDIA H200", tmp_path).write_text("{}")
    with pytest.raises(ValueError, match="GEMV table .*NVIDIA_H200.json"):
        gemv_mod.tables_for("NVIDIA H200", str(tmp_path))


@torch.no_grad()
def test_the_table_picks_the_kernel_config_or_cublas_per_shape(monkeypatch):
    """_rows_linear takes this GPU's table's choice for the shape and row count: its block sizes, or F.linear where
    cuBLAS was faster; an unlisted shape runs BLOCKS. (On the CPU the table lookup is replaced, the kernel runs in
    the interpreter.)"""
    x1, w, b = _inputs(24, 64, torch.float32, bias=True, seed=6)
    x2 = torch.randn(2, 64).to(DEVICE)
    h, down_w, _ = _inputs(16, 32, torch.float32, silu_mul=True, seed=7)
    table = {(1, 24, 64, False): (8, 32, 1, 1), (2, 24, 64, False): gemv_mod.CUBLAS,
             (1, 16, 32, True): (4, 16, 1, 1)}
    monkeypatch.setattr(gemv_mod, "tuned_choice",
                        lambda x, weight, rows, silu_mul: table.get((rows, *weight.shape, silu_mul), SMALL_BLOCKS))
    launched, launch = [], gemv_mod._launch

    def counted(x, weight, bias, silu_mul, blocks=None, **kw):
        launched.append((x.shape[0], silu_mul, blocks))
        return launch(x, weight, bias, silu_mul, blocks, **kw)

    monkeypatch.setattr(gemv_mod, "_launch", counted)
    torch.testing.assert_close(gemv_mod.gemv(x1, w, b).double(), _reference64(x1, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gemv_mod.gemv(x2, w, b).double(), _reference64(x2, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gemv_mod.gemv(h, down_w, silu_mul=True).double(),
                               _reference64(h, down_w, silu_mul=True), atol=1e-4, rtol=1e-4)
    other = torch.randn(8, 64).to(DEVICE)  # a shape the table does not list: BLOCKS (here the small ones)
    gemv_mod.gemv(x1, other)
    assert launched == [(1, False, (8, 32, 1, 1)), (1, True, (4, 16, 1, 1)), (1, False, SMALL_BLOCKS)]
    launched.clear()  # explicit blocks (the benchmark's sweep) win over the table
    gemv_mod.gemv(x2, w, b, blocks=SMALL_BLOCKS)
    assert launched == [(2, False, SMALL_BLOCKS)]


def test_bench_gemv_writes_the_fastest_choice_per_shape_and_merges(tmp_path):
    from fms.bench import gemv as bench
    rows = [{"rows": 2, "n": 3072, "k": 2048, "cublas_us": 6.4, "triton_us": 7.4, "triton_best_cfg": (2, 1024, 4, 2)},
            {"rows": 2, "n": 2048, "k": 8192, "cublas_us": 13.6, "triton_us": 12.0, "triton_best_cfg": (4, 512, 4, 2),
             "fused_silu_mul_us": 27.9, "fused_silu_mul_cfg": (2, 1024, 4, 2), "silu_mul_then_cublas_us": 15.1}]
    entries = bench.table_entries(rows)
    assert [(e["n"], e["silu_mul"], e["choice"]) for e in entries] == [
        (3072, False, "cublas"), (2048, False, [4, 512, 4, 2]), (2048, True, "cublas")]
    assert entries[2]["triton_us"] == 27.9 and entries[2]["cublas_us"] == 15.1
    path = tmp_path / "t.json"
    gemv_mod.write_table(path, "GPU", [{"rows": 1, "n": 3072, "k": 2048, "silu_mul": False, "choice": [2, 512, 4, 2]},
                                       {"rows": 2, "n": 3072, "k": 2048, "silu_mul": False, "choice": [8, 512, 4, 2]}],
                         {})
    merged = bench.merge_entries(path, entries)  # the one-row entry stays, the two-row one is replaced
    assert [(e["rows"], e["n"], e["silu_mul"], e["choice"]) for e in merged] == [
        (1, 3072, False, [2, 512, 4, 2]), (2, 2048, False, [4, 512, 4, 2]), (2, 2048, True, "cublas"),
        (2, 3072, False, "cublas")]
