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


def env_switch(name: str, on: str, off: str, value: str | None = None) -> bool:
    """An on/off environment variable (or value, for tests): "1" on; "0", unset or empty off; anything else a
    ValueError naming it and what 1 and 0 choose."""
    value = os.environ.get(name, "") if value is None else value
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r}: use 1 ({on}) or 0 ({off})")
    return value == "1"


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
