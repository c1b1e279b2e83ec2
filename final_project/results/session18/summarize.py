"""Tables (markdown) of a session-18 device run's files, for the report: serving passes and batch-1, GEMV timings,
start-ups, fp32 eval, server vs offline. Reads every part folder given (the unpacked PART.tgz of run.sh).
Usage: python final_project/results/session18/summarize.py final_project/results/session18/{a,t,b,c,d}"""

import json
import sys
from pathlib import Path


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def serving(folders):
    rows = []
    for f in sorted(p for d in folders for p in Path(d).glob("serving_1b_*/serving.json")):
        d = json.loads(f.read_text())
        passes = [r for r in d["results"] if "batch-1" not in r["system"] and r["system"].startswith("fms")]
        one = [r for r in d["results"] if "batch-1" in r["system"]]
        meta = d["metadata"]
        rows.append([f.parent.name, meta.get("git_commit"), meta.get("env_switches", {}).get("FMS_GEMV"),
                     " / ".join(f"{r['output_tokens_per_s']:,.0f}" for r in passes),
                     f"{one[0]['output_tokens_per_s']:,.1f} ({one[0]['tpot_p50_ms']:.2f} ms)" if one else "-"])
    return table(["dir", "tree", "FMS_GEMV", "passes, output tok/s", "batch-1 tok/s (TPOT p50)"], rows) if rows else ""


def gemv(folders):
    rows = []
    for f in sorted(p for d in folders for p in Path(d).rglob("bench_gemv*.json")):
        for r in json.loads(f.read_text())["rows"]:
            fused = f"{r['fused_silu_mul_us']:.2f} / {r['silu_mul_then_cublas_us']:.2f}" if "fused_silu_mul_us" in r else "-"
            rows.append([f"{f.parent.name}/{f.name}", r["shape"], r["rows"], f"{r['cublas_us']:.2f}",
                         f"{r['triton_us']:.2f}", tuple(r["triton_best_cfg"]), fused])
    return table(["file", "shape", "rows", "cuBLAS us", "Triton us", "cfg", "fused SwiGLU / silu+cuBLAS us"],
                 rows) if rows else ""


def startup(folders):
    rows = []
    for f in sorted(p for d in folders for p in Path(d).glob("startup_*.json")):
        d = json.loads(f.read_text())
        for m in d["models"]:
            for run, r in m["runs"].items():
                ph = r.get("phases_s", {})
                dyn = r.get("dynamo", {})
                rows.append([f.name, m["model"], run, r["status"], f"{ph.get('get_model_s', 0):.1f}",
                             f"{ph.get('engine_s', 0):.1f}",
                             f"{dyn.get('graphs_traced')} / {len(dyn.get('recompiles') or [])}",
                             ", ".join(f"{k} {v:.1f}" for k, v in (r.get("graph_capture_s") or {}).items())])
    return table(["file", "model", "run", "status", "get_model s", "LLMEngine s", "graphs / recompiles",
                  "capture s"], rows) if rows else ""


def evals(folders):
    rows = []
    for f in sorted(p for d in folders for p in Path(d).glob("eval_fp32_*.json")):
        m = json.loads(f.read_text())["modes"]
        rows.append([f.name, f"{m['paged']['latency_ms'] / m['default']['latency_ms']:.3f}",
                     f"{m['default']['input_tokens']} / {m['paged']['input_tokens']}",
                     m["paged"].get("shared_context")])
    return table(["file", "paged / default", "input tokens default / paged", "shared"], rows) if rows else ""


def server(folders):
    rows = []
    for f in sorted(p for d in folders for p in Path(d).glob("server_vs_offline*.json")):
        d = json.loads(f.read_text())
        s, o = d["server"], d["offline"]
        rows.append([f.name, d.get("commit"), f"{d['server_over_offline']:.3f}",
                     " / ".join(f"{x:.3f}" for x in s["durations_s"]), " / ".join(f"{x:.3f}" for x in o["durations_s"]),
                     " / ".join(f"{x:.0f}" for x in s["client_mean_ttft_ms"])])
    return table(["file", "commit", "server / offline", "server passes s", "offline passes s", "client TTFT ms"],
                 rows) if rows else ""


if __name__ == "__main__":
    folders = sys.argv[1:] or ["."]
    for title, text in (("Serving", serving(folders)), ("GEMV", gemv(folders)), ("Start-up", startup(folders)),
                        ("fp32 eval", evals(folders)), ("Server vs offline", server(folders))):
        if text:
            print(f"### {title}\n\n{text}\n")
