"""Loading Hugging Face checkpoint folders (single or sharded safetensors) into fms models by name mapping.

Each architecture registers rules `(our parameter regex, [HF name templates], transform)`; several HF
tensors listed for one parameter are concatenated along dim 0 (e.g. gate_proj + up_proj -> fused).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class CheckpointError(ValueError):
    pass


@dataclass(frozen=True)
class Rule:
    pattern: str  # regex over our parameter name; groups fill the templates
    sources: tuple[str, ...]  # HF names, "{0}", "{1}" ... filled from the groups
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


_RULES: dict[str, tuple[list[Rule], list[str]]] = {}
_OPTIONAL_PREFIXES: dict[str, tuple[str, ...]] = {}


def register_checkpoint_rules(architecture: str, rules: list[Rule], ignore: list[str] = (),
                              optional_prefixes: tuple[str, ...] = ()) -> None:
    """ignore: regexes of HF tensor names a checkpoint may carry that the model does not use.

    optional_prefixes: prefixes some exports put before the names the rules use (GPT-2's
    "transformer."); a checkpoint's names are matched with such a prefix removed.
    """
    _RULES[architecture] = (list(rules), list(ignore))
    _OPTIONAL_PREFIXES[architecture] = tuple(optional_prefixes)


def _llama_core(mlp: list[Rule]) -> list[Rule]:
    layer = r"layers\.(\d+)\."
    return [
        Rule(r"embedding\.weight", ("model.embed_tokens.weight",)),
        Rule(r"head\.weight", ("lm_head.weight",)),
        Rule(r"dec_norm\.weight", ("model.norm.weight",)),
        Rule(layer + r"ln\.weight", ("model.layers.{0}.input_layernorm.weight",)),
        Rule(layer + r"ff_ln\.weight", ("model.layers.{0}.post_attention_layernorm.weight",)),
        Rule(layer + r"mixer\.qkv_fused\.weight", tuple(f"model.layers.{{0}}.self_attn.{n}_proj.weight" for n in "qkv")),
        Rule(layer + r"mixer\.dense\.weight", ("model.layers.{0}.self_attn.o_proj.weight",)),
        *mlp,
    ]


_LLAMA_MLP = [
    Rule(r"layers\.(\d+)\.ff\.wg1_fused\.weight",
         ("model.layers.{0}.mlp.gate_proj.weight", "model.layers.{0}.mlp.up_proj.weight")),
    Rule(r"layers\.(\d+)\.ff\.w2\.weight", ("model.layers.{0}.mlp.down_proj.weight",)),
]
_GRANITE4_MLP = [
    Rule(r"layers\.(\d+)\.ff\.(?:shared\.)?wg1_fused\.weight", ("model.layers.{0}.shared_mlp.input_linear.weight",)),
    Rule(r"layers\.(\d+)\.ff\.(?:shared\.)?w2\.weight", ("model.layers.{0}.shared_mlp.output_linear.weight",)),
    Rule(r"layers\.(\d+)\.ff\.moe\.router\.weight", ("model.layers.{0}.block_sparse_moe.router.layer.weight",)),
    Rule(r"layers\.(\d+)\.ff\.moe\.w13", ("model.layers.{0}.block_sparse_moe.input_linear.weight",)),
    Rule(r"layers\.(\d+)\.ff\.moe\.w2", ("model.layers.{0}.block_sparse_moe.output_linear.weight",)),
    Rule(r"layers\.(\d+)\.mixer\.mamba\.(.+)", ("model.layers.{0}.mamba.{1}",)),
]
_IGNORE = [r".*rotary_emb\.inv_freq"]

register_checkpoint_rules("llama", _llama_core(_LLAMA_MLP), _IGNORE)
register_checkpoint_rules("granite", _llama_core(_LLAMA_MLP), _IGNORE)
register_checkpoint_rules("granite_hybrid", _llama_core(_GRANITE4_MLP), _IGNORE)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def checkpoint_index(model_path: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    path = Path(model_path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {model_path} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        files = {name: path / file for name, file in weight_map.items()}
        missing_files = sorted({str(f.name) for f in files.values() if not f.is_file()})
        if missing_files:
            raise CheckpointError(f"{index} lists shard files that are not in {path}: {missing_files}")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"no *.safetensors files in {path} (pytorch_model.bin checkpoints are not supported)")
    from safetensors import safe_open

    files = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                files[name] = shard
    return files


class _Reader:
    """Opens each shard once and hands out tensors by name."""

    def __init__(self, files: dict[str, Path], strip_prefixes: tuple[str, ...] = ()):
        self._stored = {}  # name the rules use -> name in the file
        for stored in files:
            name = next((stored[len(p):] for p in strip_prefixes if stored.startswith(p)), stored)
            if name in self._stored:
                raise CheckpointError(f"checkpoint holds both {self._stored[name]!r} and {stored!r}")
            self._stored[name] = stored
        self.files = {name: files[stored] for name, stored in self._stored.items()}
        self._open = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file].get_tensor(self._stored[name])

    def shape(self, name: str) -> list[int]:
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return list(self._open[file].get_slice(self._stored[name]).get_shape())


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def _sources_for(name: str, rules: list[Rule]) -> tuple[list[str], Rule]:
    for rule in rules:
        match = re.fullmatch(rule.pattern, name)
        if match:
            return [s.format(*match.groups()) for s in rule.sources], rule
    raise CheckpointError(f"no checkpoint name mapping for parameter {name!r}")


def _parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our tensors to fill; a tied head is filled through the embedding."""
    params = dict(model.named_parameters(remove_duplicate=True))
    return params


@torch.no_grad()
def load_hf_checkpoint(model: nn.Module, model_path: str | Path, architecture: str) -> None:
    if architecture not in _RULES:
        raise CheckpointError(f"no checkpoint rules for architecture {architecture!r}; known: {sorted(_RULES)}")
    rules, ignore = _RULES[architecture]
    reader = _Reader(checkpoint_index(model_path), _OPTIONAL_PREFIXES.get(architecture, ()))
    plan = {}
    missing = []
    for name, param in _parameters(model).items():
        sources, rule = _sources_for(name, rules)
        absent = [s for s in sources if s not in reader.files]
        if absent:
            missing += [f"{s} (for {name})" for s in absent]
        plan[name] = (param, sources, rule)
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {model_path} is missing tensors: {shown}")
    used = {s for _, sources, _ in plan.values() for s in sources}
    tied = getattr(model.config, "tie_word_embeddings", False)
    unexpected = [
        n for n in reader.files
        if n not in used and not any(re.fullmatch(p, n) for p in ignore) and not (tied and n == "lm_head.weight")
    ]
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5]) + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"checkpoint {model_path} has tensors the {architecture!r} model does not use: {shown} "
            "(is the config.json right for these weights?)"
        )
    for name, (param, sources, rule) in plan.items():
        pieces = [reader.get(s) for s in sources]
        tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)
        if rule.transform is not None:
            tensor = rule.transform(tensor)
        if tuple(tensor.shape) != tuple(param.shape):
            got = " + ".join(f"{s} {list(p.shape)}" for s, p in zip(sources, pieces))
            raise CheckpointError(
                f"checkpoint tensor {got} does not fit {name}: expected shape {list(param.shape)}"
                + (f", got {list(tensor.shape)}" if len(pieces) > 1 or rule.transform else "")
            )
        param.copy_(tensor.to(param.dtype))
