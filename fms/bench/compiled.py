"""A model whose forward runs through torch.compile, falling back to eager, and the scoped dynamo limits a sweep needs."""

import contextlib

import torch


def recompile_limits(enabled: bool, limit: int = 256):
    """A context in which dynamo may recompile a function up to `limit` times (nothing changes when not enabled).

    Why: every sweep point is a new shape for the compiled FlexAttention (dynamic=False) and for a
    compiled forward. Past dynamo's recompile limit (8 by default) a function silently runs eagerly,
    and eager FlexAttention on a GPU is far slower: the later points would measure that instead.
    The setting is patched for the benchmark's run only (torch._dynamo.config.patch), not globally.
    """
    if not enabled:
        return contextlib.nullcontext()
    import torch._dynamo

    config = torch._dynamo.config
    wanted = {"recompile_limit": limit, "accumulated_recompile_limit": 4 * limit}
    return config.patch(**{k: max(getattr(config, k), v) for k, v in wanted.items() if hasattr(config, k)})


class CompiledModel:
    """Calls the model through torch.compile(model.forward) and stands in for the model everywhere else.

    The model itself is not modified: generate() is handed this object, whose attribute reads
    (config, cache_spec, embedding, ...) go to the model. When compilation fails it records the
    error and calls the eager model from then on. dynamic=None (dynamo's default): a size is static
    until a call changes it, then that dim becomes symbolic (one recompile per new batch or pool size,
    not one per step); size 1 is always specialized. scope "decode" compiles only one-token steps
    (prefill eager, as gpt-fast compiles only its decode step). Counts the graphs dynamo compiles per
    (backend, step kind) and the graph breaks.
    """

    def __init__(self, model, enabled: bool, backend: str = "inductor", scope: str = "all"):
        self.model = model
        self.requested = enabled
        self.backend = backend
        self.scope = scope
        self.active = False
        self.error = None
        self.fell_back_at = None
        self.graphs: dict[str, dict[str, int]] = {}
        self._compiled = None
        self._breaks_before = {}
        if enabled:
            try:
                from torch._dynamo.utils import counters

                self._breaks_before = dict(counters["graph_break"])
                self._compiled = torch.compile(model.forward, backend=backend)
                self.active = True
            except Exception as exc:  # noqa: BLE001
                self.fail(exc)

    def __getattr__(self, name):
        if name == "model":  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    @property
    def target(self):
        """What to run: this object while compiled, else the plain model."""
        return self if self.active else self.model

    def __call__(self, input_ids, *args, **kwargs):
        if not self.active or (self.scope == "decode" and input_ids.shape[1] != 1):
            return self.model(input_ids, *args, **kwargs)
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        out = self._compiled(input_ids, *args, **kwargs)
        new = counters["stats"]["unique_graphs"] - before
        if new:
            backend = kwargs.get("attn_name") or self.model.attn_name
            kind = "decode" if input_ids.shape[1] == 1 else "prefill"  # one token per row, or several
            per_kind = self.graphs.setdefault(backend, {"prefill": 0, "decode": 0})
            per_kind[kind] += new
        return out

    def fail(self, exc, where: str | None = None) -> None:
        self.error = f"{type(exc).__name__}: {exc}"[:2000]
        self.fell_back_at = where
        print(f"torch.compile failed{f' at {where}' if where else ''} ({self.error.splitlines()[0][:300]}); "
              "continuing in eager mode")
        self.active = False

    def run(self, fn, where: str | None = None):
        """fn(), and once more in eager mode if it fails while the forward is compiled."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a compiled forward may fail on a new shape
            if not self.active:
                raise
            self.fail(exc, where)
            return fn()

    def summary(self) -> dict:
        """What results.json records: whether the runs were compiled, and how often dynamo compiled."""
        from torch._dynamo.utils import counters

        breaks = {reason.splitlines()[0][:300]: n - self._breaks_before.get(reason, 0)
                  for reason, n in counters["graph_break"].items() if n > self._breaks_before.get(reason, 0)}
        requested = self.requested
        return {
            "requested": requested,
            "active": self.active,  # still compiled at the end
            "fell_back_to_eager": requested and not self.active,
            "fell_back_at": self.fell_back_at,
            "error": self.error,
            "mode": f"torch.compile(model.forward, backend={self.backend!r}), dynamic=None" if requested else None,
            "scope": self.scope if requested else None,  # all steps, or decode steps only
            "graphs": self.graphs,  # backend -> {"prefill": n, "decode": n} graphs compiled
            "graph_breaks": breaks,
        }
