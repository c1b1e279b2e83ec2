"""Shared test fixtures: tiny seeded models (built once per session; tests must not modify them)."""

import os
import shutil
import tempfile

import pytest
import torch

# The suite compiles with inductor into a cache of its own, made fresh for this session and removed
# at its end. The default cache (/tmp/torchinductor_$USER) outlives a run: a run killed while
# inductor was writing a kernel leaves a truncated .so behind, and every later run that hits the
# same kernel fails with "file too short". Subprocesses started by tests inherit the variable.
# A cache directory set by the caller is respected and kept.
_OWN_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="fms-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _OWN_INDUCTOR_CACHE
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_OWN_INDUCTOR_CACHE, "triton"))


def pytest_sessionfinish(session, exitstatus):
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)

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

