"""The model registry: architectures, their named variants (config factories), HF model types.

Architecture modules register themselves here; fms.models (get_model) reads it. Its own module so
that an architecture imports the registry, not the package that imports the architecture.
"""

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class _Architecture:
    model_class: type
    variants: dict[str, Callable[[], object]] = field(default_factory=dict)


ARCHITECTURES: dict[str, _Architecture] = {}
# HF `model_type` -> (architecture, function(hf_config_dict) -> our config)
HF_MODEL_TYPES: dict[str, tuple[str, Callable[[dict], object]]] = {}


def register_architecture(name: str, model_class: type) -> None:
    if name in ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = _Architecture(model_class)


def register_model(architecture: str, variant: str, config_factory: Callable[[], object]) -> None:
    arch = lookup_architecture(architecture)
    if variant in arch.variants:
        raise ValueError(f"variant {variant!r} of {architecture!r} is already registered")
    arch.variants[variant] = config_factory


def register_variants(architecture: str, config_class: type, variants: dict[str, dict]) -> None:
    """Register each named variant as a factory building config_class(**fields)."""
    for name, values in variants.items():
        register_model(architecture, name, lambda values=values: config_class(**values))


def register_hf_model_type(model_type: str, architecture: str, config_from_hf: Callable[[dict], object]) -> None:
    HF_MODEL_TYPES[model_type] = (architecture, config_from_hf)


def list_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def list_variants(architecture: str) -> list[str]:
    return sorted(lookup_architecture(architecture).variants)


def lookup_architecture(name: str) -> _Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        allowed = sorted(ARCHITECTURES) + ["hf_pretrained"]
        raise ValueError(f"unknown architecture {name!r}; allowed: {allowed}") from None


def get_config(architecture: str, variant: str):
    arch = lookup_architecture(architecture)
    try:
        return arch.variants[variant]()
    except KeyError:
        raise ValueError(
            f"unknown variant {variant!r} for architecture {architecture!r}; allowed: {sorted(arch.variants)}"
        ) from None
