"""Session 18, CPU: where a streaming request's first token waits in `fms serve` (engine process) on the CPU.
Starts `fms serve` from the tree given (the 1-layer checkpoint of scripts/bench_server_overhead.py), sends rounds
of N concurrent streaming /v1/completions (64-128 token ids, 128 new tokens, one aiohttp session as
`fms bench serve` does) and prints, per round, when the response headers, the first token and the end arrived
(ms after the round's first send; median / max over the requests).
With --pin: the engine process alone on CPU 1, the HTTP process and this client on CPU 0 (a host with cores to
spare, as the GPU's).
Usage: python ttft_probe.py TREE [ROUNDS] [N] [--pin]"""
import asyncio, json, os, random, socket, subprocess, sys, tempfile, time

pin = "--pin" in sys.argv
sys.argv = [a for a in sys.argv if a != "--pin"]
tree = os.path.abspath(sys.argv[1]); rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
n = int(sys.argv[3]) if len(sys.argv) > 3 else 128
sys.path.insert(0, tree); sys.path.insert(0, os.path.join(tree, "scripts"))
from bench_server_overhead import write_checkpoint  # noqa: E402
import aiohttp  # noqa: E402

folder = write_checkpoint(tempfile.mkdtemp(prefix="probe-"), 512, 0)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
env = {**os.environ, "PYTHONPATH": tree + os.environ.get("PROBE_EXTRA_PATH", ""), "OMP_NUM_THREADS": "1"}
server = subprocess.Popen([sys.executable, "-m", "fms.entrypoints.cli", "serve", folder, "--seed", "0", "--no-compile",
                           "--device", "cpu", "--dtype", "fp32", "--max-num-seqs", "128", "--max-model-len", "256",
                           "--port", str(port), "--max-waiting", "1024", "--log-level", "warning"], env=env, cwd=tree)
url = f"http://127.0.0.1:{port}"
rng = random.Random(0)
prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(64, 128))] for _ in range(n)]


async def one(session, prompt, t0):
    body = {"model": None, "prompt": prompt, "max_tokens": 128, "ignore_eos": True, "temperature": 0, "stream": True}
    async with session.post(url + "/v1/completions", json={k: v for k, v in body.items() if v is not None}) as r:
        headers = time.perf_counter() - t0
        first = None
        async for line in r.content:
            if line.startswith(b"data: {") and first is None:
                first = time.perf_counter() - t0
        return headers, first, time.perf_counter() - t0


def pin_processes():
    """The engine process (the server's child) on CPU 1; the server and this process on CPU 0."""
    children = subprocess.run(["pgrep", "-P", str(server.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        os.sched_setaffinity(int(pid), {1})
    os.sched_setaffinity(server.pid, {0})
    os.sched_setaffinity(0, {0})
    return children


async def main():
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(600):
            try:
                async with session.get(url + "/health") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        if pin:
            print("engine process(es) pinned:", pin_processes(), flush=True)
        for k in range(rounds + 1):
            print(f"round {k} starts at {time.time():.3f}", flush=True)
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(session, p, t0) for p in prompts))
            if k == 0:
                continue  # warm-up round
            cols = list(zip(*res))
            med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            print(f"round {k}: headers {1e3 * med(cols[0]):.0f} / {1e3 * max(cols[0]):.0f} ms, first token "
                  f"{1e3 * med(cols[1]):.0f} / {1e3 * max(cols[1]):.0f} ms, done {1e3 * med(cols[2]):.0f} / "
                  f"{1e3 * max(cols[2]):.0f} ms", flush=True)


try:
    asyncio.run(main())
finally:
    server.terminate(); server.wait(timeout=60)
