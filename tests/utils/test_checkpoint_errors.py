"""Damaged Hugging Face checkpoints: each is written by transformers, then broken one way, and loading must
fail with the exception type and a message that names the bad tensor, file, index entry or config key.

Each family (Llama, Granite) is saved once per module as one file and as three shards; every test copies
one of those folders into its tmp_path before damaging it.
"""

import json
import shutil
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from fms.models import InsufficientMemoryError, get_model  # noqa: E402
from fms.utils.serialization import CheckpointError  # noqa: E402

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 32, 4, 2, 8, 48
_SIZES = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_SIZES, tie_word_embeddings=False)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(_SIZES, tie_word_embeddings=True, embedding_multiplier=3.0, attention_multiplier=0.1,
                     residual_multiplier=0.5, logits_scaling=2.5)),
}
Q, K = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
GATE, UP = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(family, layout) -> (a folder written by save_pretrained, the HF model)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, (config_name, model_name, kwargs) in FAMILIES.items():
        torch.manual_seed(0)
        hf = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()
        hf.save_pretrained(root / family / "single")
        hf.save_pretrained(root / family / "sharded", max_shard_size="20KB")
        index = json.loads((root / family / "sharded" / INDEX).read_text())
        assert len(set(index["weight_map"].values())) >= 3, "the sharded layout should hold several files"
        out[family] = hf
    return root, out


@pytest.fixture(params=list(FAMILIES))
def family(request):
    return request.param


def copy_of(saved, tmp_path, family, layout="single"):
    root, _ = saved
    return shutil.copytree(root / family / layout, tmp_path / "ckpt", symlinks=True)


def load(path):
    return get_model("hf_pretrained", model_path=str(path))


def shard_files(path) -> list[str]:
    return sorted(set(json.loads((path / INDEX).read_text())["weight_map"].values()))


def rewrite_tensors(path, edit):
    """Apply edit(tensors) to the safetensors file of a single-file checkpoint."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def edit_config(path, edit):
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def error_of(path, exc_type=CheckpointError) -> str:
    with pytest.raises(exc_type) as err:
        load(path)
    return str(err.value)


# ---------------------------------------------------------------------------------------------
# a correct checkpoint still loads and computes what HF computes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_intact_checkpoint_matches_hf(saved, family, layout):
    root, hf_models = saved
    model = load(root / family / layout)
    ids = torch.tensor([[3, 17, 42, 5, 60, 9]])
    with torch.no_grad():
        expected = hf_models[family](ids).logits
    torch.testing.assert_close(model(ids), expected, atol=1e-4, rtol=1e-4)


def test_symlink_inside_the_folder_is_allowed(saved, tmp_path, family):
    path = copy_of(saved, tmp_path, family)
    (path / "model.safetensors").rename(path / "weights.bin")
    (path / "model.safetensors").symlink_to("weights.bin")
    load(path)


def test_hub_cache_snapshot_symlinks_into_blobs_load(saved, tmp_path):
    """The Hugging Face hub cache keeps <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    root, hf_models = saved
    repo = tmp_path / "models--tiny--llama"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((root / "llama" / "sharded").iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    model = load(snapshot)
    torch.testing.assert_close(model.embedding.weight, hf_models["llama"].model.embed_tokens.weight)


# ---------------------------------------------------------------------------------------------
# fused pieces are checked before they are concatenated
# ---------------------------------------------------------------------------------------------
def test_q_and_k_with_swapped_row_counts_are_refused(saved, tmp_path, family):
    # q_proj holds k's row count and k_proj q's: the fused total is still right, so concatenating first
    # would load shuffled weights without a word.
    path = copy_of(saved, tmp_path, family)

    def swap(tensors):
        q, k = tensors[Q], tensors[K]
        tensors[Q], tensors[K] = q[: k.shape[0]].clone(), torch.cat([k, k])

    rewrite_tensors(path, swap)
    msg = error_of(path)
    assert Q in msg
    assert f"[{KV_HEADS * HEAD_DIM}, {HIDDEN}]" in msg  # what the file holds
    assert f"[{HEADS * HEAD_DIM}, {HIDDEN}]" in msg  # what the config needs
    assert "layers.1.mixer.qkv_fused.weight" in msg


def test_gate_and_up_with_compensating_row_counts_are_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path, "llama")

    def shift_rows(tensors):
        gate, up = tensors[GATE], tensors[UP]
        tensors[GATE], tensors[UP] = gate[:-8].clone(), torch.cat([up, up[:8]])

    rewrite_tensors(path, shift_rows)
    msg = error_of(path)
    assert GATE in msg and f"[{INTER - 8}, {HIDDEN}]" in msg and f"[{INTER}, {HIDDEN}]" in msg


