"""torch.compile of a model's forward: the whole model in one graph, or one decoder layer compiled once and
reused for every layer.

scope "model": dynamo traces every layer and inductor fuses across them; both take time in proportion to depth
(Llama-3.1-8B on the H200: 89 s for the first decode compile, 47 s of it again in a process that finds every
graph in inductor's cache, which cannot skip dynamo's tracing).
scope "layers": each layer is its own torch.compile of the same code, so dynamo traces a layer once (and once
more for the first layer of a forward, which computes the rotary cos/sin the others reuse) and inductor builds
one small graph. The attention op runs between the compiled pieces, outside the graphs (opaque_attention: the
layer index that picks its KV pool would otherwise be a constant of each layer's trace); the embedding, final
norm and LM head run eagerly. Fusions across those boundaries are lost.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

COMPILE_SCOPES = ("model", "layers")


def why_no_layer_scope(model) -> str | None:
    """Why this model cannot compile one layer for all, or None."""
    layers, layer_type = getattr(model, "layers", None), getattr(model, "layer_type", None)
    if layers is None or layer_type is None:
        return f"{type(model).__name__} has no decoder layers to compile one at a time"
    kinds = sorted({layer_type(i) for i in range(len(layers))})
    if kinds != ["attention"]:
        return f"its layers are of kinds {kinds}; only attention layers are compiled one for all"
    return None


def compile_forward(model, scope: str = "model", backend: str = "inductor", options: dict | None = None):
    """A callable like model(input_ids, **kwargs), compiled with dynamic shapes over the given scope."""
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {COMPILE_SCOPES}, got {scope!r}")
    if scope == "layers":
        why = why_no_layer_scope(model)
        if why is not None:
            logger.warning("compiling the whole model instead of one layer for all: %s", why)
            scope = "model"
    if scope == "model":
        return torch.compile(model, dynamic=True, backend=backend, options=options)
    layers = [torch.compile(layer, dynamic=True, backend=backend, options=options) for layer in model.layers]

    def forward(*args, **kwargs):
        # the layer index is an int attribute of each layer: a symbol, not a constant, so that one trace serves all
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return model(*args, layers=layers, opaque_attention=True, **kwargs)

    return forward
