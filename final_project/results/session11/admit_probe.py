"""Session 11 (docs/serving.md): cost of admitting one streaming /v1/completions request in the HTTP process (ASGI app driven directly, no socket),
with a stub engine client that accepts and never answers. Prints us per request, and with any argument a
cProfile of the same 512 requests. Run from the repository root: PYTHONPATH=. python final_project/results/session11/admit_probe.py prof"""
import asyncio, cProfile, json, pstats, random, sys, time
from fms.entrypoints.openai.server import build_app, make_client_state
from fms.entrypoints.async_engine import RequestStream

class Stub:
    tokenizer = None
    vocab_size = 128256
    max_model_len = 4096
    is_accepting = True
    failure = None
    stats = {}
    def __init__(self): self.n = 0
    def submit(self, ids, params):
        self.n += 1
        return RequestStream(self.n, len(ids), self)
    def abort(self, rid): pass

state = make_client_state(Stub(), None, "m")
app = build_app(state)
rng = random.Random(0)
bodies = [json.dumps({"model": "m", "prompt": [rng.randrange(100, 128000) for _ in range(rng.randint(64, 512))],
                      "max_tokens": 256, "temperature": 0.0, "stream": True,
                      "stream_options": {"include_usage": True}, "ignore_eos": True}).encode() for _ in range(128)]

async def one(body):
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
    started = asyncio.get_running_loop().create_future()
    sent = [False]
    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
    async def send(msg):
        if msg["type"] == "http.response.start" and not started.done():
            started.set_result(msg["status"])
    task = asyncio.create_task(app(scope, receive, send))
    status = await started
    task.cancel()
    return status

async def main(n):
    for b in bodies[:8]:
        await one(b)
    t = time.perf_counter()
    for i in range(n):
        await one(bodies[i % 128])
    return (time.perf_counter() - t) / n

n = 512
print("us per request", round(1e6 * asyncio.run(main(n)), 1))
if len(sys.argv) > 1:
    cProfile.run("asyncio.run(main(n))", "/tmp/admit.prof")
    pstats.Stats("/tmp/admit.prof").sort_stats("cumulative").print_stats(35)
