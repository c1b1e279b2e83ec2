"""`fms bench serve`: a load generator against a running OpenAI-compatible server (like `vllm bench serve`).

Requests arrive at a Poisson rate (or all at once, rate inf), optionally capped at --max-concurrency, each
streaming /v1/completions. Prompts are random token ids of random lengths (exact lengths, no tokenizer
needed) or the turns of a ShareGPT-style JSON file. Reported: request and token throughput, TTFT, TPOT,
ITL and end-to-end latency percentiles, and goodput (requests per second that met every --goodput SLO).

    fms bench serve --port 8000 --num-prompts 128 --random-input-len 256 --random-output-len 128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fms.bench.commit import git_commit
from fms.entrypoints.heap import frozen_heap

DEFAULT_PERCENTILES = (50, 90, 99)


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    # seconds from the run's start until the response's headers came: the server had admitted the request and
    # handed it to the engine (fms serve answers the headers right after), so their spread is the admission's
    admitted: float | None = None

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int, low_token: int = 4) -> list[BenchRequest]:
    """num prompts of random token ids; lengths uniform in [len * (1 - r), len * (1 + r)] (vLLM's random set).
    Ids below low_token (special tokens of the shipped tokenizer) are never drawn."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)

    def length(n):
        return rng.randint(max(1, int(n * (1 - range_ratio))), max(1, int(n * (1 + range_ratio))))

    requests = []
    for _ in range(num):
        n_in, n_out = length(input_len), length(output_len)
        ids = [rng.randrange(low_token, vocab_size) for _ in range(n_in)]
        requests.append(BenchRequest(ids, n_in, n_out))
    return requests


def sharegpt_requests(path: Path, num: int, tokenizer, seed: int, output_len: int | None = None,
                      max_len: int = 2048) -> list[BenchRequest]:
    """Human turn -> prompt, the reply's token count -> output length (vLLM's ShareGPT sampling)."""
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    requests = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if isinstance(item, dict) and "prompt" in item:
            prompt, reply = item["prompt"], item.get("completion", "")
        elif len(turns) >= 2:
            prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        else:
            continue
        n_in = len(tokenizer.encode(prompt))
        n_out = output_len or len(tokenizer.encode(reply, add_bos=False))
        if n_in < 4 or n_out < 4 or n_in + n_out > max_len:
            continue
        requests.append(BenchRequest(prompt, n_in, n_out))
        if len(requests) == num:
            break
    if not requests:
        raise ValueError(f"{path} holds no usable conversations (prompt + reply of 4..{max_len} tokens)")
    return requests


def _body(model: str, request: BenchRequest, ignore_eos: bool) -> bytes:
    """The request's JSON body (a streaming /v1/completions call), encoded before the run starts: the load
    generator's own serialization is not the server's time."""
    return json.dumps({"model": model, "prompt": request.prompt, "max_tokens": request.output_len,
                       "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
                       "ignore_eos": ignore_eos}).encode()


JSON_HEADERS = {"Content-Type": "application/json"}


async def _one(session, url: str, body: bytes, request: BenchRequest, timeout_s: float, run_start: float):
    import aiohttp

    result = RequestResult(prompt_len=request.prompt_len)
    start = time.perf_counter()
    last = start
    try:
        async with session.post(url, data=body, headers=JSON_HEADERS,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            result.admitted = time.perf_counter() - run_start
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
        result.latency = time.perf_counter() - start
        result.ok = result.output_len > 0
        if not result.ok:
            result.error = "no tokens came back"
    except Exception as e:  # a refused connection, a timeout: counted as failed, the run goes on
        result.error = f"{type(e).__name__}: {e}"
    return result


def _percentiles(values: list[float], percentiles, prefix: str) -> dict:
    out = {}
    if not values:
        return {f"mean_{prefix}_ms": None, f"median_{prefix}_ms": None,
                **{f"p{p}_{prefix}_ms": None for p in percentiles}}
    ordered = sorted(values)

    def pick(q):
        k = (len(ordered) - 1) * q / 100
        lo, hi = math.floor(k), math.ceil(k)
        return (ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)) * 1000

    out[f"mean_{prefix}_ms"] = sum(ordered) / len(ordered) * 1000
    out[f"median_{prefix}_ms"] = pick(50)
    for p in percentiles:
        out[f"p{p}_{prefix}_ms"] = pick(p)
    return out


def summarize(results: list[RequestResult], duration_s: float, percentiles=DEFAULT_PERCENTILES,
              goodput: dict[str, float] | None = None) -> dict:
    ok = [r for r in results if r.ok]
    num_in = sum(r.prompt_len for r in ok)
    num_out = sum(r.output_len for r in ok)
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration_s,
        "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration_s if duration_s else 0.0,
        "output_throughput": num_out / duration_s if duration_s else 0.0,
        "total_token_throughput": (num_in + num_out) / duration_s if duration_s else 0.0,
    }
    summary.update(_percentiles([r.ttft for r in ok], percentiles, "ttft"))
    summary.update(_percentiles([r.tpot for r in ok if r.tpot is not None], percentiles, "tpot"))
    summary.update(_percentiles([g for r in ok for g in r.itl], percentiles, "itl"))
    summary.update(_percentiles([r.latency for r in ok], percentiles, "e2el"))
    admitted = [r.admitted for r in ok if r.admitted is not None]
    summary.update(_percentiles(admitted, percentiles, "admitted"))  # response headers, from the run's start
    summary["max_admitted_ms"] = max(admitted) * 1000 if admitted else None
    if goodput:
        def meets(r):
            values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
            return all(values[k] * 1000 <= limit for k, limit in goodput.items())

        summary["goodput_slo_ms"] = dict(goodput)
        summary["request_goodput"] = sum(meets(r) for r in ok) / duration_s if duration_s else 0.0
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        summary["errors"] = errors[:10]
    return summary


