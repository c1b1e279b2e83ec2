"""LLMEngine on CUDA: CUDA-graph decode equals eager decode and static SDPA generate (llama "nano", fp32).

head_dim 32: compiled FlexAttention has no fp32 kernel choice for nano's head_dim of 16.
"""

import pytest
import torch

from fms.models import get_model
from fms.serving import LLMEngine, SamplingParams
from fms.utils.generation import generate

pytestmark = [pytest.mark.gpu, pytest.mark.paged,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model():
    return get_model("llama", "nano", device_type="cuda", data_type="float32", head_dim=32)


def test_cuda_graph_decode_matches_eager_and_sdpa(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (1, 5, 17, 33, 40, 64, 100)]
    reference = generate(model, prompts, 12, attn_name="sdpa")
    params = SamplingParams(max_new_tokens=12)
    graphed = LLMEngine(model, num_pages=64, max_num_seqs=8, graph_batch_sizes=(1, 2, 4, 8))
    assert graphed.runner.graphs is not None
    outs = graphed.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference
    assert graphed.stats()["num_graph_forwards"] > 0
    eager = LLMEngine(model, num_pages=64, max_num_seqs=8, use_cuda_graphs=False)
    assert [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)] == reference
    # a tight pool (preemption) and a small token budget (chunked prefill) with graphs on
    tight = LLMEngine(model, num_pages=12, max_num_seqs=8, max_num_batched_tokens=32, graph_batch_sizes=(1, 2, 4, 8))
    assert [o.token_ids for o in tight.generate(prompts, params, use_tqdm=False)] == reference
    assert tight.stats()["num_preemptions"] > 0
