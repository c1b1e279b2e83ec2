"""What the `fms` command's model argument names -> (model, tokenizer, the tokenizer's folder, a display name).

    fms serve ./my-checkpoint                       a local HF folder (config.json + safetensors)
    fms serve meta-llama/Llama-3.2-1B               a hub id, through huggingface_hub (its cache and token)
    fms serve --architecture llama --variant micro  a registered shape with random (seeded) weights
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fms.utils.tokenizers import BaseTokenizer

# What a checkpoint folder needs from the hub: config, weights, tokenizer and chat template files.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class WideVocabTokenizer(BaseTokenizer):
    """A tokenizer for a random-weight model whose vocabulary is larger than the tokenizer's (the shipped
    2,048-token one with a 128k Llama shape): text encodes as before, and ids past the tokenizer's
    vocabulary decode as " <id>" placeholders instead of failing."""

    def __init__(self, base: BaseTokenizer, vocab_size: int):
        self.base, self._vocab_size = base, vocab_size

    def __repr__(self) -> str:
        return f"WideVocabTokenizer({self.base!r}, vocab_size={self._vocab_size})"

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_token_id(self):
        return self.base.bos_token_id

    @property
    def eos_token_id(self):
        return self.base.eos_token_id

    @property
    def pad_token_id(self):
        return self.base.pad_token_id

    def _encode(self, text: str, add_bos) -> list[int]:
        return self.base._encode(text, add_bos)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        known, parts, run = self.base.vocab_size, [], []
        for token_id in ids:
            if token_id < known:
                run.append(token_id)
                continue
            if run:
                parts.append(self.base._decode(run, skip_special_tokens))
                run = []
            parts.append(f" <{token_id}>")
        if run:
            parts.append(self.base._decode(run, skip_special_tokens))
        return "".join(parts)


class ModelNotFound(ValueError):
    """The model argument is neither a folder nor a hub id we could reach."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    tokenizer_folder: Path | None  # where the chat template is looked for
    name: str  # the served model name by default
    checkpoint: Path | None  # None: random weights


def resolve_checkpoint(model: str, revision: str | None = None) -> Path:
    """A local folder as is; a hub id downloaded (or found in the cache) by huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFound(f"model {model!r} is a file; give the checkpoint's folder (config.json + *.safetensors)")
    if not _HUB_ID.match(model):
        raise ModelNotFound(f"model {model!r} is not a folder here, nor a hub id of the form 'org/name'")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFound(f"{model!r} looks like a hub id but huggingface_hub is not installed "
                            f"(pip install huggingface_hub), or pass a local folder") from None
    try:  # the cache first: no network needed when it is there
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFound(_offline_message(model, "HF_HUB_OFFLINE is set and it is not in the local cache"))
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=HUB_PATTERNS, etag_timeout=10))
    except Exception as e:  # the client's exception types vary by version: name the one we got
        raise ModelNotFound(_offline_message(model, f"{type(e).__name__}: {e}")) from None


def _offline_message(model: str, why: str) -> str:
    return (f"could not get {model!r} from the Hugging Face Hub ({why}). On a machine with network access run "
            f"`huggingface-cli download {model} --local-dir DIR` (log in first for gated models), copy DIR here "
            f"and pass the folder instead: `fms serve DIR`")


def check_model_choice(model: str | None, variant: str | None) -> None:
    """A model (folder or hub id) or a variant, exactly one; ValueError naming what is missing otherwise."""
    if model is not None and variant is not None:
        raise ValueError("give either a model (folder or hub id) or --architecture/--variant, not both")
    if model is None and variant is None:
        raise ValueError("name a model: a checkpoint folder, a hub id, or --architecture A --variant V "
                         "(e.g. --architecture llama --variant micro)")


def resolve_model_once(args) -> None:
    """A hub id is downloaded (or found in the cache) here, once, before other processes start (tensor-parallel
    ranks, the engine process); they get the folder, and the served name stays what the user typed."""
    check_model_choice(args.model, args.variant)
    if args.model is not None:
        if hasattr(args, "served_model_name"):
            args.served_model_name = args.served_model_name or args.model
        args.model = str(resolve_checkpoint(args.model, args.revision))
        args.revision = None


def load_tokenizer(model: str | None, tokenizer: str | None, vocab_size: int, revision: str | None = None):
    """(the tokenizer, its folder) for the model argument (a checkpoint folder or hub id; None: random weights)
    whose vocabulary has vocab_size ids; without the model itself (the HTTP process of `fms serve`)."""
    from fms.utils.tokenizers import DEFAULT_TOKENIZER_PATH, get_tokenizer

    if model is None:
        tok = get_tokenizer(tokenizer)
        if tok.vocab_size < vocab_size:  # random weights sample any id of the model
            tok = WideVocabTokenizer(tok, vocab_size)
        return tok, Path(tokenizer) if tokenizer else Path(DEFAULT_TOKENIZER_PATH)
    folder = Path(tokenizer) if tokenizer else resolve_checkpoint(model, revision)
    return get_tokenizer(folder), folder


def display_name(model: str | None, architecture: str | None, variant: str | None) -> str:
    """The served model name by default: the model argument, or ARCHITECTURE-VARIANT for random weights."""
    return model if model is not None else f"{architecture or 'llama'}-{variant}"


def load_model(model: str | None = None, architecture: str | None = None, variant: str | None = None,
               tokenizer: str | None = None, device: str | None = None, dtype: str | None = None, seed: int = 0,
               revision: str | None = None, tensor_parallel_size: int = 1) -> LoadedModel:
    """tensor_parallel_size > 1: this process is one rank of a started process group (fms.distributed.launch
    or torchrun) and gets its shard of the model; 1: the whole model, no process group."""
    from fms.models import get_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_model_choice(model, variant)
    strategy = "tp" if tensor_parallel_size > 1 else None
    name = display_name(model, architecture, variant)
    if model is None:
        # random weights drawn where the model lives: seconds for an 8B model on a GPU, not a minute
        built = get_model(architecture or "llama", variant, device_type=device, data_type=dtype, attn_name="paged",
                          seed=seed, distributed_strategy=strategy, init_on_device=True)
        tok, tokenizer_folder = load_tokenizer(None, tokenizer, built.config.vocab_size)
        return LoadedModel(built, tok, tokenizer_folder, name, None)
    folder = resolve_checkpoint(model, revision)
    built = get_model(architecture or "hf_pretrained", model_path=str(folder), device_type=device, data_type=dtype,
                      attn_name="paged", seed=seed, distributed_strategy=strategy)
    tok, tokenizer_folder = load_tokenizer(str(folder), tokenizer, built.config.vocab_size)
    return LoadedModel(built, tok, tokenizer_folder, name, folder)