async def run_load(base_url: str, model: str, requests: list[BenchRequest], request_rate: float,
                   max_concurrency: int | None, seed: int, ignore_eos: bool = True, timeout_s: float = 600.0,
                   progress: bool = True, window: dict | None = None,
                   session=None) -> tuple[list[RequestResult], float]:
    """Send every request (Poisson arrivals at request_rate per second; inf: all at once); -> results, seconds.
    window, when given, gets the run's "start" and "end" (time.perf_counter(), to set beside a server's trace).
    session: an aiohttp.ClientSession to send on, with the connections it holds (open_connections); by default
    one of the run's own, which opens a connection per request inside the timed run."""
    from tqdm.auto import tqdm

    url = base_url.rstrip("/") + "/v1/completions"
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress, dynamic_ncols=True)
    bodies = [_body(model, request, ignore_eos) for request in requests]

    async with contextlib.nullcontext(session) if session is not None else new_session() as session:
        async def send(request, body):
            if limit is None:
                result = await _one(session, url, body, request, timeout_s, start)
            else:
                async with limit:
                    result = await _one(session, url, body, request, timeout_s, start)
            bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for request, body in zip(requests, bodies):
            tasks.append(asyncio.create_task(send(request, body)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        end = time.perf_counter()
        duration = end - start
        if window is not None:
            window.update(start=start, end=end)
    bar.close()
    return list(results), duration


def new_session():
    """An aiohttp.ClientSession with no client-side cap on connections (--max-concurrency is the only one)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def open_connections(session, base_url: str, n: int) -> None:
    """Open up to n keep-alive connections in session's pool (n GET /health at once), so that a burst sent next
    finds them open, as a long-running client's pool would be: a burst on fresh connections spends its first
    tens of milliseconds on connecting (measured on the CPU: the first of 128 requests reached a bare ASGI server
    42-69 ms after the run's start on fresh connections, 16-20 ms on open ones)."""
    import aiohttp

    async def get():
        async with session.get(base_url.rstrip("/") + "/health", timeout=aiohttp.ClientTimeout(total=30)) as r:
            await r.read()

    await asyncio.gather(*(get() for _ in range(n)))


async def _server_model(base_url: str) -> tuple[str, int | None]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(base_url.rstrip("/") + "/v1/models", timeout=aiohttp.ClientTimeout(total=30)) as r:
            data = (await r.json())["data"][0]
            return data["id"], data.get("max_model_len")


def _commit() -> str | None:
    """fms.bench.commit.git_commit beside this file (FMS_GIT_COMMIT, a clean tree's COMMIT file, or git); None when
    none answers."""
    commit = git_commit(cwd=Path(__file__).resolve().parent)
    return None if commit == "unknown" else commit


def _parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        name, _, value = item.partition(":")
        if name not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes NAME:MS with NAME one of ttft, tpot, e2el; got {item!r}")
        slos[name] = float(value)
    return slos


def plot(results: list[RequestResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, values, title in ((axes[0], [r.ttft * 1000 for r in ok], "TTFT (ms)"),
                              (axes[1], [r.tpot * 1000 for r in ok if r.tpot is not None], "TPOT (ms)"),
                              (axes[2], [r.latency for r in ok], "end-to-end latency (s)")):
        ax.hist(values, bins=30)
        ax.set_title(title)
        ax.set_ylabel("requests")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="served model name (default: the server's, from /v1/models)")
    p.add_argument("--dataset-name", default="random", choices=["random", "sharegpt"])
    p.add_argument("--dataset-path", type=Path, default=None, help="ShareGPT-style JSON for --dataset-name sharegpt")
    p.add_argument("--tokenizer", default=None, help="for ShareGPT lengths (default: the shipped tokenizer)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random token ids are drawn below this (default: 2048, the shipped tokenizer's)")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: fixed output lengths)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile-metrics-percentiles", "--metric-percentiles", dest="metric_percentiles",
                   default="50,90,99", help="comma list of percentiles to report")
    p.add_argument("--goodput", nargs="*", default=None, metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:10000")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--warmup-prompts", type=int, default=0, help="untimed requests sent first (compiles, graphs)")
    p.add_argument("--result-dir", type=Path, default=None, help="write bench_serve.json (and a plot) here")
    p.add_argument("--result-filename", default="bench_serve.json")
    p.add_argument("--plot", action="store_true", help="with --result-dir: latency histograms as PNG")
    p.add_argument("--no-progress", action="store_true")


def run_from_args(args, argv: list[str] | None = None) -> dict:
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    percentiles = tuple(float(x) if "." in x else int(x) for x in args.metric_percentiles.split(",") if x)
    goodput = _parse_goodput(args.goodput)
    model, max_model_len = (args.model, None)
    if model is None:
        model, max_model_len = asyncio.run(_server_model(base_url))
    if args.dataset_name == "sharegpt":
        if args.dataset_path is None:
            raise ValueError("--dataset-name sharegpt needs --dataset-path FILE")
        from fms.utils.tokenizers import get_tokenizer

        requests = sharegpt_requests(args.dataset_path, args.num_prompts, get_tokenizer(args.tokenizer), args.seed,
                                     args.sharegpt_output_len, max_model_len or 2048)
    else:
        requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                   args.random_range_ratio, args.vocab_size or 2048, args.seed)
    if args.warmup_prompts:
        warm = random_requests(args.warmup_prompts, args.random_input_len, min(args.random_output_len, 16), 0.0,
                               args.vocab_size or 2048, args.seed + 1)
        asyncio.run(run_load(base_url, model, warm, float("inf"), args.max_concurrency, args.seed, args.ignore_eos,
                             args.request_timeout, progress=False))
    with frozen_heap():  # no full collection of the start-up heap pauses the load it sends (fms.entrypoints.heap)
        results, duration = asyncio.run(run_load(base_url, model, requests, args.request_rate, args.max_concurrency,
                                                 args.seed, args.ignore_eos, args.request_timeout,
                                                 progress=not args.no_progress))
    summary = summarize(results, duration, percentiles, goodput)
    report = {
        "command": " ".join(shlex.quote(a) for a in ["fms", "bench", "serve", *(argv or [])]),
        "commit": _commit(), "base_url": base_url, "model": model, "dataset": args.dataset_name,
        "num_prompts": len(requests), "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "ignore_eos": args.ignore_eos, "seed": args.seed, **summary,
    }
    print_summary(report)
    if args.result_dir is not None:
        args.result_dir.mkdir(parents=True, exist_ok=True)
        out = args.result_dir / args.result_filename
        report["per_request"] = [asdict(r) for r in results]
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
        if args.plot:
            plot(results, out.with_suffix(".png"))
            print(f"wrote {out.with_suffix('.png')}")
    return report


def print_summary(report: dict) -> None:
    def fmt(v):
        return "n/a" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))

    print("=" * 20 + " serving benchmark " + "=" * 20)
    for key in ("completed", "failed", "duration_s", "total_input_tokens", "total_output_tokens",
                "request_throughput", "output_throughput", "total_token_throughput", "request_goodput"):
        if key in report:
            print(f"{key:<34}{fmt(report[key]):>20}")
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for key, value in report.items():
            if key.endswith(f"_{metric}_ms"):
                print(f"{key:<34}{fmt(value):>20}")
    for error in report.get("errors", []):
        print(f"error: {error}", file=sys.stderr)
