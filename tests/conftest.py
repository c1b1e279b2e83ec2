"""Shared test fixtures: tiny seeded models (built once per session; tests must not modify them)."""

import pytest


@pytest.fixture(scope="session")
def llama_nano():
    """llama "nano" (vocab 512, hidden 64, 2 layers, GQA 4/2) with seeded random fp32 weights."""
    from fms.models import get_model

    return get_model("llama", "nano", seed=0)

