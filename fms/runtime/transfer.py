"""Host-to-device copies that do not wait for the GPU.

`torch.tensor(values, device="cuda")` and `t.to("cuda")` copy from pageable memory with a stream synchronization:
the host waits for every kernel already queued. In the middle of a step (after a prefill forward is queued, before
its sampling and the decode window are launched) that empties the GPU's queue and leaves it idle while the host
prepares the next launches. `to_device` copies through pinned memory without blocking instead; the copy is ordered
on the current stream like a kernel, so what reads it later sees it.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t (a CPU tensor) on device; on CUDA through pinned memory, not waiting for queued work."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
