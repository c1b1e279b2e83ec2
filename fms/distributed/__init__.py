"""Tensor parallel over torch.distributed: the process group, how tensors are split, and the process launcher.

    group.py     TensorParallel (rank, world size, group, the collectives a sharded layer calls) and
                 init_distributed (NCCL on CUDA, gloo on CPU, with a timeout on every collective)
    sharding.py  TensorShard: which slice of a full tensor one rank holds (seeded init, checkpoint slices)
    launch.py    launch(fn, world_size): one process per rank over torch.multiprocessing; a failing rank
                 stops the others and is reported with its traceback

This package imports only torch: the layers (fms.modules.parallel) and models build on it.
"""

from fms.distributed.group import (  # noqa: F401
    DEFAULT_TIMEOUT_S,
    TensorParallel,
    current_tensor_parallel,
    init_distributed,
)
from fms.distributed.launch import RankFailedError, launch  # noqa: F401
from fms.distributed.sharding import TensorShard, split_range  # noqa: F401
