"""Caller-supplied token ids (prompts, EOS ids): normalized to Python ints and checked, for generate() and the engine.

A token id is a Python int, a NumPy integer or an element of an integer tensor / array; floats
are refused rather than truncated, and bools rather than read as 0 / 1. A prompt is a sequence of
such ids, a 1-D integer tensor or a 1-D integer NumPy array.
"""

from __future__ import annotations

import numbers

import torch

ALLOWED_IDS = "token ids must be ints (Python or NumPy ints, or a 1-D integer tensor / NumPy array)"


def as_int(value) -> int | None:
    """value as a Python int when it is an integer (Python, NumPy, or a 0-d integer tensor), else None.

    bool is refused even though Python counts it as an int: True as a token id or a count is a bug.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            return None
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None  # NumPy integers are numbers.Integral; numpy.bool_ is not
    return int(value)


def _describe(value) -> str:
    text = repr(value) if isinstance(value, (str, bytes)) else str(value)  # str: NumPy 2 reprs read np.int64(3)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _is_array(value) -> bool:
    """A torch tensor or a NumPy array (found by its attributes: NumPy is not imported here)."""
    return isinstance(value, torch.Tensor) or (hasattr(value, "dtype") and hasattr(value, "ndim"))


def _int_list(ids, name: str) -> list[int]:
    """A 1-D tensor / array, or an iterable of integers, as a list of Python ints (no vocabulary check)."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be token ids, got text {_describe(ids)}: encode it with a tokenizer first")
    if _is_array(ids):
        if ids.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        is_integer = (ids.dtype != torch.bool and not ids.is_floating_point() and not ids.is_complex()
                      if isinstance(ids, torch.Tensor) else ids.dtype.kind in "iu")
        if not is_integer:
            raise ValueError(f"{name}: {ALLOWED_IDS}, got dtype {ids.dtype} ({type(ids).__name__})")
        return [int(t) for t in ids.tolist()]
    try:
        items = list(ids)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of token ids, got {_describe(ids)}") from None
    if all(type(t) is int for t in items):  # the common case, ~20x faster than as_int per item (bool is not int)
        return items
    out = []
    for i, t in enumerate(items):
        value = as_int(t)
        if value is None:
            raise ValueError(f"{name}: {ALLOWED_IDS}, got {_describe(t)} at index {i}")
        out.append(value)
    return out


def _check_vocab(ids: list[int], vocab_size: int, name: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}")


def prompt_token_ids(prompt, vocab_size: int, name: str = "prompt") -> list[int]:
    """One prompt (see the module docstring) -> a non-empty list of ids in [0, vocab_size)."""
    ids = _int_list(prompt, name)
    if not ids:
        raise ValueError(f"{name} is empty: every prompt needs at least one token")
    _check_vocab(ids, vocab_size, name)
    return ids


def prompt_batch(prompts, vocab_size: int) -> list[list[int]]:
    """A batch of prompts (a list or tuple, one prompt per sequence) -> one id list per prompt."""
    wanted = "prompts must be a list of token-id lists or 1-D integer tensors (one per sequence)"
    if isinstance(prompts, (str, bytes)):
        raise ValueError(f"{wanted}, got text {_describe(prompts)}: encode it with a tokenizer first")
    if _is_array(prompts):
        raise ValueError(f"{wanted}, got shape {tuple(prompts.shape)} "
                         f"({type(prompts).__name__}): "
                         "pass list(batch) for a batch of equal-length rows")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{wanted}, got {_describe(prompts)}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    if all(as_int(p) is not None for p in prompts):
        raise ValueError(f"{wanted}, got a flat list of ints {_describe(list(prompts))}: "
                         "wrap a single prompt as [ids]")
    return [prompt_token_ids(p, vocab_size, f"prompt {i}") for i, p in enumerate(prompts)]


def eos_token_ids(value, vocab_size: int) -> tuple[int, ...]:
    """An EOS argument (None, one id, or a sequence of ids; empty = none) -> the ids, each in the vocabulary."""
    if value is None:
        return ()
    single = as_int(value)
    if single is None and isinstance(value, (str, bytes)):
        raise ValueError(f"eos_token_id must be a token id (int) or a sequence of them, got {_describe(value)}")
    ids = [single] if single is not None else _int_list(value, "eos_token_id")
    _check_vocab(ids, vocab_size, "eos_token_id")
    return tuple(ids)
