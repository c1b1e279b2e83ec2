import gc, os, time
_t = {}
_log = open(f"/tmp/gcsite/gc_{os.getpid()}.log", "w", buffering=1)
def _cb(phase, info):
    if phase == "start":
        _t["s"] = time.perf_counter()
    elif info["generation"] >= 1:
        _log.write(f"{time.time():.3f} gen{info['generation']} {1e3 * (time.perf_counter() - _t['s']):.1f} ms collected {info['collected']}\n")
gc.callbacks.append(_cb)
