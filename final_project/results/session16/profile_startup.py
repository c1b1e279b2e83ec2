"""Where a cold LLMEngine start-up spends its time, on the GPU: cProfile of get_model and LLMEngine(model) in a
fresh process with empty inductor/Triton caches, plus dynamo's own compile-time table and each capture's seconds.
Usage: python profile_startup.py ARCH:VARIANT OUT_PREFIX [engine options as key=value ...]"""
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time

spec, prefix = sys.argv[1], sys.argv[2]
options = dict(kv.split("=", 1) for kv in sys.argv[3:])
cache = tempfile.mkdtemp(prefix="fms-prof-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
t0 = time.perf_counter()
import torch  # noqa: E402

from fms.models import get_model  # noqa: E402
from fms.serving import EngineConfig, LLMEngine  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
record = {"spec": spec, "options": options, "import_s": time.perf_counter() - t0}
arch, variant = spec.split(":")
prof = cProfile.Profile()
start = time.perf_counter()
prof.enable()
model = get_model(arch, variant, device_type=DEV, data_type=torch.bfloat16 if DEV == "cuda" else torch.float32, seed=0, init_on_device=True)
sync()
prof.disable()
record["get_model_s"] = time.perf_counter() - start
stream = io.StringIO()
pstats.Stats(prof, stream=stream).sort_stats("cumulative").print_stats(40)
open(f"{prefix}_get_model.txt", "w").write(stream.getvalue())
prof = cProfile.Profile()
start = time.perf_counter()
prof.enable()
engine = LLMEngine(model, config=EngineConfig(**{k: type(getattr(EngineConfig(), k))(v) for k, v in options.items()}))
sync()
prof.disable()
record["engine_s"] = time.perf_counter() - start
record["engine_phases_s"] = dict(engine.startup_s)
record["graph_capture_s"] = {f"{bs}/{m}": s for (bs, m), s in engine.runner.decoder.capture_s.items()}
for sort, n in (("cumulative", 120), ("tottime", 60)):
    stream = io.StringIO()
    pstats.Stats(prof, stream=stream).sort_stats(sort).print_stats(n)
    open(f"{prefix}_engine_{sort}.txt", "w").write(stream.getvalue())
prof.dump_stats(f"{prefix}_engine.pstats")
try:
    record["compile_times"] = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
except Exception as e:  # noqa: BLE001
    record["compile_times"] = f"unavailable: {e!r}"
json.dump(record, open(f"{prefix}.json", "w"), indent=2)
print(json.dumps({k: v for k, v in record.items() if k != "compile_times"}, indent=1))
print(record["compile_times"])
