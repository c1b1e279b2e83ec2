"""The split-K decode kernel (fms.triton.splitk: the engine's batch buckets above two rows) against torch, and how
fms.triton.gemv hands it the rows its GPU table chose it for.

On CPU the kernel runs in Triton's interpreter (tests/conftest.py), where its tiles are multiplied in fp32 (the
interpreter multiplies bf16 tiles wrongly). The reference is a float64 matmul of the same inputs; bf16 outputs are
within 2 bf16 ulps of the output's scale (each side rounds once; the kernel rounds silu(gate) * up to bf16 first,
as the layers do).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed; the split-K kernel needs it")

from fms.triton import gemv as gemv_mod
from fms.triton.splitk import MAX_DOT_ROWS, candidate_configs, check_config, splitk_linear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference64(x, w, b=None, silu_mul=False):
    if silu_mul:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate.float()).mul(up.float()).to(x.dtype)  # rounded once, as the layers' unfused expression
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


def _inputs(m, n, k, dtype, silu_mul=False, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if silu_mul else k, generator=g).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("m, n, k, config, silu_mul, bias", [
    (3, 96, 256, (32, 64, 2, 4, 3), False, False),    # rows under one 16-row tile, two K slices
    (20, 80, 512, (64, 128, 1, 4, 3), True, True),    # no split, N not a multiple of BLOCK_N, SwiGLU and bias
    (33, 64, 512, (32, 64, 8, 4, 3), True, True),     # 8 K slices summed by the reduce kernel, with the bias
    (128, 48, 256, (16, 64, 4, 4, 2), False, True),   # a full 128-row tile
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_splitk_equals_the_reference(m, n, k, config, silu_mul, bias, dtype):
    x, w, b = _inputs(m, n, k, dtype, silu_mul, bias, seed=m)
    got = splitk_linear(x, w, b, silu_mul, config)
    assert got.shape == (m, n) and got.dtype == dtype
    ref = _reference64(x, w, b, silu_mul)
    ulp = (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10) * ref.abs().max().item()
    assert (got.double() - ref).abs().max().item() <= 2 * ulp


@torch.no_grad()
def test_splitk_is_the_same_on_every_run_and_into_a_new_tensor_of_out_shape():
    """The partial sums are added in a fixed order (no atomics): two runs give the same bits. out_shape gives a
    fresh (B, 1, N) tensor, not a view of a 2-D one (see fms.triton.gemv._rows_linear)."""
    x, w, b = _inputs(24, 64, 512, torch.bfloat16, bias=True, seed=3)
    first = splitk_linear(x, w, b, False, (32, 64, 4, 4, 3), out_shape=(24, 1, 64))
    second = splitk_linear(x, w, b, False, (32, 64, 4, 4, 3), out_shape=(24, 1, 64))
    assert first.shape == (24, 1, 64) and first._base is None
    assert torch.equal(first, second)


def test_bad_inputs_and_configs_are_refused_naming_the_value():
    x32, w32, _ = _inputs(4, 32, 128, torch.float32)
    with pytest.raises(ValueError, match=r"bf16 or fp16 .*got x torch.float32 and weight torch.float32"):
        splitk_linear(x32, w32, None, False, (32, 64, 1, 4, 3))
    x, w = x32.bfloat16(), w32.bfloat16()
    with pytest.raises(ValueError, match=r"1 to 256 rows of 128 values .* got x of shape \(4, 64\)"):
        splitk_linear(x[:, :64], w, None, False, (32, 64, 1, 4, 3))
    with pytest.raises(ValueError, match=r"1 to 256 rows of 256 values .*silu_mul"):
        splitk_linear(x, w, None, True, (32, 64, 1, 4, 3))
    big = torch.zeros(MAX_DOT_ROWS + 1, 128, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="got x of shape \\(257, 128\\)"):
        splitk_linear(big, w, None, False, (32, 64, 1, 4, 3))
    with pytest.raises(ValueError, match=r"K=128 is not a multiple of SPLIT_K \* BLOCK_K = 256"):
        splitk_linear(x, w, None, False, (32, 64, 4, 4, 3))
    with pytest.raises(ValueError, match=r"powers of two >= 16 .*\(24, 64, 1, 4, 3\)"):
        check_config((24, 64, 1, 4, 3), 128)
    with pytest.raises(ValueError, match=r"\[BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages\] .*got \(32, 64, 1\)"):
        check_config((32, 64, 1), 128)


def test_candidate_configs_fill_the_gpu_and_divide_k():
    """The sweep's configs: SPLIT_K * BLOCK_K divides K, and each gives between half the SMs and 16x their count in
    programs: a 2048-wide output (o) is split along K, a 16384-wide one (gate|up) mostly is not."""
    for n, k in ((2048, 2048), (16384, 2048), (2048, 8192)):
        configs = candidate_configs(128, n, k, sms=132)
        assert configs
        for block_n, block_k, split_k, _, _ in configs:
            assert k % (block_k * split_k) == 0
            assert 66 <= -(-n // block_n) * split_k <= 16 * 132
    assert all(c[2] > 1 for c in candidate_configs(128, 2048, 2048, sms=132) if c[0] == 128)


def test_the_table_lists_split_k_configs_above_two_rows_and_unlisted_rows_stay_on_cublas(tmp_path, monkeypatch):
    """Above MAX_ROWS, table_choice gives the entry for exactly these rows (the engine's batch buckets) and CUBLAS
    for rows or shapes the table does not list. Rows up to MAX_ROWS keep the GEMV default."""
    gemv_mod.write_table(gemv_mod.table_path("Test GPU", tmp_path), "Test GPU", [
        {"rows": 8, "n": 2048, "k": 2048, "silu_mul": False, "choice": [32, 128, 4, 4, 3]},
        {"rows": 32, "n": 2048, "k": 2048, "silu_mul": False, "choice": "cublas"},
        {"rows": 128, "n": 2048, "k": 2048, "silu_mul": False, "choice": [64, 64, 8, 8, 4]},
        {"rows": 128, "n": 2048, "k": 8192, "silu_mul": True, "choice": [64, 128, 4, 4, 3]}], {"command": "t"})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Test GPU")
    monkeypatch.setenv(gemv_mod.TABLE_DIR_ENV, str(tmp_path))
    gemv_mod._tables.cache_clear()
    try:
        choice = lambda rows, n=2048, k=2048, silu=False: gemv_mod.table_choice(0, rows, n, k, silu)  # noqa: E731
        assert choice(8) == (32, 128, 4, 4, 3) and choice(128) == (64, 64, 8, 8, 4)
        assert choice(32) == gemv_mod.CUBLAS
        assert choice(4) == choice(64) == choice(100) == choice(256) == gemv_mod.CUBLAS  # not listed
        assert choice(128, 2048, 8192, True) == (64, 128, 4, 4, 3)
        assert choice(128, 2048, 8192, False) == gemv_mod.CUBLAS  # the SwiGLU entry is its own shape
        assert choice(128, 3072, 2048) == gemv_mod.CUBLAS
        assert choice(2) == gemv_mod.BLOCKS
    finally:
        gemv_mod._tables.cache_clear()


@torch.no_grad()
def test_gemv_hands_rows_above_two_to_the_split_k_kernel_where_the_table_chose_it(monkeypatch):
    """gemv (the layers' entry, and the op fms::gemv under torch.compile) sends 3-256 rows to the split-K kernel
    with the table's config, SwiGLU fused, the residual added after; to cuBLAS where the table chose it or lists
    nothing. Every path returns a new tensor of the input's leading shape."""
    table = {(16, 64, 256, False): (32, 64, 2, 4, 3), (16, 48, 128, True): (16, 64, 2, 4, 3)}
    monkeypatch.setattr(gemv_mod, "tuned_dot_choice",
                        lambda x, weight, rows, silu_mul: table.get((rows, *weight.shape, silu_mul), gemv_mod.CUBLAS))
    launched = []
    real = gemv_mod.splitk_linear

    def counted(x, weight, bias, silu_mul, config, out_shape=None):
        launched.append((x.shape[0], silu_mul, config))
        return real(x, weight, bias, silu_mul, config, out_shape)

    monkeypatch.setattr(gemv_mod, "splitk_linear", counted)
    x, w, b = _inputs(16, 64, 256, torch.bfloat16, bias=True, seed=11)
    res = torch.randn(16, 1, 64).to(DEVICE, torch.bfloat16)
    got = gemv_mod._rows_linear(x.view(16, 1, 256), w, b, False, residual=res)
    assert got.shape == (16, 1, 64)
    ref = _reference64(x, w, b).view(16, 1, 64) + res.double()
    assert (got.double() - ref).abs().max().item() <= 3 * 2.0 ** -7 * ref.abs().max().item()  # two roundings
    h, down, _ = _inputs(16, 48, 128, torch.bfloat16, silu_mul=True, seed=12)
    got = gemv_mod._rows_linear(h.view(16, 1, 256), down, None, True)
    assert got.shape == (16, 1, 48) and got._base is None
    ref = _reference64(h, down, silu_mul=True)
    assert (got.view(16, 48).double() - ref).abs().max().item() <= 2 * 2.0 ** -7 * ref.abs().max().item()
    assert launched == [(16, False, (32, 64, 2, 4, 3)), (16, True, (16, 64, 2, 4, 3))]
    launched.clear()  # unlisted rows and shapes, and fp32 (tf32 in tl.dot): cuBLAS (F.linear), not the kernel
    x8, _, _ = _inputs(8, 64, 256, torch.bfloat16, seed=13)
    torch.testing.assert_close(gemv_mod._rows_linear(x8, w, None, False), F.linear(x8, w))
    torch.testing.assert_close(gemv_mod._rows_linear(x.float(), w.float(), None, False), F.linear(x.float(), w.float()))
    assert launched == []


@torch.no_grad()
def test_compiled_decode_with_split_k_gives_the_eager_tokens(monkeypatch):
    """The engine's compiled decode step (scope "layers") at 3 and 4 rows, with every projection given a split-K
    config (as a GPU table would): the op fms::gemv runs the kernel at run time, and the tokens equal an eager
    decode through F.linear. On CPU the layers' `fits` is widened to the interpreter's rows (tests/modules/
    test_fused_norm.py) and every split-K launch is logged, so the check is not vacuous."""
    from fms.models import get_model
    from fms.modules import linear as linear_mod
    from fms.runtime.decode import DecodeWindowRunner
    from tests.runtime.test_compile_counts import _cache, _windows_equal_eager
    from tests.triton_interpreter import fits_cpu_rows

    launched, real = [], gemv_mod.splitk_linear

    def counted(x, weight, bias, silu_mul, config, out_shape=None):
        launched.append((x.shape[0], tuple(weight.shape), silu_mul))
        return real(x, weight, bias, silu_mul, config, out_shape)

    def config_for(x, weight, rows, silu_mul):
        k = weight.shape[1]
        return (16, 16, 2, 1, 1) if k % 32 == 0 else gemv_mod.CUBLAS

    monkeypatch.setattr(gemv_mod, "splitk_linear", counted)
    monkeypatch.setattr(linear_mod, "fits", fits_cpu_rows(linear_mod.fits))
    monkeypatch.setattr(gemv_mod, "tuned_dot_choice", config_for)
    cuda_choice = gemv_mod.tuned_choice
    monkeypatch.setattr(gemv_mod, "tuned_choice", lambda x, *a: cuda_choice(x, *a) if x.is_cuda else (32, 64, 1, 1))
    torch._dynamo.reset()
    plain = get_model("llama", "nano", seed=0, device_type=DEVICE, data_type=torch.bfloat16, head_dim=32)
    model = get_model("llama", "nano", seed=0, device_type=DEVICE, data_type=torch.bfloat16, head_dim=32)
    runner = DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None,
                                compile_model=True, compile_scope="layers")
    runner._set_compiled(True, "aot_eager")
    # eagerly only rows the GEMV kernel takes go through gemv: the eager runner's 3 and 4 rows run F.linear
    _windows_equal_eager(model, runner, (3, 4), eager_model=plain)
    torch._dynamo.reset()
    shapes = {shape for _, shape, _ in launched}
    assert {rows for rows, _, _ in launched} == {3, 4}
    # q|k|v and gate|up (256, 64), o and the SwiGLU down projection (64, 128) (head_dim 32: 128 wide attention)
    assert shapes >= {(256, 64), (64, 128)} and {silu for *_, silu in launched} == {False, True}


def test_bench_gemv_takes_a_list_of_row_counts_and_refuses_rows_no_kernel_takes(capsys):
    """`fms bench gemv --rows 4,...,256` times the split-K kernel for the larger buckets; a count over 256 or not a
    number is refused before anything is timed, naming it. A timed split-K row becomes a five-field table entry."""
    import re

    from fms.bench import gemv as bench

    for rows, message in (("2,300", r"--rows must be in \[1, 256\] .* got 300"),
                          ("8,x", r"comma-separated list of them, got '8,x'")):
        with pytest.raises(SystemExit):
            bench.main(["--rows", rows])
        assert re.search(message, capsys.readouterr().err)
    entries = bench.table_entries([{"rows": 128, "n": 2048, "k": 2048, "cublas_us": 9.0, "triton_us": 6.0,
                                    "triton_best_cfg": (64, 128, 4, 4, 3)}])
    assert entries == [{"rows": 128, "n": 2048, "k": 2048, "silu_mul": False, "choice": [64, 128, 4, 4, 3],
                        "us": 6.0, "triton_us": 6.0, "cublas_us": 9.0}]


def test_the_sweep_refuses_a_config_that_computes_a_wrong_product(monkeypatch):
    """fms bench gemv's split-K sweep checks each config's product before timing it: a config whose result is wrong
    is recorded as failed and is never the best (here the wrong one is also the "fastest"), so it never reaches a
    table. Timings are faked (no GPU); the kernel runs in the interpreter on the CPU."""
    from types import SimpleNamespace

    from fms.bench import gemv as bench

    good, bad = (16, 16, 2, 1, 1), (32, 16, 1, 1, 1)
    monkeypatch.setattr(bench, "candidate_configs", lambda rows, n, k, sms: [good, bad])
    real = bench.splitk_linear

    last = {}

    def splitk(x, w, bias, silu_mul, cfg, out_shape=None):
        last["cfg"] = cfg
        out = real(x, w, bias, silu_mul, cfg, out_shape)
        return out * 2 if cfg == bad else out  # a miscompiled config

    def fake_time(fn, calls, replays):  # the wrong config would be the fastest, were it timed
        last["cfg"] = None
        fn(0)
        return 0.5 if last["cfg"] == bad else 2.0 if last["cfg"] is not None else 3.0  # None: cuBLAS

    monkeypatch.setattr(bench, "splitk_linear", splitk)
    monkeypatch.setattr(bench, "graph_time_us", fake_time)
    if not torch.cuda.is_available():  # the CPU has no properties to read (on a GPU, its own: configs are faked)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: SimpleNamespace(multi_processor_count=4))
    args = SimpleNamespace(layers=2, replays=1, configs="sweep")
    # time_shapes draws its inputs from the global generator. Triton's CPU interpreter rounds fp32 to bf16 by
    # truncation (the GPU rounds to nearest), so at k=64 a correct fused SwiGLU product can miss the sweep's 1%
    # check for some draws (seeds 4 and 5 did): a fixed seed keeps this test about the wrong config alone.
    torch.manual_seed(0)
    rows, full = bench.time_shapes(args, {"o": (32, 64), "down": (32, 64)}, 4, torch.device(DEVICE))
    for row in rows:
        assert row["triton_best_cfg"] == good
        assert str(full["o"][str(bad)]).startswith("failed: ValueError: wrong result")
    down = next(r for r in rows if r["shape"] == "down")
    assert down["fused_silu_mul_cfg"] == good
