"""How benchmarks choose kernels: the SSD scan of a benchmark path, set on one module for a block, and the
environment switches a results file records.

Kernel choices are fields of the model's KernelConfig (fms.modules.kernel_config): gemv and ssd_scan, held by
each layer, set with get_model(..., kernels=) or model.set_kernels(cfg). Inductor's combo kernels are
EngineConfig.combo_kernels. Four environment variables are left: FMS_GEMV and FMS_FUSE_NORM, read only by
get_model when it is given no kernels= (the defaults of KernelConfig.gemv and .fuse_norm), FMS_ARGMAX_KERNEL and
FMS_FUSE_KV_WRITE, read once at import (the decode step's argmax, fms.triton.argmax; the paged decode kernel storing
the step's K/V, fms.triton.paged_decode), so that shell A/B runs (FMS_GEMV=0, FMS_FUSE_NORM=1, FMS_ARGMAX_KERNEL=1,
FMS_FUSE_KV_WRITE=1) stay reproducible. Every results file records them (env_switches()) and FMS_GEMV_TABLE_DIR, a
folder of the user's own GEMV tables (fms.triton.gemv).
"""

import contextlib
import dataclasses
import os

from torch import nn

from fms.modules.kernel_config import FUSE_NORM_ENV, GEMV_ENV
from fms.triton.argmax import ARGMAX_ENV
from fms.triton.gemv import TABLE_DIR_ENV
from fms.triton.paged_decode import FUSE_KV_WRITE_ENV

# benchmark path name -> KernelConfig.ssd_scan
SCAN_OF_PATH = {"fast": "triton", "reference": "reference", "recurrent": "recurrent"}
ENV_SWITCHES = (GEMV_ENV, FUSE_NORM_ENV, ARGMAX_ENV, FUSE_KV_WRITE_ENV, TABLE_DIR_ENV)


def scan_of_path(path: str) -> str:
    """The KernelConfig.ssd_scan of a benchmark path ("fast", "reference", "recurrent")."""
    if path not in SCAN_OF_PATH:
        raise ValueError(f"unknown scan path {path!r}; allowed: {', '.join(SCAN_OF_PATH)}")
    return SCAN_OF_PATH[path]


@contextlib.contextmanager
def scan_path(module: nn.Module, path: str):
    """Inside the block, module (a model or a Mamba2 mixer) prefills with the path's scan; its own kernel
    config comes back afterwards. Other modules, and other models, are untouched."""
    previous = module.kernels
    module.set_kernels(dataclasses.replace(previous, ssd_scan=scan_of_path(path)))
    try:
        yield
    finally:
        module.set_kernels(previous)


def env_switches() -> dict[str, str | None]:
    """The environment switches as this process sees them (None: unset, the default applies)."""
    return {name: os.environ.get(name) for name in ENV_SWITCHES}
