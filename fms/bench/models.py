"""Which model a benchmark runs: auto variants per device, building the first candidate that builds, its description."""

from pathlib import Path

import torch

from fms.bench.timing import GB
from fms.models import get_config, get_model, list_variants, read_hf_config

ARCHITECTURES = ("llama", "granite", "granite_hybrid")

# auto variants: (GPU >= 24 GB, smaller GPU, CPU) -> candidates tried in order
AUTO_VARIANTS = {
    ("auto-llama", "llama"): (["2-7b"], ["3.2-1b"], ["micro"]),
    ("auto-granite", "granite_hybrid"): (["4.0-h-1b", "4.0-1b"], ["4.0-h-350m", "4.0-350m"], ["h-micro-test", "nano"]),
    ("auto-granite", "granite"): (["3.3-2b"], ["3.3-2b"], ["micro"]),
}


def model_candidates(architecture: str, variant: str | None, model_path: str | None,
                     device: torch.device) -> list[tuple[str, str]]:
    """(architecture, variant) to try in order; auto variants depend on the device."""
    if model_path is not None:
        return [("hf_pretrained", Path(model_path).name)]
    variant = variant or ("auto-llama" if architecture == "llama" else "auto-granite")
    if not variant.startswith("auto-"):
        if variant not in list_variants(architecture):
            raise ValueError(f"variant: unknown variant {variant!r} for {architecture}; "
                             f"allowed: {', '.join(list_variants(architecture))}, auto-llama, auto-granite")
        return [(architecture, variant)]
    key = (variant, architecture)
    if key not in AUTO_VARIANTS:
        allowed = sorted({f"{v} (architecture {a})" for v, a in AUTO_VARIANTS})
        raise ValueError(f"variant {variant} does not apply to architecture {architecture}; allowed: "
                         + ", ".join(allowed))
    large, small, cpu = AUTO_VARIANTS[key]
    if device.type != "cuda":
        chosen = cpu
    else:
        total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
        chosen = large if total_gb >= 23.5 else small  # "24 GB" cards report a little under 24 GiB
    return [(architecture, v) for v in chosen]


def candidate_config(candidate: tuple[str, str], model_path: str | None):
    """The model config of a candidate, without building the model."""
    arch, variant = candidate
    if arch == "hf_pretrained":
        return read_hf_config(model_path)[1]
    return get_config(arch, variant)


def build_first(candidates, model_path, device: torch.device, dtype: str | None, attn_name: str, seed: int):
    """(model, architecture, variant) of the first candidate that builds; SystemExit listing every failure."""
    errors = []
    for arch, variant in candidates:
        try:
            if arch == "hf_pretrained":
                model = get_model("hf_pretrained", model_path=model_path, device_type=device.type, data_type=dtype,
                                  attn_name=attn_name)
                arch = read_hf_config(model_path)[0]
            else:
                model = get_model(arch, variant, device_type=device.type, data_type=dtype, attn_name=attn_name,
                                  seed=seed)
        except Exception as exc:  # noqa: BLE001 - e.g. a hybrid variant that fails to build: try the next
            errors.append(f"{arch} {variant}: {type(exc).__name__}: {exc}")
            print(f"could not build {arch} {variant} ({type(exc).__name__}: {exc})"
                  + ("; trying the next candidate" if (arch, variant) != tuple(candidates[-1]) else ""))
            continue
        return model, arch, variant
    raise SystemExit("no model could be built:\n  " + "\n  ".join(errors))


def describe_model(model, arch: str, variant: str, model_path: str | None, seed: int) -> dict:
    spec = model.cache_spec()
    device = model.embedding.weight.device
    info = {
        "architecture": arch,
        "variant": variant,
        "model_path": model_path,
        "weights": "checkpoint" if model_path else f"random (seed {seed})",
        "dtype": str(model.embedding.weight.dtype).replace("torch.", ""),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "max_position_embeddings": model.config.max_position_embeddings,
        "kv_bytes_per_token": spec.kv_bytes_per_token,
        "attention_layers": len(spec.attention_layers),
        "num_layers": spec.num_layers,
    }
    if device.type == "cuda":
        info["weights_gpu_memory_gb"] = torch.cuda.memory_allocated(device) / GB
    return info
