"""Model registry: architectures, their named variants (configs), and `get_model`."""

import os
from pathlib import Path

import torch
from torch import nn

from fms.models.registry import (  # noqa: F401  (re-exported: the public registry API)
    ARCHITECTURES,
    HF_MODEL_TYPES,
    lookup_architecture as _architecture,
    get_config,
    list_architectures,
    list_variants,
    register_architecture,
    register_hf_model_type,
    register_model,
    register_variants,
)


def read_hf_config(model_path: str | Path) -> tuple[str, object]:
    """(architecture, our config) from a HF checkpoint folder's config.json.

    Anything wrong in the file (bad JSON, a missing or mistyped key, a value out of range) is a
    CheckpointError naming the file and the key.
    """
    from fms.utils.serialization import CheckpointError, read_json_object

    path = Path(model_path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {model_path}; expected a Hugging Face checkpoint folder")
    hf = read_json_object(config_file)
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"unsupported model_type {model_type!r} in {config_file}; supported: {sorted(HF_MODEL_TYPES)}"
        )
    architecture, convert = HF_MODEL_TYPES[model_type]
    try:
        return architecture, convert(hf)
    except KeyError as err:  # a nested key a converter reads directly
        raise CheckpointError(f"{config_file}: required key {err.args[0]!r} is missing") from None
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{config_file}: {err}") from err


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(data_type) -> torch.dtype | None:
    if data_type is None or isinstance(data_type, torch.dtype):
        return data_type
    try:
        return _DTYPES[str(data_type)]
    except KeyError:
        raise ValueError(f"unknown data_type {data_type!r}; allowed: {sorted(_DTYPES)}") from None


def get_model(
    architecture: str,
    variant: str | None = None,
    model_path: str | None = None,
    source: str | None = None,
    device_type: str = "cpu",
    data_type=None,
    attn_name: str = "sdpa",
    seed: int = 0,
    kernels=None,
    distributed_strategy: str | None = None,
    init_on_device: bool = False,
    **config_overrides,
) -> nn.Module:
    """Build a model. With model_path, weights come from that HF checkpoint folder; else random (seeded).

    architecture "hf_pretrained" reads the architecture and config from model_path/config.json.
    data_type: torch dtype or name ("bf16", "float32", ...); default fp32 on CPU, bf16 on CUDA.
    kernels: a KernelConfig (fms.modules.kernel_config) for this model's layers; None: the defaults, with
    gemv from the environment variable FMS_GEMV. Change it later with model.set_kernels(cfg).
    distributed_strategy: None (the whole model here) or "tp": this rank's tensor-parallel shard, in a process
    where torch.distributed is initialized or can be from torchrun's environment (fms.distributed); random
    weights equal the whole model's for the same seed, and a checkpoint is read only for this rank's slices.
    With one rank the model is the whole model, without collectives. See docs/tensor_parallel.md.
    init_on_device: draw random weights with a generator on the model's device (seconds for an 8B model
    on a GPU, where the CPU generator takes about a minute); the same seed then gives the same weights
    only on the same kind of device. Default False: a CPU generator, the same weights everywhere.
    """
    from fms.modules.attention import get_attention_op
    from fms.modules.kernel_config import KernelConfig, check_kernel_config
    from fms.utils import serialization

    get_attention_op(attn_name)  # fail early on an unknown op name
    kernels = KernelConfig.from_env() if kernels is None else check_kernel_config(kernels)
    if source not in (None, "hf"):
        raise ValueError(f"unknown checkpoint source {source!r}; allowed: 'hf'")
    if architecture == "hf_pretrained" or (variant is None and model_path is not None):
        if model_path is None:
            raise ValueError("architecture 'hf_pretrained' needs model_path (a HF checkpoint folder)")
        hf_arch, config = read_hf_config(model_path)
        if architecture not in ("hf_pretrained", hf_arch):
            raise ValueError(f"{model_path} holds a {hf_arch!r} checkpoint, not {architecture!r}")
        architecture = hf_arch
    else:
        if variant is None:
            raise ValueError(f"architecture {architecture!r} needs a variant; allowed: {list_variants(architecture)}")
        config = get_config(architecture, variant)
    if config_overrides:
        config = config.updated(**config_overrides)
    device = torch.device(device_type)
    dtype = resolve_dtype(data_type) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    model_class = _architecture(architecture).model_class
    tp = _tensor_parallel(distributed_strategy, architecture, model_class)
    with torch.device("meta"):
        model = model_class(config, attn_name=attn_name, **({} if tp is None else {"tp": tp})).to(dtype)
    model.set_kernels(kernels)  # before any allocation: a scan whose kernel is missing is refused here
    check_fits_in_memory(model, device, architecture)
    model = allocate(model, device)
    materialize(model)
    if model_path is not None:
        serialization.load_hf_checkpoint(model, model_path, architecture)
    else:
        if not isinstance(init_on_device, bool):
            raise ValueError(f"init_on_device must be a bool, got {init_on_device!r}")
        generator = torch.Generator(device=device if init_on_device else "cpu").manual_seed(seed)
        model.reset_parameters(generator)
    return model.eval().requires_grad_(False)


