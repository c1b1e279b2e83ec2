"""The Triton argmax (fms.triton.argmax) against torch's x.argmax(-1), index for index: ties (the first maximum wins),
rows of -inf, NaNs (the first NaN wins, as in argmax), every part count; its part sizing, its errors, and the decode
step's greedy tokens with the kernel switched on.

On CPU the kernel runs in Triton's interpreter; shapes are small.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton", reason="triton is not installed; the argmax kernel needs it")

from fms.triton import argmax as argmax_mod  # noqa: E402
from fms.triton.argmax import argmax_rows_op, argmax_rows_triton, kernel_on_from_env, num_parts  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,vocab,parts", [(3, 5000, None), (2, 3000, 4), (1, 1024, 1), (4, 2049, 8),
                                               (2, 7, None), (5, 3000, 64), (2, 100, 64)])
def test_equals_torch_argmax_with_ties(dtype, batch, vocab, parts):
    torch.manual_seed(batch * vocab)
    x = torch.randn(batch, vocab, device=DEVICE).to(dtype)
    first, second = 3 % vocab, (vocab - 2) % vocab  # the row maximum twice, the first copy early
    x[0, first] = x[0].max() + 1
    x[0, second] = x[0, first]
    if batch > 1:
        x[1] = 0.5  # a whole row tied
    assert torch.equal(argmax_rows_triton(x, parts), x.argmax(-1))


@pytest.mark.parametrize("parts", [1, 4, 16])
def test_infinities_and_nans_resolve_as_torch_does(parts):
    x = torch.randn(5, 4000, device=DEVICE)
    x[0, :] = float("-inf")  # all -inf: column 0
    x[1, 2500] = float("nan")  # NaNs count as the maximum, the first one wins
    x[1, 3000] = float("nan")
    x[1, 10] = float("inf")
    x[2, 100] = float("inf")  # +inf twice: the first
    x[2, 3999] = float("inf")
    x[3, 3999] = float("nan")
    x[3, 0] = float("nan")
    x[4, 1000:] = float("-inf")
    expected = x.argmax(-1)
    assert expected.tolist()[:4] == [0, 2500, 100, 0]  # torch's own answers, which the kernel must match
    assert torch.equal(argmax_rows_triton(x, parts), expected)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 4), vocab=st.integers(1, 2600), parts=st.sampled_from([None, 1, 2, 3, 8, 64]),
       levels=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_matches_argmax_on_few_distinct_values(batch, vocab, parts, levels, seed):
    """Few distinct values (many ties in every part) and arbitrary part counts, including parts past the row's end."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (batch, vocab), generator=g).float().to(DEVICE)
    assert torch.equal(argmax_rows_triton(x, parts), x.argmax(-1))


def test_rows_with_a_stride_and_an_empty_batch():
    wide = torch.randn(3, 1, 2100, device=DEVICE)
    rows = wide[:, 0]  # the decode step's logits[:, 0]: row stride 2100, column stride 1
    assert torch.equal(argmax_rows_triton(rows), rows.argmax(-1))
    assert argmax_rows_triton(torch.empty(0, 50, device=DEVICE)).shape == (0,)


def test_num_parts_fills_the_gpu_within_its_bounds():
    assert num_parts(128, 128256, 132) == 8  # 4 programs an SM: 528 wanted, 1024 given
    assert num_parts(1, 128256, 132) == 64  # the cap
    assert num_parts(1, 3000, 132) == 2  # each part at least one block of 1024 columns
    assert num_parts(1, 1500, 132) == 1
    for batch in (1, 2, 3, 17, 128, 256):
        for vocab in (1, 1000, 50257, 128256):
            p = num_parts(batch, vocab, 132)
            assert p & (p - 1) == 0 and 1 <= p <= 64
            assert p == 1 or p * 1024 <= vocab
            assert p == 64 or batch * p >= 4 * 132 or 2 * p * 1024 > vocab  # stops only at a bound


@pytest.mark.parametrize("x,parts,match", [
    (torch.zeros(5), None, "a \\(B, V\\) floating tensor"),
    (torch.zeros(2, 5, dtype=torch.int64), None, "floating"),
    (torch.zeros(5, 2).t(), None, "stride 1"),
    (torch.zeros(2, 0), None, "V >= 1"),
    (torch.zeros(2, 5), 0, "parts=0"),
    (torch.zeros(2, 5), True, "parts=True"),
])
def test_bad_input_is_named(x, parts, match):
    with pytest.raises(ValueError, match=match):
        argmax_rows_triton(x.to(DEVICE), parts)


def test_the_switch_takes_only_1_0_or_empty():
    assert kernel_on_from_env("1") and not kernel_on_from_env("0") and not kernel_on_from_env("")
    with pytest.raises(ValueError, match="FMS_ARGMAX_KERNEL='true'"):
        kernel_on_from_env("true")


def test_the_op_compiles_with_a_symbolic_batch():
    torch._dynamo.reset()
    step = torch.compile(lambda x: argmax_rows_op(x) + 1, dynamic=True)
    for batch in (4, 3):
        x = torch.randn(batch, 3000, device=DEVICE)
        assert torch.equal(step(x), x.argmax(-1) + 1)


def test_the_decode_step_with_the_kernel_on_gives_the_same_greedy_tokens(monkeypatch):
    """The decode windows' tokens (compiled step, argmax inside _step_outputs) equal an uncompiled forward's, and
    the kernel ran: sampler.argmax_rows sends its rows there when FMS_ARGMAX_KERNEL is on."""
    from tests.runtime.test_compile_counts import _cache, _windows_equal_eager

    from fms.models import get_model
    from fms.runtime.decode import DecodeWindowRunner

    launches, launch = [], argmax_mod.argmax_rows_triton
    monkeypatch.setattr(argmax_mod, "KERNEL_ON", True)
    monkeypatch.setattr(argmax_mod, "argmax_rows_triton", lambda *a, **k: launches.append(1) or launch(*a, **k))
    torch._dynamo.reset()
    model = get_model("llama", "nano", seed=0, device_type="cpu", data_type=torch.float32, head_dim=32, num_layers=2)
    runner = DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None,
                                compile_model=True, compile_scope="layers")
    runner._set_compiled(True, "aot_eager")
    _windows_equal_eager(model, runner, (4, 2))
    assert launches


def test_one_compile_for_every_graph_batch_size(monkeypatch):
    """Each distinct launch key is a compile at engine start-up; the part count follows the batch (Llama-3's
    128,256-token vocabulary, 132 SMs), but the key does not."""
    from fms.triton import argmax as module
    from tests.triton.launch_keys import LaunchRecorder

    recorder = LaunchRecorder(module._part_argmax_kernel)
    monkeypatch.setattr(module, "_part_argmax_kernel", recorder)
    monkeypatch.setattr(module, "sm_count", lambda device: 132)
    for batch in (1, 2, 4, 8, 16, 32, 64, 128):
        argmax_rows_triton(torch.zeros(batch, 128256))
    assert len({grid[1] for grid, _, _ in recorder.launches}) >= 4  # several part counts
    assert len(recorder.variants) == 1, recorder.variants
