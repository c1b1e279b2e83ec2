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

from fms.triton.gemv import MAX_ROWS

# "auto": our Triton kernel on CUDA, else the reference; "triton": our grouped SSD kernel (CUDA, or Triton's
# interpreter); "fla": flash-linear-attention's scalar-decay GLA kernel (CUDA only); "reference": the chunked
# PyTorch scan; "recurrent": token by token (a second reference, slow)
SSD_SCAN_NAMES = ("auto", "triton", "fla", "reference", "recurrent")

# FMS_GEMV is read only by KernelConfig.from_env (get_model without kernels=): shell A/B runs stay reproducible.
# Its value is the most rows the kernel takes: "0" none (F.linear everywhere), "1" single rows only (two rows run
# cuBLAS), "2" (or unset) one or two rows.
GEMV_ENV = "FMS_GEMV"
_GEMV_ENV_VALUES = {str(n): n for n in range(MAX_ROWS + 1)}
# FMS_FUSE_NORM, also read only by KernelConfig.from_env: "1" fuse_norm=True, "0" or unset False.
FUSE_NORM_ENV = "FMS_FUSE_NORM"


@dataclass(frozen=True)
class KernelConfig:
    """Kernel choices of one model.

    gemv: up to gemv_rows CUDA rows (decode at batch 1 and 2) go through the Triton GEMV kernel (fms.triton.gemv)
        in every projection; False keeps every projection on F.linear (cuBLAS).
    gemv_rows: the most rows the kernel takes, 1 to fms.triton.gemv.MAX_ROWS; more go to cuBLAS.
    ssd_scan: the Mamba2 prefill scan, one of SSD_SCAN_NAMES (models without Mamba layers ignore it).
    fuse_norm: a pre-norm block's RMSNorm goes into the GEMV kernel of the projection after it (qkv, gate|up), and
        its residual adds into the epilogue of the one before (attention output, SwiGLU down): three kernels fewer
        per layer for rows the kernel takes (needs gemv). Other rows, tensor-parallel row shards and other norms
        run the same expression unfused. Off by default: slower on an H100 at two rows, where batch 1 runs
        (final_project/README.md, section 20).
    """

    gemv: bool = True
    ssd_scan: str = "auto"
    gemv_rows: int = MAX_ROWS
    fuse_norm: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.gemv, bool):
            raise ValueError(f"KernelConfig.gemv must be True or False, got {self.gemv!r}")
        if isinstance(self.gemv_rows, bool) or not isinstance(self.gemv_rows, int) \
                or not 1 <= self.gemv_rows <= MAX_ROWS:
            raise ValueError(f"KernelConfig.gemv_rows must be an int from 1 to {MAX_ROWS}, got {self.gemv_rows!r}")
        if not isinstance(self.fuse_norm, bool):
            raise ValueError(f"KernelConfig.fuse_norm must be True or False, got {self.fuse_norm!r}")
        if self.ssd_scan not in SSD_SCAN_NAMES:
            raise ValueError(f"KernelConfig.ssd_scan must be one of {', '.join(SSD_SCAN_NAMES)}; "
                             f"got {self.ssd_scan!r}")

    @classmethod
    def from_env(cls) -> "KernelConfig":
        """The default config, with the GEMV kernel's rows from FMS_GEMV ("0": off; "1": one row; "2", unset or
        empty: one or two rows) and fuse_norm from FMS_FUSE_NORM ("1": on; "0", unset or empty: off)."""
        value = os.environ.get(GEMV_ENV, "")
        if value not in ("", *_GEMV_ENV_VALUES):
            raise ValueError(f"environment variable {GEMV_ENV}={value!r}; allowed: '0' (F.linear everywhere), "
                             f"'1' (the GEMV kernel for single CUDA rows), '2' or unset (for one or two rows)")
        fuse = os.environ.get(FUSE_NORM_ENV, "")
        if fuse not in ("", "0", "1"):
            raise ValueError(f"environment variable {FUSE_NORM_ENV}={fuse!r}; allowed: '1' (fuse RMSNorm and the "
                             f"residual adds into the GEMV kernel), '0' or unset (do not)")
        rows = _GEMV_ENV_VALUES.get(value, MAX_ROWS)
        gemv = {"gemv": False} if rows == 0 else {"gemv_rows": rows}
        return cls(**gemv, fuse_norm=fuse == "1")


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
