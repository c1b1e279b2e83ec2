"""HF transformers helpers shared by the equivalence tests."""

import torch


@torch.no_grad()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0]  # (T, V)


@torch.no_grad()
def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    """HF greedy generation for one unpadded prompt (EOS ignored) -> the n new token ids."""
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()
