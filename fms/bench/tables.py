"""Markdown tables of benchmark results: sweep points, backends side by side, mixed workload, peers."""


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _mb(v):
    return None if v is None else v / 1e6


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def points_table(points) -> str:
    header = ["sweep", "backend", "batch", "context", "new", "prefill ms", "decode ms/tok", "e2e ms", "req/s",
              "in tok/s", "out tok/s", "peak alloc GB", "peak resv GB", "KV alloc MB", "KV in use MB",
              "KV tokens MB", "= generate", "limit tok/s", "% of limit"]
    rows = [[p["sweep"], p["backend"], p["batch_size"], p["context_len"], p["max_new_tokens"], p["prefill_ms"],
             p["decode_ms_per_token"], p["e2e_latency_ms"], p["requests_per_s"], p["input_tokens_per_s"],
             p["output_tokens_per_s"], p["peak_gpu_mem_allocated_gb"], p["peak_gpu_mem_reserved_gb"],
             _mb(p["kv_bytes_allocated"]), _mb(p["kv_bytes_in_use"]), _mb(p["kv_bytes_holding_tokens"]),
             p["generate_agreement"], p.get("limit_tok_s"), p.get("pct_of_limit")] for p in points]
    return markdown_table(header, rows)


def side_by_side_tables(points, backends) -> str:
    """Seed-report layout: one row per sweep value, each backend's figures side by side."""
    out = []
    for sweep, key, label in (("batch", "batch_size", "Batch Size"), ("context", "context_len", "Context Length")):
        chosen = [p for p in points if sweep in p["sweep"].split("+")]
        if not chosen:
            continue
        header = [label]
        for b in backends:
            header += [f"{b} latency ms", f"{b} QPS", f"{b} ms/token", f"{b} peak GB"]
        rows = []
        for value in sorted({p[key] for p in chosen}):
            row = [value]
            for b in backends:
                p = next((q for q in chosen if q[key] == value and q["backend"] == b), None)
                row += [None] * 4 if p is None else [p["e2e_latency_ms"], p["requests_per_s"],
                                                     p["decode_ms_per_token"], p["peak_gpu_mem_allocated_gb"]]
            rows.append(row)
        out.append(f"{sweep} sweep\n" + markdown_table(header, rows))
    return "\n\n".join(out)


def mixed_tables(mixed: dict) -> str:
    runs = mixed["runs"]
    header = ["backend", "requests", "e2e ms", "out tok/s", "KV alloc MB", "KV in use MB", "KV tokens MB",
              "KV waste", "peak alloc GB"]
    rows = [[r["backend"], r["num_requests"], r["e2e_latency_ms"], r["output_tokens_per_s"],
             _mb(r["kv_bytes_allocated"]), _mb(r["kv_bytes_in_use"]), _mb(r["kv_bytes_holding_tokens"]),
             r["kv_waste_fraction"], r["peak_gpu_mem_allocated_gb"]] for r in runs]
    cap = mixed["capacity"]
    cap_header = ["backend", "KV budget GB", "largest batch", "KV bytes needed MB", "rule", "verified"]
    cap_rows = [[c["backend"], c["budget_gb"], c["largest_batch"], _mb(c["kv_bytes_needed"]), c["rule"],
                 _verify_label(c.get("verify"))] for c in cap]
    return (markdown_table(header, rows) + "\n\nlargest batch within the KV budget (computed from measured "
            "per-row / per-page sizes)\n" + markdown_table(cap_header, cap_rows))


def _verify_label(v):
    if v is None:
        return "not run"
    return "yes" if v.get("ok") else f"NO {v}"


def peers_table(peers) -> str:
    header = ["peer", "batch", "context", "new", "e2e ms", "out tok/s", "peak alloc GB", "attn", "= fms", "error"]
    rows = [[p["peer"], p["batch_size"], p["context_len"], p["max_new_tokens"], p.get("e2e_latency_ms"),
             p.get("output_tokens_per_s"), p.get("peak_gpu_mem_allocated_gb"), p.get("attn_implementation") or "-",
             p.get("tokens_match_fms"), p.get("error") or ""] for p in peers]
    return markdown_table(header, rows)


