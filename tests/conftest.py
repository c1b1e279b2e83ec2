"""Shared test fixtures: tiny seeded models (built once per session; tests must not modify them)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (paged decode, GEMV) run in Triton's interpreter on CPU. @triton.jit picks
    # interpreter mode when it decorates, so this must precede the first import of triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        from tests.triton_interpreter import patch_interpreter_for_numpy_2_4

        patch_interpreter_for_numpy_2_4()


@pytest.fixture(scope="session")
def llama_nano():
    """llama "nano" (vocab 512, hidden 64, 2 layers, GQA 4/2) with seeded random fp32 weights."""
    from fms.models import get_model

    return get_model("llama", "nano", seed=0)

