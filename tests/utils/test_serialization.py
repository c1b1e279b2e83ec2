"""HF checkpoint loading: a hand-written tiny Llama checkpoint loads by name, bitwise, onto the model's device
and in its dtype, and every broken folder fails with a message that names what is wrong."""

import contextlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fms.models import get_model, list_variants
from fms.utils.serialization import CheckpointError

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 32, 16, 2, 1, 8, 24

HF_CONFIG = dict(model_type="llama", vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                 num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTER,
                 max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


def hf_tensors(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": rand(VOCAB, HIDDEN),
        p + "input_layernorm.weight": rand(HIDDEN),
        p + "self_attn.q_proj.weight": rand(HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.k_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.v_proj.weight": rand(KV_HEADS * HEAD_DIM, HIDDEN),
        p + "self_attn.o_proj.weight": rand(HIDDEN, HEADS * HEAD_DIM),
        p + "post_attention_layernorm.weight": rand(HIDDEN),
        p + "mlp.gate_proj.weight": rand(INTER, HIDDEN),
        p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
        p + "mlp.down_proj.weight": rand(HIDDEN, INTER),
        "model.norm.weight": rand(HIDDEN),
        "lm_head.weight": rand(VOCAB, HIDDEN),
    }


def write_checkpoint(path, tensors, config=None, shards=1):
    """config.json plus the tensors, in one file or round-robin over `shards` files with an index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or HF_CONFIG))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def load(path):
    return get_model("hf_pretrained", model_path=str(path))


# ---------------------------------------------------------------------------------------------
# loading that works
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 3])
def test_loads_every_tensor_by_name(tmp_path, shards):
    tensors = hf_tensors()
    model = load(write_checkpoint(tmp_path, tensors, shards=shards))
    params = dict(model.named_parameters())
    torch.testing.assert_close(params["embedding.weight"], tensors["model.embed_tokens.weight"])
    torch.testing.assert_close(params["head.weight"], tensors["lm_head.weight"])
    qkv = torch.cat([tensors[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"])
    torch.testing.assert_close(params["layers.0.mixer.qkv_fused.weight"], qkv)
    fused = torch.cat([tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]])
    torch.testing.assert_close(params["layers.0.ff.wg1_fused.weight"], fused)
    torch.testing.assert_close(params["dec_norm.weight"], tensors["model.norm.weight"])


def test_tied_checkpoint_without_lm_head(tmp_path):
    tensors = hf_tensors()
    del tensors["lm_head.weight"]
    model = load(write_checkpoint(tmp_path, tensors, dict(HF_CONFIG, tie_word_embeddings=True)))
    assert model.head.weight is model.embedding.weight
    torch.testing.assert_close(model.head.weight, tensors["model.embed_tokens.weight"])


def test_old_rotary_inv_freq_buffers_are_ignored(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(HEAD_DIM // 2)
    load(write_checkpoint(tmp_path, tensors))


# ---------------------------------------------------------------------------------------------
# read onto the parameters' device, converted to their dtype
# ---------------------------------------------------------------------------------------------
# our parameter -> the HF tensors that fill its rows, in order
SOURCES = {
    "embedding.weight": ["model.embed_tokens.weight"],
    "head.weight": ["lm_head.weight"],
    "dec_norm.weight": ["model.norm.weight"],
    "layers.0.ln.weight": ["model.layers.0.input_layernorm.weight"],
    "layers.0.ff_ln.weight": ["model.layers.0.post_attention_layernorm.weight"],
    "layers.0.mixer.qkv_fused.weight": [f"model.layers.0.self_attn.{n}_proj.weight" for n in "qkv"],
    "layers.0.mixer.dense.weight": ["model.layers.0.self_attn.o_proj.weight"],
    "layers.0.ff.wg1_fused.weight": ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"],
    "layers.0.ff.w2.weight": ["model.layers.0.mlp.down_proj.weight"],
}


@pytest.fixture
def opened_on(monkeypatch):
    """The device each safetensors file is opened for, in order."""
    from fms.utils import serialization

    devices = []
    real = serialization._open_safetensors

    def spy(file, device="cpu"):
        devices.append(device)
        return real(file, device)

    monkeypatch.setattr(serialization, "_open_safetensors", spy)
    return devices


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("file_dtype, model_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_each_parameter_is_its_file_tensors_in_the_model_dtype(tmp_path, opened_on, shards, file_dtype, model_dtype):
    # bitwise: the rows of a fused parameter are its sources in order, each rounded once to the model's dtype
    tensors = {n: t.to(file_dtype) for n, t in hf_tensors().items()}
    model = get_model("hf_pretrained", model_path=str(write_checkpoint(tmp_path, tensors, shards=shards)),
                      data_type=model_dtype)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(SOURCES)
    for name, sources in SOURCES.items():
        expected = torch.cat([tensors[s] for s in sources]).to(model_dtype)
        assert params[name].dtype == model_dtype and torch.equal(params[name], expected), name
    assert opened_on and set(opened_on) == {"cpu"}  # a CPU model reads on the CPU


def test_parameters_on_several_devices_are_read_on_the_cpu():
    from fms.utils.serialization import _read_device

    cpu = torch.zeros(1)
    assert _read_device([cpu, cpu]) == "cpu"
    assert _read_device([cpu, torch.zeros(1, device="meta")]) == "cpu"  # then copy_ moves each where it lives
    if torch.cuda.is_available():
        assert _read_device([torch.zeros(1, device="cuda")]) == f"cuda:{torch.cuda.current_device()}"


@pytest.fixture
def stagings(monkeypatch):
    """Every _HostStaging the loader makes, in order (the real one for its device)."""
    from fms.utils import serialization

    made = []
    real = serialization._staging_for

    def spy(device):
        staging = real(device)
        made.append(staging)
        return staging

    monkeypatch.setattr(serialization, "_staging_for", spy)
    return made


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: checks the weights are read onto it")
@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_a_cuda_model_reads_its_weights_onto_the_gpu(tmp_path, opened_on, stagings, model_dtype):
    tensors = hf_tensors()
    path = str(write_checkpoint(tmp_path, tensors, shards=3))
    model = get_model("hf_pretrained", model_path=path, device_type="cuda", data_type=model_dtype)
    # each shard memory-mapped once; every byte through the pinned ring once: no CPU copy of the model
    assert opened_on == ["cpu"] * 3
    (staging,) = stagings
    assert staging.bytes == tensor_bytes(tensors) and all(slot.is_pinned() for slot in staging.slots)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(b.device.type == "cuda" for b in model.buffers())
    on_cpu = dict(get_model("hf_pretrained", model_path=path, data_type=model_dtype).named_parameters())
    for name, param in model.named_parameters():
        assert param.dtype == model_dtype and torch.equal(param.cpu(), on_cpu[name]), name


def small_staging(monkeypatch, slot_bytes=40, num_slots=2):
    """Make the loader on the CPU go through a ring of `num_slots` buffers of `slot_bytes` (the GPU path's staging,
    with every tensor larger than a slot cut into pieces and the ring wrapping around many times)."""
    from fms.utils import serialization

    made = []

    def staging_for(device):
        made.append(serialization._HostStaging(device, slot_bytes, num_slots))
        return made[-1]

    monkeypatch.setattr(serialization, "_staging_for", staging_for)
    return made


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("file_dtype, model_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.float16, torch.bfloat16)])
def test_weights_through_the_staging_ring_are_the_file_tensors(tmp_path, monkeypatch, shards, file_dtype,
                                                               model_dtype):
    made = small_staging(monkeypatch)
    tensors = {n: t.to(file_dtype) for n, t in hf_tensors().items()}
    model = get_model("hf_pretrained", model_path=str(write_checkpoint(tmp_path, tensors, shards=shards)),
                      data_type=model_dtype)
    params = dict(model.named_parameters())
    for name, sources in SOURCES.items():
        expected = torch.cat([tensors[s] for s in sources]).to(model_dtype)
        assert params[name].dtype == model_dtype and torch.equal(params[name], expected), name
    (staging,) = made
    assert staging.bytes == tensor_bytes(tensors)  # each file tensor read once


@pytest.mark.parametrize("staged", [True, False])
def test_parameters_in_the_file_dtype_are_read_straight_into_their_rows(tmp_path, monkeypatch, staged):
    # bf16 matrices into a bf16 model: read by offset into the parameters' rows (q|k|v and gate|up fused in place),
    # in one batch, never through get() -- through a ring (the GPU's path) or, for a CPU model, straight into the
    # parameters; the fp32 norms need a conversion and take get(), one by one
    from fms.utils import serialization

    made = small_staging(monkeypatch, slot_bytes=24, num_slots=3) if staged else []
    direct = []
    real_direct = serialization._read_direct
    monkeypatch.setattr(serialization, "_read_direct", lambda jobs: direct.append(real_direct(jobs, 24, 3)) or
                        direct[-1])
    got = []
    real_get = serialization._Reader.get
    monkeypatch.setattr(serialization._Reader, "get", lambda self, name: got.append(name) or real_get(self, name))
    tensors = {n: t if "norm" in n else t.to(torch.bfloat16) for n, t in hf_tensors().items()}
    model = get_model("hf_pretrained", model_path=str(write_checkpoint(tmp_path, tensors, shards=2)),
                      data_type=torch.bfloat16)
    params = dict(model.named_parameters())
    for name, sources in SOURCES.items():
        expected = torch.cat([tensors[s] for s in sources]).to(torch.bfloat16)
        assert torch.equal(params[name], expected), name
    assert sorted(got) == sorted(n for n in tensors if "norm" in n)
    matrices = tensor_bytes({n: t for n, t in tensors.items() if "norm" not in n})
    if staged:
        (staging,) = made
        assert staging.bytes == tensor_bytes(tensors) and direct == []
    else:
        assert direct == [matrices]  # one batch of every matrix; the norms were read as memory-map views


@contextlib.contextmanager
def raw_file(tmp_path, data: bytes):
    """An fd open for reading on a file holding data (closed afterwards)."""
    (tmp_path / "raw").write_bytes(data)
    fd = os.open(tmp_path / "raw", os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("piece_bytes, threads", [(1, 1), (5, 3), (64, 2), (1 << 20, 4)])
def test_direct_reads_fill_every_destination(tmp_path, piece_bytes, threads):
    # a CPU model's read: pieces of several jobs on threads at once, straight into the destinations
    from fms.utils.serialization import _read_direct

    data = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    out = torch.zeros(1000, dtype=torch.uint8)
    with raw_file(tmp_path, data.numpy().tobytes()) as fd:
        assert _read_direct([(fd, 3, out[:400]), (fd, 403, out[400:997]), (fd, 0, out[997:])], piece_bytes,
                            threads) == 1000
    assert torch.equal(out[:997], data[3:]) and torch.equal(out[997:], data[:3])


def test_a_short_direct_read_names_the_first_tensor_that_ends_early(tmp_path):
    from fms.utils.serialization import _read_direct

    out = torch.zeros(300, dtype=torch.uint8)
    with raw_file(tmp_path, bytes(range(100))) as fd:
        with pytest.raises(OSError, match="the file ends at byte 100, inside a tensor that ends at byte 150"):
            _read_direct([(fd, 0, out[:50]), (fd, 50, out[50:150]), (fd, 90, out[150:300])], 16, 4)
    assert torch.equal(out[:50], torch.arange(50, dtype=torch.uint8))  # the jobs before it were read


@pytest.mark.parametrize("slot_bytes, num_slots", [(1, 1), (3, 2), (7, 3), (1 << 20, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool])
def test_host_staging_copies_every_byte(slot_bytes, num_slots, dtype):
    from fms.utils.serialization import _HostStaging

    staging = _HostStaging("cpu", slot_bytes, num_slots)
    g = torch.Generator().manual_seed(1)
    base = (torch.randn(5, 7, generator=g) * 100).to(dtype)
    cases = [base, base.T, base[1:4, ::2], base[0, 0], base[:0], base.reshape(35)]
    for t in cases:
        out = staging.to_device(t)
        assert out.shape == t.shape and out.dtype == dtype and torch.equal(out, t)
        assert out.data_ptr() != t.data_ptr() or t.numel() == 0
    assert staging.bytes == sum(t.numel() * t.element_size() for t in cases)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned slots reused under transfers")
def test_pinned_slots_are_reused_only_after_their_transfer():
    # 512 pieces through two 64 KB slots: a slot refilled before its last transfer finished would corrupt the copy
    from fms.utils.serialization import _HostStaging

    staging = _HostStaging("cuda", 1 << 16, 2)
    t = torch.randint(0, 256, (512 << 16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = staging.to_device(t.view(torch.float32).reshape(-1, 1024))
    staging.finish()
    assert torch.equal(out.cpu().reshape(-1).view(torch.uint8), t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned slots refilled by reading threads")
def test_pinned_slots_read_by_threads_are_reused_only_after_their_transfer(tmp_path):
    # 512 pieces of 64 KB read from a file by offset through three pinned slots, into two destinations at odd
    # offsets: a slot refilled by a reading thread before its transfer finished would corrupt the copy
    from fms.utils.serialization import _HostStaging

    data = torch.randint(0, 256, (512 << 16,), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    out = torch.empty(512 << 16, dtype=torch.uint8, device="cuda")
    staging = _HostStaging("cuda", 1 << 16, 3)
    with raw_file(tmp_path, data.numpy().tobytes()) as fd:
        staging.read_into([(fd, 7, out[:300 << 16]), (fd, (300 << 16) + 7, out[300 << 16:-7])])
        staging.finish()
    assert torch.equal(out[:-7].cpu(), data[7:])


@pytest.mark.parametrize("slot_bytes, num_slots", [(0, 2), (8, 0), (-1, -1)])
def test_host_staging_refuses_empty_rings(slot_bytes, num_slots):
    from fms.utils.serialization import _HostStaging

    with pytest.raises(ValueError, match=f"got {slot_bytes}, {num_slots}"):
        _HostStaging("cpu", slot_bytes, num_slots)


def test_slices_through_the_staging_ring_are_the_file_slices(tmp_path):
    from fms.utils.serialization import _HostStaging, _Reader, checkpoint_index

    tensors = hf_tensors()
    reader = _Reader(checkpoint_index(write_checkpoint(tmp_path, tensors)), staging=_HostStaging("cpu", 24, 2))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(reader.get_range("model.layers.0.self_attn.q_proj.weight", 0, 3, 11), q[3:11])
    assert torch.equal(reader.get_range("model.layers.0.self_attn.q_proj.weight", 1, 5, 13), q[:, 5:13])


def test_tensors_read_by_offset_are_the_file_tensors(tmp_path, monkeypatch):
    # with a staging, whole tensors and row ranges come from the file by offset (os.preadv on the reading threads),
    # never through the memory map; every dtype, pieces cut at odd sizes, the ring wrapping many times
    from safetensors.torch import save_file

    from fms.utils.serialization import _HostStaging, _Reader, checkpoint_index

    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g) * 50
    tensors = {f"t_{str(d).split('.')[-1]}": base.to(d) for d in
               (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.int16,
                torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}
    tensors["scalar"], tensors["empty"] = torch.tensor(2.5), torch.zeros(0, 3)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(_HostStaging, "to_device", lambda self, t: pytest.fail("read through the memory map"))
    staging = _HostStaging("cpu", 7, 3)
    reader = _Reader(checkpoint_index(tmp_path), staging=staging)
    try:
        for name, t in tensors.items():
            got = reader.get(name)
            assert got.dtype == t.dtype and got.shape == t.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name  # bits
        for start, stop in [(0, 6), (2, 5), (4, 4)]:
            assert torch.equal(reader.get_range("t_float32", 0, start, stop), tensors["t_float32"][start:stop])
        with pytest.raises(CheckpointError, match=r"rows 3:7 of 't_float32' \[6, 5\] do not exist"):
            reader.get_range("t_float32", 0, 3, 7)
    finally:
        staging.finish()
        reader.close()
    assert staging.bytes == tensor_bytes(tensors) + 4 * (6 + 3 + 0) * 5


def test_a_short_read_fails_and_leaves_the_ring_usable(tmp_path):
    # the file ends inside a tensor: the read names the shortfall, every piece in flight is waited for, and the
    # same ring then reads the next tensor correctly
    from fms.utils.serialization import _HostStaging

    data = torch.arange(100, dtype=torch.float32)
    staging = _HostStaging("cpu", 12, 3)
    with raw_file(tmp_path, data.numpy().tobytes()) as fd:
        try:
            with pytest.raises(OSError, match="the file ends at byte 400, inside a tensor that ends at byte 420"):
                staging.read(fd, 40, [95], torch.float32)
            assert torch.equal(staging.read(fd, 8, [10, 9], torch.float32), data[2:92].reshape(10, 9))
        finally:
            staging.finish()
    assert staging._pool is None


def failing_preadv(monkeypatch, failing_call: int) -> list[int]:
    """Make os.preadv raise OSError("disk gone") at its failing_call-th call; returns the offsets it was called with."""
    real_preadv, calls = os.preadv, []

    def preadv(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == failing_call:
            raise OSError("disk gone")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    return calls


def test_a_failed_load_waits_for_its_transfers(tmp_path, monkeypatch):
    # a load whose file read fails after some pieces went through the ring (the 30th read of a 40-byte ring) still
    # waits for their transfers (the pinned buffers must outlive every copy reading them) and stops its reading
    # threads before the error comes out, naming the tensors
    from fms.utils import serialization

    finished = []

    class Recording(serialization._HostStaging):
        def finish(self):
            finished.append(self.bytes)
            super().finish()
            finished.append(self._pool)

    monkeypatch.setattr(serialization, "_staging_for", lambda device: Recording(device, 40, 2))
    calls = failing_preadv(monkeypatch, 30)
    with pytest.raises(CheckpointError, match="cannot read the tensors .*disk gone"):
        get_model("hf_pretrained", model_path=str(write_checkpoint(tmp_path, hf_tensors())))
    assert len(calls) >= 30 and len(finished) == 2 and finished[1] is None
    assert 0 < finished[0] < tensor_bytes(hf_tensors())


def test_a_cpu_load_whose_read_fails_names_the_tensors(tmp_path, monkeypatch):
    calls = failing_preadv(monkeypatch, 3)
    with pytest.raises(CheckpointError, match=r"cannot read the tensors 'model\.embed_tokens\.weight', .*disk gone"):
        get_model("hf_pretrained", model_path=str(write_checkpoint(tmp_path, hf_tensors())))
    assert len(calls) > 3  # the other reads in the batch ran to their end first


# ---------------------------------------------------------------------------------------------
# broken checkpoints
# ---------------------------------------------------------------------------------------------
def test_missing_tensor_is_named(tmp_path):
    tensors = hf_tensors()
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(CheckpointError, match="missing") as err:
        load(write_checkpoint(tmp_path, tensors))
    assert "model.layers.0.self_attn.k_proj.weight" in str(err.value)


def test_missing_half_of_a_fused_tensor_is_named(tmp_path):
    tensors = hf_tensors()
    del tensors["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        load(write_checkpoint(tmp_path, tensors, shards=2))


def test_unexpected_tensor_is_named(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.0\.mlp\.extra_proj\.weight"):
        load(write_checkpoint(tmp_path, tensors))


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path):
    tensors = hf_tensors()
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(HIDDEN, HIDDEN)
    with pytest.raises(CheckpointError) as err:
        load(write_checkpoint(tmp_path, tensors))
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight" in msg
    assert f"[{HIDDEN}, {HIDDEN}]" in msg  # what the file holds
    assert f"[{KV_HEADS * HEAD_DIM}, {HIDDEN}]" in msg  # what the model needs


def test_unknown_model_type_is_named_with_supported_list(tmp_path):
    path = write_checkpoint(tmp_path, hf_tensors(), dict(HF_CONFIG, model_type="gpt_neox"))
    with pytest.raises(ValueError, match="gpt_neox") as err:
        load(path)
    msg = str(err.value)
    assert "supported" in msg
    for model_type in ("llama", "granite", "granitemoehybrid"):
        assert repr(model_type) in msg


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files"):
        load(tmp_path)


def test_folder_without_config(tmp_path):
    save_file(hf_tensors(), str(tmp_path / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load(tmp_path)


def test_index_listing_a_missing_shard(tmp_path):
    path = write_checkpoint(tmp_path, hf_tensors(), shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors") as err:
        load(path)
    assert "model-00001-of-00003" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# registry errors
# ---------------------------------------------------------------------------------------------
def test_unknown_variant_lists_allowed():
    with pytest.raises(ValueError, match="unknown variant 'nope'") as err:
        get_model("llama", "nope")
    for variant in list_variants("llama"):
        assert repr(variant) in str(err.value)


def test_unknown_architecture_lists_allowed():
    with pytest.raises(ValueError, match="unknown architecture 'gpt9'") as err:
        get_model("gpt9", "nano")
    for arch in ("llama", "granite", "granite_hybrid", "hf_pretrained"):
        assert repr(arch) in str(err.value)


def test_hf_pretrained_needs_model_path():
    with pytest.raises(ValueError, match="model_path"):
        get_model("hf_pretrained")


def test_architecture_mismatch_with_checkpoint(tmp_path):
    path = write_checkpoint(tmp_path, hf_tensors())
    with pytest.raises(ValueError, match="'llama' checkpoint, not 'granite'"):
        get_model("granite", model_path=str(path))
