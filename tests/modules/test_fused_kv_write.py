"""FMS_FUSE_KV_WRITE: a one-token paged step hands its K/V to the decode kernel, which stores them as it attends,
instead of a K/V write kernel before it. On the CPU the kernel's place is taken by its reference (the write, then
the reference attention), with the op made to take the CUDA path's decisions, so that the wiring is tested: the
compiled layer's first half leaves the write to attend, attend writes once, and the tokens are those of the
separate write. The kernel itself is tested in tests/triton/test_paged_decode.py (new_kv)."""

from types import SimpleNamespace

import pytest
import torch

import fms.modules.attention as attention
from fms.modules.attention import PagedOp, get_attention_op
from fms.modules.masks import AttentionVariant
from fms.models import get_model
from fms.runtime.decode import DecodeWindowRunner
from fms.triton import paged_decode
from fms.triton.paged_decode import fuse_kv_write_from_env

from tests.runtime.test_compile_counts import MAX_BATCH, _cache, run_window


def test_switch_values():
    assert fuse_kv_write_from_env("1") and not fuse_kv_write_from_env("0") and not fuse_kv_write_from_env("")
    with pytest.raises(ValueError, match="FMS_FUSE_KV_WRITE='yes'"):
        fuse_kv_write_from_env("yes")


def _spec(device, head_dim=64):
    return SimpleNamespace(spec=SimpleNamespace(device=torch.device(device), head_dim=head_dim))


@pytest.mark.parametrize("switch, device, query_len, packed, variant, head_dim, expected", [
    (True, "cuda", 1, False, AttentionVariant(), 64, True),
    (False, "cuda", 1, False, AttentionVariant(), 64, False),  # the switch off
    (True, "cpu", 1, False, AttentionVariant(), 64, False),  # the reference path writes first
    (True, "cuda", 5, False, AttentionVariant(), 64, False),  # multi-token steps write first
    (True, "cuda", 1, True, AttentionVariant(), 64, False),  # packed steps
    (True, "cuda", 1, False, AttentionVariant(softcap=30.0), 64, False),  # FlexAttention decodes soft-capping
    (True, "cuda", 1, False, AttentionVariant(), 96, False),  # a head_dim the kernel does not tile
])
def test_when_attend_writes(monkeypatch, switch, device, query_len, packed, variant, head_dim, expected):
    monkeypatch.setattr(attention, "FUSE_KV_WRITE", switch)
    meta = SimpleNamespace(query_len=query_len, packed=packed)
    assert PagedOp().writes_kv_in_attend(_spec(device, head_dim), meta, variant) is expected
    assert PagedOp(decode_kernel="flex").writes_kv_in_attend(_spec(device, head_dim), meta, variant) is False
    assert get_attention_op("sdpa").writes_kv_in_attend(_spec(device, head_dim), meta, variant) is False


def _windows(runner, batches=(MAX_BATCH, 2, 3)):
    return [run_window(runner, batch) for batch in batches]


@pytest.mark.parametrize("scope, kernel", [("layers", False), ("model", False), ("layers", True)],
                         ids=["layers", "model", "layers-interpreted-kernel"])
def test_decode_windows_equal_the_separate_write(monkeypatch, scope, kernel):
    """kernel: the eager steps run the Triton kernel itself (in Triton's interpreter on the CPU), writing new_kv."""
    torch._dynamo.reset()
    model = get_model("llama", "nano", seed=0, device_type="cpu", data_type=torch.float32, head_dim=32)
    expected = _windows(DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None))

    if kernel:
        if not paged_decode.can_run_triton(torch.device("cpu")):
            pytest.skip("needs Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py on a CPU machine)")
        launches = []

        def interpreted(q, k_pool, v_pool, *args, new_kv=None, **kwargs):
            if torch.compiler.is_compiling():
                return original_decode(q, k_pool, v_pool, *args, new_kv=new_kv, **kwargs)
            launches.append(new_kv is not None)
            return paged_decode.paged_decode_attention(q, k_pool, v_pool, *args, new_kv=new_kv, **kwargs)

        original_decode = attention._paged_decode
        monkeypatch.setattr(attention, "_paged_decode", interpreted)
    monkeypatch.setattr(attention, "FUSE_KV_WRITE", True)
    original = PagedOp._fuses_kv_write
    # the CUDA path's decisions on the CPU: attend hands the K/V to _paged_decode, whose reference path writes them
    monkeypatch.setattr(PagedOp, "_fuses_kv_write", lambda self, device, variant, head_dim:
                        original(self, torch.device("cuda"), variant, head_dim))
    calls = {"attend_writes": 0, "write_kv": 0}
    write_new_kv, write_kv = paged_decode.write_new_kv, PagedOp.write_kv

    def counted_write_new_kv(*args):
        calls["attend_writes"] += 1
        return write_new_kv(*args)

    def counted_write_kv(self, *args):
        calls["write_kv"] += 1
        return write_kv(self, *args)

    monkeypatch.setattr(paged_decode, "write_new_kv", counted_write_new_kv)
    monkeypatch.setattr(PagedOp, "write_kv", counted_write_kv)
    eager = _windows(DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None))
    assert eager == expected
    eager_writes = 3 * 3 * model.config.num_layers  # 3 windows of 3 steps, each layer once
    if not kernel:
        assert calls["attend_writes"] == eager_writes
    calls.update(attend_writes=0, write_kv=0)
    compiled = DecodeWindowRunner(model, _cache(model), "paged", max_steps=3, graph_batch_sizes=None,
                                  compile_model=True, compile_scope=scope)
    compiled._set_compiled(True, "aot_eager")
    assert _windows(compiled) == expected
    if kernel:  # every eager step's attention was the kernel, given the step's K/V
        assert calls["write_kv"] == 0 and len(launches) == 2 * eager_writes and all(launches)
    elif scope == "layers":  # the first half leaves the write to attend, which writes (eagerly)
        assert calls["write_kv"] == 0 and calls["attend_writes"] == eager_writes
    else:  # a traced attend writes in its graph, never through the kernel
        assert calls["attend_writes"] == 0
