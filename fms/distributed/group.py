"""The tensor-parallel process group: who this rank is, and the two collectives sharded layers call."""

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

# Every collective gives up after this long (the process group's timeout): a rank whose peer died or hangs
# raises instead of waiting forever. Long enough for a first CUDA-graph capture or torch.compile on one rank.
DEFAULT_TIMEOUT_S = 600.0

# torch 2.13 deprecates all_gather_into_tensor for all_gather_single (same call); older versions lack the new name
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """This process's place in a tensor-parallel group; group None is the default (world) group."""

    rank: int
    world_size: int
    group: object | None = None

    def __post_init__(self):
        for name in ("rank", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"TensorParallel.{name} must be an int, got {value!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"TensorParallel needs world_size >= 1 and 0 <= rank < world_size, "
                             f"got rank={self.rank}, world_size={self.world_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (every rank gets the same bits); returns x."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor, full_size: int) -> torch.Tensor:
        """Every rank's (..., chunk) side by side on the last dim, cut to full_size: rank r's chunk lands in
        columns [r * chunk, (r + 1) * chunk). Every rank passes the same shape (pad the last chunk)."""
        x = x.contiguous()
        gathered = x.new_empty(self.world_size * x.numel())
        _all_gather_flat(gathered, x.view(-1), group=self.group)
        gathered = gathered.view(self.world_size, *x.shape)  # (N, ..., chunk)
        return gathered.movedim(0, -2).flatten(-2)[..., :full_size]  # (..., N * chunk) -> (..., full_size)


    def broadcast_object(self, obj):
        """Rank 0's obj on every rank (pickled; for host-side decisions such as a server's new requests)."""
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        return box[0]

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (e.g. a page-pool size measured from each GPU's free memory)."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(self.group) == "nccl" \
            else torch.device("cpu")
        t = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def current_tensor_parallel() -> TensorParallel | None:
    """The default group as a TensorParallel, or None when torch.distributed is not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return TensorParallel(dist.get_rank(), dist.get_world_size())


_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _destroy_at_exit() -> None:
    """Destroy the process group init_distributed made, if the script did not: left to the interpreter's own
    shutdown, gloo's worker threads could be torn down mid-use and abort the process ("terminate called without an
    active exception", seen in 3 of 6 torchrun runs of tests/test_tensor_parallel_torchrun.py's script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     seed: int | None = None) -> TensorParallel:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK), or return the one already initialized.

    backend: "nccl" when CUDA is available, else "gloo" (None picks). On CUDA this rank's device becomes
    cuda:LOCAL_RANK. Every collective times out after timeout_s.
    seed: every rank then seeds torch's host generator with the same value (rank 0's seed when None), so that
    what the engine draws from it (the seed of a request without one) is the same on every rank.
    """
    if dist.is_available() and dist.is_initialized():
        return current_tensor_parallel()
    missing = [name for name in _TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"tensor parallel needs torch.distributed, but the environment lacks {missing}: start the script with "
            "`torchrun --nproc-per-node N`, or call fms.distributed.launch(fn, N)"
        )
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' (CUDA) or 'gloo' (CPU), got {backend!r}")
    options = {}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU: this host has {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        options["device_id"] = torch.device("cuda", local_rank)  # the communicator is created now, not mid-step
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **options)
    atexit.register(_destroy_at_exit)  # a script that never calls destroy_process_group still tears down in order
    shared = [seed if seed is not None else torch.initial_seed()]
    dist.broadcast_object_list(shared, src=0)
    torch.manual_seed(shared[0])
    return current_tensor_parallel()
