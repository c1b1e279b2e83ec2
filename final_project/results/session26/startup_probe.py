"""Where an engine's cold start goes (session 26): get_model + LLMEngine in this process, fresh compile caches
expected from the caller, under cProfile, with every Triton JIT compile of a @triton.jit kernel (fms's own kernels;
inductor's are compiled in its worker processes) timed by name and specialization.

usage: python startup_probe.py MODEL_SPEC OUT_PREFIX [--no-profile]   (MODEL_SPEC as bench_startup.py --models takes it)
--no-profile: no cProfile (it slows dynamo's Python several-fold and cannot follow dynamo's frames); the JSON then
holds dynamo's own per-phase compile times (torch._dynamo.utils.compile_times).
Writes OUT_PREFIX.json (phases, compiles) and, when profiling, OUT_PREFIX_profile.txt (top functions by cumulative
and own time).
"""
import cProfile
import io
import json
import os
import pstats
import sys
import time

t_start = time.perf_counter()
import torch  # noqa: E402
import triton  # noqa: E402
from torch._inductor import config as inductor_config  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

compiles = []
_orig = JITFunction._do_compile


def _timed(self, *args, **kwargs):  # (key, signature, device, constexprs, options, attrs, warmup) in 3.6-3.9
    start = time.perf_counter()
    out = _orig(self, *args, **kwargs)
    compiles.append({"kernel": self.fn.__name__, "seconds": time.perf_counter() - start, "at_s": start - t_start,
                     "constexprs": repr(args[3] if len(args) > 3 else kwargs.get("constexprs"))[:300],
                     "signature": repr(args[1] if len(args) > 1 else kwargs.get("signature"))[:300]})
    return out


JITFunction._do_compile = _timed

from fms.bench.startup import parse_model  # noqa: E402
from fms.models import get_model  # noqa: E402
from fms.serving import LLMEngine, SamplingParams  # noqa: E402

spec, prefix = sys.argv[1], sys.argv[2]
arch, variant = parse_model(spec)
phases = {"import_s": time.perf_counter() - t_start}
t = time.perf_counter()
model = get_model(arch, variant, device_type="cuda", data_type="bfloat16", seed=0, init_on_device=True)
torch.cuda.synchronize()
phases["get_model_s"] = time.perf_counter() - t
profiler = None if "--no-profile" in sys.argv[3:] else cProfile.Profile()
t = time.perf_counter()
if profiler:
    profiler.enable()
engine = LLMEngine(model)
torch.cuda.synchronize()
if profiler:
    profiler.disable()
phases["engine_s"] = time.perf_counter() - t
n_engine = len(compiles)
t = time.perf_counter()
engine.generate([[1, 2, 3, 4] * 32], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
torch.cuda.synchronize()
phases["first_generate_s"] = time.perf_counter() - t
by_kernel = {}
for c in compiles[:n_engine]:
    k = by_kernel.setdefault(c["kernel"], {"count": 0, "seconds": 0.0})
    k["count"] += 1
    k["seconds"] += c["seconds"]
result = {"model": spec, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
          "triton": triton.__version__, "commit": os.environ.get("FMS_GIT_COMMIT"), "phases": phases,
          "engine_startup_s": dict(engine.startup_s),
          "graph_capture_s": engine.runner.decoder.capture_times(),
          "compile_threads": inductor_config.compile_threads, "cpu_count": os.cpu_count(),
          "jit_compiles_in_engine": n_engine,
          "jit_compile_seconds_in_engine": sum(k["seconds"] for k in by_kernel.values()),
          "jit_by_kernel": by_kernel, "jit_compiles": compiles}
try:
    from torch._dynamo.utils import compile_times
    result["dynamo_compile_times"] = compile_times(repr="str", aggregate=True)
except Exception as e:  # its signature moves between torch releases
    result["dynamo_compile_times"] = f"unavailable: {type(e).__name__}: {e}"
with open(prefix + ".json", "w") as f:
    json.dump(result, f, indent=1)
if profiler:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(40)
    with open(prefix + "_profile.txt", "w") as f:
        f.write(text.getvalue())
print(result["dynamo_compile_times"])
print(json.dumps({k: result[k] for k in ("phases", "engine_startup_s", "graph_capture_s", "jit_compiles_in_engine",
                                          "jit_compile_seconds_in_engine", "jit_by_kernel", "compile_threads")},
                 indent=1))