def test_shapes_are_checked_before_any_weight_is_read(saved, tmp_path, monkeypatch):
    """A bad last layer fails from the headers alone: no tensor data is read (and nothing half-loaded)."""
    import fms.utils.serialization as serialization

    path = copy_of(saved, tmp_path, "llama")
    rewrite_tensors(path, lambda t: t.update({K: torch.zeros(HIDDEN, HIDDEN)}))
    monkeypatch.setattr(serialization._Reader, "get", lambda self, name: pytest.fail(f"read {name} before checks"))
    assert K in error_of(path)


# ---------------------------------------------------------------------------------------------
# index entries and files outside the checkpoint folder
# ---------------------------------------------------------------------------------------------
def _move_first_shard_out(path, tmp_path):
    """Move the first shard to tmp_path/elsewhere/x.safetensors; (its index entries, the moved file)."""
    first = shard_files(path)[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (path / first).rename(elsewhere / "x.safetensors")
    index = json.loads((path / INDEX).read_text())
    names = sorted(n for n, f in index["weight_map"].items() if f == first)
    return first, names, index, elsewhere / "x.safetensors"


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_index_entry_outside_the_folder_is_refused(saved, tmp_path, how):
    path = copy_of(saved, tmp_path, "llama", "sharded")
    first, names, index, outside = _move_first_shard_out(path, tmp_path)
    target = "../elsewhere/x.safetensors" if how == "dotdot" else str(outside)
    for name in names:
        index["weight_map"][name] = target
    (path / INDEX).write_text(json.dumps(index))
    msg = error_of(path)
    assert repr(target) in msg and "weight_map[" in msg and INDEX in msg
    assert ("absolute path" if how == "absolute" else "outside the checkpoint folder") in msg


def test_index_entry_symlinked_outside_is_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path, "llama", "sharded")
    first, _, _, outside = _move_first_shard_out(path, tmp_path)
    (path / first).symlink_to(outside)
    msg = error_of(path)
    assert repr(first) in msg and str(outside.resolve()) in msg and "outside the checkpoint folder" in msg


def test_single_file_symlinked_outside_is_refused(saved, tmp_path):
    path = copy_of(saved, tmp_path, "granite")
    outside = tmp_path / "elsewhere.safetensors"
    (path / "model.safetensors").rename(outside)
    (path / "model.safetensors").symlink_to(outside)
    msg = error_of(path)
    assert str(path / "model.safetensors") in msg and "outside the checkpoint folder" in msg


def test_index_that_is_not_json_names_the_file(saved, tmp_path):
    path = copy_of(saved, tmp_path, "llama", "sharded")
    (path / INDEX).write_text('{"weight_map": ')
    msg = error_of(path)
    assert str(path / INDEX) in msg and "not valid JSON" in msg


# ---------------------------------------------------------------------------------------------
# safetensors files that cannot be read
# ---------------------------------------------------------------------------------------------
def test_truncated_file_is_named(saved, tmp_path, family):
    path = copy_of(saved, tmp_path, family)
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    msg = error_of(path)
    assert str(file) in msg


def test_corrupt_header_is_named(saved, tmp_path):
    path = copy_of(saved, tmp_path, "granite")
    file = path / "model.safetensors"
    file.write_bytes(b"\xff" * 64)
    assert str(file) in error_of(path)


def test_truncated_shard_is_named(saved, tmp_path):
    path = copy_of(saved, tmp_path, "llama", "sharded")
    last = shard_files(path)[-1]
    data = (path / last).read_bytes()
    (path / last).write_bytes(data[:-100])
    msg = error_of(path)
    assert last in msg
    assert shard_files(path)[0] not in msg


def test_shard_missing_from_the_folder_is_named(saved, tmp_path):
    path = copy_of(saved, tmp_path, "granite", "sharded")
    second = shard_files(path)[1]
    (path / second).unlink()
    msg = error_of(path)
    assert second in msg and INDEX in msg


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_config_key_names_file_and_key(saved, tmp_path, family, key):
    path = copy_of(saved, tmp_path, family)
    edit_config(path, lambda c: c.pop(key))
    msg = error_of(path)
    assert str(path / "config.json") in msg and repr(key) in msg and "missing" in msg


