"""torch.compile of a model's forward: the whole model in one graph, or one compile per kind of decoder layer,
reused for every layer of that kind.

scope "model": dynamo traces every layer and inductor fuses across them; both take time in proportion to depth
(Llama-3.1-8B on the H200: 89 s for the first decode compile, 47 s of it again in a process that finds every
graph in inductor's cache, which cannot skip dynamo's tracing).
scope "layers": each compiled function takes the layer as an argument, so dynamo traces it once per shape for
all layers; the rotary cos/sin are computed once per forward, eagerly, and passed in.
- An attention layer runs in three parts: its inputs compiled (norm, q/k/v projection, rotary, and the op's K/V
  cache write where the op offers one: AttentionOp.layer_kv_state / write_kv, this layer's cache tensors passed
  in; the paged op's write is an opaque op there, see fms.modules.attention._paged_kv_write_op; unless the op's
  kernel stores them as it attends, AttentionOp.writes_kv_in_attend), the attention op
  eagerly (it picks its KV pool by the layer's index, which would be a constant of each
  trace), its output compiled (projection, residual, norm, MLP, residual).
- A layer whose mixer hands out its own part of the cache for a step (a Mamba layer's decode step:
  MambaLayer.decode_cache, its state pools) is compiled whole, the layer index a symbol
  (allow_unspec_int_on_nn_module); its other steps (prefill, prefix-cache checkpoints) run eagerly.
The embedding, final norm and LM head run eagerly. Fusions across those boundaries are lost.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from types import SimpleNamespace

import torch

from fms.modules.attention import get_attention_op

logger = logging.getLogger(__name__)

COMPILE_SCOPES = ("model", "layers")
DEFAULT_COMPILE_SCOPE = "layers"
"""The engine's. On the H200, Llama-3.1-8B's engine starts in 33-39 s cold against 221 s with "model", and 1B serving
throughput is 6-10% lower in paired runs (final_project/README.md, section 10)."""


def check_compile_scope(scope, optional: bool = False) -> None:
    """A ValueError naming the value unless scope is one of COMPILE_SCOPES (or None, when optional)."""
    if scope in COMPILE_SCOPES or (optional and scope is None):
        return
    allowed = ", ".join(COMPILE_SCOPES) + (" or None (the engine's default)" if optional else "")
    raise ValueError(f"compile_scope must be one of {allowed}, got {scope!r}")


def _layer_runner(layer, kind: str):
    """(the class that runs this layer under scope "layers", None) or (None, why it cannot)."""
    mixer = getattr(layer, "mixer", None)
    if kind == "attention":
        if hasattr(layer, "attention_inputs") and hasattr(layer, "attention_output") \
                and all(hasattr(mixer, name) for name in ("project", "attend", "output")):
            return _SplitLayer, None
        return None, (f"its attention layers ({type(layer).__name__} with {type(mixer).__name__}) do not split "
                      f"around the attention op")
    if hasattr(mixer, "decode_cache"):
        return _WholeLayer, None
    return None, (f"its {kind} layers ({type(mixer).__name__}) hand out no per-layer cache "
                  f"(decode_cache); attention and Mamba layers are compiled one for all")


def why_no_layer_scope(model) -> str | None:
    """Why this model cannot compile one layer for all, or None."""
    layers, layer_type = getattr(model, "layers", None), getattr(model, "layer_type", None)
    if layers is None or layer_type is None:
        return f"{type(model).__name__} has no decoder layers to compile one at a time"
    for i, layer in enumerate(layers):
        _, why = _layer_runner(layer, layer_type(i))
        if why is not None:
            return why
    return None


def _attention_inputs(layer, x, position_ids, rope, op, kv_state, meta):
    same_batch(x, position_ids, *(rope or ()))  # (slot_mapping holds B * T slots)
    q, k, v = layer.attention_inputs(x, position_ids, rope)
    if kv_state is not None:  # the op's K/V cache write, inside this graph (no eager kernels between the halves)
        op.write_kv(k, v, kv_state, meta)
    return q, k, v


def _attention_output(layer, x, out):
    same_batch(x, out)
    return layer.attention_output(x, out)


def _whole_layer(layer, x, position_ids, attn_name, cache, meta):
    same_batch(x, position_ids, meta.state_slots, meta.num_new_tokens)
    return layer(x, position_ids, attn_name=attn_name, cache=cache, meta=meta)


class _SplitLayer:
    """An attention layer run as: compiled attention inputs, the attention op eagerly, compiled output."""

    def __init__(self, layer, compiled):
        self.layer, self.compiled = layer, compiled

    def __call__(self, x, position_ids, attn_name=None, **attn_kwargs):
        mixer = self.layer.mixer
        rope = None if mixer.rotary is None else mixer.rotary.cos_sin(position_ids)  # once per forward
        # Only batch and token counts vary. Under dynamic=True every input size is a symbol, and dynamo ties
        # symbols whose sizes happen to be equal in the first trace (a batch equal to the head count, a prefill
        # as long as the hidden size), then recompiles when they differ: fix the model's own sizes.
        _static(x, 2)  # (B, T, E)
        if rope is not None:
            _static(rope[0], 1, 3), _static(rope[1], 1, 3)  # (B, 1, T, D)
        op, cache, meta = get_attention_op(attn_name), attn_kwargs.get("cache"), attn_kwargs.get("meta")
        kv_state = None  # None: attend writes the step's K/V (where its kernel stores them, or the op has no state)
        if cache is not None and not op.writes_kv_in_attend(cache, meta, mixer.variant):
            kv_state = op.layer_kv_state(cache, mixer.layer_idx)
        mark_batch(x, position_ids, *(rope or ()), None if kv_state is None else meta.slot_mapping)
        q, k, v = self.compiled.inputs(self.layer, x, position_ids, rope, op, kv_state, meta)
        written = {} if kv_state is None else {"kv_written": True}
        out = mixer.attend(q, k, v, attn_name, **attn_kwargs, **written)
        # out is a view where the op returns one ((B, Hq, 1, D) of the paged decode kernel's (B, Hq, D)): dynamo gives
        # its base sizes of their own, and a backed batch there was guarded >= 2, so that on the GPU a batch of 1
        # compiled attention_output again (final_project section 26)
        mark_batch(out, out._base)
        return self.compiled.output(self.layer, x, _static(out, 1, 3))  # (B, Hq, T, D)


class _WholeLayer:
    """A layer compiled whole (one compile for all such layers) when its mixer hands out its own part of the cache
    for the step (decode_cache); otherwise run eagerly."""

    def __init__(self, layer, compiled):
        self.layer, self.compiled = layer, compiled

    def __call__(self, x, position_ids, attn_name=None, cache=None, meta=None):
        part = self.layer.mixer.decode_cache(cache, meta)
        if part is None:
            return self.layer(x, position_ids, attn_name=attn_name, cache=cache, meta=meta)
        _static(x, 2)  # (B, T, E): see _SplitLayer
        mark_batch(x, position_ids, meta.state_slots, meta.num_new_tokens)
        # the layer index (an int attribute of the mixer) a symbol, not a constant: one trace for all such layers
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return self.compiled.whole(self.layer, x, position_ids, attn_name, part, meta)


_unbacked_hint: list = []  # inside unbacked_batch(hint): [hint], and mark_batch marks
# inductor sizes its kernels for an unbacked symbol by a hint (config.unbacked_symint_fallback, 8192, without one)
_HINTS_UNBACKED = "hint_override" in inspect.signature(torch._dynamo.decorators.mark_unbacked).parameters


@contextlib.contextmanager
def unbacked_batch(hint: int):
    """A context for tracing decode steps: within it, mark_batch makes the batch dimension of the step's tensors an
    unbacked symbol, on which dynamo and inductor add no guard. A backed symbol (torch.compile's dynamic=True) is
    specialized at size 1 and, under torch.fx's backed_size_oblivious, guarded >= 2 by inductor's lowering: either
    way a batch of 1 traced and compiled the whole step a second time (1.3-5.7 s of the 1B's start-up and four
    recompiles of Granite-4.0-H's on the H100, final_project section 25). With it, one trace serves every batch
    size, 1 included. The model's own sizes stay static (_static) and the token count of a decode step, 1, is
    specialized as before (the projections' fms::gemv op needs the constant: fms.triton.gemv.one_token_rows).
    hint: the batch size inductor tunes its kernels for (the backed symbol's was the first trace's size: the
    largest captured bucket), where this torch takes one (mark_unbacked's hint_override)."""
    _unbacked_hint.append(hint)
    try:
        yield
    finally:
        _unbacked_hint.pop()


def mark_batch(*tensors) -> tuple:
    """Inside unbacked_batch(): each tensor's dim 0 (its batch) an unbacked symbol for the next compiled call it
    enters (None entries skipped); elsewhere nothing. -> the tensors. Every batch-sized input of a compiled frame
    needs it (views included: dynamo gives a view's base a symbol of its own), or that input's size alone
    specializes at 1."""
    if _unbacked_hint:
        hint = {"hint_override": _unbacked_hint[-1]} if _HINTS_UNBACKED else {}
        for t in tensors:
            if t is not None:
                torch._dynamo.decorators.mark_unbacked(t, 0, **hint)
    return tensors


def same_batch(first: torch.Tensor, *others) -> None:
    """Each tensor's dim 0 equals first's (None entries skipped). Traced, it tells the compiler that the unbacked batch
    symbols mark_batch gave each input are one symbol (a runtime assertion in the graph): without it a check such as
    "residual has the output's shape" cannot be decided and breaks the graph."""
    for t in others:
        if t is not None:
            torch._check(t.shape[0] == first.shape[0])  # no message: dynamo cannot trace its closure


def _static(t: torch.Tensor, *dims: int) -> torch.Tensor:
    for dim in dims:
        torch._dynamo.mark_static(t, dim)
    return t


def compiled_scope(model, scope: str) -> str:
    """The scope compile_forward(model, scope) compiles: "layers" becomes "model" for a model whose layers cannot be
    compiled one for all (why_no_layer_scope)."""
    check_compile_scope(scope)
    return "model" if scope == "layers" and why_no_layer_scope(model) is not None else scope


def compile_forward(model, scope: str = "model", backend: str = "inductor", options: dict | None = None):
    """A callable like model(input_ids, **kwargs), compiled with dynamic shapes over the given scope."""
    if compiled_scope(model, scope) != scope:
        logger.warning("compiling the whole model instead of one layer for all: %s", why_no_layer_scope(model))
        scope = "model"
    if scope == "model":
        return torch.compile(model, dynamic=True, backend=backend, options=options)
    compiled = SimpleNamespace(**{name: torch.compile(fn, dynamic=True, backend=backend, options=options) for name, fn
                                  in (("inputs", _attention_inputs), ("output", _attention_output),
                                      ("whole", _whole_layer))})
    layers = [_layer_runner(layer, model.layer_type(i))[0](layer, compiled) for i, layer in enumerate(model.layers)]

    def forward(*args, **kwargs):
        # No duck sizing: dynamo would otherwise tie sizes that are equal in the first trace (a batch of 128 and a
        # head_dim of 128, in a view's base that _static cannot reach) and recompile when they differ.
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return model(*args, layers=layers, **kwargs)

    return forward
