"""What Triton compiles a kernel for: a launch's key, computed on any machine, for tests that count the variants a
decode step compiles across its CUDA-graph batch sizes (each variant is a compile at engine start-up).

Triton compiles one binary per distinct key: the constexpr values, num_warps / num_stages, each tensor's dtype and
whether its address is 16-byte aligned, and for each int argument not listed in the kernel's do_not_specialize
whether it equals 1 or is divisible by 16 (Triton's documented specialization; floats and bools only by type). The
recorder below stands in for a kernel object in its module, records the key of every launch and runs nothing.
"""

from __future__ import annotations

import inspect

import torch


def _constexpr_names(fn) -> set[str]:
    names = set()
    for name, param in inspect.signature(fn).parameters.items():
        annotation = param.annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
        if "constexpr" in str(text):
            names.add(name)
    return names


def _not_specialized(kernel, arg_names: list[str]) -> set[str]:
    """Names in the kernel's do_not_specialize: a JITFunction keeps them on its params, Triton's interpreter in the
    keyword arguments it was made with (names or positions)."""
    params = getattr(kernel, "params", None)
    if params is not None:
        return {p.name for p in params if p.do_not_specialize}
    listed = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    return {arg_names[x] if isinstance(x, int) else x for x in listed}


def launch_key(kernel, args: tuple, kwargs: dict) -> tuple:
    fn = kernel.fn
    signature = inspect.signature(fn)
    names = list(signature.parameters)
    constexprs = _constexpr_names(fn)
    skip = _not_specialized(kernel, names)
    bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
    key = []
    for name in names:
        value = bound.arguments.get(name, signature.parameters[name].default)
        if name in constexprs:
            key.append((name, value))
        elif isinstance(value, torch.Tensor):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or isinstance(value, float) or value is None:
            key.append((name, type(value).__name__))
        elif isinstance(value, int):
            key.append((name, "int") if name in skip else (name, "int", value == 1, value % 16 == 0))
        else:
            key.append((name, type(value).__name__))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in signature.parameters))
    return tuple(key) + options


class LaunchRecorder:
    """Stands in for `kernel` (monkeypatch it into the kernel's module): kernel[grid](...) records the launch's key
    and computes nothing."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.keys: list[tuple] = []
        self.launches: list[tuple] = []  # (grid, args, kwargs) of each launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.keys.append(launch_key(self.kernel, args, kwargs))
            self.launches.append((grid, args, kwargs))

        return launch

    @property
    def variants(self) -> set[tuple]:
        return set(self.keys)
