"""What the Triton kernel modules share: the optional import, where a kernel can run, and launch sizing."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs fall back to each kernel's torch reference
    triton = None
    tl = None
    HAS_TRITON = False

# SM count assumed when no GPU is present (H100 SXM); it only shapes launch heuristics.
DEFAULT_NUM_SMS = 132


def can_run_triton(device: torch.device) -> bool:
    """A Triton kernel can launch on `device`: CUDA, or any device under Triton's interpreter (TRITON_INTERPRET=1,
    the CPU tests)."""
    return HAS_TRITON and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, DEFAULT_NUM_SMS elsewhere."""
    return _cuda_num_sms(device.index or 0) if device.type == "cuda" else DEFAULT_NUM_SMS


@functools.lru_cache(maxsize=None)
def _cuda_num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def positive_ints(values) -> bool:
    """Every value an int >= 1 (a bool is not one): the fields of a kernel config or a table key."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values)


def check_rows_input(op: str, x: torch.Tensor, weight: torch.Tensor, silu_mul: bool, max_rows: int) -> None:
    """A row kernel's input check (fms.triton.gemv, fms.triton.splitk): x is 1 to max_rows rows of the weight's K
    values, or of 2K = [gate | up] with silu_mul; ValueError naming the shapes otherwise."""
    width = 2 * weight.shape[1] if silu_mul else weight.shape[1]
    if x.dim() != 2 or x.shape[1] != width or not 1 <= x.shape[0] <= max_rows:
        raise ValueError(f"{op} needs 1 to {max_rows} rows of {width} values for a weight of shape "
                         f"{tuple(weight.shape)}{' (silu_mul: [gate | up])' if silu_mul else ''}, "
                         f"got x of shape {tuple(x.shape)}")


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel before it
# finishes, and waits (griddepcontrol.wait) before it reads anything that kernel wrote. FMS_PDL turns it on for the
# kernels that support it (the GEMV kernel): "1" also lets the next kernel launch once every program has read its
# inputs, "2" only as they exit; unset, empty or "0": off. Off by default: at the engine's batch-1 (two rows) "1"
# made the H100's GEMV chain 24% slower (final_project/README.md, section 24).
PDL_ENV = "FMS_PDL"
PDL_MODES = ("0", "1", "2")


def pdl_mode() -> int:
    """FMS_PDL as asked: 0 (unset, empty or "0"), 1 or 2; ValueError for another value."""
    value = os.environ.get(PDL_ENV, "")
    if value not in ("", *PDL_MODES):
        raise ValueError(f"environment variable {PDL_ENV}={value!r}; allowed: '1' (programmatic dependent launch on "
                         f"Hopper and later GPUs, the next kernel launched once inputs are read), '2' (launched as "
                         f"programs exit), '0', empty or unset (off)")
    return int(value or 0)


def pdl_launch(device: torch.device) -> dict:
    """The launch options of a PDL-capable kernel on `device`: {"PDL": mode, "launch_pdl": True} for FMS_PDL mode 1
    or 2 on a CUDA GPU of compute capability 9.0 or more (not Triton's interpreter), else {"PDL": 0}. ValueError
    for another FMS_PDL value."""
    mode = pdl_mode()
    on = mode and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1" \
        and _capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)
    return {"PDL": mode, "launch_pdl": True} if on else {"PDL": 0}


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)
