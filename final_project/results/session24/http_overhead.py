"""The HTTP path alone, on the CPU: `fms bench serve`'s client against (a) a bare ASGI app that streams 16 events of
16 tokens per request on a 40 ms clock (a 1B decode window on the GPU), and (b) fms serve's app (build_app) over a
stub engine that emits the same deltas to every live request on the same clock, text left to the HTTP process's
detokenizer as in the benchmark. 128 requests of 64-512 random token ids, all at t=0, 6 runs each, alternated.
The ideal run is 16 x 40 = 640 ms; (a) - ideal is the client's and uvicorn's cost, (b) - (a) is fms's app.

    PYTHONPATH=. python final_project/results/session24/http_overhead.py OUT.json
"""
import asyncio
import itertools
import json
import multiprocessing as mp
import random
import statistics
import sys
import time

WINDOW_S, WINDOWS, TOKENS = 0.04, 16, 16


def bare_app():
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for k in range(1, WINDOWS + 1):
            await asyncio.sleep(max(0.0, t0 + WINDOW_S * k - loop.time()))
            chunk = {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [
                {"index": 0, "text": " t1" * TOKENS, "logprobs": None, "finish_reason": None, "stop_reason": None}]}
            await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                        "more_body": True})
        usage = {"id": "x", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": WINDOWS * TOKENS}}
        await send({"type": "http.response.body", "body": f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()})
    return app


def fms_app():
    from fms.entrypoints.async_engine import Delta, RequestStream
    from fms.entrypoints.openai.server import build_app, make_client_state
    from fms.utils.tokenizers import get_tokenizer

    class StubEngine:
        vocab_size, max_model_len, is_accepting, failure, stats = 2048, 4096, True, None, {}

        def __init__(self, tokenizer):
            self.tokenizer, self.ids, self.live, self.ticker = tokenizer, itertools.count(), {}, None

        def submit(self, ids, params):
            stream = RequestStream(next(self.ids), len(ids), self, ids[-8:])
            self.live[stream.request_id] = [stream, 0]
            if self.ticker is None or self.ticker.done():
                self.ticker = asyncio.get_running_loop().create_task(self.tick())
            return stream

        def abort(self, request_id):
            self.live.pop(request_id, None)

        async def tick(self):  # windows on the engine's clock: a busy event loop does not slow the engine
            loop = asyncio.get_running_loop()
            t0, k = loop.time(), 0
            while self.live:
                k += 1
                await asyncio.sleep(max(0.0, t0 + WINDOW_S * k - loop.time()))
                for request_id, entry in list(self.live.items()):
                    entry[1] += TOKENS
                    done = entry[1] >= WINDOWS * TOKENS
                    entry[0]._queue.put_nowait(Delta(list(ids), None, finished=done,
                                                     finish_reason="length" if done else None,
                                                     num_prompt_tokens=entry[0].num_prompt_tokens,
                                                     num_output_tokens=entry[1]))
                    if done:
                        self.live.pop(request_id)

    tokenizer = get_tokenizer(None)
    ids = tokenizer.encode(" the quick brown fox jumps over the lazy dog and runs", add_bos=False)[:TOKENS]  # real text
    return build_app(make_client_state(StubEngine(tokenizer), tokenizer, "m"))


def serve(which: str, port: int):
    import uvicorn

    uvicorn.run(bare_app() if which == "bare" else fms_app(), host="127.0.0.1", port=port, log_level="warning")


def main(out: str):
    from fms.entrypoints.bench_serve import BenchRequest, run_load

    rng = random.Random(0)
    requests = [BenchRequest([rng.randrange(4, 2000) for _ in range(n)], n, WINDOWS * TOKENS)
                for n in (rng.randint(64, 512) for _ in range(128))]
    servers = {name: mp.get_context("spawn").Process(target=serve, args=(name, port), daemon=True)
               for name, port in (("bare", 8791), ("fms", 8792))}
    for p in servers.values():
        p.start()
    time.sleep(5)
    ports = {"bare": 8791, "fms": 8792}
    runs = {name: [] for name in servers}
    try:
        for name in servers:  # warm-up
            asyncio.run(run_load(f"http://127.0.0.1:{ports[name]}", "m", requests[:8], float("inf"), None, 0,
                                 progress=False))
        for _ in range(6):
            for name in servers:
                results, duration = asyncio.run(run_load(f"http://127.0.0.1:{ports[name]}", "m", requests,
                                                         float("inf"), None, 0, progress=False))
                assert all(r.ok for r in results), name
                runs[name].append(duration * 1e3)
    finally:
        for p in servers.values():
            p.terminate()
    report = {"command": " ".join(["python", *sys.argv]), "ideal_ms": WINDOW_S * WINDOWS * 1e3, "runs_ms": runs,
              "median_ms": {k: statistics.median(v) for k, v in runs.items()}}
    print(json.dumps(report["median_ms"]), runs)
    json.dump(report, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
