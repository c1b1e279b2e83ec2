"""The fused Mamba2 decode update (fms.triton.mamba_decode) against `ssd_step` on gathered rows.

On CPU the Triton kernel runs in Triton's interpreter (slow), so shapes are small; the custom op runs
the torch reference there and the kernel on CUDA.

Tolerances, fp32: atol/rtol 1e-5 on states and on y (elementwise updates and one length-N reduction in
fp32; observed differences ~1 ulp on states, ~4e-6 on y). bf16 inputs: the same, because x, B, C and D
are upcast exactly and all arithmetic is fp32. Idle rows (dt = 0) and slots no row names: bit for bit.
"""

import pytest
import torch

# On CPU, tests/conftest.py has put Triton in interpreter mode before anything imported it.
pytest.importorskip("triton", reason="triton is not installed; the Mamba decode kernel needs it")

from fms.triton import mamba_decode as kernel  # noqa: E402
from fms.triton.mamba_decode import (  # noqa: E402
    choose_block_p,
    mamba_decode_reference,
    mamba_decode_triton,
    mamba_decode_update,
)
from fms.triton.ssd_reference import ssd_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ATOL = RTOL = 1e-5


def make_case(slots, active, num_heads=4, head_dim=16, state_size=32, num_groups=2, num_slots=8, dtype=torch.float32,
              seed=0):
    """A random pool of num_slots + 1 slots (the last one the scratch slot) and one step's inputs.

    active[i] False gives row i dt = 0. dt spans [0.01, 2] and A [-8, -0.1], so decays go from ~1 to ~0.
    """
    g = torch.Generator().manual_seed(seed)
    b = len(slots)
    dt = torch.rand(b, num_heads, generator=g) * 2 + 0.01
    dt[~torch.tensor(active)] = 0.0
    case = dict(
        ssm_pool=torch.randn(num_slots + 1, num_heads, head_dim, state_size, generator=g),
        slots=torch.tensor(slots),
        x=torch.randn(b, num_heads, head_dim, generator=g).to(dtype),
        dt=dt,
        A=-(torch.rand(num_heads, generator=g) * 7.9 + 0.1),
        B=torch.randn(b, num_groups, state_size, generator=g).to(dtype),
        C=torch.randn(b, num_groups, state_size, generator=g).to(dtype),
        D=torch.randn(num_heads, generator=g).to(dtype),
    )
    return {k: v.to(DEVICE) for k, v in case.items()}


def expected(case):
    """y and the new state of every row, from ssd_step on the rows as they were (fp32, on CPU)."""
    c = {k: v.cpu() for k, v in case.items()}
    x = c["x"].float()
    y, h = ssd_step(x, c["dt"], c["A"], c["B"], c["C"], c["ssm_pool"][c["slots"]])
    return y + c["D"].float()[:, None] * x, h


def run(impl, case, **kwargs):
    """-> (y, pool after); the case's own pool is left as it was."""
    args = dict(case, ssm_pool=case["ssm_pool"].clone())
    if impl == "triton":
        y = mamba_decode_triton(**args, **kwargs)
    elif impl == "op":
        y = torch.ops.fms.mamba_decode_update(**args)
    else:
        y = mamba_decode_reference(**args)
    assert y.dtype == torch.float32 and y.shape == case["x"].shape
    return y.cpu(), args["ssm_pool"].cpu()


def check(case, y, pool, rows):
    """Rows `rows` (each on a slot of its own) match ssd_step; idle rows' slots and unnamed slots are unchanged."""
    want_y, want_h = expected(case)
    before = case["ssm_pool"].cpu()
    slots = case["slots"].cpu()
    for i in rows:
        torch.testing.assert_close(y[i], want_y[i], atol=ATOL, rtol=RTOL)
        if case["dt"][i].any():
            torch.testing.assert_close(pool[slots[i]], want_h[i], atol=ATOL, rtol=RTOL)
        else:
            assert torch.equal(pool[slots[i]], before[slots[i]]), f"idle row {i} changed its state"
    unnamed = [s for s in range(pool.shape[0]) if s not in slots.tolist()]
    assert torch.equal(pool[unnamed], before[unnamed])


