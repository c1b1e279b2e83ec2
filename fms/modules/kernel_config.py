"""Which kernel each layer runs (GEMV for single rows, the SSD prefill scan): one frozen config, held per layer.

A model gets it from `get_model(..., kernels=KernelConfig(...))` or later from `model.set_kernels(cfg)`;
`apply_kernels` hands it to every layer below a module that takes one (a `set_kernels(cfg)` method, and
optionally `check_kernels(cfg)` to refuse it), and each layer keeps its own reference. Nothing here is process-wide: two models in one process may differ.

Changing the config of a model whose forward has been compiled makes torch.compile recompile it (the
layers' attribute is guarded); CUDA graphs captured before the change keep replaying the old kernels.
"""

import os
from dataclasses import dataclass

from torch import nn

# "auto": our Triton kernel on CUDA, else the reference; "triton": our grouped SSD kernel (CUDA, or Triton's
# interpreter); "fla": flash-linear-attention's scalar-decay GLA kernel (CUDA only); "reference": the chunked
# PyTorch scan; "recurrent": token by token (a second reference, slow)
SSD_SCAN_NAMES = ("auto", "triton", "fla", "reference", "recurrent")

# FMS_GEMV is read only by KernelConfig.from_env (get_model without kernels=): shell A/B runs stay reproducible
GEMV_ENV = "FMS_GEMV"
_GEMV_ENV_VALUES = {"0": False, "1": True}


@dataclass(frozen=True)
class KernelConfig:
    """Kernel choices of one model.

    gemv: a single CUDA row (batch-1 decode) goes through the Triton GEMV kernel (fms.triton.gemv) in every
        projection; False keeps every projection on F.linear (cuBLAS).
    ssd_scan: the Mamba2 prefill scan, one of SSD_SCAN_NAMES (models without Mamba layers ignore it).
    """

    gemv: bool = True
    ssd_scan: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.gemv, bool):
            raise ValueError(f"KernelConfig.gemv must be True or False, got {self.gemv!r}")
        if self.ssd_scan not in SSD_SCAN_NAMES:
            raise ValueError(f"KernelConfig.ssd_scan must be one of {', '.join(SSD_SCAN_NAMES)}; "
                             f"got {self.ssd_scan!r}")

    @classmethod
    def from_env(cls) -> "KernelConfig":
        """The default config, with gemv from FMS_GEMV ("0" off, "1" on; unset or empty: on)."""
        value = os.environ.get(GEMV_ENV, "")
        if value == "":
            return cls()
        if value not in _GEMV_ENV_VALUES:
            raise ValueError(f"environment variable {GEMV_ENV}={value!r}; allowed: '0' (F.linear everywhere), "
                             f"'1' or unset (the GEMV kernel for single CUDA rows)")
        return cls(gemv=_GEMV_ENV_VALUES[value])


def check_kernel_config(kernels) -> "KernelConfig":
    if not isinstance(kernels, KernelConfig):
        raise TypeError(f"kernels must be a KernelConfig (fms.modules.kernel_config), got {kernels!r}")
    return kernels


def apply_kernels(root: nn.Module, kernels: KernelConfig) -> None:
    """Give kernels to every layer below root that takes a kernel config (a set_kernels method; root's own is
    not called). Layers that can refuse a config (a check_kernels method) are all asked first, so a refused
    config leaves every layer as it was."""
    check_kernel_config(kernels)
    layers = [m for m in root.modules() if m is not root and callable(getattr(m, "set_kernels", None))]
    for layer in layers:
        if callable(getattr(layer, "check_kernels", None)):
            layer.check_kernels(kernels)
    for layer in layers:
        layer.set_kernels(kernels)
