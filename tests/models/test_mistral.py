"""Mistral checkpoints (Llama with a sliding window) against transformers, on every cache layout."""

import pytest
import torch

from fms.models import get_model
from fms.utils.generation import generate
from tests.hf_helpers import hf_greedy, hf_logits

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

WINDOW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=WINDOW,
        initializer_range=0.3, tie_word_embeddings=False,
    )
    hf = transformers.MistralForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("mistral")
    hf.save_pretrained(path)
    return hf, path


def test_config_reads_the_window(checkpoint):
    _, path = checkpoint
    model = get_model("hf_pretrained", model_path=str(path))
    assert model.config.sliding_window == WINDOW


def test_logits_match_past_the_window(checkpoint):
    hf, path = checkpoint
    model = get_model("hf_pretrained", model_path=str(path))
    ids = torch.randint(0, 300, (3 * WINDOW + 5,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = model(torch.tensor([ids]))[0]
    # the window must matter here, else this test could not tell a windowed model from a plain one
    full = get_model("hf_pretrained", model_path=str(path), sliding_window=None)(torch.tensor([ids]))[0]
    assert (ours - full).abs().max() > 1e-3
    torch.testing.assert_close(ours, hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attn_name", ["sdpa", "flex", "paged"])
def test_greedy_generation_matches(checkpoint, attn_name):
    hf, path = checkpoint
    model = get_model("hf_pretrained", model_path=str(path))
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 300, (n,), generator=gen).tolist() for n in (3, 2 * WINDOW + 1, 20)]
    expected = [hf_greedy(hf, p, 12) for p in prompts]
    options = {"page_size": 16} if attn_name == "paged" else {}
    assert generate(model, prompts, 12, attn_name=attn_name, **options) == expected