IMPLS = ["triton", "op"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_groups", [1, 2])
@pytest.mark.parametrize("head_dim, state_size, block_p", [(16, 32, None), (64, 128, 16), (24, 48, 16), (8, 16, 4)])
def test_matches_ssd_step(impl, num_groups, head_dim, state_size, block_p):
    """Rows on their own slots, one idle; head_dim 24 / state_size 48: a partial P block and a masked N tail."""
    slots, active = [5, 0, 3, 7, 2], [True, True, False, True, True]
    case = make_case(slots, active, head_dim=head_dim, state_size=state_size, num_groups=num_groups,
                     seed=head_dim + num_groups)
    y, pool = run(impl, case, **({"block_p": block_p} if impl == "triton" else {}))
    check(case, y, pool, rows=range(len(slots)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_heads, num_groups", [(1, 1), (6, 3)])
def test_batch_of_one(impl, num_heads, num_groups):
    case = make_case([4], [True], num_heads=num_heads, num_groups=num_groups, seed=num_heads)
    check(case, *run(impl, case), rows=[0])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padded_rows_active", [False, True])
def test_padded_rows_share_the_scratch_slot(impl, padded_rows_active):
    """Padded rows of a CUDA-graph batch all name the scratch slot, which holds NaN here. Idle (as the runner
    makes them), they leave it alone; active, they race on it, but nothing reaches the other rows or slots."""
    scratch = 8
    slots = [1, scratch, 6, scratch, scratch]
    case = make_case(slots, [True, padded_rows_active, True, padded_rows_active, padded_rows_active], seed=3)
    case["ssm_pool"][scratch] = float("nan")
    y, pool = run(impl, case)
    check(case, y, pool, rows=[0, 2])
    assert torch.isfinite(y[[0, 2]]).all()
    if not padded_rows_active:
        assert pool[scratch].isnan().all()  # bit for bit: not written at all


@pytest.mark.parametrize("impl", IMPLS)
def test_idle_rows_keep_every_bit(impl):
    """dt = 0 leaves the state exactly as it was, whatever it holds (huge, tiny, subnormal values)."""
    case = make_case([2, 5, 0], [False, True, False], seed=9)
    pool = case["ssm_pool"]
    pool[2].mul_(1e30)
    pool[0].mul_(1e-40)  # subnormal
    y, after = run(impl, case)
    assert torch.equal(after[2], pool[2].cpu()) and torch.equal(after[0], pool[0].cpu())
    check(case, y, after, rows=[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs(impl):
    """x, B, C, D in bf16 (the model dtype) against ssd_step on the same values upcast: fp32 tolerance."""
    case = make_case([3, 1, 6], [True, False, True], num_groups=2, dtype=torch.bfloat16, seed=4)
    check(case, *run(impl, case), rows=range(3))


def test_strided_inputs():
    """x, B and C as the mixer passes them: views into one (b, conv_dim) row of conv outputs."""
    b, nh, P, G, N = 3, 4, 16, 2, 32
    case = make_case([4, 0, 2], [True, True, True], num_heads=nh, head_dim=P, state_size=N, num_groups=G, seed=5)
    xBC = torch.cat([case["x"].reshape(b, -1), case["B"].reshape(b, -1), case["C"].reshape(b, -1)], dim=-1)
    x, B, C = xBC.split([nh * P, G * N, G * N], dim=-1)
    strided = dict(case, x=x.view(b, nh, P), B=B.view(b, G, N), C=C.view(b, G, N))
    assert not strided["x"].is_contiguous()
    check(case, *run("triton", strided), rows=range(b))


def test_reference_is_ssd_step_exactly():
    """The CPU path is the gather-step-scatter it replaces, bit for bit (so CPU model outputs did not move)."""
    case = {k: v.cpu() for k, v in make_case([5, 0, 3], [True, False, True], seed=6).items()}
    want_y, want_h = expected(case)
    y, pool = run("reference", case)
    assert torch.equal(y, want_y)
    assert torch.equal(pool[[5, 3]], want_h[[0, 2]])


def test_update_dispatches_by_device(monkeypatch):
    """mamba_decode_update takes the reference off CUDA even with TRITON_INTERPRET set (as tests set it)."""
    called = []
    monkeypatch.setattr(kernel, "mamba_decode_triton", lambda *a, **k: called.append("triton"))
    case = {k: v.cpu() for k, v in make_case([1, 2], [True, True], seed=7).items()}
    args = dict(case, ssm_pool=case["ssm_pool"].clone())
    y = mamba_decode_update(**args)
    assert not called
    want_y, _ = expected(case)
    assert torch.equal(y, want_y)


def test_compiled_op_equals_eager():
    """Under torch.compile(fullgraph=True) the op stays one opaque call that updates the pool in place
    (no functional copy of the pool), with the eager results bit for bit (the same reference or kernel)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    case = make_case([5, 8, 0, 8], [True, False, True, False], seed=8)

    def step(ssm_pool, slots, x, dt, A, B, C, D):
        return mamba_decode_update(ssm_pool, slots, x, dt, A, B, C, D) * 2.0

    eager_pool, compiled_pool = case["ssm_pool"].clone(), case["ssm_pool"].clone()
    want = step(**dict(case, ssm_pool=eager_pool))
    got, (code,) = run_and_get_code(torch.compile(step, fullgraph=True), **dict(case, ssm_pool=compiled_pool))
    assert "fms.mamba_decode_update" in code and "copy_" not in code
    assert torch.equal(got, want) and torch.equal(compiled_pool, eager_pool)


def decode_two_ways(device, graph_batch_sizes=None, monkeypatch=None):
    """The tiny hybrid's decode windows (3 rows, one idling after 2 steps) on two prefilled caches: eagerly on
    the first, then on the second with CUDA graphs (graph_batch_sizes) or with the Triton kernel in place of
    the op's device choice (monkeypatch). Asserts the same tokens and Mamba states; -> the second runner."""
    from fms.runtime.decode import DecodeWindowRunner
    from tests.models.test_hybrid_decode_compile import STEPS, _model, _prefilled_cache, _prompts, _window

    model = _model(device)
    prompts = _prompts((5, 19, 3), model.config.vocab_size)
    (eager_cache, firsts), (other_cache, _) = (_prefilled_cache(model, prompts) for _ in range(2))
    eager = DecodeWindowRunner(model, eager_cache, "paged", max_steps=STEPS, graph_batch_sizes=None)
    other = DecodeWindowRunner(model, other_cache, "paged", max_steps=STEPS, graph_batch_sizes=graph_batch_sizes)
    want = _window(eager, firsts, [STEPS, 2, STEPS])
    if monkeypatch is not None:
        monkeypatch.setattr(kernel, "_by_device", mamba_decode_triton)
    assert _window(other, firsts, [STEPS, 2, STEPS]) == want
    for a, b in zip(eager_cache.state_pool.conv + eager_cache.state_pool.ssm,
                    other_cache.state_pool.conv + other_cache.state_pool.ssm):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL)
    return other


def test_hybrid_decode_with_the_kernel_equals_the_reference(monkeypatch):
    """The model's decode with the Triton kernel (the interpreter on CPU) in place of the reference."""
    decode_two_ways(DEVICE, monkeypatch=monkeypatch)


def test_choose_block_p():
    # Granite-4.0-H-1B (48 heads x 64 x 128): the largest 16 KB tile once the batch fills the GPU ...
    assert choose_block_p(32, 48, 64, 128, num_sms=132) == 32
    # ... and smaller tiles for more programs at batch 1 (48 heads * 64/8 = 384 programs >= 2 per SM).
    assert choose_block_p(1, 48, 64, 128, num_sms=132) == 8
    assert choose_block_p(1, 1, 64, 128, num_sms=132) == 4  # never below 4 rows
    assert choose_block_p(64, 8, 16, 64, num_sms=132) == 16  # no larger than head_dim


def _valid_args():
    b, nh, P, G, N = 2, 4, 8, 2, 16
    return dict(ssm_pool=torch.zeros(5, nh, P, N), slots=torch.tensor([0, 1]), x=torch.zeros(b, nh, P),
                dt=torch.zeros(b, nh), A=-torch.ones(nh), B=torch.zeros(b, G, N), C=torch.zeros(b, G, N),
                D=torch.ones(nh))


@pytest.mark.parametrize("change, match", [
    (dict(ssm_pool=torch.zeros(5, 4, 8, 16, dtype=torch.bfloat16)), "ssm_pool must be fp32"),
    (dict(ssm_pool=torch.zeros(4, 8, 16)), "ssm_pool must be fp32"),
    (dict(x=torch.zeros(2, 4, 16)), r"x must be \[batch, num_heads=4, head_dim=8\]"),
    (dict(x=torch.zeros(2, 4, 8, dtype=torch.float64)), "x dtype"),
    (dict(slots=torch.tensor([0.0, 1.0])), "slots must be"),
    (dict(slots=torch.tensor([0, 1, 2])), "slots must be"),
    (dict(dt=torch.zeros(2, 4, dtype=torch.bfloat16)), "dt must be fp32"),
    (dict(A=-torch.ones(3)), "A must be fp32"),
    (dict(D=torch.ones(4, dtype=torch.long)), "D must be a float tensor"),
    (dict(B=torch.zeros(2, 2, 8)), "B must be"),
    (dict(C=torch.zeros(2, 1, 16)), "B and C must have one shape"),
    (dict(B=torch.zeros(2, 3, 16), C=torch.zeros(2, 3, 16)), "num_heads=4 must be a multiple of num_groups=3"),
])
@pytest.mark.parametrize("fn", [mamba_decode_reference, mamba_decode_triton, mamba_decode_update])
def test_rejects_bad_inputs(fn, change, match):
    args = _valid_args()
    args.update(change)
    with pytest.raises(ValueError, match=match):
        fn(**args)


def test_kernel_refuses_what_it_cannot_run(monkeypatch):
    args = {name: t.to(DEVICE) for name, t in _valid_args().items()}
    with pytest.raises(ValueError, match="block_p=3"):
        mamba_decode_triton(**args, block_p=3)
    big = dict(args, ssm_pool=torch.zeros(5, 4, 8, 2048, device=DEVICE), B=torch.zeros(2, 2, 2048, device=DEVICE),
               C=torch.zeros(2, 2, 2048, device=DEVICE))
    with pytest.raises(ValueError, match="state_size=2048"):
        mamba_decode_triton(**big)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs Triton and a CUDA device"):
            mamba_decode_triton(**args)


# -- GPU ------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_granite_4_h_1b_shapes(batch_size, dtype):
    """48 heads x 64 x 128, one group, as served: padded rows on the scratch slot, one idle row."""
    num_slots = 64
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(batch_size))[:batch_size].tolist()
    active = [i != 1 for i in range(batch_size)]
    if batch_size > 4:
        slots[-2:] = [num_slots, num_slots]
        active[-2:] = [False, False]
    case = make_case(slots, active, num_heads=48, head_dim=64, state_size=128, num_groups=1,
                     num_slots=num_slots, dtype=dtype, seed=batch_size)
    y, pool = run("op", case)
    check(case, y, pool, rows=[i for i, s in enumerate(slots) if s != num_slots])


@gpu
@pytest.mark.gpu
def test_gpu_hybrid_decode_step_in_a_cuda_graph():
    """The tiny hybrid's eager decode step captured in CUDA graphs (the kernel launched inside the capture)
    and replayed: the eager step's tokens and Mamba states (fp32)."""
    graphed = decode_two_ways("cuda", graph_batch_sizes=(1, 2, 4))
    assert graphed.use_graphs, "CUDA graph capture failed and fell back to eager (see the log)"
    assert graphed.num_graph_steps > 0
