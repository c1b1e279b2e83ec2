"""metadata.to_device: a step's host tensors sent in one copy per dtype, and the caches' metadata built through it.

On CUDA the packed path is the default; on the CPU these tests force it (pack=True, no pinning) so that the
packing, the aligned offsets and the caches' wiring of names to tensors are checked on every machine."""

import functools

import pytest
import torch

import fms.cache.contiguous as contiguous_module
import fms.cache.paged as paged_module
from fms.cache.contiguous import ContiguousKVCache
from fms.cache.metadata import to_device
from fms.cache.paged import PagedKVCache
from fms.cache.spec import KVCacheSpec

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mixed():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randint(0, 1000, (3, 5), generator=g),  # int64
        None,
        torch.randint(0, 1000, (7,), generator=g, dtype=torch.int32),
        torch.randint(0, 1000, (1,), generator=g),  # int64, odd size: the next one must still start aligned
        torch.empty(0, dtype=torch.int64),
        torch.randint(0, 1000, (2, 1, 3), generator=g, dtype=torch.int32),
        torch.rand(4, generator=g) > 0.5,  # bool
        torch.randint(0, 1000, (4, 4), generator=g).t(),  # not contiguous
    ]


@pytest.mark.parametrize("pack", [True, None])
def test_values_shapes_dtypes_and_nones_survive(pack):
    host = _mixed()
    sent = to_device(host, DEVICE, pack=pack)
    assert len(sent) == len(host)
    for h, d in zip(host, sent):
        if h is None:
            assert d is None
            continue
        assert d.device.type == DEVICE and d.dtype == h.dtype and d.shape == h.shape
        assert torch.equal(d.cpu(), h)


def test_packed_tensors_share_one_buffer_per_dtype_at_aligned_offsets():
    host = _mixed()
    sent = to_device(host, DEVICE, pack=True)
    by_dtype = {}
    for h, d in zip(host, sent):
        if h is None or h.numel() == 0:
            continue
        by_dtype.setdefault(d.dtype, set()).add(d.untyped_storage().data_ptr())
        assert d.is_contiguous()
        assert d.data_ptr() % 64 == 0, f"{d.dtype} tensor at byte offset {d.storage_offset() * d.element_size()}"
    assert all(len(storages) == 1 for storages in by_dtype.values()), by_dtype  # one copy per dtype


def test_unpacked_path_on_the_cpu_returns_the_tensors_themselves():
    host = _mixed()
    sent = to_device(host, "cpu")
    assert all(h is d for h, d in zip(host, sent))


def _spec(num_layers=2):
    return KVCacheSpec(num_layers=num_layers, attention_layers=tuple(range(num_layers)), num_kv_heads=2,
                       head_dim=8, dtype=torch.float32, device=torch.device(DEVICE), max_position_embeddings=128)


def _tensor_fields(obj, prefix=""):
    """Every tensor reachable from a step's metadata dataclass (nested VarlenMeta included), by name."""
    out = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif hasattr(value, "__dataclass_fields__"):
            out.update(_tensor_fields(value, prefix + name + "."))
    return out


def _steps(cache_cls, **kw):
    """The metadata of a fresh prefill, a mixed resumed step (padded and packed) and a decode step."""
    cache = cache_cls(_spec(), max_batch_size=3, max_seq_len=96, **kw)
    for s in "abc":
        cache.add(s)
    metas = [cache.prepare(["a", "b", "c"], [5, 17, 2])]
    metas.append(cache.prepare(["a", "b", "c"], [3, 1, 20]))
    if cache.can_pack:
        metas.append(cache.prepare(["a", "b", "c"], [4, 9, 1], packed=True))
    metas.append(cache.prepare(["a", "b", "c"], [1, 1, 1]))
    padded = [m.get_padded_kv() for m in metas if getattr(m, "padded_kv_builder", None) is not None]
    return metas, padded


@pytest.mark.parametrize("cache_cls,module,kw", [
    (PagedKVCache, paged_module, dict(page_size=16)),
    (ContiguousKVCache, contiguous_module, {}),
])
def test_cache_metadata_is_the_same_sent_packed_or_one_by_one(monkeypatch, cache_cls, module, kw):
    """The caches name each sent tensor by its position in one list: a slip there would hand a layer the wrong
    tensor. The metadata built through the packed path must equal the one built tensor by tensor."""
    monkeypatch.setattr(module, "to_device", functools.partial(to_device, pack=False))
    plain, plain_padded = _steps(cache_cls, **kw)
    monkeypatch.setattr(module, "to_device", functools.partial(to_device, pack=True))
    packed, packed_padded = _steps(cache_cls, **kw)
    assert len(plain) == len(packed) and len(plain_padded) == len(packed_padded)
    if cache_cls is PagedKVCache:  # the resumed padded step's key grid (not built on the step with no context)
        assert any(p.kv_slots is not None for p in packed_padded)
    for a, b in zip(plain + plain_padded, packed + packed_padded):
        fa, fb = _tensor_fields(a), _tensor_fields(b)
        assert fa.keys() == fb.keys()
        assert len(fa) >= 3 or a in plain_padded
        for name in fa:
            assert fa[name].dtype == fb[name].dtype and fa[name].shape == fb[name].shape, name
            assert torch.equal(fa[name].cpu(), fb[name].cpu()), name


def test_paged_step_fields_hold_what_their_names_say():
    """Each sent tensor checked against its meaning, computed here from the block tables and lengths (the test
    above cannot see a slip made the same way on both paths)."""
    cache = PagedKVCache(_spec(), max_batch_size=3, max_seq_len=96, page_size=16)
    for s in "abc":
        cache.add(s)
    cache.prepare(["a", "b", "c"], [5, 17, 2])
    ctx, new = [5, 17, 2], [3, 1, 20]
    meta = cache.prepare(["a", "b", "c"], new)
    lens = [c + n for c, n in zip(ctx, new)]
    tables = [cache.block_table(s) for s in "abc"]
    t = max(new)

    def slot(row, pos):
        return tables[row][pos // 16] * 16 + pos % 16

    assert meta.context_lens.cpu().tolist() == ctx and meta.q_start.cpu().tolist() == ctx
    assert meta.num_new_tokens.cpu().tolist() == new
    assert meta.seq_lens.cpu().tolist() == lens and meta.seq_lens.dtype == torch.int32
    assert meta.position_ids.cpu().tolist() == [[c + j for j in range(t)] for c in ctx]
    for b, table in enumerate(tables):
        assert meta.page_table[b, :len(table)].cpu().tolist() == table
    slots = meta.slot_mapping.view(3, t).cpu()
    for b in range(3):
        assert slots[b, :new[b]].tolist() == [slot(b, ctx[b] + j) for j in range(new[b])]
    v = meta.varlen
    assert v.cu_q.cpu().tolist() == [0, 3, 4, 24] and v.cu_k.cpu().tolist() == [0, 8, 26, 48]
    assert v.q_index.cpu().tolist() == [b * t + j for b in range(3) for j in range(new[b])]
    assert v.kv_slots.cpu().tolist() == [slot(b, p) for b in range(3) for p in range(lens[b])]
    assert v.max_lens.tolist() == [20, 22]
    grid = meta.get_padded_kv()
    assert grid.kv_slots.cpu().tolist() == [[slot(b, min(p, lens[b] - 1)) for p in range(22)] for b in range(3)]