def _tensor_parallel(distributed_strategy, architecture: str, model_class):
    """The TensorParallel a model is built for, or None for the whole model (no strategy, or one rank)."""
    if distributed_strategy is None:
        return None
    if distributed_strategy != "tp":
        raise ValueError(f"unknown distributed_strategy {distributed_strategy!r}; allowed: None, 'tp'")
    if not getattr(model_class, "supports_tensor_parallel", False):
        supported = sorted(name for name, arch in ARCHITECTURES.items()
                           if getattr(arch.model_class, "supports_tensor_parallel", False))
        raise ValueError(f"architecture {architecture!r} has no tensor-parallel form; "
                         f"distributed_strategy='tp' supports {supported}")
    from fms.distributed import init_distributed

    tp = init_distributed()
    return None if tp.world_size == 1 else tp  # one rank holds everything: the plain model, no collectives


class InsufficientMemoryError(MemoryError):
    """A model's weights would not fit in the memory free on its device."""


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """(bytes free on device, where that number comes from), or None where it cannot be known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free memory of {device}"
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free physical pages (sysconf)"
    except (AttributeError, OSError, ValueError):
        return None


def _format_bytes(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024:
            return f"{num_bytes:.2f} {unit}" if unit != "B" else f"{num_bytes} B"
        num_bytes /= 1024
    return f"{num_bytes:.2f} TiB"


def check_fits_in_memory(model: nn.Module, device: torch.device, architecture: str = "") -> None:
    """Refuse, before any allocation, a model (still on the meta device) whose weights exceed free memory."""
    needed = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    available = available_memory(device)
    if available is None or needed <= available[0]:
        return
    free, source = available
    dtype = next(model.parameters()).dtype
    raise InsufficientMemoryError(
        f"the {architecture + ' ' if architecture else ''}model needs {_format_bytes(needed)} ({needed} bytes) "
        f"for its {dtype} weights on {device}, but only {_format_bytes(free)} ({free} bytes) is available "
        f"({source}); use a smaller config, a smaller data_type or another device"
    )


def allocate(model: nn.Module, device: torch.device) -> nn.Module:
    """model.to_empty(device=device) by torch.empty of each tensor's shape and dtype: to_empty's empty_like of a
    meta tensor runs a Python reference that imports sympy (0.3-0.7 s of a get_model). Ties are re-made by
    materialize, as after to_empty."""
    return model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))


def materialize(model: nn.Module) -> None:
    """After to_empty: recompute non-persistent buffers and re-tie shared weights."""
    for module in model.modules():
        if module is not model and hasattr(module, "reset_buffers"):
            module.reset_buffers()
    if getattr(model.config, "tie_word_embeddings", False):
        model.head.weight = model.embedding.weight


# Architectures register themselves on import.
from fms.models import llama  # noqa: E402,F401
from fms.models import granite  # noqa: E402,F401
from fms.models import granite_hybrid  # noqa: E402,F401
from fms.models import gpt2  # noqa: E402,F401