def test_zero_attention_heads_names_the_key(saved, tmp_path):
    # without head_dim the converter divides hidden_size by num_attention_heads (once a ZeroDivisionError)
    path = copy_of(saved, tmp_path, "llama")
    edit_config(path, lambda c: (c.pop("head_dim", None), c.update(num_attention_heads=0)))
    msg = error_of(path)
    assert str(path / "config.json") in msg and "'num_attention_heads'" in msg and ">= 1, got 0" in msg


@pytest.mark.parametrize("key, value", [("hidden_size", "32"), ("vocab_size", 64.5), ("num_hidden_layers", True),
                                        ("rms_norm_eps", "1e-5"), ("intermediate_size", -4)])
def test_mistyped_config_value_names_key_and_value(saved, tmp_path, key, value):
    path = copy_of(saved, tmp_path, "llama")
    edit_config(path, lambda c: c.update({key: value}))
    msg = error_of(path)
    assert str(path / "config.json") in msg and repr(key) in msg and repr(value) in msg


@pytest.mark.parametrize("key, value, allowed", [("rope_theta", -1.0, "> 0"), ("rms_norm_eps", 0, "> 0"),
                                                 ("eos_token_id", VOCAB, f"vocab_size ({VOCAB})"),
                                                 ("eos_token_id", [2, 999], f"vocab_size ({VOCAB})")])
def test_out_of_range_config_value_names_file_key_and_allowed(saved, tmp_path, key, value, allowed):
    path = copy_of(saved, tmp_path, "llama")
    edit_config(path, lambda c: (c.pop("rope_parameters", None), c.update({key: value})))
    msg = error_of(path)
    assert str(path / "config.json") in msg and key in msg and allowed in msg


def test_config_that_is_not_json_names_the_file(saved, tmp_path):
    path = copy_of(saved, tmp_path, "granite")
    (path / "config.json").write_text('{"model_type": "granite", ')
    msg = error_of(path)
    assert str(path / "config.json") in msg and "not valid JSON" in msg


def test_config_that_is_a_list_names_the_file(saved, tmp_path):
    path = copy_of(saved, tmp_path, "llama")
    (path / "config.json").write_text("[1, 2]")
    msg = error_of(path)
    assert str(path / "config.json") in msg and "array" in msg and "object" in msg


# ---------------------------------------------------------------------------------------------
# model size against available memory
# ---------------------------------------------------------------------------------------------
def test_terabyte_config_fails_before_allocating(saved, tmp_path, monkeypatch):
    path = copy_of(saved, tmp_path, "llama")
    edit_config(path, lambda c: c.update(hidden_size=65536, intermediate_size=262144, num_hidden_layers=64,
                                         num_attention_heads=512, num_key_value_heads=512, head_dim=128))
    monkeypatch.setattr(torch.nn.Module, "to_empty",
                        lambda self, **kw: pytest.fail("weights were allocated before the memory check"))
    start = time.monotonic()
    msg = error_of(path, InsufficientMemoryError)
    assert time.monotonic() - start < 30
    # 64 layers x (qkv 3*H*H + o H*H + gate/up/down 3*H*4H + two norms 2*H) + embedding and head 2*V*H
    # + final norm H + the rotary inv_freq buffer head_dim/2, 4 bytes each (fp32 on CPU)
    h = 65536
    needed = 4 * (64 * (4 * h * h + 12 * h * h + 2 * h) + 2 * VOCAB * h + h + 128 // 2)
    assert f"({needed} bytes)" in msg and "TiB" in msg and "available" in msg


# config.json of the other families, written by transformers (config only: read_hf_config needs no weights)
@pytest.mark.parametrize("config_name, kwargs, key, value", [
    ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2), "n_head", 0),
    ("GPT2Config", dict(n_embd=32, n_layer=1, n_head=4, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2), "n_embd", "32"),
    ("GraniteMoeHybridConfig", dict(_SIZES, mamba_n_heads=8, mamba_d_head=8, layer_types=["mamba", "attention"]),
     "mamba_d_state", 0),
    ("GraniteMoeHybridConfig", dict(_SIZES, mamba_n_heads=8, mamba_d_head=8, layer_types=["mamba", "attention"]),
     "num_local_experts", -1),
])
def test_other_families_config_errors_name_file_and_key(tmp_path, config_name, kwargs, key, value):
    from fms.models import read_hf_config

    getattr(transformers, config_name)(**kwargs).save_pretrained(tmp_path)
    read_hf_config(tmp_path)  # as written, it parses
    edit_config(tmp_path, lambda c: c.update({key: value}))
    with pytest.raises(CheckpointError) as err:
        read_hf_config(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "config.json") in msg and repr(key) in msg and repr(value) in msg
